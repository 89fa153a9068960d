"""JIT building of the operator extensions, shared by the four operator folders.

Each operator folder ships `<name>_cpu.cpp` and `<name>_cuda.cu`. Both compile to an extension with the same two
functions, `forward` and `backward`; the folder's dispatcher picks one by device. Extensions are built once with
ninja and cached in TORCH_EXTENSIONS_DIR (torch's default cache when unset).
"""
import functools
import os
import sys
import warnings

import torch

FORCE_REFERENCE_ENV = "FWP_FORCE_REFERENCE"


def reference_forced():
    """True when the user asked for the plain PyTorch reference (FWP_FORCE_REFERENCE=1)."""
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


def _build_root():
    from torch.utils.cpp_extension import _get_build_directory
    return os.path.dirname(_get_build_directory("probe", verbose=False))


@functools.lru_cache(maxsize=None)
def load(folder, name, device_type):
    """Build (first use only) and import `<folder>/<name>_<device_type>.{cpp,cu}`; None if it cannot be built."""
    from torch.utils import cpp_extension

    suffix = "cpp" if device_type == "cpu" else "cu"
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), folder, f"{name}_{device_type}.{suffix}")
    ext_name = f"{name}_{device_type}"
    build_dir = os.path.join(_build_root(), ext_name)
    if not os.path.isdir(build_dir) or not any(f.endswith(".so") for f in os.listdir(build_dir)):
        print(f"Building the {device_type.upper()} kernel '{ext_name}' (first use only, about a minute)...",
              file=sys.stderr, flush=True)
    # at::parallel_for only runs in parallel when the extension itself is compiled with OpenMP.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    try:
        return cpp_extension.load(name=ext_name, sources=[source], extra_cflags=["-O3"] + openmp,
                                  extra_ldflags=openmp, extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as exc:  # no compiler, no nvcc, ...: the reference still gives correct results
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"could not build {ext_name} ({first_line}); using the slow PyTorch reference instead")
        return None


def extension_for(folder, name, tensor):
    """The compiled extension for `tensor`'s device, or None when the reference must be used."""
    if reference_forced() or tensor.device.type not in ("cpu", "cuda"):
        return None
    return load(folder, name, tensor.device.type)


class _FusedOp(torch.autograd.Function):
    """Autograd glue for every extension: `ext.forward(*inputs) -> [out, *saved]`,
    `ext.backward(grad_out, *inputs, saved) -> grads of the first `num_differentiable` inputs`."""

    @staticmethod
    def forward(ctx, ext, num_differentiable, *inputs):
        out, *saved = ext.forward(*inputs)
        ctx.ext = ext
        ctx.num_inputs = len(inputs)
        ctx.num_differentiable = num_differentiable
        ctx.save_for_backward(*inputs, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        inputs, saved = tensors[:ctx.num_inputs], list(tensors[ctx.num_inputs:])
        grads = ctx.ext.backward(grad_out.contiguous(), *inputs, saved)
        return (None, None, *grads, *([None] * (ctx.num_inputs - ctx.num_differentiable)))


@functools.lru_cache(maxsize=None)
def _warn_unsupported(description):
    """One warning per distinct unsupported case, not one per call."""
    warnings.warn(f"{description}; using the PyTorch reference instead (same results, slower)", stacklevel=3)


def run_fused(folder, name, reference, num_differentiable, *inputs):
    """Run an operator through its compiled kernel, or through `reference` when no kernel applies.

    The first `num_differentiable` inputs get gradients; the rest (initial states) do not. An extension may expose
    `supports(*inputs)`; when it says False (a dtype or head size the kernel does not handle), the reference runs.
    """
    ext = extension_for(folder, name, inputs[0])
    if ext is None:
        return reference(*inputs)
    if hasattr(ext, "supports") and not ext.supports(*inputs):
        sizes = sorted({t.shape[-1] for t in inputs})
        _warn_unsupported(f"{folder}.{name}: the {inputs[0].device.type.upper()} kernel does not handle "
                          f"{inputs[0].dtype} inputs with last dimensions {sizes}")
        return reference(*inputs)
    return _FusedOp.apply(ext, num_differentiable, *(t.contiguous() for t in inputs))
