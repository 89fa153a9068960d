"""The delta update rule (`delta_net_fn`, DeltaNet), fused CPU/CUDA kernels with a reference fallback; DeltaProduct
(`delta_product_fn`) computed with it; the gated delta rule (`gated_delta_net_fn`, Gated DeltaNet), a fused CPU
kernel (on CUDA the reference runs)."""
import torch.nn.functional as F

from kernel_loader import run_fused

from .reference import delta_net_reference, delta_product_reference, gated_delta_net_reference


def delta_net_fn(q, k, v, beta, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); beta: (B, H, L, 1); W0: (B, H, E, M) -> (B, H, L, M).

    Gradients for q, k, v, beta. FWP_FORCE_REFERENCE=1 selects the PyTorch loop.
    """
    return run_fused("fast_weight", "delta_net", delta_net_reference, 4, q, k, v, beta, W0,
                     num_sequences=4)


def delta_product_fn(q, k, v, beta, W0):
    """n delta-rule steps per token, read after the last (delta_product_reference is its specification).
    q: (B, H, L, E); k: (B, H, L, n, E); v: (B, H, L, n, M); beta: (B, H, L, n); W0: (B, H, E, M) -> (B, H, L, M).

    The steps of all tokens form one delta-rule sequence of length n * L, step j of token t at n * t + j, so
    delta_net_fn (and its kernels) computes it. The queries of the first n - 1 steps of a token are zero: those
    outputs are never read.
    """
    batch, heads, length, steps, _ = k.shape
    queries = F.pad(q[:, :, :, None, :], (0, 0, steps - 1, 0))  # (B, H, L, n, E): q at each token's last step
    out = delta_net_fn(*(x.reshape(batch, heads, length * steps, -1) for x in (queries, k, v, beta[..., None])), W0)
    return out.view(batch, heads, length, steps, -1)[:, :, :, -1]


def gated_delta_net_fn(q, k, v, beta, alpha, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); beta, alpha: (B, H, L, 1); W0: (B, H, E, M) -> (B, H, L, M).

    W_t = alpha_t (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T, out_t = q_t @ W_t (gated_delta_net_reference).
    Gradients for q, k, v, beta, alpha. FWP_FORCE_REFERENCE=1 selects the PyTorch loop.
    """
    return run_fused("fast_weight", "gated_delta_net", gated_delta_net_reference, 5, q, k, v, beta, alpha, W0,
                     num_sequences=5, kernel_devices=("cpu",))


__all__ = ["delta_net_fn", "delta_net_reference", "delta_product_fn", "delta_product_reference",
           "gated_delta_net_fn", "gated_delta_net_reference"]
