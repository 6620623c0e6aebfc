"""Attention backends: causal attention, optionally kept inside each packed document.

A backend has two parts. `prepare(document_ids)` runs once per forward and turns the per-token
document ids of a packed batch ([batch, seq]; equal id = same document, None = one sequence per
row) into whatever the kernel wants: a boolean mask, a flex BlockMask, or cumulative sequence
lengths. `__call__(q, k, v, prepared)` then runs in every layer, on q [batch, heads, seq, dim]
and k, v with possibly fewer heads (grouped-query attention).

`prepare_shard` is the general form context parallelism uses: queries and keys are given by their
token indices in the original row (a rank's head and tail chunks against all gathered keys, in
rank-major order), and a query attends a key iff the key comes no later and both share a document.

| backend | document masks | runs on | notes |
|---|---|---|---|
| sdpa   | boolean query-by-key mask | CPU, GPU | the reference; O(queries x keys) mask memory |
| flex   | flex_attention BlockMask  | GPU (CPU: forward only) | skips fully masked blocks |
| varlen | cu_seqlens per document piece, flash-attn or torch varlen_attn | CUDA | no mask at all |

`auto` is resolved by the plan (`titanlm.plan.resolve_attention_backend`): sdpa on CPU; on CUDA
varlen when a varlen kernel is installed, else flex.
Without document ids every backend is plain causal attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from titanlm.errors import UnsupportedError


class AttentionBackend:
    name = ""

    def prepare(self, document_ids: torch.Tensor | None) -> Any:
        """Kernel inputs for whole rows ([batch, seq] document ids, or None for plain causal rows)."""
        raise NotImplementedError

    def prepare_shard(
        self,
        query_index: torch.Tensor,
        key_index: torch.Tensor,
        query_documents: torch.Tensor,
        key_documents: torch.Tensor,
    ) -> Any:
        """Kernel inputs for queries and keys given by their token indices in the row ([n_q], [n_k];
        the keys a permutation of the whole row) and their document ids ([rows, n_q], [rows, n_k]; ids
        rise along a row, as the loader numbers documents)."""
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise NotImplementedError


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return k.shape[1] != q.shape[1]


def _row_index(document_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(document_ids.shape[1], device=document_ids.device)


def document_causal_mask(
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    query_documents: torch.Tensor | None = None,
    key_documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean SDPA mask [batch or 1, 1, queries, keys]: True where the query may attend the key.

    `*_index`: token indices in the original row (causality); `*_documents`: [batch, n] document
    ids, or None for one document per row. Context parallelism passes a rank's queries against
    the gathered keys; a whole row passes the same indices twice.
    """
    allowed = key_index[None, :] <= query_index[:, None]
    if query_documents is None:
        return allowed[None, None]
    same_document = query_documents[:, :, None] == key_documents[:, None, :]
    return (allowed & same_document)[:, None]


class SDPABackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, document_ids: torch.Tensor | None) -> torch.Tensor | None:
        if document_ids is None:
            return None
        index = _row_index(document_ids)
        return self.prepare_shard(index, index, document_ids, document_ids)

    def prepare_shard(self, query_index, key_index, query_documents, key_documents):
        return document_causal_mask(query_index, key_index, query_documents, key_documents)

    def __call__(self, q, k, v, prepared):
        if prepared is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=_gqa(q, k))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared, enable_gqa=_gqa(q, k))


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention is a slow reference implementation; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # Eager create_block_mask materializes the whole [queries, keys] boolean mask first (2 GiB for one
    # 32K row and 512 MiB per cp 2 rank); compiled, it evaluates the mask block by block.
    return torch.compile(create_block_mask, dynamic=False)


