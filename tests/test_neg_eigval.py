"""DeltaNet with negative eigenvalues (models 20-22, after Grazzi et al., ICLR 2025).

Operator: with unit keys and beta in (0, 2) the delta rule's transition I - beta k k^T has the eigenvalue 1 - beta
in (-1, 1) along k, so parts of the state flip sign each step and never decay. The fused kernel, the chunk-parallel
form and their gradients are checked against the reference loop in that regime (L = 100-200, beta up to 1.99, and
exactly 2 for the closed-form case). Models: the op's inputs are captured by monkeypatching model.delta_net_fn. (The data option for their length
split, --train_lengths/--test_lengths, is tested in tests/test_data.py.)
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import kernel_loader
import model as model_module
from fast_weight import delta_net_fn, delta_net_reference
from fast_weight.chunked import delta_net_chunked
from kernel_paths import fused_checked
from test_model import make_model, random_tokens

BETA_MAX = 1.99
PATHS = {"fused": fused_checked(delta_net_fn, "delta_net"), "chunked": functools.partial(delta_net_chunked, chunk_size=32),
         "chunked-small": functools.partial(delta_net_chunked, chunk_size=4)}


@pytest.fixture(autouse=True)
def kernels_not_forced_off(monkeypatch):
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    assert kernel_loader.load("fast_weight", "delta_net", "cpu") is not None, "fast_weight/delta_net_cpu.cpp"


def unit_key_inputs(B, H, L, E, M, dtype=torch.float64, seed=0, beta_max=BETA_MAX, similar_keys=False):
    """L2-normalised q and k (as model 20 gives them), beta uniform in (0, beta_max), W0 != 0. similar_keys makes
    all keys of a sequence close to one direction, the hardest case for the chunked form's triangular solve."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, E, generator=gen), torch.randn(B, H, L, E, generator=gen)
    if similar_keys:
        k = k[:, :, :1] + 0.1 * k
    v, W0 = torch.randn(B, H, L, M, generator=gen), torch.randn(B, H, E, M, generator=gen)
    beta = beta_max * torch.rand(B, H, L, 1, generator=gen)
    differentiable = [F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta]
    return [t.to(dtype).requires_grad_() for t in differentiable] + [W0.to(dtype)]


def output_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out)]


def assert_close_to(actual, expected, rel):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err, scale = (a.double() - e).abs().max().item(), max(1.0, e.abs().max().item())
        assert err <= rel * scale, f"tensor {i} (0: output, then dq, dk, dv, dbeta): error {err:.3g}, scale {scale:.3g}"


def exact_and_actual(path, shape, dtype, **kwargs):
    """(float64 reference output and gradients, `path`'s in `dtype`) on the same unit-key inputs."""
    inputs = unit_key_inputs(*shape, dtype=dtype, **kwargs)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grad_out = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (output_and_grads(delta_net_reference, exact, grad_out),
            output_and_grads(PATHS[path], inputs, grad_out.to(dtype)))


# (B, H, L, E, M): the model's head size 16 at the training and test lengths, E != M, a large head, tiny heads.
LONG_SHAPES = [(2, 2, 100, 16, 16), (1, 2, 200, 16, 8), (1, 1, 150, 64, 64), (2, 1, 200, 4, 4)]


# The small chunk size (many chunks) only at L = 100, for time.
PATH_SHAPES = [(path, shape) for path in PATHS for shape in LONG_SHAPES if path != "chunked-small" or shape[2] <= 100]


