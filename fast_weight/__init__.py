"""Placeholder until the fused kernels land: the public name points at the reference."""
from .reference import delta_net_reference
from .reference import delta_net_reference as delta_net_fn

__all__ = ["delta_net_fn", "delta_net_reference"]
