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


def delta_product_reference(q, k, v, beta, W0):
    """DeltaProduct (Siems et al., 2025): n delta-rule steps per token. q: (B, H, L, E); k: (B, H, L, n, E);
    v: (B, H, L, n, M); beta: (B, H, L, n); W0: (B, H, E, M). Returns (B, H, L, M).

    Per token t, for j = 1..n:  W <- (I - beta_tj k_tj k_tj^T) W + beta_tj k_tj v_tj^T  (a generalised Householder
    transform of the state plus a write); then out_t = q_t @ W. Written with the E x E transition matrices, not
    through delta_net_reference, so that it checks the interleaved delta-rule sequence that computes it.
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    W = W0
    outs = []
    for t in range(q.shape[2]):
        for j in range(k.shape[3]):
            k_tj, b_tj = k[:, :, t, j], beta[:, :, t, j, None, None]
            transition = eye - b_tj * k_tj[..., :, None] * k_tj[..., None, :]
            W = transition @ W + b_tj * k_tj[..., :, None] * v[:, :, t, j, None, :]
        outs.append(torch.einsum("bhe,bhem->bhm", q[:, :, t], W))
    return torch.stack(outs, dim=2)


def gated_delta_net_reference(q, k, v, beta, alpha, W0):
    """The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh, ICLR 2025). q, k: (B, H, L, E);
    v: (B, H, L, M); beta, alpha: (B, H, L, 1); W0: (B, H, E, M). Returns (B, H, L, M).

    W_t = alpha_t (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T;  out_t = q_t @ W_t. That is the delta rule
    applied to the decayed state alpha_t W_{t-1}, which is how it is written here.
    """
    W = W0
    outs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]
        W = alpha[:, :, t, :, None] * W
        v_old = torch.einsum("bhe,bhem->bhm", k_t, W)
        W = W + k_t[..., None] * (beta[:, :, t] * (v[:, :, t] - v_old))[:, :, None, :]
        outs.append(torch.einsum("bhe,bhem->bhm", q[:, :, t], W))
    return torch.stack(outs, dim=2)