@pytest.mark.parametrize("path,shape", PATH_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("similar_keys", [False, True], ids=["random-keys", "similar-keys"])
def test_matches_reference_with_beta_up_to_2(path, shape, dtype, similar_keys):
    expected, actual = exact_and_actual(path, shape, dtype, similar_keys=similar_keys)
    assert_close_to(actual, expected, 1e-10 if dtype == torch.float64 else 5e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("shape", LONG_SHAPES)
def test_cuda_kernel_matches_reference_with_beta_up_to_2(shape):
    """delta_net_cuda.cu in float32 against the float64 reference, unit keys, beta up to 1.99 (no GPU here when
    this was written: the kernel assumes nothing about beta, it scans W forward and G backward without reversal)."""
    inputs = unit_key_inputs(*shape, dtype=torch.float32, similar_keys=True)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grad_out = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = output_and_grads(delta_net_reference, exact, grad_out)
    on_gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in inputs]
    actual = output_and_grads(delta_net_fn, on_gpu, grad_out.float().cuda())
    assert "fused CUDA kernel" in kernel_loader.operator_paths()["delta_net"]
    assert_close_to([t.cpu() for t in actual], expected, 5e-5)


def test_test_inputs_reach_negative_eigenvalues():
    q, k, v, beta, W0 = unit_key_inputs(2, 2, 100, 16, 16)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 2, 100, dtype=torch.float64))
    assert beta.max() > 1.95 and (beta > 1).float().mean() > 0.4


@pytest.mark.parametrize("path", ["fused", "chunked", "reference"])
@pytest.mark.parametrize("beta_value", [1.99, 2.0])
def test_eigenvalue_minus_one_flips_the_state(path, beta_value):
    """One fixed unit key k, v = 0, W0 = outer(k, w): W_t = (1 - beta)^(t+1) outer(k, w), so
    out_t = (q . k) (1 - beta)^(t+1) w. At beta = 2 the state flips sign every step and never decays."""
    L, E, M = 200, 8, 5
    gen = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(E, generator=gen, dtype=torch.float64), dim=0)
    q, w = torch.randn(E, generator=gen, dtype=torch.float64), torch.randn(M, generator=gen, dtype=torch.float64)
    inputs = (q.expand(1, 1, L, E).contiguous(), k.expand(1, 1, L, E).contiguous(),
              torch.zeros(1, 1, L, M, dtype=torch.float64), torch.full((1, 1, L, 1), beta_value, dtype=torch.float64),
              torch.outer(k, w)[None, None])
    fn = delta_net_reference if path == "reference" else PATHS[path]
    out = fn(*inputs)[0, 0]
    powers = (1 - beta_value) ** torch.arange(1, L + 1, dtype=torch.float64)
    torch.testing.assert_close(out, (q @ k) * powers[:, None] * w, rtol=1e-10, atol=1e-12)
    if beta_value == 2.0:
        torch.testing.assert_close(out[-1], out[0] * (-1) ** (L - 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 4), (1, 1, 35, 3, 2), (2, 1, 12, 4, 4)])
def test_gradcheck_fused(shape):
    """Exact gradients of the fused kernel in float64 with unit keys and beta in (0, 2) (gradcheck moves k off the
    unit sphere by its small steps; the operator itself takes any k)."""
    assert torch.autograd.gradcheck(PATHS["fused"], unit_key_inputs(*shape))


def test_gradcheck_chunked():
    assert torch.autograd.gradcheck(PATHS["chunked-small"], unit_key_inputs(1, 2, 10, 3, 4), fast_mode=True)


# -- models 20-22 ------------------------------------------------------------------------------------------------

VARIANTS = (2, 20, 21, 22)


def captured_op_inputs(model_type, monkeypatch, tokens, weight_scale=1.0, seed=0):
    """The (q, k, v, beta) of every delta_net_fn call of a forward pass; weight_scale multiplies the projections
    so that sigmoid saturates and beta explores its whole range."""
    calls = []

    def recording(q, k, v, beta, W0):
        calls.append((q.detach(), k.detach(), v.detach(), beta.detach()))
        return delta_net_fn(q, k, v, beta, W0)

    monkeypatch.setattr(model_module, "delta_net_fn", recording)
    net = make_model(model_type, seed=seed, remove_pos_enc=True)
    with torch.no_grad():
        for block in net.layers[0::2]:
            block.in_proj.weight.mul_(weight_scale)
        net(tokens)
    return calls


