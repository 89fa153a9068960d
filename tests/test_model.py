"""The seven models and the models beyond the paper (20-26): shapes, gradients, causality, parameter counts, initialisations
and config checks."""
import argparse
import math

import pytest
import torch

from model import (FAST_WEIGHT_BLOCKS, MODEL_NAMES, ModelConfigError, build_model, config_error,
                   count_trainable_params, sinusoidal_positions)

IN_VOCAB, OUT_VOCAB = 5, 4
BATCH, LENGTH = 3, 9


def make_args(model_type, **overrides):
    args = dict(model_type=model_type, hidden_size=16, n_head=4, num_layer=2, ff_factor=2, emb_size=8, dropout=0.0,
                no_embedding=False, remove_pos_enc=model_type == 12)
    args.update(overrides)
    return argparse.Namespace(**args)


def make_model(model_type, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(make_args(model_type, **overrides), IN_VOCAB, OUT_VOCAB)


def random_tokens(seed=0):
    return torch.randint(0, IN_VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


# Every model, plus the variants that change the input path: one-hot inputs and positional encoding.
VARIANTS = [(t, {}) for t in sorted(MODEL_NAMES)] + [
    (0, {"no_embedding": True}), (10, {"no_embedding": True}),
    (2, {"remove_pos_enc": True}), (7, {"remove_pos_enc": True}), (8, {"remove_pos_enc": True})]
VARIANT_IDS = [f"{t}-{'-'.join(k for k in o) or 'default'}" for t, o in VARIANTS]


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=VARIANT_IDS)
def test_forward_shape(model_type, overrides):
    logits = make_model(model_type, **overrides)(random_tokens())
    assert logits.shape == (BATCH, LENGTH, OUT_VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=VARIANT_IDS)
def test_backward_reaches_every_parameter(model_type, overrides):
    model = make_model(model_type, **overrides)
    model(random_tokens()).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=VARIANT_IDS)
