"""Golden values for every --model_type: the logits and the loss gradient of one training step at seed 1 on a fixed
input, built through model.build_model as main.py builds a run's model. The numbers are in tests/fixtures:
golden_paper.json for the paper's seven models, computed by the original repository's model code (on CPU),
golden_extensions.json for models 20-28, computed by this repository's reference loops; tests/fixtures/README.md
says how. Each model with a fast-weight operator is checked twice: through the PyTorch reference and through its
fused CPU kernel (which must then have run, not the reference fallback)."""
import argparse
import contextlib
import json
from pathlib import Path

import pytest
import torch

import kernel_loader
from kernel_paths import fused_only
from model import MODELS, build_model
from utils import seed_everything, sequence_loss

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = {name: json.loads((FIXTURES / f"golden_{name}.json").read_text()) for name in ("paper", "extensions")}
# float32 throughout: the kernels, the reference loops and the original's code differ by rounding only.
RTOL = 1e-5


def golden_entry(model_type):
    fixture = GOLDEN["paper" if MODELS[model_type].in_paper else "extensions"]
    return fixture["setup"], fixture["models"][str(model_type)]


def gradient_summary(grad):
    """[sum, sum of |g|, sum of g_i cos(i)] over the flattened gradient, in float64: a sign error, a swapped
    pair of entries or a wrong scale each moves one of them."""
    g = grad.detach().double().flatten()
    return [g.sum().item(), g.abs().sum().item(), (g * torch.cos(torch.arange(g.numel(), dtype=torch.float64))).sum().item()]


def training_step(model_type, setup):
    """(logits, loss, {parameter name: gradient_summary}) of one forward and backward pass, as main.py's Run:
    seed_everything, build_model, then utils.sequence_loss on the non-pad targets."""
    args = argparse.Namespace(model_type=model_type, remove_pos_enc=MODELS[model_type].requires_remove_pos_enc,
                              **setup["flags"])
    seed_everything(setup["seed"])
    model = build_model(args, setup["in_vocab_size"], setup["out_vocab_size"]).train()
    logits = model(torch.tensor(setup["tokens"]))
    loss = sequence_loss(logits, torch.tensor(setup["targets"]), setup["pad"])
    loss.backward()
    return logits, loss, {name: gradient_summary(p.grad) for name, p in model.named_parameters()}


CASES = [(t, "reference") for t in sorted(MODELS)] + [(t, "fused") for t in sorted(MODELS) if MODELS[t].operator]


@pytest.mark.parametrize("model_type,path", CASES, ids=[f"{t}-{MODELS[t].slug}-{p}" for t, p in CASES])
def test_one_training_step_matches_the_golden_values(model_type, path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv(kernel_loader.FORCE_REFERENCE_ENV, "1")
    else:
        monkeypatch.delenv(kernel_loader.FORCE_REFERENCE_ENV, raising=False)
    setup, golden = golden_entry(model_type)
    with fused_only() if path == "fused" else contextlib.nullcontext():
        logits, loss, grads = training_step(model_type, setup)
    expected_logits = torch.tensor(golden["logits"], dtype=torch.float64).view(logits.shape)
    torch.testing.assert_close(logits.detach().double(), expected_logits, rtol=RTOL, atol=RTOL)
    assert loss.item() == pytest.approx(golden["loss"], rel=RTOL)
    assert grads.keys() == golden["grads"].keys()
    for name, (total, size, weighted) in golden["grads"].items():
        scale = RTOL * size + 1e-9  # the sums of signed entries may cancel: measured against sum |g|
        actual = grads[name]
        assert abs(actual[0] - total) <= scale and abs(actual[2] - weighted) <= scale, (name, actual, golden["grads"][name])
        assert actual[1] == pytest.approx(size, rel=RTOL, abs=1e-9), (name, actual, golden["grads"][name])
