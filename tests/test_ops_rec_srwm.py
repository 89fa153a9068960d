"""Recurrent Delta (rec_delta_fn) and SRWM (self_ref_v0): references, fused CPU kernels, and their agreement."""
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kernel_loader
from rec_update_fwm_tanh import rec_delta_fn, rec_delta_reference
from self_ref_v0 import self_ref_v0, self_ref_v0_reference

from kernel_paths import fused_checked


def rec_inputs(B, H, L, D, dtype, seed=0, zero_state=False):
    """qx, kx, vx, bx, R_q, R_k, R_v, r_b (requiring grad), W0, h0; drawn in float64 so every dtype sees the same
    values. R_* and r_b use the model's scale 1/sqrt(D)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    differentiable = [draw(B, H, L, D), draw(B, H, L, D), draw(B, H, L, D), draw(B, H, L, 1),
                      *(draw(1, H, D, D, scale=D ** -0.5) for _ in range(3)), draw(1, H, 1, D, scale=D ** -0.5)]
    W0 = draw(B, H, D, D, scale=0.5 * D ** -0.5)
    h0 = draw(B, H, 1, D)
    if zero_state:
        W0, h0 = torch.zeros_like(W0), torch.zeros_like(h0)
    return [t.requires_grad_() for t in differentiable] + [W0, h0]


def srwm_inputs(B, H, L, D, dtype, seed=0):
    """x, W_y, W_q, W_k, w_b (all requiring grad), with the model's initialisation scales."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0, mean=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + mean).to(dtype)

    tensors = [draw(B, H, L, D), draw(B, H, D, D, scale=D ** -0.5), draw(B, H, D, D, scale=0.01 * D ** -0.5),
               draw(B, H, D, D, scale=D ** -0.5), draw(B, H, D, 4, scale=D ** -0.5, mean=-1.0)]
    return [t.requires_grad_() for t in tensors]


@dataclass(frozen=True)
class Op:
    name: str
    folder: str
    kernel: str
    public: Callable  # the operator's public function: its kernel, or the reference where none applies
    reference: Callable
    make_inputs: Callable
    num_differentiable: int

    def __str__(self):
        return self.name

    @property
    def fused(self):
        """The public function, failing the test when a call does not run the fused kernel."""
        return fused_checked(self.public, self.name)


REC = Op("rec_delta", "rec_update_fwm_tanh", "rec_delta", rec_delta_fn, rec_delta_reference, rec_inputs, 8)
SRWM = Op("self_ref_v0", "self_ref_v0", "self_ref_v0", self_ref_v0, self_ref_v0_reference, srwm_inputs, 5)
OPS = [REC, SRWM]


@pytest.fixture(autouse=True)
def fused_path_enabled(monkeypatch):
    """The public functions must take the compiled path here, whatever the caller's environment says."""
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """The reference loops run thousands of tiny ops that gain nothing from threads, and on a busy machine OpenMP's
    waiting threads slow them down tenfold. The thread-count test below sets its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=OPS, ids=str)
def op(request):
    """Each operator, with its CPU extension built (once per test run; kernel_loader caches it)."""
    ext = kernel_loader.load(request.param.folder, request.param.kernel, "cpu")
    assert ext is not None, f"the CPU kernel of {request.param.name} did not build"
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_first_call_on_one_step_keeps_the_kernel(op, dtype, monkeypatch):
    """The kernel's self-check runs when a process first calls the operator; a first call on a one-step sequence
    must not fail it (on one step the SRWM's output leaves W_q out of the graph) and drop the kernel for good."""
    monkeypatch.setattr(kernel_loader, "_self_checks", {})
    op.fused(*op.make_inputs(1, 1, 1, 4, dtype, seed=3))


def run_with_grads(fn, inputs, num_differentiable, grad_out):
    """Output and the gradients of the first num_differentiable inputs (zeros for inputs the output ignores)."""
    out = fn(*inputs)
    wrt = inputs[:num_differentiable]
    grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]


