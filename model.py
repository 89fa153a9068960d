"""The seven sequence models of the paper, selected by `--model_type`, and models beyond it: three DeltaNet variants
(20-22: negative eigenvalues after Grazzi et al., ICLR 2025, and the two halves of that change), DeltaProduct
(23-26, Siems et al., 2025) and Gated DeltaNet (27, 28; Yang, Kautz & Hatamizadeh, ICLR 2025).

Every model maps a (B, L) LongTensor of token ids to (B, L, out_vocab) logits and is causal: the logits at
position t depend on tokens 0..t only. The layers work batch-first, (B, L, hidden); the fast-weight operators
take (B, H, L, d). Equations and initialisations: docs/models.md.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_transformers import fast_weight_sum
from fast_weight import delta_net_fn, delta_product_fn, gated_delta_net_fn
from rec_update_fwm_tanh import rec_delta_fn
from self_ref_v0 import self_ref_v0

class ModelConfigError(ValueError):
    """A flag combination that cannot build a model; the message is one user-readable line."""


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


class OneHot(nn.Module):
    """Replaces the embedding under --no_embedding: token ids become one-hot vectors (pad row included)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, tokens):
        return F.one_hot(tokens, self.num_classes).float()


def sinusoidal_positions(length, dim, device, dtype):
    """The (length, dim) table of Vaswani et al.: sin on even channels, cos on odd ones."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[:dim // 2])
    return table.to(dtype)


def split_heads(x, num_head):
    """(B, L, H*w) -> (B, H, L, w)."""
    batch, length, width = x.shape
    return x.view(batch, length, num_head, width // num_head).permute(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, w) -> (B, L, H*w)."""
    batch, num_head, length, width = x.shape
    return x.permute(0, 2, 1, 3).reshape(batch, length, num_head * width)


def elu_plus_one(x):
    return F.elu(x) + 1.0


def sum_normalised(x):
    return x / x.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# LSTM and e-LSTM: input layer -> recurrent body -> dropout -> output layer


class LSTMBody(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class ELSTMBody(nn.Module):
    """One element-wise recurrent layer (Quasi-LSTM) followed by its output gate.

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t with z_t, f_t depending on c_{t-1} only element-wise;
    output o_t * c_t with o_t = sigmoid(Linear([x_t; c_t])).
    """

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        # The original allocates with uniform draws that normal_ then overwrites; the draws are kept because they
        # advance the RNG, so that a seed gives the original's initial weights.
        self.W_z = nn.Parameter(torch.rand(hidden_size, input_size))
        self.W_f = nn.Parameter(torch.rand(hidden_size, input_size))
        self.w_z = nn.Parameter(torch.rand(hidden_size))
        self.w_f = nn.Parameter(torch.rand(hidden_size))
        self.b_z = nn.Parameter(torch.rand(hidden_size))
        self.b_f = nn.Parameter(torch.rand(hidden_size))
        for param in (self.W_z, self.W_f, self.w_z, self.w_f, self.b_z, self.b_f):
            nn.init.normal_(param, mean=0.0, std=0.1)
        self.output_gate = nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x):
        # The input projections of all steps are computed at once; only the element-wise recurrence loops.
        z_in = F.linear(x, self.W_z) + self.b_z
        f_in = F.linear(x, self.W_f) + self.b_f
        cell = x.new_zeros(x.shape[0], self.hidden_size)
        cells = []
        for t in range(x.shape[1]):
            z = torch.tanh(z_in[:, t] + self.w_z * cell)
            f = torch.sigmoid(f_in[:, t] + self.w_f * cell)
            cell = f * cell + (1.0 - f) * z
            cells.append(cell)
        cells = torch.stack(cells, dim=1)
        return torch.sigmoid(self.output_gate(torch.cat([x, cells], dim=-1))) * cells


