"""The modern self-referential weight matrix (SRWM): the readable specification of `self_ref_v0`."""
import torch


def self_ref_v0_reference(x, W_y, W_q, W_k, w_b):
    """x: (B, H, L, D); W_y, W_q, W_k: (B, H, D, D); w_b: (B, H, D, 4). Returns (B, H, L, D).

    The matrix that produces the query, key and learning rates also updates itself, one delta step per matrix.
    """
    def read(vec, W):
        return torch.einsum("bhd,bhde->bhe", vec, W)

    weights = [W_y, W_q, W_k, w_b]
    outs = []
    for t in range(x.shape[2]):
        x_t = x[:, :, t]
        W_y, W_q, W_k, w_b = weights
        outs.append(read(x_t, W_y))  # the output uses the weights before this step's update
        q = torch.softmax(read(x_t, W_q), dim=-1)
        k = torch.softmax(read(x_t, W_k), dim=-1)
        b = torch.sigmoid(read(x_t, w_b))
        weights = [W + k[..., None] * (b[..., i, None] * (read(q, W) - read(k, W)))[:, :, None, :]
                   for i, W in enumerate(weights)]
    return torch.stack(outs, dim=2)