def assert_all_close(actual, expected, rtol, atol_scale, names):
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol_scale * float(e.abs().max()) + 1e-30,
                                   msg=lambda m, name=name: f"{name}: {m}")


def result_names(op):
    arg_names = {REC: ["qx", "kx", "vx", "bx", "R_q", "R_k", "R_v", "r_b"],
                 SRWM: ["x", "W_y", "W_q", "W_k", "w_b"]}[op]
    return ["out"] + [f"d{name}" for name in arg_names]


TOLERANCES = {torch.float64: dict(rtol=1e-9, atol_scale=1e-11), torch.float32: dict(rtol=1e-4, atol_scale=1e-5)}

# L = 1, odd L and D, B = H = 1, D = 4 (the SRWM minimum), D = 64 over several checkpoints, B over several
# gradient-accumulation groups (rec groups 8 batch elements).
AWKWARD_SHAPES = [(1, 1, 1, 4), (2, 3, 7, 5), (1, 1, 9, 4), (10, 2, 5, 8), (1, 2, 41, 64), (3, 1, 33, 16)]


# ---- References -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS, ids=str)
def test_reference_gradcheck(op):
    inputs = op.make_inputs(1, 2, 2, 4, torch.float64, seed=1)
    assert torch.autograd.gradcheck(op.reference, inputs)


# ---- Fused kernels ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (2, 1, 4, 5)], ids=str)
def test_fused_gradcheck(op, shape):
    inputs = op.make_inputs(*shape, torch.float64, seed=2)
    assert torch.autograd.gradcheck(op.fused, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_fused_matches_reference(op, shape, dtype):
    inputs = op.make_inputs(*shape, dtype, seed=3)
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    fused = run_with_grads(op.fused, inputs, op.num_differentiable, grad_out)
    reference = run_with_grads(op.reference, inputs, op.num_differentiable, grad_out)
    assert_all_close(fused, reference, names=result_names(op), **TOLERANCES[dtype])


def test_rec_zero_initial_state_as_in_the_model():
    inputs = rec_inputs(3, 2, 12, 8, torch.float64, seed=5, zero_state=True)
    grad_out = torch.randn(3, 2, 12, 8, dtype=torch.float64)
    fused = run_with_grads(REC.fused, inputs, 8, grad_out)
    reference = run_with_grads(rec_delta_reference, inputs, 8, grad_out)
    assert_all_close(fused, reference, names=result_names(REC), **TOLERANCES[torch.float64])


def test_srwm_weights_expanded_over_the_batch_as_in_the_model():
    B, H, L, D = 3, 2, 6, 8
    weights = srwm_inputs(1, H, L, D, torch.float64, seed=6)[1:]  # (1, H, ...) parameters
    x = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    grads = {}
    for path, fn in (("fused", SRWM.fused), ("reference", self_ref_v0_reference)):
        out = fn(x, *(w.expand(B, -1, -1, -1) for w in weights))
        grads[path] = torch.autograd.grad(out.square().sum(), [x, *weights])
    for fused, reference in zip(grads["fused"], grads["reference"]):
        assert fused.shape == reference.shape
        torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12)


def test_long_sequence_float32_stays_close_to_float64(op):
    """300 steps at D = 64: several checkpoints, and no drift of the rebuilt matrices over time."""
    shape = (1, 1, 300, 64)
    inputs64 = op.make_inputs(*shape, torch.float64, seed=7)
    inputs32 = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs64]
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fused32 = run_with_grads(op.fused, inputs32, op.num_differentiable, grad_out.float())
    exact = run_with_grads(op.reference, inputs64, op.num_differentiable, grad_out)
    assert_all_close([t.double() for t in fused32], exact, names=result_names(op), rtol=1e-4, atol_scale=2e-5)


