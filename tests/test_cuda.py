"""The CUDA kernels of the four operators against their references, the fallback for unsupported inputs, and the
seven models training on a GPU. Skipped (with the reason shown) where no CUDA GPU is present.

The references run in float64 on the GPU, the kernels in float32; errors are measured as ||kernel - reference|| /
||reference|| per output and per gradient.
"""
import argparse
import warnings

import pytest
import torch

import kernel_loader
import model
from fast_transformers.reference import fast_weight_sum_reference
from fast_weight.reference import delta_net_reference
from rec_update_fwm_tanh.reference import rec_delta_reference
from self_ref_v0.reference import self_ref_v0_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

TOLERANCE = 1e-4  # float32 kernels vs float64 references, relative to the norm of each tensor


def sum_inputs(B, H, L, E, M, gen):
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return [randn(B, H, L, E), randn(B, H, L, E), randn(B, H, L, M), randn(B, H, E, M)]


def delta_inputs(B, H, L, E, M, gen):
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return [torch.softmax(randn(B, H, L, E), -1), torch.softmax(randn(B, H, L, E), -1), randn(B, H, L, M),
            torch.sigmoid(randn(B, H, L, 1)), randn(B, H, E, M)]


def rec_inputs(B, H, L, D, gen):
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    R = lambda *shape: randn(*shape) * 0.5 / D ** 0.5  # noqa: E731  (a contracting recurrence: no chaos to amplify)
    return [randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, 1), R(1, H, D, D),
            R(1, H, D, D), R(1, H, D, D), R(1, H, 1, D), randn(B, H, D, D) * 0.5, randn(B, H, 1, D)]


def srwm_inputs(B, H, L, D, gen):
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return [randn(B, H, L, D), randn(B, H, D, D) / D ** 0.5, randn(B, H, D, D) * 0.1 / D ** 0.5,
            randn(B, H, D, D) / D ** 0.5, randn(B, H, D, 4) / D ** 0.5 - 1]


# name: (folder, kernel base name, reference, number of differentiable inputs, input maker)
OPS = {
    # folder, operator, reference, differentiable inputs, input maker, sequence inputs
    "sum": ("fast_transformers", "fast_weight_sum", fast_weight_sum_reference, 3, sum_inputs, 3),
    "delta": ("fast_weight", "delta_net", delta_net_reference, 4, delta_inputs, 4),
    "rec": ("rec_update_fwm_tanh", "rec_delta", rec_delta_reference, 8, rec_inputs, 4),
    "srwm": ("self_ref_v0", "self_ref_v0", self_ref_v0_reference, 5, srwm_inputs, 1),
}

# Awkward shapes: (B, H, L, E, M) for sum and delta, (B, H, L, D) for rec and srwm. L = 1, odd L, B = 1, H = 1,
# E != M, the smallest and largest supported head sizes, and L past several staging chunks and checkpoints.
SHAPES = {
    "sum": [(2, 3, 1, 8, 8), (1, 1, 17, 5, 11), (3, 1, 33, 16, 7), (1, 2, 40, 64, 64), (2, 1, 21, 128, 128),
            (1, 1, 9, 200, 3), (1, 1, 9, 3, 256)],
    "delta": [(2, 3, 1, 8, 8), (1, 1, 17, 5, 11), (3, 1, 33, 16, 7), (1, 2, 40, 64, 64), (2, 1, 21, 128, 128),
              (1, 1, 9, 200, 3), (1, 1, 9, 3, 256)],
    "rec": [(2, 3, 1, 8), (1, 1, 17, 5), (3, 1, 33, 4), (1, 2, 70, 16), (2, 1, 40, 32), (1, 1, 37, 64)],
    "srwm": [(2, 3, 1, 4), (1, 1, 17, 5), (3, 1, 33, 4), (1, 2, 70, 16), (2, 1, 40, 32), (1, 1, 37, 64)],
}
CASES = [(op, shape) for op, shapes in SHAPES.items() for shape in shapes]
LONG = {"sum": (2, 2, 1000, 32, 16), "delta": (2, 2, 1000, 32, 16), "rec": (2, 2, 1000, 16),
        "srwm": (2, 2, 1000, 16)}


@pytest.fixture(autouse=True)
def kernels_enabled(monkeypatch):
    monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)


def extension(op):
    folder, name = OPS[op][:2]
    ext = kernel_loader.load(folder, name, "cuda")
    assert ext is not None, f"the CUDA extension {name}_cuda did not build (see the warning above)"
    return ext