class RecurrentModel(nn.Module):
    def __init__(self, body_type, in_vocab_size, out_vocab_size, emb_size, hidden_size, num_layers, dropout,
                 no_embedding):
        super().__init__()
        if no_embedding:
            self.input_layer, input_size = OneHot(in_vocab_size), in_vocab_size
        else:
            self.input_layer, input_size = nn.Embedding(in_vocab_size, emb_size), emb_size
        if body_type == "lstm":
            self.body = LSTMBody(input_size, hidden_size, num_layers)
        else:
            self.body = ELSTMBody(input_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_layer = nn.Linear(hidden_size, out_vocab_size)

    def forward(self, tokens):
        return self.out_layer(self.dropout(self.body(self.input_layer(tokens))))


# ---------------------------------------------------------------------------------------------------------------
# Transformer


class TransformerModel(nn.Module):
    """Post-norm nn.TransformerEncoder with a final LayerNorm and a causal mask; no positional encoding
    (the original never gives this model one)."""

    def __init__(self, in_vocab_size, out_vocab_size, hidden_size, num_layers, num_head, ff_factor, dropout):
        super().__init__()
        self.embedding = nn.Embedding(in_vocab_size, hidden_size)
        layer = nn.TransformerEncoderLayer(d_model=hidden_size, nhead=num_head,
                                           dim_feedforward=ff_factor * hidden_size, dropout=dropout,
                                           activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_size),
                                             enable_nested_tensor=False)
        self.out_layer = nn.Linear(hidden_size, out_vocab_size)

    def forward(self, tokens):
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.encoder(self.embedding(tokens), mask=mask, is_causal=True)
        return self.out_layer(hidden)


# ---------------------------------------------------------------------------------------------------------------
# Fast-weight models: embedding -> num_layers x [fast-weight block, feed-forward block] -> output


class FeedForwardBlock(nn.Module):
    """x + Dropout(Linear(Dropout(ReLU(Linear(LayerNorm(x))))))."""

    def __init__(self, hidden_size, ff_factor, dropout):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.net = nn.Sequential(nn.Linear(hidden_size, ff_factor * hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ff_factor * hidden_size, hidden_size), nn.Dropout(dropout))

    def forward(self, x):
        return x + self.net(self.layer_norm(x))