def test_result_does_not_depend_on_the_number_of_threads(op):
    inputs = op.make_inputs(17, 2, 6, 8, torch.float32, seed=9)
    grad_out = torch.randn(17, 2, 6, 8)
    results = []
    for num_threads in (1, 2):  # one_thread restores the setting afterwards
        torch.set_num_threads(num_threads)
        results.append(run_with_grads(op.fused, inputs, op.num_differentiable, grad_out))
    for name, one, two in zip(result_names(op), *results):
        assert torch.equal(one, two), name


def test_arguments_are_not_modified(op):
    inputs = op.make_inputs(2, 2, 5, 6, torch.float32, seed=10)
    before = [t.detach().clone() for t in inputs]
    op.fused(*inputs).square().sum().backward()
    for i, (now, then) in enumerate(zip(inputs, before)):
        assert torch.equal(now.detach(), then), f"argument {i} of {op.name} was modified"


def test_bfloat16_runs_through_the_reference(op):
    inputs = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in op.make_inputs(1, 2, 3, 4, torch.float32)]
    with pytest.warns(UserWarning, match="does not handle"):
        out = op.public(*inputs)
    assert "_FusedOp" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, op.reference(*inputs))


def test_forcing_the_reference_bypasses_the_kernel(op, monkeypatch):
    monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    out = op.public(*op.make_inputs(1, 1, 2, 4, torch.float32))
    assert "_FusedOp" not in type(out.grad_fn).__name__