def make_inputs(op, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [x.cuda() for x in OPS[op][4](*shape, gen)]


def run_with_grads(op, inputs, grad_out, dtype):
    """Output and gradients of the differentiable inputs through the dispatcher, in `dtype`."""
    folder, name, reference, n_diff = OPS[op][:4]
    leaves = [x.to(dtype).requires_grad_(i < n_diff) for i, x in enumerate(inputs)]
    out = kernel_loader.run_fused(folder, name, reference, n_diff, *leaves, num_sequences=OPS[op][5])
    grads = torch.autograd.grad(out, leaves[:n_diff], grad_out.to(dtype), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def reference_with_grads(op, inputs, grad_out):
    reference, n_diff = OPS[op][2], OPS[op][3]
    leaves = [x.double().requires_grad_(i < n_diff) for i, x in enumerate(inputs)]
    out = reference(*leaves)
    grads = torch.autograd.grad(out, leaves[:n_diff], grad_out.double(), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def relative_error(actual, expected):
    assert actual.shape == expected.shape and actual.device == expected.device
    assert torch.isfinite(actual).all()
    scale = expected.norm()
    return ((actual.double() - expected).norm() / scale).item() if scale > 0 else actual.abs().max().item()


def assert_matches_reference(op, shape, seed=0):
    inputs = make_inputs(op, shape, seed)
    assert extension(op).supports(*inputs), f"{op} {shape} should run on the CUDA kernel"
    grad_out = torch.randn(OPS[op][2](*inputs).shape, device="cuda")
    out, grads = run_with_grads(op, inputs, grad_out, torch.float32)
    ref_out, ref_grads = reference_with_grads(op, inputs, grad_out)
    errors = {"out": relative_error(out, ref_out)}
    errors.update({f"grad{i}": relative_error(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))})
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s in CASES])
def test_kernel_matches_reference(op, shape):
    assert_matches_reference(op, shape)


@pytest.mark.parametrize("op", list(OPS))
def test_long_sequence_matches_reference(op):
    assert_matches_reference(op, LONG[op], seed=1)


@pytest.mark.parametrize("op", list(OPS))
def test_kernel_is_deterministic_and_leaves_inputs_alone(op):
    """Bitwise-equal repeats (a race would move the result) and untouched arguments."""
    folder, name, reference, n_diff = OPS[op][:4]
    shape = SHAPES[op][3]
    inputs = make_inputs(op, shape, seed=2)
    originals = [x.clone() for x in inputs]
    ext = extension(op)
    out, *saved = ext.forward(*inputs)
    grad_out = torch.randn_like(out)
    grads = ext.backward(grad_out, *inputs, saved)
    out_again, *saved_again = ext.forward(*inputs)
    grads_again = ext.backward(grad_out, *inputs, saved_again)
    assert torch.equal(out, out_again)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert all(torch.equal(a, b) for a, b in zip(inputs, originals))
    assert len(grads) == n_diff


# Inputs the kernels refuse: too large a head, float64 and bfloat16. Each must give the reference's result.
UNSUPPORTED = [("sum", (1, 2, 5, 300, 8), torch.float32), ("delta", (1, 2, 5, 8, 257), torch.float32),
               ("rec", (1, 1, 5, 128), torch.float32), ("srwm", (1, 1, 5, 128), torch.float32)]
UNSUPPORTED += [(op, SHAPES[op][1], dtype) for op in OPS for dtype in (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize("op,shape,dtype", UNSUPPORTED,
                         ids=[f"{op}-{'x'.join(map(str, s))}-{str(d)[6:]}" for op, s, d in UNSUPPORTED])
def test_unsupported_inputs_fall_back_with_one_warning(op, shape, dtype):
    folder, name, reference, n_diff = OPS[op][:4]
    inputs = [x.to(dtype) for x in make_inputs(op, shape)]
    assert not extension(op).supports(*inputs)
    kernel_loader._warn_unsupported.cache_clear()
    with pytest.warns(UserWarning, match="does not handle") as record:
        out = kernel_loader.run_fused(folder, name, reference, n_diff, *inputs, num_sequences=OPS[op][5])
        kernel_loader.run_fused(folder, name, reference, n_diff, *inputs, num_sequences=OPS[op][5])
    assert sum("does not handle" in str(w.message) for w in record) == 1
    torch.testing.assert_close(out, reference(*inputs))


# ---------------------------------------------------------------------------------------------------------------
# The seven models on CUDA.

MODEL_TYPES = [0, 1, 2, 7, 8, 10, 12]
OP_OF_MODEL = {2: "delta", 7: "rec", 8: "sum", 12: "srwm"}  # the fast-weight models


def model_args(model_type):
    return argparse.Namespace(model_type=model_type, num_layer=2, hidden_size=32, n_head=4, ff_factor=2,
                              dropout=0.0, emb_size=16, no_embedding=False, remove_pos_enc=True)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_models_train_a_few_steps_on_cuda(model_type, monkeypatch):
    torch.manual_seed(0)
    vocab_in, vocab_out = 5, 4
    net = model.build_model(model_args(model_type), vocab_in, vocab_out).cuda()
    src = torch.randint(0, vocab_in - 1, (6, 13), device="cuda")
    tgt = torch.randint(0, vocab_out - 1, (6, 13), device="cuda")

    def loss_and_grads():
        net.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(src).reshape(-1, vocab_out), tgt.reshape(-1))
        loss.backward()
        return loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]

    if model_type in OP_OF_MODEL:  # the kernels give the reference's loss and gradients
        extension(OP_OF_MODEL[model_type])
        monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
        ref_loss, ref_grads = loss_and_grads()
        monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loss, grads = loss_and_grads()
        fallbacks = [str(w.message) for w in record if "PyTorch reference" in str(w.message)]
        assert not fallbacks, fallbacks  # a failed build or an unsupported shape would have warned
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= 1e-4 * r.norm() + 1e-7

    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(src).reshape(-1, vocab_out), tgt.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
