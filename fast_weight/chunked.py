"""Chunk-parallel form of `delta_net_fn` (plain PyTorch, autograd gradients).

Within a chunk starting from state S, the delta rule's updates u_t = beta_t (v_t - k_t @ S_{t-1}) satisfy
    (I + diag(beta) strict_tril(K K^T)) U = diag(beta) (V - K S),
so with T the inverse of that unit lower-triangular matrix (the "UT transform" used by flash-linear-attention's
chunked delta rule), U = T diag(beta) V - T diag(beta) K S, and out = Q S + tril(Q K^T) U, S_next = S + K^T U.
Only S is carried sequentially from chunk to chunk.

On CPU at this project's shapes (L ~ 100, D <= 64) the fused sequential kernel is several times faster (see
scripts/bench_ops.py --chunked), so this form is not the default path; it is kept, tested against the reference.
The triangular solve is well conditioned while beta * |k|^2 stays in [0, 2]: every step's transition
I - beta k k^T then has norm <= 1, so T diag(beta), whose entries are -beta_i k_i^T (product of the transitions
between j and i) k_j beta_j, stays bounded (by 4 for unit keys). That covers DeltaNet (2: sum-normalised k, sigmoid
beta) and the negative-eigenvalue variants 20-22 (unit or sum-normalised k, beta in (0, 2)), where the transition has
eigenvalues down to -1: tests/test_neg_eigval.py checks this form against the reference there (L up to 200, beta up
to 1.99, nearly parallel keys). With unnormalised keys (beta |k|^2 > 2) the float32 result can lose accuracy.
"""
import torch

from fast_transformers.chunked import split_into_chunks


def delta_net_chunked(q, k, v, beta, W0, chunk_size=32):
    """Same result as `delta_net_reference(q, k, v, beta, W0)` (up to rounding)."""
    length = q.shape[2]
    qc, kc, vc, bc = (split_into_chunks(x, chunk_size) for x in (q, k, v, beta))
    identity = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    lower = identity + (bc * (kc @ kc.transpose(-1, -2))).tril(-1)
    values_part = torch.linalg.solve_triangular(lower, bc * vc, upper=False, unitriangular=True)
    keys_part = torch.linalg.solve_triangular(lower, bc * kc, upper=False, unitriangular=True)
    scores = (qc @ kc.transpose(-1, -2)).tril()
    state = W0
    outs = []
    for c in range(qc.shape[2]):
        updates = values_part[:, :, c] - keys_part[:, :, c] @ state
        outs.append(qc[:, :, c] @ state + scores[:, :, c] @ updates)
        state = state + kc[:, :, c].transpose(-1, -2) @ updates
    return torch.stack(outs, dim=2).flatten(2, 3)[:, :, :length]
