"""DeltaProduct (models 23-26, after Siems et al., 2025): n_h delta-rule steps per token, computed by the delta
operator on the interleaved sequence of length n_h * L.

The spec is fast_weight.delta_product_reference, a per-token loop over explicit E x E transition matrices. It is
checked against a hand-computed token, then delta_product_fn (fused CPU kernel and the PyTorch reference path of
the delta operator) against it, outputs and gradients, with unit keys and beta up to 2 (reflections); then the
model blocks: their projection layout, normalisation and beta range.
"""
import pytest
import torch
import torch.nn.functional as F

import kernel_loader
import model as model_module
from fast_weight import delta_net_reference, delta_product_fn, delta_product_reference
from model import MODELS
from kernel_paths import fused_checked, fused_only
from test_model import make_model, random_tokens


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    assert kernel_loader.load("fast_weight", "delta_net", "cpu") is not None, "fast_weight/delta_net_cpu.cpp"


@pytest.fixture(params=["fused", "reference"])
def path(request, monkeypatch):
    """Which code delta_product_fn's delta_net_fn runs: the fused CPU kernel, or FWP_FORCE_REFERENCE's loop."""
    if request.param == "reference":
        monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    else:
        monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    kernel_loader.forget_operator_paths()
    return request.param


def product_fn(path):
    """delta_product_fn; on the fused path asserting at each call that the kernel ran (not the fallback)."""
    return fused_checked(delta_product_fn, "delta_net") if path == "fused" else delta_product_fn


