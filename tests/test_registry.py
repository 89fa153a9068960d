"""model.MODELS, the one registry of --model_type: every entry complete and buildable, the paper's order, the facts
the scripts read from it, a new model as one entry, and no model ID written anywhere else in the code."""
import argparse
import re
import tokenize
from pathlib import Path

import pytest

import main
import model
from model import (EXTENSION_MODELS, MODEL_NAMES, MODEL_SLUGS, MODELS, PAPER_MODELS, FastWeightBuilder,
                   FastWeightModel, ModelSpec, RecurrentModel, TransformerModel, build_model, config_error,
                   count_trainable_params)

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_args(model_type, **overrides):
    return argparse.Namespace(**{"model_type": model_type, "hidden_size": 16, "n_head": 4, "num_layer": 2,
                                 "ff_factor": 2, "emb_size": 8, "dropout": 0.0, "no_embedding": False,
                                 "remove_pos_enc": True, **overrides})


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_every_model_has_a_name_a_slug_and_a_builder_that_builds_it(model_type):
    spec = MODELS[model_type]
    assert spec.id == model_type and spec.name and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", spec.slug)
    net = build_model(make_args(model_type), 5, 4)
    expected = (RecurrentModel if spec.recurrent else FastWeightModel if spec.operator else TransformerModel)
    assert type(net) is expected
    if isinstance(spec.builder, FastWeightBuilder):
        assert isinstance(net.layers[0], spec.builder.block)


def test_names_and_slugs_are_unique_and_the_lookups_come_from_the_registry():
    assert len({s.name for s in MODELS.values()}) == len({s.slug for s in MODELS.values()}) == len(MODELS)
    assert MODEL_NAMES == {i: s.name for i, s in MODELS.items()} and list(MODEL_NAMES) == sorted(MODELS)
    assert MODEL_SLUGS == {i: s.slug for i, s in MODELS.items()}
    model_type = next(a for a in main.build_parser()._actions if a.dest == "model_type")
    assert model_type.choices == sorted(MODELS)
    assert all(f"{i}: {s.name}" in model_type.help for i, s in MODELS.items())


def test_the_paper_s_order_then_the_models_beyond_it():
    # Irie et al. (2023), Table 2: LSTM, e-LSTM, Transformer, Linear Transformer, DeltaNet, Recurrent Delta, SRWM.
    assert PAPER_MODELS == (0, 10, 1, 8, 2, 7, 12)
    assert {20, 21, 22} <= set(EXTENSION_MODELS) and not set(PAPER_MODELS) & set(EXTENSION_MODELS)
    assert tuple(MODELS) == PAPER_MODELS + EXTENSION_MODELS  # the paper's rows first, whatever is added later


def test_the_facts_the_code_and_the_scripts_read():
    paper = {i: MODELS[i] for i in PAPER_MODELS}
    assert {i for i, s in paper.items() if s.recurrent} == {0, 10}
    assert {i for i, s in paper.items() if s.one_layer} == {10}
    assert {i for i, s in MODELS.items() if s.requires_remove_pos_enc} == {12}
    assert {i: s.operator for i, s in paper.items()} == {0: None, 10: None, 1: None, 8: "fast_weight_sum",
                                                         2: "delta_net_fn", 7: "rec_delta_fn", 12: "self_ref_v0"}
    assert all(MODELS[i].operator == "delta_net_fn" for i in (20, 21, 22))
    for spec in MODELS.values():  # the operator named is the function model.py calls
        assert spec.operator is None or callable(getattr(model, spec.operator))


def test_the_facts_hold_for_the_models_built():
    one_layer, two_layers = (count_trainable_params(build_model(make_args(10, num_layer=n), 5, 4)) for n in (1, 2))
    assert one_layer == two_layers
    assert "--remove_pos_enc" in config_error(make_args(12, remove_pos_enc=False))
    assert config_error(make_args(0, hidden_size=18)) is None  # recurrent: no heads to divide the width


def test_a_new_model_is_one_entry(monkeypatch):
    """What a later model (DeltaProduct, say) needs: its entry, and nothing elsewhere, to be built and checked."""
    spec = ModelSpec(99, "Test Net", "test-net", FastWeightBuilder(model.DeltaNetBlock), operator="delta_net_fn",
                     min_head_dim=8, in_paper=False)
    monkeypatch.setitem(MODELS, 99, spec)
    assert type(build_model(make_args(99, hidden_size=32), 5, 4).layers[0]) is model.DeltaNetBlock
    assert "at least 8" in config_error(make_args(99))


# Model IDs belong to the registry (model.py), main.py's flag parser (which reads it) and the tests.
def code_without_strings(path):
    """The file's tokens with strings and comments left out, one space apart."""
    skipped = {tokenize.STRING, tokenize.COMMENT, *(getattr(tokenize, name) for name in
                                                    ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                                    if hasattr(tokenize, name))}
    with open(path) as f:
        return " ".join(token.string for token in tokenize.generate_tokens(f.readline) if token.type not in skipped)


def integers(text):
    return {int(n) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", text)}


CODE_OUTSIDE_THE_REGISTRY = ["main.py", *sorted(f"scripts/{p.name}" for p in (REPO_ROOT / "scripts").glob("*.py"))]


@pytest.mark.parametrize("path", CODE_OUTSIDE_THE_REGISTRY)
def test_no_model_id_is_written_outside_the_registry(path):
    code = code_without_strings(REPO_ROOT / path)
    for comparison in re.finditer(r"\bmodel_type\b[^=!]{0,20}?(==|!=|\bin\b)\s*[\[({]?\s*\d+", code):
        assert not integers(comparison.group()) & set(MODELS), comparison.group()
    # any equality with an ID (but 0, as often an exit status or a count), or with a constant standing for one
    for comparison in re.finditer(r"==\s*\d+\b", code):
        assert not integers(comparison.group()) & (set(MODELS) - {0}), f"{path}: {comparison.group()}"
    assert not re.search(r"\bmodel_type\s*(==|!=)\s*[A-Z][A-Z_0-9]*\b", code)
    for group in re.finditer(r"[\[({][^\[\](){}]*[\])}]", code):  # tuples, lists, sets and dicts of IDs
        numbers = integers(group.group())
        assert not (len(numbers) >= 3 and numbers <= set(MODELS)), f"{path}: {group.group()}"
