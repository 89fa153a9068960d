"""Recurrent Delta rule: `rec_delta_fn` runs the fused kernel of the input's device (the reference otherwise)."""
from kernel_loader import run_fused

from .reference import rec_delta_reference


def rec_delta_fn(qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0):
    """See `rec_delta_reference` for shapes and equations; W0 and h0 get no gradient and are not modified."""
    return run_fused("rec_update_fwm_tanh", "rec_delta", rec_delta_reference, 8,
                     qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0, num_sequences=4)


__all__ = ["rec_delta_fn", "rec_delta_reference"]