class ProjectedFastWeightBlock(nn.Module):
    """The pre-norm fast-weight block shared by the Linear Transformer, DeltaNet and Recurrent Delta:
    h = LayerNorm(x); one bias-free projection gives, per head, slices of widths `head_slices(d)` (q, k, v and
    possibly beta, in that order); the operator mixes them over time; x + Dropout(Linear(out)).
    Subclasses choose the slices and `fast_weight`, the operator call."""

    def __init__(self, hidden_size, num_head, dropout):
        super().__init__()
        self.num_head = num_head
        self.head_dim = hidden_size // num_head
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.slices = self.head_slices(self.head_dim)
        self.in_proj = nn.Linear(hidden_size, num_head * sum(self.slices), bias=False)
        self.out_proj = nn.Linear(num_head * self.head_dim, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def head_slices(self, head_dim):
        raise NotImplementedError

    def fast_weight(self, *heads):
        raise NotImplementedError

    def forward(self, x):
        heads = split_heads(self.in_proj(self.layer_norm(x)), self.num_head).split(self.slices, dim=-1)
        return x + self.dropout(self.out_proj(merge_heads(self.fast_weight(*heads))))

    def zero_fast_weights(self, like):
        batch = like.shape[0]
        return like.new_zeros(batch, self.num_head, self.head_dim, self.head_dim)


class LinearAttentionBlock(ProjectedFastWeightBlock):
    """Linear Transformer: sum update rule, q and k through elu+1."""

    def head_slices(self, head_dim):
        return (head_dim, head_dim, head_dim)

    def fast_weight(self, q, k, v):
        return fast_weight_sum(elu_plus_one(q), elu_plus_one(k), v, self.zero_fast_weights(q))


class DeltaNetBlock(ProjectedFastWeightBlock):
    """DeltaNet: delta update rule; q, k through elu+1 and sum normalisation; sigmoid learning rate per head."""

    def head_slices(self, head_dim):
        return (head_dim, head_dim, head_dim, 1)

    def fast_weight(self, q, k, v, beta):
        q = sum_normalised(elu_plus_one(q))
        k = sum_normalised(elu_plus_one(k))
        return delta_net_fn(q, k, v, torch.sigmoid(beta), self.zero_fast_weights(q))


class DeltaNetVariantBlock(DeltaNetBlock):
    """DeltaNet with two switches (models 20-22; beyond the paper, see Grazzi et al., ICLR 2025):
    `l2_keys`: q and k L2-normalised per head (F.normalize, default eps 1e-12) instead of elu+1 and sum
    normalisation, so that |k| = 1; `beta_scale`: beta = beta_scale * sigmoid(.), i.e. in (0, 2) for 2.
    The state transition W_t = (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T then has the eigenvalue
    1 - beta_t |k_t|^2 along k_t, in (-1, 1) when both switches are on (model 20). Same projection, parameters
    and initialisation as DeltaNet (2), so a seed gives the same initial weights."""

    l2_keys = True
    beta_scale = 2.0

    def fast_weight(self, q, k, v, beta):
        if self.l2_keys:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        else:
            q, k = sum_normalised(elu_plus_one(q)), sum_normalised(elu_plus_one(k))
        return delta_net_fn(q, k, v, self.beta_scale * torch.sigmoid(beta), self.zero_fast_weights(q))


class NegativeEigenvalueDeltaNetBlock(DeltaNetVariantBlock):
    """Model 20, DeltaNet [-1, 1]: L2-normalised q, k and beta in (0, 2)."""


class L2DeltaNetBlock(DeltaNetVariantBlock):
    """Model 21 (ablation): L2-normalised q, k, beta in (0, 1) as in DeltaNet: eigenvalues in (0, 1)."""
    beta_scale = 1.0


class WideBetaDeltaNetBlock(DeltaNetVariantBlock):
    """Model 22 (ablation): DeltaNet's elu+1, sum-normalised q, k with beta in (0, 2). |k|^2 <= 1 (equality only
    for a one-hot k), so the eigenvalue 1 - beta |k|^2 is negative only for keys concentrated on few entries."""
    l2_keys = False


class DeltaProductBlock(ProjectedFastWeightBlock):
    """DeltaProduct (Siems et al., 2025; models 23-26, beyond the paper): each token writes `steps` (n_h) key/value
    pairs with the delta rule, W <- (I - beta_j k_j k_j^T) W + beta_j k_j v_j^T for j = 1..n_h, and its query reads
    W after the last. One projection gives per head q, the n_h keys, the n_h values and the n_h betas; q and the
    keys are L2-normalised and beta = beta_scale * sigmoid(.), so with beta_scale 2 each step's eigenvalue
    1 - beta_j along k_j lies in (-1, 1), as in model 20 (which is n_h = 1). A product of n_h such reflections
    can permute up to n_h + 1 directions of the state, the point for the group word problems."""

    steps = 2
    beta_scale = 2.0

    def head_slices(self, head_dim):
        return (head_dim, self.steps * head_dim, self.steps * head_dim, self.steps)

    def fast_weight(self, q, k, v, beta):
        by_step = [x.unflatten(-1, (self.steps, -1)) for x in (k, v)]  # (B, H, L, n_h, d)
        keys, values = F.normalize(by_step[0], dim=-1), by_step[1]
        return delta_product_fn(F.normalize(q, dim=-1), keys, values, self.beta_scale * torch.sigmoid(beta),
                                self.zero_fast_weights(q))


class DeltaProduct2Block(DeltaProductBlock):
    """Model 23: n_h = 2, beta in (0, 2)."""


class DeltaProduct3Block(DeltaProductBlock):
    """Model 24: n_h = 3, beta in (0, 2)."""
    steps = 3


class DeltaProduct4Block(DeltaProductBlock):
    """Model 25: n_h = 4, beta in (0, 2)."""
    steps = 4


class PositiveDeltaProduct2Block(DeltaProductBlock):
    """Model 26 (ablation): n_h = 2 with beta in (0, 1): eigenvalues in (0, 1), no reflection."""
    beta_scale = 1.0


class GatedDeltaNetBlock(ProjectedFastWeightBlock):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025; models 27, 28, beyond the paper): the delta rule with a
    decay alpha_t in (0, 1) per head and token, W_t = alpha_t (I - beta_t k_t k_t^T) W_{t-1} + beta_t k_t v_t^T.
    q and k L2-normalised and beta = beta_scale * sigmoid(.), as in model 20 (beta_scale 2: eigenvalues of the
    transition in (-alpha_t, alpha_t) along k_t, down to -1). The decay comes from one more slice of the projection,
    a_t, as the authors' code makes it (after Mamba2): alpha_t = exp(-A softplus(a_t + dt_bias)) with A > 0 and
    dt_bias per head. So log alpha_t is minus a positive rate that A scales per head, and a head can hold its state
    (alpha_t -> 1 as a_t -> -inf) or clear it (alpha_t -> 0) without a sigmoid's saturation near either end. Mamba2's
    initialisation: A uniform in [1, 16], softplus(dt_bias) log-uniform in [0.001, 0.1]: alpha_t about 0.2-0.999.
    The rest of the authors' layer (short convolutions, an output gate and norm) is left out, so that the model
    differs from model 20 by the decay alone."""

    beta_scale = 1.0

    def __init__(self, hidden_size, num_head, dropout):
        super().__init__(hidden_size, num_head, dropout)
        self.A_log = nn.Parameter(torch.empty(num_head).uniform_(1.0, 16.0).log())
        rate = torch.empty(num_head).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(rate + torch.log(-torch.expm1(-rate)))  # softplus(dt_bias) = rate

    def head_slices(self, head_dim):
        return (head_dim, head_dim, head_dim, 1, 1)

    def decay(self, a):
        """alpha (B, H, L, 1) from the decay slice a (B, H, L, 1)."""
        per_head = (-1, 1, 1)
        return torch.exp(-self.A_log.exp().view(per_head) * F.softplus(a + self.dt_bias.view(per_head)))

    def fast_weight(self, q, k, v, beta, a):
        return gated_delta_net_fn(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                  self.beta_scale * torch.sigmoid(beta), self.decay(a), self.zero_fast_weights(q))


class NegativeEigenvalueGatedDeltaNetBlock(GatedDeltaNetBlock):
    """Model 28: Gated DeltaNet with beta in (0, 2)."""
    beta_scale = 2.0


class RecurrentDeltaBlock(ProjectedFastWeightBlock):
    """Recurrent Delta: raw q, k, v, beta go to the operator, which adds the recurrent terms R_* tanh(out_{t-1})
    and applies softmax/sigmoid itself."""

    def __init__(self, hidden_size, num_head, dropout):
        super().__init__(hidden_size, num_head, dropout)
        d = self.head_dim
        self.R_q = nn.Parameter(torch.empty(1, num_head, d, d))
        self.R_k = nn.Parameter(torch.empty(1, num_head, d, d))
        self.R_v = nn.Parameter(torch.empty(1, num_head, d, d))
        self.r_b = nn.Parameter(torch.empty(1, num_head, 1, d))
        for param in (self.R_q, self.R_k, self.R_v, self.r_b):
            nn.init.normal_(param, mean=0.0, std=1.0 / math.sqrt(d))

    def head_slices(self, head_dim):
        return (head_dim, head_dim, head_dim, 1)

    def fast_weight(self, q, k, v, beta):
        h0 = q.new_zeros(q.shape[0], self.num_head, 1, self.head_dim)
        return rec_delta_fn(q, k, v, beta, self.R_q, self.R_k, self.R_v, self.r_b, self.zero_fast_weights(q), h0)


class SRWMBlock(nn.Module):
    """Self-referential weight matrix: the residual stream itself, split into heads, is the SRWM input (no
    LayerNorm before the op); the residual is LayerNorm(x) + Dropout(Linear(out))."""

    def __init__(self, hidden_size, num_head, dropout):
        super().__init__()
        self.num_head = num_head
        d = self.head_dim = hidden_size // num_head
        std = 1.0 / math.sqrt(d)
        self.W_y = nn.Parameter(torch.empty(1, num_head, d, d))
        self.W_q = nn.Parameter(torch.empty(1, num_head, d, d))
        self.W_k = nn.Parameter(torch.empty(1, num_head, d, d))
        self.w_b = nn.Parameter(torch.empty(1, num_head, d, 4))
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.out_proj = nn.Linear(num_head * d, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        # After out_proj's own initialisation, as in the original: the RNG order fixes the initial weights.
        nn.init.normal_(self.W_y, mean=0.0, std=std)
        nn.init.normal_(self.W_q, mean=0.0, std=0.01 * std)
        nn.init.normal_(self.W_k, mean=0.0, std=std)
        nn.init.normal_(self.w_b, mean=-1.0, std=std)

    def forward(self, x):
        batch = x.shape[0]
        initial = [w.expand(batch, -1, -1, -1) for w in (self.W_y, self.W_q, self.W_k, self.w_b)]
        out = self_ref_v0(split_heads(x, self.num_head), *initial)
        return self.layer_norm(x) + self.dropout(self.out_proj(merge_heads(out)))


class FastWeightModel(nn.Module):
    def __init__(self, block_type, in_vocab_size, out_vocab_size, hidden_size, num_layers, num_head, ff_factor,
                 dropout, use_pos_enc):
        super().__init__()
        self.use_pos_enc = use_pos_enc
        self.embedding = nn.Embedding(in_vocab_size, hidden_size)
        layers = []
        for _ in range(num_layers):
            layers += [block_type(hidden_size, num_head, dropout), FeedForwardBlock(hidden_size, ff_factor, dropout)]
        self.layers = nn.Sequential(*layers)
        self.out_layer = nn.Linear(hidden_size, out_vocab_size)

    def forward(self, tokens):
        x = self.embedding(tokens)
        if self.use_pos_enc:
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return self.out_layer(self.layers(x))


# ---------------------------------------------------------------------------------------------------------------
# The registry: every --model_type, and what the code and the scripts need to know about it


def build_recurrent(body_type, args, in_vocab_size, out_vocab_size):
    return RecurrentModel(body_type, in_vocab_size, out_vocab_size, emb_size=args.emb_size,
                          hidden_size=args.hidden_size, num_layers=args.num_layer, dropout=args.dropout,
                          no_embedding=args.no_embedding)


def build_transformer(args, in_vocab_size, out_vocab_size):
    return TransformerModel(in_vocab_size, out_vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layer,
                            num_head=args.n_head, ff_factor=args.ff_factor, dropout=args.dropout)


@dataclass(frozen=True)
class FastWeightBuilder:
    """Builds a FastWeightModel of `block`s: the fast-weight models differ only in their block."""
    block: type

    def __call__(self, args, in_vocab_size, out_vocab_size):
        return FastWeightModel(self.block, in_vocab_size, out_vocab_size, hidden_size=args.hidden_size,
                               num_layers=args.num_layer, num_head=args.n_head, ff_factor=args.ff_factor,
                               dropout=args.dropout, use_pos_enc=not args.remove_pos_enc)


@dataclass(frozen=True)
class ModelSpec:
    """One --model_type."""
    id: int
    name: str  # in logs, tables and plots
    slug: str  # in directory names: run directories `<slug>-<task>-<time>-<hash>`, sweep and search folders
    builder: Callable  # (args, in_vocab_size, out_vocab_size) -> the model
    operator: str = None  # the fast-weight operator it calls (a compiled kernel); None: PyTorch computes it all
    recurrent: bool = False  # an RNN body: it has no heads, feed-forward blocks or positional encoding
    one_layer: bool = False  # it has one layer whatever --num_layer says
    requires_remove_pos_enc: bool = False  # refuses to run with positional encodings
    min_head_dim: int = 1  # the smallest --hidden_size / --n_head it can work with
    in_paper: bool = True  # one of the paper's seven models (False: an extension beyond it)


# In the order of the paper's table: recurrent models, the Transformer family, its recurrent extensions; then the
# models beyond the paper. Adding a model is adding its entry.
MODELS = {spec.id: spec for spec in (
    ModelSpec(0, "LSTM", "lstm", partial(build_recurrent, "lstm"), recurrent=True),
    ModelSpec(10, "e-LSTM", "e-lstm", partial(build_recurrent, "e-lstm"), recurrent=True, one_layer=True),
    ModelSpec(1, "Transformer", "transformer", build_transformer),
    ModelSpec(8, "Linear Transformer", "linear-transformer", FastWeightBuilder(LinearAttentionBlock),
              operator="fast_weight_sum"),
    ModelSpec(2, "DeltaNet", "deltanet", FastWeightBuilder(DeltaNetBlock), operator="delta_net_fn"),
    ModelSpec(7, "Recurrent Delta", "recurrent-delta", FastWeightBuilder(RecurrentDeltaBlock),
              operator="rec_delta_fn"),
    # The SRWM emits 4 learning rates per step from a d-dimensional input: d >= 4.
    ModelSpec(12, "SRWM", "srwm", FastWeightBuilder(SRWMBlock), operator="self_ref_v0",
              requires_remove_pos_enc=True, min_head_dim=4),
    # Beyond the paper: Grazzi et al. (2025)'s DeltaNet [-1, 1] and its two ingredients alone.
    ModelSpec(20, "DeltaNet [-1,1]", "deltanet-neg", FastWeightBuilder(NegativeEigenvalueDeltaNetBlock),
              operator="delta_net_fn", in_paper=False),
    ModelSpec(21, "DeltaNet L2", "deltanet-l2", FastWeightBuilder(L2DeltaNetBlock), operator="delta_net_fn",
              in_paper=False),
    ModelSpec(22, "DeltaNet beta(0,2)", "deltanet-beta2", FastWeightBuilder(WideBetaDeltaNetBlock),
              operator="delta_net_fn", in_paper=False),
    # Siems et al. (2025)'s DeltaProduct: n_h delta steps per token, computed by the delta operator.
    ModelSpec(23, "DeltaProduct n2 [-1,1]", "deltaproduct2", FastWeightBuilder(DeltaProduct2Block),
              operator="delta_net_fn", in_paper=False),
    ModelSpec(24, "DeltaProduct n3 [-1,1]", "deltaproduct3", FastWeightBuilder(DeltaProduct3Block),
              operator="delta_net_fn", in_paper=False),
    ModelSpec(25, "DeltaProduct n4 [-1,1]", "deltaproduct4", FastWeightBuilder(DeltaProduct4Block),
              operator="delta_net_fn", in_paper=False),
    ModelSpec(26, "DeltaProduct n2 [0,1]", "deltaproduct2-pos", FastWeightBuilder(PositiveDeltaProduct2Block),
              operator="delta_net_fn", in_paper=False),
    # Yang, Kautz & Hatamizadeh (2025)'s Gated DeltaNet: the delta rule with a decay, beta in (0, 1) and (0, 2).
    ModelSpec(27, "Gated DeltaNet", "gated-deltanet", FastWeightBuilder(GatedDeltaNetBlock),
              operator="gated_delta_net_fn", in_paper=False),
    ModelSpec(28, "Gated DeltaNet [-1,1]", "gated-deltanet-neg",
              FastWeightBuilder(NegativeEigenvalueGatedDeltaNetBlock), operator="gated_delta_net_fn", in_paper=False),
)}

# Views of the registry, by ID.
PAPER_MODELS = tuple(model_type for model_type, spec in MODELS.items() if spec.in_paper)  # the table's row order
EXTENSION_MODELS = tuple(model_type for model_type, spec in MODELS.items() if not spec.in_paper)
MODEL_NAMES = {model_type: MODELS[model_type].name for model_type in sorted(MODELS)}
MODEL_SLUGS = {model_type: MODELS[model_type].slug for model_type in sorted(MODELS)}
FAST_WEIGHT_BLOCKS = {model_type: spec.builder.block for model_type, spec in MODELS.items()
                      if isinstance(spec.builder, FastWeightBuilder)}


def config_error(args):
    """The reason `args` cannot build a model (one line), or None when they can."""
    spec = MODELS.get(args.model_type)
    if spec is None:
        return f"unknown --model_type {args.model_type}; choose one of {sorted(MODELS)}"
    if spec.recurrent:
        return None
    if args.hidden_size % args.n_head != 0:
        return f"--hidden_size {args.hidden_size} is not divisible by --n_head {args.n_head}"
    if spec.requires_remove_pos_enc and not args.remove_pos_enc:
        return f"the {spec.name} (--model_type {spec.id}) takes no positional encoding: add --remove_pos_enc"
    if args.hidden_size // args.n_head < spec.min_head_dim:
        return (f"the {spec.name} needs a head dimension (--hidden_size / --n_head) of at least {spec.min_head_dim}, "
                f"got {args.hidden_size // args.n_head}")
    return None


def build_model(args, in_vocab_size, out_vocab_size):
    """The model selected by `args.model_type`; vocab sizes include the padding id (len(vocab) + 1)."""
    error = config_error(args)
    if error:
        raise ModelConfigError(error)
    return MODELS[args.model_type].builder(args, in_vocab_size, out_vocab_size)


def count_trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
