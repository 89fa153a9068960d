"""The delta update rule (DeltaNet): the readable specification of `delta_net_fn`."""
import torch


def delta_net_reference(q, k, v, beta, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); beta: (B, H, L, 1); W0: (B, H, E, M). Returns (B, H, L, M).

    v_old = k_t @ W_{t-1};  W_t = W_{t-1} + outer(k_t, beta_t * (v_t - v_old));  out_t = q_t @ W_t.
    """
    W = W0
    outs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]
        v_old = torch.einsum("bhe,bhem->bhm", k_t, W)
        W = W + k_t[..., None] * (beta[:, :, t] * (v[:, :, t] - v_old))[:, :, None, :]
        outs.append(torch.einsum("bhe,bhem->bhm", q[:, :, t], W))
    return torch.stack(outs, dim=2)
