"""The delta update rule (`delta_net_fn`, DeltaNet), fused CPU/CUDA kernels with a reference fallback."""
from kernel_loader import run_fused

from .reference import delta_net_reference


def delta_net_fn(q, k, v, beta, W0):
    """q, k: (B, H, L, E); v: (B, H, L, M); beta: (B, H, L, 1); W0: (B, H, E, M) -> (B, H, L, M).

    Gradients for q, k, v, beta. FWP_FORCE_REFERENCE=1 selects the PyTorch loop.
    """
    return run_fused("fast_weight", "delta_net", delta_net_reference, 4, q, k, v, beta, W0,
                     num_sequences=4)


__all__ = ["delta_net_fn", "delta_net_reference"]
