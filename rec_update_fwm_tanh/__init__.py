"""Placeholder until the fused kernels land: the public name points at the reference."""
from .reference import rec_delta_reference
from .reference import rec_delta_reference as rec_delta_fn

__all__ = ["rec_delta_fn", "rec_delta_reference"]
