"""Gated DeltaNet (models 27, 28): the gated delta rule's reference against a case worked out by hand and against
the delta rule, its fused CPU kernel against the reference (the kernel must have run), float64 gradcheck, and the
models built on it."""
import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernel_loader
import model
from fast_weight import delta_net_reference, gated_delta_net_fn, gated_delta_net_reference


@pytest.fixture(autouse=True)
def fused_path_enabled(monkeypatch):
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference loop's tiny ops gain nothing from threads
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kernel():
    ext = kernel_loader.load("fast_weight", "gated_delta_net", "cpu")
    assert ext is not None, "the CPU kernel of gated_delta_net did not build"
    return ext


def make_inputs(B, H, L, E, M, dtype, seed=0, requires_grad=True):
    """q, k (unit keys), v, beta in (0, 2), alpha in (0, 1), W0; the first five require grad."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=generator, dtype=dtype)
    k = F.normalize(torch.randn(B, H, L, E, generator=generator, dtype=dtype), dim=-1)
    v = torch.randn(B, H, L, M, generator=generator, dtype=dtype)
    beta = 2 * torch.rand(B, H, L, 1, generator=generator, dtype=dtype)
    alpha = torch.rand(B, H, L, 1, generator=generator, dtype=dtype)
    W0 = torch.randn(B, H, E, M, generator=generator, dtype=dtype)
    return [x.requires_grad_(requires_grad and i < 5) for i, x in enumerate((q, k, v, beta, alpha, W0))]


def assert_took_kernel(out):
    assert "_FusedOp" in type(out.grad_fn).__name__, "gated_delta_net did not run its compiled kernel"


def output_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return out, [out.detach(), *torch.autograd.grad(out, inputs[:5], grad_out)]


def test_reference_by_hand():
    """E = 2, M = 1, two steps.
    t = 1: W0 = [1, 0]^T, alpha 0.5: A = [0.5, 0]; k = [1, 0]: v_old = 0.5; v = 3, beta 0.5: u = 0.5 (3 - 0.5) = 1.25;
           W1 = A + k u = [1.75, 0]; q = [1, 1]: out = 1.75.
    t = 2: alpha 0.2: A = [0.35, 0]; k = [0, 1]: v_old = 0; v = 2, beta 1: u = 2; W2 = [0.35, 2]; q = [1, 2]:
           out = 0.35 + 4 = 4.35."""
    def seq(*rows):
        return torch.tensor(rows, dtype=torch.float64)[None, None]
    q, k, v = seq([1.0, 1.0], [1.0, 2.0]), seq([1.0, 0.0], [0.0, 1.0]), seq([3.0], [2.0])
    beta, alpha, W0 = seq([0.5], [1.0]), seq([0.5], [0.2]), seq([1.0], [0.0])
    expected = seq([1.75], [4.35])
    torch.testing.assert_close(gated_delta_net_reference(q, k, v, beta, alpha, W0), expected)
    torch.testing.assert_close(gated_delta_net_fn(q, k, v, beta, alpha, W0), expected)


def test_without_decay_it_is_the_delta_rule():
    q, k, v, beta, _, W0 = make_inputs(2, 2, 9, 4, 3, torch.float64, requires_grad=False)
    torch.testing.assert_close(gated_delta_net_reference(q, k, v, beta, torch.ones_like(beta), W0),
                               delta_net_reference(q, k, v, beta, W0))


# L = 1; L over one, two and three of the kernel's 32-step intervals; odd E and M; head sizes of the models.
SHAPES = [(1, 1, 1, 3, 2), (2, 3, 7, 5, 7), (1, 2, 32, 4, 4), (2, 1, 33, 16, 16), (1, 2, 70, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_matches_reference(kernel, shape, dtype):
    inputs = make_inputs(*shape, dtype, seed=sum(shape))
    grad_out = torch.randn(*shape[:3], shape[4], dtype=dtype)
    out, fused = output_and_grads(gated_delta_net_fn, inputs, grad_out)
    assert_took_kernel(out)
    _, reference = output_and_grads(gated_delta_net_reference, inputs, grad_out)
    # float32: a gradient is a sum of up to E x M rounded products, so atol scales with the tensor's size
    rtol, atol_scale = (1e-9, 1e-11) if dtype == torch.float64 else (1e-4, 1e-5)
    for name, a, e in zip(["out", "dq", "dk", "dv", "dbeta", "dalpha"], fused, reference):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol_scale * max(1.0, float(e.abs().max())),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 2), (1, 1, 35, 2, 3)], ids=str)
def test_fused_gradcheck(kernel, shape):
    inputs = make_inputs(*shape, torch.float64, seed=1)
    assert_took_kernel(gated_delta_net_fn(*inputs))
    assert torch.autograd.gradcheck(gated_delta_net_fn, inputs)


def test_a_vanishing_decay_leaves_the_backward_exact(kernel):
    """alpha near 0 clears the state; a backward that walked back by dividing by alpha would blow up here."""
    inputs = make_inputs(1, 1, 40, 4, 4, torch.float64, seed=2)
    with torch.no_grad():
        inputs[4].mul_(1e-6)
    grad_out = torch.randn(1, 1, 40, 4, dtype=torch.float64)
    out, fused = output_and_grads(gated_delta_net_fn, inputs, grad_out)
    assert_took_kernel(out)
    for a, e in zip(fused, output_and_grads(gated_delta_net_reference, inputs, grad_out)[1]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def model_args(model_type):
    return argparse.Namespace(model_type=model_type, num_layer=1, hidden_size=16, n_head=4, ff_factor=2,
                              dropout=0.0, remove_pos_enc=True, emb_size=8, no_embedding=False)


@pytest.mark.parametrize("model_type, beta_scale", [(27, 1.0), (28, 2.0)])
def test_the_models_decay_within_0_1_and_learn_the_decay(kernel, model_type, beta_scale):
    torch.manual_seed(0)
    net = model.build_model(model_args(model_type), 5, 4)
    block = net.layers[0]
    assert isinstance(block, model.GatedDeltaNetBlock) and block.beta_scale == beta_scale
    assert model.MODELS[model_type].operator == "gated_delta_net_fn"
    alpha = block.decay(torch.randn(3, 4, 6, 1) * 5)
    assert ((alpha > 0) & (alpha < 1)).all()
    rates = -block.decay(torch.zeros(1, 4, 1, 1)).log().flatten() / block.A_log.exp()  # softplus(dt_bias)
    assert ((rates > 1e-3 - 1e-9) & (rates < 0.1 + 1e-9)).all()
    logits = net(torch.randint(1, 5, (2, 7)))
    logits.sum().backward()
    assert block.A_log.grad.abs().sum() > 0 and block.dt_bias.grad.abs().sum() > 0
    assert kernel_loader.operator_paths()["gated_delta_net"] == "fused CPU kernel"


def test_a_device_without_a_kernel_takes_the_reference_without_a_build(monkeypatch):
    """Gated DeltaNet ships no CUDA kernel: on such a device the reference runs, with no build tried and no warning.
    (Shown with the CPU: the operator is told it has kernels for no device.)"""
    monkeypatch.setattr(kernel_loader, "load", lambda *args: pytest.fail("a build was tried"))
    inputs = make_inputs(1, 1, 3, 2, 2, torch.float64, requires_grad=False)
    kernel_loader.forget_operator_paths()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kernel_loader.run_fused("fast_weight", "gated_delta_net", gated_delta_net_reference, 5, *inputs,
                                      num_sequences=5, kernel_devices=())
    torch.testing.assert_close(out, gated_delta_net_reference(*inputs))
    assert kernel_loader.operator_paths()["gated_delta_net"] == "PyTorch reference (no CPU kernel)"

