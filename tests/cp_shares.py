"""One context-parallel rank's attention, computed alone: the cases and references the CP kernel tests share.

`share_attention` runs a backend inside `AllGatherKVAttention` (the rank's queries against all keys
in rank-major order), its all-gathers emulated without a process group; `reference_varlen_kernel` computes what a
varlen kernel computes, with SDPA, so the varlen pieces are checked where no varlen kernel runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titanlm.models.attention import SDPABackend, VarlenBatch
from titanlm.parallel.context_parallel import AllGatherKVAttention, cp_token_indices


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
        attended = F.scaled_dot_product_attention(*piece, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])
        out.append(attended[0].transpose(0, 1))
    return torch.cat(out)


class _CPMesh:
    """What `AllGatherKVAttention` reads of its cp mesh."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.cp = rank, size

    def get_group(self) -> None:
        return None

    def get_local_rank(self) -> int:
        return self.rank

    def size(self) -> int:
        return self.cp


def share_attention(backend, qkv: list[torch.Tensor], documents: torch.Tensor | None, rank: int, cp: int):
    """One cp rank's attention as `AllGatherKVAttention` computes it, its all-gathers emulated from
    the whole row: the rank's queries against all keys, in the rank-major order the gather leaves.
    `documents` None is a plain causal row, which `shard_batch_for_cp` gives one document id."""
    q, k, v = qkv
    rows, seq = q.shape[0], q.shape[2]
    if documents is None:
        documents = torch.zeros(rows, seq, dtype=torch.long, device=q.device)
    queries = cp_token_indices(seq, rank, cp, q.device)
    keys = torch.cat([cp_token_indices(seq, r, cp, q.device) for r in range(cp)])
    attention = AllGatherKVAttention(backend, _CPMesh(rank, cp))
    gathered = {2: documents[:, keys], 5: torch.stack((k, v))[:, :, :, keys]}  # by rank: ids, stacked k and v
    attention._gather_seq = lambda tensor, seq_dim: gathered[tensor.dim()]
    prepared = attention.prepare(documents[:, queries])
    return attention(q[:, :, queries], k[:, :, queries], v[:, :, queries], prepared)


def whole_row_reference(qkv: list[torch.Tensor], documents: torch.Tensor | None) -> torch.Tensor:
    sdpa = SDPABackend()
    return sdpa(*qkv, sdpa.prepare(documents))
