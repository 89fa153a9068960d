"""Linear attention with the sum update rule: the readable specification of `fast_weight_sum`."""
import torch


def fast_weight_sum_reference(q, k, v, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); W0: (B, H, E, M). Returns (B, H, L, M).

    W_t = W_{t-1} + outer(k_t, v_t);  out_t = q_t @ W_t  (the query reads after the write).
    """
    W = W0
    outs = []
    for t in range(q.shape[2]):
        W = W + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhe,bhem->bhm", q[:, :, t], W))
    return torch.stack(outs, dim=2)