def test_causal(model_type, overrides):
    """Changing the tokens from position t on never changes the logits before t."""
    model = make_model(model_type, **overrides).eval()
    tokens = random_tokens()
    with torch.no_grad():
        reference = model(tokens)
        for t in (1, LENGTH // 2, LENGTH - 1):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1 + torch.arange(LENGTH - t)) % IN_VOCAB
            logits = model(changed)
            torch.testing.assert_close(logits[:, :t], reference[:, :t], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(logits[:, t], reference[:, t]), "the changed token has no effect"


# -- parameter counts, written out from the architecture description ---------------------------------------------

def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def layer_norm(dim):
    return 2 * dim


def expected_params(model_type, hidden_size, n_head, num_layer, ff_factor, emb_size, no_embedding=False, **_):
    D, H, d, F = hidden_size, n_head, hidden_size // n_head, ff_factor * hidden_size
    output = linear(D, OUT_VOCAB)
    if model_type in (0, 10):
        inp = IN_VOCAB if no_embedding else emb_size
        embedding = 0 if no_embedding else IN_VOCAB * emb_size
        if model_type == 0:  # nn.LSTM: per layer W_ih (4D x in), W_hh (4D x D), two biases of 4D
            lstm = sum(4 * D * (n_in + D) + 8 * D for n_in in [inp] + [D] * (num_layer - 1))
            return embedding + lstm + output
        elstm = 2 * D * inp + 4 * D  # W_z, W_f; w_z, w_f, b_z, b_f
        return embedding + elstm + linear(inp + D, D) + output
    embedding = IN_VOCAB * D
    if model_type == 1:
        attention = linear(D, 3 * D) + linear(D, D)
        layer = attention + linear(D, F) + linear(F, D) + 2 * layer_norm(D)
        return embedding + num_layer * layer + layer_norm(D) + output
    feed_forward = layer_norm(D) + linear(D, F) + linear(F, D)
    out_proj = linear(H * d, D, bias=False)
    block = {
        8: layer_norm(D) + linear(D, H * 3 * d, bias=False) + out_proj,
        2: layer_norm(D) + linear(D, H * (3 * d + 1), bias=False) + out_proj,
        20: layer_norm(D) + linear(D, H * (3 * d + 1), bias=False) + out_proj,   # 20-22: DeltaNet's parameters
        7: layer_norm(D) + linear(D, H * (3 * d + 1), bias=False) + out_proj + 3 * H * d * d + H * d,
        12: 3 * H * d * d + H * d * 4 + layer_norm(D) + out_proj,
        # 23-26, DeltaProduct: q, then n_h keys, values and betas per head
        **{m: layer_norm(D) + linear(D, H * (d + n * (2 * d + 1)), bias=False) + out_proj
           for m, n in ((23, 2), (24, 3), (25, 4), (26, 2))},
        # 27-28, Gated DeltaNet: DeltaNet's slices and a decay slice per head; A_log and dt_bias per head
        **{m: layer_norm(D) + linear(D, H * (3 * d + 2), bias=False) + out_proj + 2 * H for m in (27, 28)},
    }[model_type if model_type not in (21, 22) else 20]
    return embedding + num_layer * (block + feed_forward) + output


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=VARIANT_IDS)
def test_parameter_count(model_type, overrides):
    config = dict(hidden_size=24, n_head=3, num_layer=3, ff_factor=3, emb_size=7, **overrides)
    model = make_model(model_type, **config)
    assert count_trainable_params(model) == expected_params(model_type, **config)


def test_elstm_ignores_num_layer():
    one, three = make_model(10, num_layer=1), make_model(10, num_layer=3)
    assert count_trainable_params(one) == count_trainable_params(three)


# -- initialisations ---------------------------------------------------------------------------------------------

def assert_normal(param, mean, std):
    values = param.detach().flatten()
    assert abs(values.mean().item() - mean) < 4 * std / math.sqrt(values.numel())
    assert abs(values.std().item() / std - 1) < 4 / math.sqrt(2 * values.numel())


def test_custom_initialisations():
    d = 32
    srwm = make_model(12, hidden_size=4 * d, n_head=4, num_layer=1).layers[0]
    assert_normal(srwm.W_y, 0.0, 1 / math.sqrt(d))
    assert_normal(srwm.W_k, 0.0, 1 / math.sqrt(d))
    assert_normal(srwm.W_q, 0.0, 0.01 / math.sqrt(d))
    assert_normal(srwm.w_b, -1.0, 1 / math.sqrt(d))
    rec = make_model(7, hidden_size=4 * d, n_head=4, num_layer=1).layers[0]
    for param in (rec.R_q, rec.R_k, rec.R_v, rec.r_b):
        assert_normal(param, 0.0, 1 / math.sqrt(d))
    elstm = make_model(10, hidden_size=256, emb_size=64).body
    for param in (elstm.W_z, elstm.W_f, elstm.w_z, elstm.w_f, elstm.b_z, elstm.b_f):
        assert_normal(param, 0.0, 0.1)


def original_order_elstm(seed, hidden, emb):
    """The e-LSTM's parameters drawn in the original's order (shared/spec/training.md): embedding; six uniform
    allocations, then normal_(0, 0.1) over them in the same order; output gate; output layer."""
    torch.manual_seed(seed)
    embedding = torch.nn.Embedding(IN_VOCAB, emb)
    shapes = [(hidden, emb), (hidden, emb), (1, hidden), (1, hidden), (1, hidden), (1, hidden)]
    recurrent = [torch.rand(*shape) for shape in shapes]
    for tensor in recurrent:
        tensor.normal_(0.0, 0.1)
    gate, out = torch.nn.Linear(emb + hidden, hidden), torch.nn.Linear(hidden, OUT_VOCAB)
    return [embedding.weight, *recurrent, gate.weight, gate.bias, out.weight, out.bias]


def original_order_srwm(seed, hidden, heads, ff, layers):
    """The SRWM's parameters drawn in the original's order: embedding; per layer the bias-free output projection
    before normal_ for W_y, W_q, W_k, w_b, then the feed-forward block; output layer."""
    torch.manual_seed(seed)
    d = hidden // heads
    params = [torch.nn.Embedding(IN_VOCAB, hidden).weight]
    for _ in range(layers):
        matrices = [torch.empty(1, heads, d, d) for _ in range(3)] + [torch.empty(1, heads, d, 4)]
        layer_norm = torch.nn.LayerNorm(hidden)
        out_proj = torch.nn.Linear(hidden, hidden, bias=False)
        std = 1 / math.sqrt(d)
        for tensor, mean, scale in zip(matrices, (0.0, 0.0, 0.0, -1.0), (std, 0.01 * std, std, std)):
            tensor.normal_(mean, scale)
        ff_norm = torch.nn.LayerNorm(hidden)
        linear1, linear2 = torch.nn.Linear(hidden, ff * hidden), torch.nn.Linear(ff * hidden, hidden)
        params += [*matrices, layer_norm.weight, layer_norm.bias, out_proj.weight, ff_norm.weight, ff_norm.bias,
                   linear1.weight, linear1.bias, linear2.weight, linear2.bias]
    out = torch.nn.Linear(hidden, OUT_VOCAB)
    return params + [out.weight, out.bias]


def test_elstm_initial_weights_follow_the_original_rng_order():
    ours = make_model(10, seed=1, hidden_size=12, emb_size=6)
    expected = original_order_elstm(1, hidden=12, emb=6)
    actual = [ours.input_layer.weight, ours.body.W_z, ours.body.W_f, ours.body.w_z, ours.body.w_f, ours.body.b_z,
              ours.body.b_f, ours.body.output_gate.weight, ours.body.output_gate.bias, ours.out_layer.weight,
              ours.out_layer.bias]
    for mine, theirs in zip(actual, expected, strict=True):
        assert torch.equal(mine.detach(), theirs.detach().reshape(mine.shape))


def test_srwm_initial_weights_follow_the_original_rng_order():
    ours = make_model(12, seed=1, hidden_size=16, n_head=4, ff_factor=2, num_layer=2)
    expected = original_order_srwm(1, hidden=16, heads=4, ff=2, layers=2)
    actual = [ours.embedding.weight]
    for srwm, ff in zip(ours.layers[0::2], ours.layers[1::2]):
        actual += [srwm.W_y, srwm.W_q, srwm.W_k, srwm.w_b, srwm.layer_norm.weight, srwm.layer_norm.bias,
                   srwm.out_proj.weight, ff.layer_norm.weight, ff.layer_norm.bias, ff.net[0].weight, ff.net[0].bias,
                   ff.net[3].weight, ff.net[3].bias]
    actual += [ours.out_layer.weight, ours.out_layer.bias]
    for mine, theirs in zip(actual, expected, strict=True):
        assert torch.equal(mine.detach(), theirs.detach())


def test_fast_weight_models_share_one_class_and_differ_in_the_block():
    models = {t: make_model(t) for t in FAST_WEIGHT_BLOCKS}
    assert len({type(m) for m in models.values()}) == 1
    for model_type, model in models.items():
        assert isinstance(model.layers[0], FAST_WEIGHT_BLOCKS[model_type])


def test_positional_encoding():
    table = sinusoidal_positions(7, 6, "cpu", torch.float32)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 3))
    torch.testing.assert_close(table[:, 0], torch.sin(torch.arange(7.0)))
    torch.testing.assert_close(table[:, 3], torch.cos(torch.arange(7.0) / 10000 ** (2 / 6)))
    with_pe, without_pe = make_model(2, seed=3), make_model(2, seed=3, remove_pos_enc=True)
    tokens = random_tokens()
    assert not torch.allclose(with_pe(tokens), without_pe(tokens))


# -- configuration errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,overrides,fragment", [
    (2, {"hidden_size": 18, "n_head": 4}, "divisible"),
    (1, {"hidden_size": 18, "n_head": 4}, "divisible"),
    (12, {"remove_pos_enc": False}, "--remove_pos_enc"),
    (12, {"hidden_size": 12, "n_head": 4}, "at least 4"),
    (5, {}, "unknown --model_type"),
])
def test_config_errors(model_type, overrides, fragment):
    args = make_args(model_type, **overrides)
    assert fragment in config_error(args)
    with pytest.raises(ModelConfigError):
        build_model(args, IN_VOCAB, OUT_VOCAB)


def test_rnns_do_not_need_heads():
    assert config_error(make_args(0, hidden_size=18, n_head=4)) is None