class FlexBackend(AttentionBackend):
    name = "flex"

    def prepare(self, document_ids: torch.Tensor | None):
        if document_ids is None:
            return None  # plain causal: __call__ uses a cached mask for the sequence length

        def document_causal(b, h, q_idx, kv_idx):  # whole rows: the indices are the row positions
            return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

        batch, seq = document_ids.shape
        return _block_mask(document_causal, batch, seq, seq, document_ids.device)

    def prepare_shard(self, query_index, key_index, query_documents, key_documents):
        def document_causal(b, h, q_idx, kv_idx):
            same_document = query_documents[b, q_idx] == key_documents[b, kv_idx]
            return same_document & (key_index[kv_idx] <= query_index[q_idx])

        rows = query_documents.shape[0]
        return _block_mask(document_causal, rows, len(query_index), len(key_index), query_index.device)

    def __call__(self, q, k, v, prepared):
        from torch.nn.attention.flex_attention import flex_attention

        if prepared is None:
            prepared = _causal_block_mask(q.shape[2], q.device.type, q.device.index)
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=prepared, enable_gqa=_gqa(q, k))


def _block_mask(mask_mod, rows: int, q_len: int, kv_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    build = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return build(mask_mod, rows, None, q_len, kv_len, device=device)


@lru_cache(maxsize=8)
def _causal_block_mask(seq: int, device_type: str, device_index: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=device)


@dataclass(frozen=True)
class VarlenBatch:
    """Kernel inputs for packed pieces. Piece i's queries are rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of
    the flattened [batch x seq] queries and its keys rows cu_seqlens_k[i]:cu_seqlens_k[i+1] of the
    flattened keys; its query j sees its keys up to len_k - len_q + j (causal aligned at the bottom
    right, as flash attention aligns unequal lengths). `key_rows` = (batch row, key position) of each
    flattened key when keys are picked per piece (context parallelism); None when the keys are laid
    out as the queries."""

    cu_seqlens_q: torch.Tensor  # int32 [pieces + 1]
    cu_seqlens_k: torch.Tensor  # int32 [pieces + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    key_rows: tuple[torch.Tensor, torch.Tensor] | None = None


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0))


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> VarlenBatch:
    """Document boundaries of a [batch, seq] id tensor, with row ends as boundaries too."""
    batch, seq = document_ids.shape
    flat = document_ids.flatten()
    new_document = torch.ones_like(flat, dtype=torch.bool)
    new_document[1:] = flat[1:] != flat[:-1]
    new_document[::seq] = True
    starts = new_document.nonzero().flatten()
    ends = torch.tensor([batch * seq], device=flat.device)
    cu_seqlens = torch.cat([starts, ends]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return VarlenBatch(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def varlen_pieces(
    query_index: torch.Tensor, key_index: torch.Tensor, query_documents: torch.Tensor, key_documents: torch.Tensor
) -> VarlenBatch:
    """Pieces of a shard of queries against the whole row's keys (context parallelism).

    A piece is a longest run of queries that are consecutive in the row and in one document (a cp
    chunk cut at document boundaries). Its keys are its document's tokens from the document's first
    up to the piece's last query: exactly the prefix causality allows, so bottom-right causal
    alignment within the piece is the document-causal mask. `key_index` must be a permutation of the
    row (the gathered keys); `key_rows` picks each piece's keys out of them.
    """
    device = query_index.device
    rows, n_queries, n_keys = query_documents.shape[0], len(query_index), len(key_index)
    row_documents = torch.empty_like(key_documents)
    row_documents[:, key_index] = key_documents
    position = torch.arange(n_keys, device=device)
    document_begins = torch.ones_like(row_documents, dtype=torch.bool)
    document_begins[:, 1:] = row_documents[:, 1:] != row_documents[:, :-1]
    document_start = torch.where(document_begins, position, 0).cummax(dim=1).values  # [rows, n_keys]

    piece_begins = torch.ones(rows, n_queries, dtype=torch.bool, device=device)
    piece_begins[:, 1:] = (query_index[1:] != query_index[:-1] + 1) | (
        query_documents[:, 1:] != query_documents[:, :-1]
    )
    first = piece_begins.flatten().nonzero().flatten()  # flattened index of each piece's first query
    query_lengths = torch.diff(first, append=first.new_tensor([rows * n_queries]))
    row = first // n_queries
    first_query = query_index[first % n_queries]
    key_start = document_start[row, first_query]
    key_lengths = first_query + query_lengths - key_start

    cu_seqlens_k = _cumulative(key_lengths)
    total_keys, max_q, max_k = torch.stack([cu_seqlens_k[-1], query_lengths.max(), key_lengths.max()]).tolist()
    piece = torch.repeat_interleave(torch.arange(len(first), device=device), key_lengths, output_size=total_keys)
    key_position = key_start[piece] + torch.arange(total_keys, device=device) - cu_seqlens_k[piece]
    gathered_at = torch.empty_like(key_index)
    gathered_at[key_index] = position  # where each row position sits among the gathered keys
    return VarlenBatch(
        _cumulative(query_lengths).to(torch.int32),
        cu_seqlens_k.to(torch.int32),
        max_q,
        max_k,
        key_rows=(row[piece], gathered_at[key_position]),
    )


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenBatch], torch.Tensor]