@pytest.mark.parametrize("model_type", [20, 21, 22])
def test_registered(model_type):
    assert model_type in model_module.MODEL_NAMES and model_type in model_module.MODEL_SLUGS
    block = make_model(model_type).layers[0]
    assert type(block) is model_module.FAST_WEIGHT_BLOCKS[model_type]
    assert isinstance(block, model_module.DeltaNetBlock)


@pytest.mark.parametrize("model_type,unit_keys,beta_max", [(20, True, 2.0), (21, True, 1.0), (22, False, 2.0),
                                                          (2, False, 1.0)])
def test_key_normalisation_and_beta_range(model_type, unit_keys, beta_max, monkeypatch):
    calls = captured_op_inputs(model_type, monkeypatch, random_tokens(), weight_scale=8.0)
    assert len(calls) == 2   # one per layer
    for q, k, v, beta in calls:
        if unit_keys:
            for x in (q, k):
                torch.testing.assert_close(x.norm(dim=-1), torch.ones_like(x[..., 0]))
        else:   # elu+1 then divided by the sum: positive, summing to 1, so |k| <= 1
            for x in (q, k):
                assert (x > 0).all()
                torch.testing.assert_close(x.sum(-1), torch.ones_like(x[..., 0]))
        assert beta.shape == (*q.shape[:3], 1)
        assert (beta > 0).all() and (beta <= beta_max).all()   # (0, beta_max), but float32 sigmoid rounds to 1
    betas = torch.cat([beta.flatten() for *_, beta in calls])
    assert betas.max() > 0.9 * beta_max   # saturated projections reach the top of the range
    if beta_max == 2.0:
        assert (betas > 1).any()


def test_variants_differ_from_model_20_in_one_ingredient_each(monkeypatch):
    """Same seed -> the same initial weights for 2, 20, 21, 22; in the first layer (same input) the op's inputs then
    differ only in what the model changes: 21 halves 20's beta, 22 has 20's beta with DeltaNet's keys."""
    states = {t: make_model(t, seed=5, remove_pos_enc=True).state_dict() for t in VARIANTS}
    for model_type in VARIANTS[1:]:
        assert states[model_type].keys() == states[2].keys()
        for name, tensor in states[2].items():
            assert torch.equal(states[model_type][name], tensor), (model_type, name)
    tokens = random_tokens()
    first = {t: captured_op_inputs(t, monkeypatch, tokens, seed=5)[0] for t in VARIANTS}
    q20, k20, v20, b20 = first[20]
    q21, k21, v21, b21 = first[21]
    q22, k22, v22, b22 = first[22]
    q2, k2, v2, b2 = first[2]
    for v in (v2, v21, v22):
        assert torch.equal(v, v20)
    assert torch.equal(q21, q20) and torch.equal(k21, k20)             # 21: same L2 keys,
    torch.testing.assert_close(2 * b21, b20)                           #     half the beta
    assert torch.equal(b22, b20)                                       # 22: same beta,
    assert torch.equal(q22, q2) and torch.equal(k22, k2)               #     DeltaNet's keys
    assert not torch.allclose(k22, k20)
    torch.testing.assert_close(b22, 2 * b2)                            # 22 vs 2: only beta doubled


def test_run_directory_names(tmp_path):
    from test_main import run_main, write_tiny_parity
    data_dir = write_tiny_parity(tmp_path / "data" / "tiny")
    flags = ["--num_layer", "1", "--hidden_size", "16", "--n_head", "4", "--batch_size", "8", "--num_epoch", "1",
             "--remove_pos_enc"]
    for model_type, slug in ((20, "deltanet-neg"), (21, "deltanet-l2"), (22, "deltanet-beta2")):
        code, run_dir = run_main(tmp_path, data_dir, "--model_type", str(model_type), *flags)
        assert code == 0 and run_dir.name.startswith(f"{slug}-tiny-")
