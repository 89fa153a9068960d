"""Linear attention with the sum update rule (`fast_weight_sum`), fused CPU/CUDA kernels with a reference fallback."""
from kernel_loader import run_fused

from .reference import fast_weight_sum_reference


def fast_weight_sum(q, k, v, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); W0: (B, H, E, M) -> (B, H, L, M); gradients for q, k, v.

    W_t = W_{t-1} + outer(k_t, v_t);  out_t = q_t @ W_t.  FWP_FORCE_REFERENCE=1 selects the PyTorch loop.
    """
    return run_fused("fast_transformers", "fast_weight_sum", fast_weight_sum_reference, 3, q, k, v, W0,
                     num_sequences=3)


__all__ = ["fast_weight_sum", "fast_weight_sum_reference"]
