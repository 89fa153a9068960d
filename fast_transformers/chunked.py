"""Chunk-parallel form of `fast_weight_sum` (plain PyTorch, autograd gradients).

Within a chunk of C steps the sum rule is causal linear attention, `tril(Q K^T) V`; across chunks only the
running state W is carried. On CPU at this project's shapes (L ~ 100, D <= 64) the fused sequential kernel is
several times faster (see scripts/bench_ops.py --chunked), so this form is not the default path; it is kept,
tested against the reference, as the matmul-bound alternative for long sequences.
"""
import torch.nn.functional as F


def split_into_chunks(x, chunk_size):
    """(B, H, L, D) -> (B, H, N, chunk_size, D), zero padded at the end to N = ceil(L / chunk_size) chunks."""
    B, H, L, D = x.shape
    num_chunks = -(-L // chunk_size)
    return F.pad(x, (0, 0, 0, num_chunks * chunk_size - L)).view(B, H, num_chunks, chunk_size, D)


def fast_weight_sum_chunked(q, k, v, W0, chunk_size=32):
    """Same result as `fast_weight_sum_reference(q, k, v, W0)` (up to rounding)."""
    length = q.shape[2]
    qc, kc, vc = (split_into_chunks(x, chunk_size) for x in (q, k, v))
    within = (qc @ kc.transpose(-1, -2)).tril() @ vc  # tril includes the diagonal: the query reads after the write
    chunk_sums = kc.transpose(-1, -2) @ vc
    state_before = W0.unsqueeze(2) + chunk_sums.cumsum(2) - chunk_sums  # W before each chunk
    out = within + qc @ state_before
    return out.flatten(2, 3)[:, :, :length]
