"""fast_weight_sum (sum rule) and delta_net_fn (delta rule): the fused CPU kernels and the chunk-parallel forms
against the reference loops, gradchecks, hand-computed steps, and the dispatcher's reference switch."""
import functools

import pytest
import torch

import kernel_loader
from fast_transformers import fast_weight_sum, fast_weight_sum_reference
from fast_transformers.chunked import fast_weight_sum_chunked
from fast_weight import delta_net_fn, delta_net_reference
from fast_weight.chunked import delta_net_chunked
from kernel_paths import fused_checked

# op name -> (public function, reference, chunk-parallel form, (folder, kernel base name), number of differentiable
# inputs); a small chunk size makes the chunked forms cross several chunks on the test shapes.
OPS = {
    "sum": (fast_weight_sum, fast_weight_sum_reference, functools.partial(fast_weight_sum_chunked, chunk_size=4),
            ("fast_transformers", "fast_weight_sum"), 3),
    "delta": (delta_net_fn, delta_net_reference, functools.partial(delta_net_chunked, chunk_size=4),
              ("fast_weight", "delta_net"), 4),
}
PATHS = ("fused", "reference", "chunked")

# (B, H, L, E, M): L = 1; odd L with E < M; E > M over exactly one delta-kernel checkpoint interval (32 steps),
# and one step past it; D = 64 over three intervals; a long sequence, where drifting states would show.
AWKWARD_SHAPES = [(1, 1, 1, 4, 4), (2, 3, 7, 5, 9), (3, 1, 32, 9, 3), (2, 2, 33, 16, 32), (1, 2, 65, 64, 64),
                  (1, 1, 200, 16, 16)]


@pytest.fixture(autouse=True)
def kernels_not_forced_off(monkeypatch):
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def built_kernels():
    """Builds both extensions once; a kernel that does not compile must fail the tests, not fall back silently."""
    for _, _, _, (folder, name), _ in OPS.values():
        assert kernel_loader.load(folder, name, "cpu") is not None, f"{folder}/{name}_cpu.cpp did not build"


def path_function(op, path):
    """The function of `path`; "fused" asserts at each call that the kernel ran (not the reference fallback)."""
    fused, reference, chunked, (_, name), _ = OPS[op]
    return {"fused": fused_checked(fused, name), "reference": reference, "chunked": chunked}[path]


def make_inputs(op, B, H, L, E, M, dtype=torch.float64, seed=0):
    """Random inputs with W0 != 0, differentiable ones requiring grad. Delta-rule keys are positive and sum to 1
    and beta lies in (0, 1), as in the DeltaNet layer, which keeps the recurrence stable over long sequences."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, E, generator=gen), torch.randn(B, H, L, E, generator=gen)
    v, W0 = torch.randn(B, H, L, M, generator=gen), torch.randn(B, H, E, M, generator=gen)
    differentiable = [q, k, v]
    if op == "delta":
        differentiable = [q, torch.softmax(k, dim=-1), v, torch.rand(B, H, L, 1, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in differentiable] + [W0.to(dtype)]


def output_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    differentiable = [t for t in inputs if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, differentiable, grad_out)]


def assert_close_to(actual, expected, rel):
    """Each tensor within rel * max(1, max |expected|) of the expected one (elementwise, absolute)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape, a.dtype, e.dtype)
        err, scale = (a - e).abs().max().item(), max(1.0, e.abs().max().item())
        assert err <= rel * scale, f"tensor {i} (0 = output, then gradients): error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 4), (1, 1, 35, 3, 2)])  # the second crosses a kernel interval
def test_gradcheck(op, path, shape):
    # The chunked forms' gradients come from autograd; the fast (random projection) mode checks them at a
    # fraction of the cost of their many small ops.
    assert torch.autograd.gradcheck(path_function(op, path), make_inputs(op, *shape), fast_mode=path == "chunked")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_fused_matches_reference(op, dtype, shape):
    inputs = make_inputs(op, *shape, dtype=dtype)
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grad_out = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = output_and_grads(path_function(op, "reference"), exact_inputs, grad_out)
    actual = output_and_grads(path_function(op, "fused"), inputs, grad_out.to(dtype))
    rel = 1e-11 if dtype == torch.float64 else 5e-5
    assert_close_to([t.double() for t in actual], expected, rel)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4), (2, 3, 7, 5, 9), (1, 2, 33, 16, 8)])
