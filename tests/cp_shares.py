"""One context-parallel rank's attention, computed alone: the cases and references the CP kernel tests share.

`share_attention` runs a backend the way `AllGatherKVAttention` does (the rank's queries against
all keys in rank-major order), without a process group; `reference_varlen_kernel` computes what a
varlen kernel computes, with SDPA, so the varlen pieces are checked where no varlen kernel runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titanlm.models.attention import SDPABackend, VarlenBatch
from titanlm.parallel.context_parallel import cp_token_indices


def packed_documents(rows: int, seq: int, mean_length: int, generator: torch.Generator) -> torch.Tensor:
    """Document ids [rows, seq] of rows packed with documents of random lengths around `mean_length`."""
    lengths = torch.randint(1, 2 * mean_length, (rows, seq), generator=generator)
    ids = torch.zeros(rows, seq, dtype=torch.long)
    for row in range(rows):
        ends = lengths[row].cumsum(0)
        ids[row] = torch.bucketize(torch.arange(seq), ends[ends < seq], right=True)
    return ids


def reference_varlen_kernel(q, k, v, pieces: VarlenBatch):
    """What flash attention's varlen kernel computes, one piece at a time with SDPA: causal aligned at
    the bottom right (query i of a piece sees keys up to len_k - len_q + i)."""
    out = []
    cu_q, cu_k = pieces.cu_seqlens_q.tolist(), pieces.cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        allowed = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        piece = [t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])]  # [1, heads, len, dim]
        attended = F.scaled_dot_product_attention(
            *piece, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])
        out.append(attended[0].transpose(0, 1))
    return torch.cat(out)


def share_attention(backend, qkv: list[torch.Tensor], documents: torch.Tensor | None, rank: int, cp: int):
    """One cp rank's attention as `AllGatherKVAttention` runs it: its queries against the keys
    gathered in rank-major order."""
    q, k, v = qkv
    seq = q.shape[2]
    queries = cp_token_indices(seq, rank, cp, q.device)
    keys = torch.cat([cp_token_indices(seq, r, cp, q.device) for r in range(cp)])
    docs = (documents[:, queries], documents[:, keys]) if documents is not None else (None, None)
    prepared = backend.prepare_shard(queries, keys, *docs, q.shape[0])
    return backend(q[:, :, queries], k[:, :, keys], v[:, :, keys], prepared)


def whole_row_reference(qkv: list[torch.Tensor], documents: torch.Tensor | None) -> torch.Tensor:
    sdpa = SDPABackend()
    return sdpa(*qkv, sdpa.prepare(documents))