def product_inputs(B, H, L, n, E, M, dtype=torch.float64, seed=0, beta_max=2.0):
    """L2-normalised q and keys (as the models give them), beta in (0, beta_max), W0 != 0."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, L, E, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, H, L, n, E, generator=gen), dim=-1)
    v = torch.randn(B, H, L, n, M, generator=gen)
    beta = beta_max * torch.rand(B, H, L, n, generator=gen)
    W0 = torch.randn(B, H, E, M, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, beta)] + [W0.to(dtype)]


def output_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs[:4], grad_out)]


def test_the_reference_on_one_token_by_hand():
    """Two steps on a zero state in E = M = 2, worked out by hand:
    k1 = [1, 0], v1 = [2, -1], b1 = 1.5:  W1 = b1 k1 v1^T = [[3, -1.5], [0, 0]].
    k2 = [0.6, 0.8], b2 = 0.25:  I - b2 k2 k2^T = [[0.91, -0.12], [-0.12, 0.84]], times W1 = [[2.73, -1.365],
    [-0.36, 0.18]]; v2 = [0.5, 3]: b2 k2 v2^T = [[0.075, 0.45], [0.1, 0.6]]; W2 = [[2.805, -0.915], [-0.26, 0.78]].
    q = [0.3, -0.7]:  q W2 = [0.8415 + 0.182, -0.2745 - 0.546] = [1.0235, -0.8205]."""
    def tensor(*values):
        return torch.tensor(values, dtype=torch.float64)
    out = delta_product_reference(tensor(0.3, -0.7).view(1, 1, 1, 2), tensor(1.0, 0.0, 0.6, 0.8).view(1, 1, 1, 2, 2),
                                  tensor(2.0, -1.0, 0.5, 3.0).view(1, 1, 1, 2, 2), tensor(1.5, 0.25).view(1, 1, 1, 2),
                                  torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(out.view(2), tensor(1.0235, -0.8205), rtol=1e-12, atol=1e-12)


def test_one_step_per_token_is_the_delta_rule():
    q, k, v, beta, W0 = product_inputs(2, 2, 7, 1, 4, 3)
    torch.testing.assert_close(delta_product_reference(q, k, v, beta, W0),
                               delta_net_reference(q, k[:, :, :, 0], v[:, :, :, 0], beta, W0),
                               rtol=1e-12, atol=1e-12)


# (B, H, L, n_h, E, M): the models' head size 16 at training and test lengths, E != M, a large head.
SHAPES = [(2, 2, 50, 2, 16, 16), (1, 2, 100, 3, 16, 16), (2, 1, 30, 4, 8, 5), (1, 1, 20, 2, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_interleaved_delta_rule_matches_the_per_token_loop(path, shape, dtype):
    inputs = product_inputs(*shape, dtype=dtype)
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grad_out = torch.randn(*shape[:3], shape[5], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = output_and_grads(delta_product_reference, exact_inputs, grad_out)
    actual = output_and_grads(product_fn(path), inputs, grad_out.to(dtype))
    rel = 1e-10 if dtype == torch.float64 else 2e-4
    for name, a, e in zip(("output", "dq", "dk", "dv", "dbeta"), actual, exact, strict=True):
        err, scale = (a.double() - e).abs().max().item(), max(1.0, e.abs().max().item())
        assert err <= rel * scale, f"{name}: error {err:.3g}, scale {scale:.3g}"
    expected_path = "fused CPU kernel" if path == "fused" else "PyTorch reference"
    assert kernel_loader.operator_paths()["delta_net"].startswith(expected_path), kernel_loader.operator_paths()


@pytest.mark.parametrize("shape", [(1, 2, 4, 2, 3, 4), (2, 1, 6, 3, 4, 2), (1, 1, 5, 4, 3, 3)])
def test_gradcheck(path, shape):
    assert torch.autograd.gradcheck(product_fn(path), product_inputs(*shape))


# -- models 23-26 ------------------------------------------------------------------------------------------------

PRODUCT_MODELS = {23: (2, 2.0), 24: (3, 2.0), 25: (4, 2.0), 26: (2, 1.0)}  # model: (n_h, beta scale)


def test_the_registry_entries():
    for model_type, (steps, beta_scale) in PRODUCT_MODELS.items():
        spec = MODELS[model_type]
        block = spec.builder.block
        assert not spec.in_paper and spec.operator == "delta_net_fn"
        assert (block.steps, block.beta_scale) == (steps, beta_scale)


def block_inputs_to_operator(block, x):
    """What the block's projection gives each of q, the keys, the values and the betas, by the layout the model
    promises: per head [q | k_1 .. k_n | v_1 .. v_n | beta_1 .. beta_n]."""
    n, d, H = block.steps, block.head_dim, block.num_head
    heads = model_module.split_heads(block.in_proj(block.layer_norm(x)), H)
    q, k, v, beta = heads.split((d, n * d, n * d, n), dim=-1)
    return q, k.unflatten(-1, (n, d)), v.unflatten(-1, (n, d)), beta


@pytest.mark.parametrize("model_type", sorted(PRODUCT_MODELS))
def test_the_block_is_the_per_token_loop_on_its_projection(model_type, monkeypatch):
    """The whole block against the spec: projection split by the stated layout, unit q and keys, beta in the model's
    range, n_h steps per token; outputs and the gradients of every block parameter."""
    steps, beta_scale = PRODUCT_MODELS[model_type]
    torch.manual_seed(0)
    block = MODELS[model_type].builder.block(32, 4, 0.0).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)

    def by_the_spec(x):
        q, k, v, beta = block_inputs_to_operator(block, x)
        out = delta_product_reference(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                      beta_scale * torch.sigmoid(beta), block.zero_fast_weights(q))
        return x + block.out_proj(model_module.merge_heads(out))

    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    with fused_only("delta_net"):
        actual = block(x)
    torch.testing.assert_close(actual, by_the_spec(x), rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(actual)
    params = list(block.parameters())
    for a, e in zip(torch.autograd.grad(actual, params, grad_out), torch.autograd.grad(by_the_spec(x), params, grad_out)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_betas_reach_past_one_only_with_the_wide_range(monkeypatch):
    """23-25 give the operator betas in (0, 2) (reflections), 26 in (0, 1); the keys reach it with unit norm."""
    seen = {}

    def capture(q, k, v, beta, W0):
        seen.update(k_norm=k.norm(dim=-1), beta=beta)
        return delta_product_reference(q, k, v, beta, W0)

    monkeypatch.setattr(model_module, "delta_product_fn", capture)
    for model_type, (steps, beta_scale) in PRODUCT_MODELS.items():
        block = MODELS[model_type].builder.block(16, 2, 0.0)
        with torch.no_grad():
            block.in_proj.weight.mul_(20.0)  # saturate the sigmoids: betas near both ends of their range
            block(torch.randn(4, 30, 16, generator=torch.Generator().manual_seed(model_type)))
        assert seen["k_norm"].shape[-1] == steps
        torch.testing.assert_close(seen["k_norm"], torch.ones_like(seen["k_norm"]))
        beta = seen["beta"]
        assert beta.min() >= 0 and beta.max() <= beta_scale
        assert (beta.max() > 1.5) == (beta_scale == 2.0)


def test_more_steps_per_token_mean_a_wider_projection_and_nothing_else():
    counts = {m: sum(p.numel() for p in make_model(m, num_layer=1, hidden_size=16, n_head=4).parameters())
              for m in (20, 23, 24, 25, 26)}
    # per head of width 4: n_h more keys and values (2 x 4 each) and betas (1 each), on a 16-wide input; 4 heads.
    per_step = 16 * 4 * (4 + 4 + 1)
    assert counts[23] - counts[20] == per_step and counts[24] - counts[20] == 2 * per_step
    assert counts[25] - counts[20] == 3 * per_step and counts[26] == counts[23]


def test_a_model_trains_a_step_through_the_fused_kernel(monkeypatch):
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    net = make_model(24, num_layer=2)
    with fused_only("delta_net"):
        loss = net(random_tokens()).logsumexp(-1).mean()
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