class VarlenBackend(AttentionBackend):
    """Packed documents without masks: flash-attn's varlen kernel, else torch's varlen_attn.

    `kernel` stands in for both (tests give a reference on CPU, where neither runs)."""

    name = "varlen"

    def __init__(self, kernel: VarlenKernel | None = None) -> None:
        self._kernel = kernel or _varlen_kernel()
        if self._kernel is None:
            raise UnsupportedError(
                "model.attention_backend = 'varlen' needs CUDA and flash-attn (pip install flash-attn) or a "
                "torch with torch.nn.attention.varlen; use 'sdpa' or 'flex' here"
            )

    def prepare(self, document_ids: torch.Tensor | None) -> VarlenBatch | None:
        return None if document_ids is None else cu_seqlens_from_document_ids(document_ids)

    def prepare_shard(self, query_index, key_index, query_documents, key_documents):
        return varlen_pieces(query_index, key_index, query_documents, key_documents)

    def __call__(self, q, k, v, prepared):
        if prepared is None:
            # One sequence per row: SDPA's flash kernel does the same work without cu_seqlens
            # (whose max length would cost a host sync in every layer).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=_gqa(q, k))
        batch, heads, seq, dim = q.shape
        if prepared.key_rows is None:
            k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (k, v))
        else:
            row, position = prepared.key_rows
            k, v = (t.transpose(1, 2)[row, position] for t in (k, v))
        out = self._kernel(q.transpose(1, 2).reshape(batch * seq, heads, dim), k, v, prepared)
        return out.view(batch, seq, heads, dim).transpose(1, 2)


def _varlen_kernel() -> VarlenKernel | None:
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:

        def flash(q, k, v, pieces: VarlenBatch):
            # flash-attn >= 2.1 aligns causal masks of unequal lengths at the bottom right.
            return flash_attn_varlen_func(
                q,
                k,
                v,
                pieces.cu_seqlens_q,
                pieces.cu_seqlens_k,
                pieces.max_seqlen_q,
                pieces.max_seqlen_k,
                causal=True,
            )

        return flash
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # Early releases spell causality is_causal=True; later ones use a (-1, 0) window (bottom-right
    # aligned, as flash attention's causal mask is).
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    native_gqa = "enable_gqa" in parameters

    def torch_varlen(q, k, v, pieces: VarlenBatch):
        lengths = (pieces.cu_seqlens_q, pieces.cu_seqlens_k, pieces.max_seqlen_q, pieces.max_seqlen_k)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                return varlen_attn(q, k, v, *lengths, enable_gqa=True, **causal)
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return varlen_attn(q, k, v, *lengths, **causal)

    return torch_varlen


BACKENDS = {"sdpa": SDPABackend, "flex": FlexBackend, "varlen": VarlenBackend}


def build_attention_backend(name: str) -> AttentionBackend:
    """The backend the plan resolved (`titanlm.plan.resolve_attention_backend` decides what `auto` means)."""
    return BACKENDS[name]()
