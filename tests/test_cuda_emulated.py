"""The CUDA kernels' own source, run on the CPU: each .cu file is built under the fiber emulator in
tests/cuda_emulator/ (g++ only, no GPU or nvcc) and its forward and every gradient are compared with float64 autograd
of the reference. This keeps the kernels verified on machines without a GPU; tests/test_cuda.py covers real GPUs.
Slow (about a minute per kernel build): run with `python -m pytest -m slow tests/test_cuda_emulated.py`."""
import functools

import pytest
import torch

from cuda_emulator import emulate
from fast_transformers.reference import fast_weight_sum_reference
from fast_weight.reference import delta_net_reference
from rec_update_fwm_tanh.reference import rec_delta_reference
from self_ref_v0.reference import self_ref_v0_reference

pytestmark = pytest.mark.slow

# Measured worst relative error is about 6e-7 (float32 kernels vs float64 reference); 1e-5 leaves room for other
# compilers' rounding but still catches any wrong index or missing term (those give errors of order 1).
TOLERANCE = 1e-5


def sum_inputs(g, B, H, L, E, M):
    return [torch.randn(B, H, L, E, generator=g), torch.randn(B, H, L, E, generator=g),
            torch.randn(B, H, L, M, generator=g), torch.randn(B, H, E, M, generator=g) * 0.5]


def delta_inputs(g, B, H, L, E, M):
    # Softmaxed keys and sigmoid rates, as the model feeds them: with raw randn the delta rule's states explode.
    q = torch.softmax(torch.randn(B, H, L, E, generator=g), -1)
    k = torch.softmax(torch.randn(B, H, L, E, generator=g), -1)
    return [q, k, torch.randn(B, H, L, M, generator=g), torch.sigmoid(torch.randn(B, H, L, 1, generator=g)),
            torch.randn(B, H, E, M, generator=g) * 0.5]


def rec_inputs(g, B, H, L, D):
    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale
    return [r(B, H, L, D), r(B, H, L, D), r(B, H, L, D), r(B, H, L, 1), r(1, H, D, D, scale=D ** -0.5),
            r(1, H, D, D, scale=D ** -0.5), r(1, H, D, D, scale=D ** -0.5), r(1, H, 1, D, scale=D ** -0.5),
            r(B, H, D, D, scale=0.3), r(B, H, 1, D)]


def srwm_inputs(g, B, H, L, D):
    def r(*shape):
        return torch.randn(*shape, generator=g) * D ** -0.5
    # w_b shifted down so that the gates are not all near 0.5.
    return [torch.randn(B, H, L, D, generator=g), r(B, H, D, D), r(B, H, D, D), r(B, H, D, D), r(B, H, D, 4) - 1]


# op -> (source, reference, number of differentiable inputs, input maker, shapes). Shapes: L = 1; odd L with B, H > 1;
# B = 1 and H = 1; for sum/delta (B, H, L, E, M) with E != M both ways, L = 17 across the 16-step staging chunk and
# M = 33 over two column blocks; for rec/srwm (B, H, L, D) with D = 4 (SRWM's smallest), L = 33 across the 32-step
# checkpoint and D = 33 past one 32-float row stride. W0, h0 and the SRWM matrices are random (nonzero).
OPS = {
    "sum": ("fast_transformers/fast_weight_sum_cuda.cu", fast_weight_sum_reference, 3, sum_inputs,
            [(1, 1, 1, 4, 4), (2, 3, 7, 5, 9), (1, 2, 17, 16, 3), (1, 1, 6, 64, 33)]),
    "delta": ("fast_weight/delta_net_cuda.cu", delta_net_reference, 4, delta_inputs,
              [(1, 1, 1, 4, 4), (2, 3, 7, 5, 9), (1, 2, 17, 16, 3), (1, 1, 6, 64, 33)]),
    "rec": ("rec_update_fwm_tanh/rec_delta_cuda.cu", rec_delta_reference, 8, rec_inputs,
            [(1, 1, 1, 4), (2, 3, 7, 5), (1, 2, 33, 8), (1, 1, 4, 33)]),
    "srwm": ("self_ref_v0/self_ref_v0_cuda.cu", self_ref_v0_reference, 5, srwm_inputs,
             [(1, 1, 1, 4), (2, 3, 7, 5), (1, 2, 33, 8), (1, 1, 4, 33)]),
}
CASES = [(op, shape) for op, spec in OPS.items() for shape in spec[4]]


@functools.lru_cache(maxsize=None)
def emulated_extension(op):
    return emulate.load(OPS[op][0])


def relative_error(actual, expected):
    # Relative to the whole tensor's norm: per-element relative errors blow up on entries that happen to be ~0. A
    # gradient that is exactly zero (SRWM's W_k at L = 1 never reaches the output) is compared absolutely.
    scale = expected.norm().item() or 1.0
    return (actual.double() - expected).norm().item() / scale


@pytest.mark.parametrize("op, shape", CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s in CASES])
def test_emulated_kernel_matches_float64_reference(op, shape):
    _, reference, num_differentiable, make_inputs, _ = OPS[op]
    ext = emulated_extension(op)
    inputs = [x.contiguous() for x in make_inputs(torch.Generator().manual_seed(0), *shape)]
    originals = [x.clone() for x in inputs]
    assert ext.supports(*inputs)

    out, *saved = ext.forward(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = ext.backward(grad_out, *inputs, saved)

    inputs64 = [x.double().requires_grad_(i < num_differentiable) for i, x in enumerate(inputs)]
    expected_out = reference(*inputs64)
    expected_grads = torch.autograd.grad(expected_out, inputs64[:num_differentiable], grad_out.double(),
                                         allow_unused=True, materialize_grads=True)
    assert relative_error(out, expected_out) < TOLERANCE
    assert len(grads) == num_differentiable
    for i, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert grad.shape == expected.shape, f"gradient {i}"
        assert relative_error(grad, expected) < TOLERANCE, f"gradient {i}"
    assert all(torch.equal(x, original) for x, original in zip(inputs, originals)), "an input was modified"