def test_chunked_matches_reference(op, dtype, shape):
    inputs = make_inputs(op, *shape, dtype=dtype)
    grad_out = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected = output_and_grads(path_function(op, "reference"), inputs, grad_out)
    actual = output_and_grads(path_function(op, "chunked"), inputs, grad_out)
    assert_close_to(actual, expected, 1e-11 if dtype == torch.float64 else 5e-5)


def as_inputs(*rows):
    """Nested lists of (L, dim) per tensor -> (1, 1, L, dim) float64 tensors (the last one, W0, is (1, 1, E, M))."""
    tensors = [torch.tensor(r, dtype=torch.float64)[None, None] for r in rows]
    return [t.requires_grad_() for t in tensors[:-1]] + [tensors[-1]]


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_sum_rule_two_steps_by_hand(path):
    # E = 2, M = 1, W0 = [[1], [0]]. Step 0: W = [[3], [0]], out = (1, 1) . (3, 0) = 3.
    # Step 1: W = [[3], [5]], out = (1, 2) . (3, 5) = 13. With loss out_0 + out_1:
    # dq_t = W_t; G_1 = q_1, G_0 = q_0 + q_1 = (2, 3); dk_t = G_t v_t; dv_t = G_t . k_t.
    # dq_0 = (3, 0) includes W0's 1: the original CUDA kernel dropped that term.
    q, k, v, W0 = as_inputs([[1, 1], [1, 2]], [[1, 0], [0, 1]], [[2], [5]], [[1], [0]])
    out = path_function("sum", path)(q, k, v, W0)
    out.sum().backward()
    assert out.flatten().tolist() == [3, 13]
    assert q.grad[0, 0].tolist() == [[3, 0], [3, 5]]
    assert k.grad[0, 0].tolist() == [[4, 6], [5, 10]]
    assert v.grad[0, 0].tolist() == [[2], [2]]


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_delta_rule_two_steps_by_hand(path):
    # E = 2, M = 1, W0 = [[1], [0]].
    # Step 0: k = (1, 0), v = 3, beta = 1/2: v_old = 1, u = 1/2 * (3 - 1) = 1, W = [[2], [0]],
    #         out = (1, 1) . (2, 0) = 2.
    # Step 1: k = (0, 1), v = 4, beta = 1/4: v_old = 0, u = 1, W = [[2], [1]], out = (1, 2) . (2, 1) = 4.
    # Backward of out_0 + out_1, G = dL/dW (a column, written as a row):
    #   step 1: G = q_1 = (1, 2); dq_1 = W_1 = (2, 1); du = G . k_1 = 2; dk_1 = G u = (1, 2); dv_1 = beta du = 1/2;
    #           dbeta_1 = du (v - v_old) = 8; dv_old = -1/2 adds k_1 dv_old to G: (1, 3/2),
    #           and W_0 dv_old to dk_1: (0, 2)
    #   step 0: G += q_0: (2, 5/2); dq_0 = W_0 = (2, 0); du = G . k_0 = 2; dk_0 = G u = (2, 5/2); dv_0 = 1;
    #           dbeta_0 = 2 * 2 = 4; dv_old = -1 adds W0 dv_old = (-1, 0) to dk_0: (1, 5/2)
    q, k, v, beta, W0 = as_inputs([[1, 1], [1, 2]], [[1, 0], [0, 1]], [[3], [4]], [[0.5], [0.25]], [[1], [0]])
    out = path_function("delta", path)(q, k, v, beta, W0)
    out.sum().backward()
    assert out.flatten().tolist() == [2, 4]
    assert q.grad[0, 0].tolist() == [[2, 0], [2, 1]]
    assert k.grad[0, 0].tolist() == [[1, 2.5], [0, 2]]
    assert v.grad[0, 0].tolist() == [[1], [0.5]]
    assert beta.grad[0, 0].tolist() == [[4], [8]]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_arguments_are_not_modified(op, path):
    inputs = make_inputs(op, 2, 2, 20, 5, 6)
    before = [t.detach().clone() for t in inputs]
    out = path_function(op, path)(*inputs)
    out.backward(torch.randn_like(out))
    for i, (t, b) in enumerate(zip(inputs, before)):
        assert torch.equal(t.detach(), b), f"argument {i} was modified"


@pytest.mark.parametrize("op", OPS)
def test_force_reference_bypasses_the_kernel(op, monkeypatch):
    fused, reference, _, _, _ = OPS[op]
    requested = []
    real_load = kernel_loader.load
    monkeypatch.setattr(kernel_loader, "load", lambda *args: requested.append(args) or real_load(*args))
    inputs = make_inputs(op, 1, 2, 6, 3, 4)

    monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    forced = fused(*inputs)
    assert requested == []
    assert torch.equal(forced, reference(*inputs))

    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV)
    fused(*inputs)
    assert requested == [(*OPS[op][3], "cpu")]


