"""A kernel test must test the kernel. kernel_loader runs the PyTorch reference instead of a fused kernel that fails
its self-check (with one warning), so a test that compares "the public function" with the reference would, for a
broken kernel, compare the reference with itself and pass. The helpers here make such a test fail instead."""
import contextlib
import functools

import kernel_loader

FUSED_CPU = "fused CPU kernel"  # what kernel_loader.operator_paths() says of an operator that ran its CPU kernel


@contextlib.contextmanager
def fused_only(*op_names):
    """Asserts, when the block ends, that each operator named (kernel_loader's names: "fast_weight_sum",
    "delta_net", "rec_delta", "self_ref_v0") ran, and ran only through its fused CPU kernel; with no names, that
    some operator ran and every one that ran took its fused CPU kernel."""
    kernel_loader.forget_operator_paths()
    yield
    paths = kernel_loader.operator_paths()
    assert paths, "no fast-weight operator ran"
    for name in op_names or paths:
        assert paths.get(name) == FUSED_CPU, f"{name} did not run its fused CPU kernel: {paths.get(name, 'no call')}"


def fused_checked(fn, op_name):
    """`fn` (a public operator function), asserting at every call that it ran the fused CPU kernel."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with fused_only(op_name):
            return fn(*args, **kwargs)
    return call