# ---- Hand-computed cases (check with pencil) ------------------------------------------------------------------
@pytest.mark.parametrize("fn", [REC.fused, rec_delta_reference], ids=["fused", "reference"])
def test_rec_two_steps_by_hand(fn):
    """D = 2, zero recurrent weights: q = k = softmax(0) = [1/2, 1/2] and beta = sigmoid(0) = 1/2 at every step.
    t = 0: W0 = 0, so v_old = 0, u = (1/2)[2, 4] = [1, 2], W = outer(k, u) = [[1/2, 1], [1/2, 1]], out = q @ W
           = [1/2, 1].
    t = 1: vx = 0, v_old = k @ W = [1/2, 1], u = (1/2)(0 - [1/2, 1]) = [-1/4, -1/2],
           W = [[3/8, 3/4], [3/8, 3/4]], out = [3/8, 3/4].
    d sum(out_0) / d vx_0 = (q . k) beta = 1/4 per component (step 0 alone: L = 1)."""
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
    vx = torch.tensor([[[[2.0, 4.0], [0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)
    args = [zeros(1, 1, 2, 2), zeros(1, 1, 2, 2), vx, zeros(1, 1, 2, 1), zeros(1, 1, 2, 2), zeros(1, 1, 2, 2),
            zeros(1, 1, 2, 2), zeros(1, 1, 1, 2), zeros(1, 1, 2, 2), zeros(1, 1, 1, 2)]
    out = fn(*args)
    torch.testing.assert_close(out, torch.tensor([[[[0.5, 1.0], [0.375, 0.75]]]], dtype=torch.float64))

    args[2] = vx[:, :, :1].detach().requires_grad_()
    args[0], args[1], args[3] = zeros(1, 1, 1, 2), zeros(1, 1, 1, 2), zeros(1, 1, 1, 1)
    (dvx,) = torch.autograd.grad(fn(*args).sum(), [args[2]])
    torch.testing.assert_close(dvx, torch.full((1, 1, 1, 2), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("fn", [SRWM.fused, self_ref_v0_reference], ids=["fused", "reference"])
def test_srwm_two_steps_by_hand(fn):
    """D = 4, x_0 = x_1 = e_0, W_y = I, W_k = 0, w_b = 0, W_q[0] = [ln 3, 0, 0, 0]:
    y_0 = e_0 @ I = [1, 0, 0, 0]; q = softmax([ln 3, 0, 0, 0]) = [1/2, 1/6, 1/6, 1/6]; k = softmax(0) = [1/4] * 4;
    b = sigmoid(0) = 1/2 for all four matrices; (q - k) @ W_y = q - k = [1/4, -1/12, -1/12, -1/12].
    W_y += outer(k, (1/2)(q - k)) adds (q - k)/8 to every row, so y_1 = e_0 @ W_y = [1 + 1/32, -1/96, -1/96, -1/96].
    d sum(y_0) / d W_y = outer(x_0, [1, 1, 1, 1]): ones in row 0 (step 0 alone: L = 1)."""
    x = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    x[..., 0] = 1.0
    W_y = torch.eye(4, dtype=torch.float64).reshape(1, 1, 4, 4).requires_grad_()
    W_q = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    W_q[0, 0, 0, 0] = math.log(3.0)
    W_k = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    w_b = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    out = fn(x, W_y, W_q, W_k, w_b)
    expected = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [1 + 1 / 32, -1 / 96, -1 / 96, -1 / 96]]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)

    (dW_y,) = torch.autograd.grad(fn(x[:, :, :1], W_y, W_q, W_k, w_b).sum(), [W_y])
    expected_dW_y = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    expected_dW_y[0, 0, 0] = 1.0
    torch.testing.assert_close(dW_y, expected_dW_y)


@pytest.mark.parametrize("fn", [REC.fused, rec_delta_reference], ids=["fused", "reference"])
def test_rec_recurrent_terms_by_hand(fn):
    """D = 2, L = 2, with the recurrent weights at work: qx = kx = bx = 0, vx_0 = [2 ln 3, 0], vx_1 = [0, 1],
    R_q = [[0, 2 ln 3], [0, 0]], R_k = [[0, -2 ln 3], [0, 0]], R_v = I, r_b = [2 ln 3, 0], W0 = 0, h0 = 0.
    t = 0: s = tanh(h0) = 0, so q = k = [1/2, 1/2], beta = 1/2, v = vx_0; u = (1/2)(v - 0) = [ln 3, 0],
           W = outer(k, u) = [[ln3/2, 0], [ln3/2, 0]], out_0 = q @ W = [ln3/2, 0].
    t = 1: s = tanh([ln3/2, 0]) = [1/2, 0] (tanh(ln3/2) = (3 - 1)/(3 + 1)). Row vector times R:
           s @ R_q = [0, ln 3] -> q = [1/4, 3/4]; s @ R_k = [0, -ln 3] -> k = [3/4, 1/4] (R @ s would give 0 and
           uniform q, k); v = vx_1 + s @ R_v = [1/2, 1]; beta = sigmoid(s . r_b) = sigmoid(ln 3) = 3/4.
           v_old = k @ W = [ln3/2, 0]; u = (3/4)[(1 - ln 3)/2, 1] = [3(1 - ln 3)/8, 3/4];
           W rows: [ln3/2 + 9(1 - ln 3)/32, 9/16] and [ln3/2 + 3(1 - ln 3)/32, 3/16];
           out_1 = (1/4) row 0 + (3/4) row 1 = [(9 + 23 ln 3)/64, 9/32].
    Gradients of sum(out_0 + out_1): out_0 depends on neither vx_1 nor r_b (s = 0 at t = 0), so
    d/d vx_1 = (q . k) beta = (3/8)(3/4) = 9/32 per component;
    d/d r_b = d sum(out_1)/d beta * beta (1 - beta) s = (q . k) sum(v - v_old) (3/16) s
            = (3/8)((3 - ln 3)/2)(3/16)[1/2, 0] = [9(3 - ln 3)/512, 0]."""
    ln3 = math.log(3.0)
    f64 = lambda rows: torch.tensor(rows, dtype=torch.float64)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
    vx = f64([[[[2 * ln3, 0.0], [0.0, 1.0]]]]).requires_grad_()
    r_b = f64([[[[2 * ln3, 0.0]]]]).requires_grad_()
    R_q, R_k = f64([[[[0.0, 2 * ln3], [0.0, 0.0]]]]), f64([[[[0.0, -2 * ln3], [0.0, 0.0]]]])
    R_v = torch.eye(2, dtype=torch.float64).reshape(1, 1, 2, 2)
    out = fn(zeros(1, 1, 2, 2), zeros(1, 1, 2, 2), vx, zeros(1, 1, 2, 1), R_q, R_k, R_v, r_b, zeros(1, 1, 2, 2),
             zeros(1, 1, 1, 2))
    torch.testing.assert_close(out, f64([[[[ln3 / 2, 0.0], [(9 + 23 * ln3) / 64, 9 / 32]]]]))
    dvx, dr_b = torch.autograd.grad(out.sum(), [vx, r_b])
    torch.testing.assert_close(dvx[0, 0, 1], f64([9 / 32, 9 / 32]))
    torch.testing.assert_close(dr_b, f64([[[[9 * (3 - ln3) / 512, 0.0]]]]))


@pytest.mark.parametrize("fn", [SRWM.fused, self_ref_v0_reference], ids=["fused", "reference"])
def test_srwm_keys_gates_and_orientation_by_hand(fn):
    """D = 4, L = 2, x_0 = e_0, x_1 = e_1, W_y = I; W_q, W_k, w_b zero but W_q[0, 2] = W_k[0, 1] = w_b[0, 0] = ln 3.
    t = 0: y_0 = x_0 @ W_y = e_0. Row vector times matrix: q = softmax(x_0 @ W_q) = softmax([0, 0, ln 3, 0])
           = [1/6, 1/6, 1/2, 1/6], k = softmax([0, ln 3, 0, 0]) = [1/6, 1/2, 1/6, 1/6] (W @ x_0 would give
           uniform ones); b = sigmoid(x_0 @ w_b) = [3/4, 1/2, 1/2, 1/2], b[0] gating W_y.
           W_y += outer(k, b[0] (q @ W_y - k @ W_y)) = outer(k, (3/4)[0, -1/3, 1/3, 0]) = outer(k, [0, -1/4, 1/4, 0]).
    t = 1: y_1 = x_1 @ W_y = e_1 + k[1] [0, -1/4, 1/4, 0] = [0, 7/8, 1/8, 0].
    Gradients of y_1[2] = k[1] b[0] (q[2] - k[2]): only the t = 0 values of q, k, b reach it.
    d/d w_b[0, 0] = k[1] (q[2] - k[2]) b[0] (1 - b[0]) = (1/2)(1/3)(3/16) = 1/32; every other entry of w_b 0.
    d/d W_q[0, j] = k[1] b[0] q[2] (delta_2j - q[j]) = (3/16)(delta_2j - q[j]) = [-1/32, -1/32, 3/32, -1/32];
    rows 1-3 of W_q: 0 (x_0 = e_0)."""
    ln3 = math.log(3.0)
    x = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = 1.0
    W_y = torch.eye(4, dtype=torch.float64).reshape(1, 1, 4, 4)
    W_q, W_k, w_b = (torch.zeros(1, 1, 4, 4, dtype=torch.float64) for _ in range(3))
    W_q[0, 0, 0, 2] = W_k[0, 0, 0, 1] = w_b[0, 0, 0, 0] = ln3
    W_q.requires_grad_(), w_b.requires_grad_()
    out = fn(x, W_y, W_q, W_k, w_b)
    expected = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 7 / 8, 1 / 8, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    dW_q, dw_b = torch.autograd.grad(out[0, 0, 1, 2], [W_q, w_b])
    expected_dW_q, expected_dw_b = torch.zeros(1, 1, 4, 4, dtype=torch.float64), torch.zeros_like(dw_b)
    expected_dW_q[0, 0, 0] = torch.tensor([-1 / 32, -1 / 32, 3 / 32, -1 / 32])
    expected_dw_b[0, 0, 0, 0] = 1 / 32
    torch.testing.assert_close(dW_q, expected_dW_q)
    torch.testing.assert_close(dw_b, expected_dw_b)