def test_kernel_rejects_a_beta_of_the_wrong_shape():
    q, k, v, beta, W0 = make_inputs("delta", 1, 2, 6, 3, 4)
    with pytest.raises(RuntimeError, match=r"beta must be \(B, H, L, 1\)"):
        delta_net_fn(q, k, v, beta.detach().expand(1, 2, 6, 4).contiguous(), W0)


@pytest.mark.parametrize("op", OPS)
def test_unsupported_dtype_runs_the_reference_with_a_warning(op):
    fused, reference, _, _, _ = OPS[op]
    inputs = [t.detach().to(torch.bfloat16) for t in make_inputs(op, 1, 2, 4, 3, 4)]
    kernel_loader._warn_unsupported.cache_clear()  # the loader warns once per case and process
    with pytest.warns(UserWarning, match="does not handle"):
        out = fused(*inputs)
    assert torch.equal(out, reference(*inputs))


# The kernels are compiled once per instruction set (AVX-512, AVX2 + FMA, baseline x86-64) and pick one at load
# time; FWP_CPU_ISA caps the choice. The tests above run the CPU's best; this one runs the others, in subprocesses
# (the choice is made once per process), against the reference.
ISA_CHECK = """
import sys, torch
import kernel_loader
sys.path.insert(0, "tests")
from kernel_paths import fused_checked
from fast_transformers import fast_weight_sum, fast_weight_sum_reference
from fast_weight import delta_net_fn, delta_net_reference
from rec_update_fwm_tanh import rec_delta_fn, rec_delta_reference
from self_ref_v0 import self_ref_v0, self_ref_v0_reference
ops = {"sum": (fast_weight_sum, fast_weight_sum_reference, "fast_transformers", "fast_weight_sum", 3),
       "delta": (delta_net_fn, delta_net_reference, "fast_weight", "delta_net", 4),
       "rec": (rec_delta_fn, rec_delta_reference, "rec_update_fwm_tanh", "rec_delta", 8),
       "srwm": (self_ref_v0, self_ref_v0_reference, "self_ref_v0", "self_ref_v0", 5)}
g = torch.Generator().manual_seed(0)
def inputs(op, B, H, L, D):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if op in ("sum", "delta"):
        q, k, v, W0 = r(B, H, L, D), torch.softmax(r(B, H, L, D), -1), r(B, H, L, D + 3), r(B, H, D, D + 3)
        return [q, k, v] + ([torch.rand(B, H, L, 1, generator=g, dtype=torch.float64)] if op == "delta" else []) + [W0]
    if op == "rec":
        return [r(B, H, L, D), r(B, H, L, D), r(B, H, L, D), r(B, H, L, 1), r(1, H, D, D) / D, r(1, H, D, D) / D,
                r(1, H, D, D) / D, r(1, H, 1, D) / D, r(B, H, D, D), r(B, H, 1, D)]
    return [r(B, H, L, D), r(B, H, D, D) / D, r(B, H, D, D) / D, r(B, H, D, D) / D, r(B, H, D, 4) / D - 1]
for op, (fused, reference, folder, name, n) in ops.items():
    ext = kernel_loader.load(folder, name, "cpu")
    assert ext.isa() == sys.argv[1], (op, ext.isa(), sys.argv[1])
    for shape in [(2, 2, 37, 5), (1, 2, 40, 19), (1, 1, 9, 40)]:
        ins = inputs(op, *shape)
        for t in ins[:n]:
            t.requires_grad_()
        results = []
        for fn in (fused_checked(fused, name), reference):
            out = fn(*ins)
            results.append([out] + list(torch.autograd.grad(out, ins[:n], torch.ones_like(out))))
        for a, e in zip(*results):
            assert (a - e).abs().max() <= 1e-9 * max(1.0, e.abs().max()), (op, shape)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set_matches_the_reference(isa):
    import os
    import subprocess
    import sys
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if isa == "avx2" and " avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FWP_CPU_ISA=isa, OMP_NUM_THREADS="1", PYTHONPATH=root)
    env.pop(kernel_loader.FORCE_REFERENCE_ENV, None)
    result = subprocess.run([sys.executable, "-c", ISA_CHECK, isa], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
