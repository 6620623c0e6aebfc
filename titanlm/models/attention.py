"""Attention backends: causal attention, optionally kept inside each packed document.

A backend has two parts. `prepare(document_ids)` runs once per forward and turns the per-token
document ids of a packed batch ([batch, seq]; equal id = same document, None = one sequence per
row) into whatever the kernel wants: a boolean mask, a flex BlockMask, or cumulative sequence
lengths. `__call__(q, k, v, prepared)` then runs in every layer, on q [batch, heads, seq, dim]
and k, v with possibly fewer heads (grouped-query attention).

| backend | document masks | runs on | notes |
|---|---|---|---|
| sdpa   | boolean block-diagonal causal mask | CPU, GPU | the reference; O(seq^2) mask memory |
| flex   | flex_attention BlockMask           | GPU (CPU: forward only) | skips fully masked blocks |
| varlen | cu_seqlens, flash-attn or torch varlen_attn | CUDA | no padding or mask work at all |

`auto` is resolved by the plan (`titanlm.plan.resolve_attention_backend`): sdpa on CPU; on CUDA
varlen when a varlen kernel is installed, else flex.
Without document ids every backend is plain causal attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from titanlm.errors import UnsupportedError


class AttentionBackend:
    name = ""

    def prepare(self, document_ids: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise NotImplementedError


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return k.shape[1] != q.shape[1]


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
        index = torch.arange(document_ids.shape[1], device=document_ids.device)
        return document_causal_mask(index, index, document_ids, document_ids)

    def __call__(self, q, k, v, prepared):
        if prepared is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=_gqa(q, k))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared, enable_gqa=_gqa(q, k))


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention is a slow reference implementation; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend(AttentionBackend):
    name = "flex"

    def prepare(self, document_ids: torch.Tensor | None):
        if document_ids is None:
            return None  # plain causal: __call__ uses a cached mask for the sequence length
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

        batch, seq = document_ids.shape
        return create_block_mask(document_causal, batch, None, seq, seq, device=document_ids.device)

    def __call__(self, q, k, v, prepared):
        from torch.nn.attention.flex_attention import flex_attention

        if prepared is None:
            prepared = _causal_block_mask(q.shape[2], q.device.type, q.device.index)
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=prepared, enable_gqa=_gqa(q, k))


@lru_cache(maxsize=8)
def _causal_block_mask(seq: int, device_type: str, device_index: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=device)


@dataclass(frozen=True)
class VarlenBatch:
    cu_seqlens: torch.Tensor  # int32 [documents + 1], offsets into the flattened batch
    max_seqlen: int


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
    return VarlenBatch(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


class VarlenBackend(AttentionBackend):
    """Packed documents without masks: flash-attn's varlen kernel, else torch's varlen_attn."""

    name = "varlen"

    def __init__(self) -> None:
        self._kernel = _varlen_kernel()
        if self._kernel is None:
            raise UnsupportedError(
                "model.attention_backend = 'varlen' needs CUDA and flash-attn (pip install flash-attn) or a "
                "torch with torch.nn.attention.varlen; use 'sdpa' or 'flex' here"
            )

    def prepare(self, document_ids: torch.Tensor | None) -> VarlenBatch | None:
        return None if document_ids is None else cu_seqlens_from_document_ids(document_ids)

    def __call__(self, q, k, v, prepared):
        if prepared is None:
            # One sequence per row: SDPA's flash kernel does the same work without cu_seqlens
            # (whose max length would cost a host sync in every layer).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=_gqa(q, k))
        batch, heads, seq, dim = q.shape
        packed = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (q, k, v)]
        out = self._kernel(*packed, prepared.cu_seqlens, prepared.max_seqlen)
        return out.view(batch, seq, heads, dim).transpose(1, 2)


def _varlen_kernel():
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        def flash(q, k, v, cu, max_len):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

        return flash
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # Early releases spell causality is_causal=True; later ones use a (-1, 0) window.
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    native_gqa = "enable_gqa" in parameters

    def torch_varlen(q, k, v, cu, max_len):
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, enable_gqa=True, **causal)
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)

    return torch_varlen


BACKENDS = {"sdpa": SDPABackend, "flex": FlexBackend, "varlen": VarlenBackend}


def build_attention_backend(name: str) -> AttentionBackend:
    """The backend the plan resolved (`titanlm.plan.resolve_attention_backend` decides what `auto` means)."""
    return BACKENDS[name]()
