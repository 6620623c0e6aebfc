"""Context parallelism: each cp rank holds a share of every sequence and gathers keys/values (Llama 3 style).

Sharding: a row of S tokens is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r. A causal
row has cheap early queries and expensive late ones; pairing a head chunk with its mirror tail chunk
gives every rank the same attention work.

Attention: each layer all-gathers k and v over the cp group (backward reduce-scatters their grads), so
the local queries see the whole row. The gathered keys stay in rank-major order (rank 0's two chunks,
then rank 1's, ...); each key is known by its token index in the original row, so no reorder copy is
needed. A query may attend a key iff key index <= query index and both share a document. Token
indices, not `position_ids`, order the row: positions restart at every packed document.

The wrapped backend turns those indices into its kernel's inputs once per forward (`prepare_shard`):
sdpa a boolean mask [batch, 1, S / cp, S] (CPU and GPU; the reference), flex a BlockMask that skips
fully masked blocks, varlen one (query piece, key prefix) pair per cp chunk and document, the keys
picked out of the gathered ones. torch's ring attention
(`torch.distributed.tensor.experimental.context_parallel`) is not wired in: it patches SDPA through
global state, has no CPU kernel and takes no document masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from titanlm.data.datasets import Batch
from titanlm.models.attention import AttentionBackend
from titanlm.models.transformer import Attention, Transformer

# torch 2.13 renamed the differentiable all-gather and deprecated the old name; 2.11 has only the old one.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def cp_token_indices(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices in the original row of the tokens that `cp_rank` keeps: chunk r, then chunk 2cp-1-r."""
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


def shard_batch_for_cp(batch: Batch, cp_rank: int, cp_size: int) -> Batch:
    """This rank's share of every [batch, seq] tensor of `batch` (see the module docstring).

    Rotary embeddings need each kept token's position in the full row, so a batch without
    `position_ids` gets 0..S-1 before it is cut. One without `document_ids` gets one document per
    row: the attention backend describes a rank's rows from them once per forward, in `prepare`,
    outside the (possibly compiled) blocks.
    """
    if cp_size == 1:
        return batch
    rows, seq_len = batch["input_ids"].shape
    # The plan refuses a training.seq_len that does not cut; a batch of another length is a bug.
    assert seq_len % (2 * cp_size) == 0, f"rows of {seq_len} tokens do not cut into 2 x {cp_size} chunks"
    device = batch["input_ids"].device
    if "position_ids" not in batch:
        batch = {**batch, "position_ids": torch.arange(seq_len, device=device).expand(rows, seq_len)}
    if "document_ids" not in batch:
        batch = {**batch, "document_ids": torch.zeros(rows, seq_len, dtype=torch.long, device=device)}
    index = cp_token_indices(seq_len, cp_rank, cp_size, device)
    return {key: value.index_select(1, index) for key, value in batch.items()}


class AllGatherKVAttention(AttentionBackend):
    """Attention of this rank's queries over the keys/values of the whole row, gathered over `cp_mesh`.

    `prepare` gathers the document ids once per forward and has the wrapped backend describe the
    rank's queries against the gathered keys (`prepare_shard`); each layer then gathers k and v and
    runs the wrapped backend's kernel.
    """

    name = "allgather_cp"

    def __init__(self, inner: AttentionBackend, cp_mesh: DeviceMesh) -> None:
        self.inner = inner
        self.group = cp_mesh.get_group()
        self.cp_rank = cp_mesh.get_local_rank()
        self.cp_size = cp_mesh.size()

    def _indices(self, local_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Original-row indices of the local queries and of the gathered (rank-major) keys."""
        seq_len = local_len * self.cp_size
        keys = [cp_token_indices(seq_len, rank, self.cp_size, device) for rank in range(self.cp_size)]
        return keys[self.cp_rank], torch.cat(keys)

    def _gather_seq(self, tensor: torch.Tensor, seq_dim: int) -> torch.Tensor:
        return _all_gather_autograd(tensor.contiguous(), seq_dim, self.group)

    def prepare(self, document_ids: torch.Tensor | None) -> Any:
        # shard_batch_for_cp gives every batch document ids; a model called under CP without them is a bug.
        assert document_ids is not None, "context parallelism needs the document ids shard_batch_for_cp adds"
        query_index, key_index = self._indices(document_ids.shape[1], document_ids.device)
        key_documents = self._gather_seq(document_ids, 1)
        return self.inner.prepare_shard(query_index, key_index, document_ids, key_documents)

    def __call__(self, q, k, v, prepared):
        # One collective for k and v together: [2, batch, kv_heads, seq, dim], gathered along seq.
        k_all, v_all = self._gather_seq(torch.stack((k, v)), 3).unbind(0)
        return self.inner(q, k_all, v_all, prepared)


def apply_cp(model: Transformer, cp_mesh: DeviceMesh) -> None:
    """Swap the model's shared attention backend for its all-gather-KV wrapper, in place.

    All layers share one backend object; the model keeps it as `attention_backend` (for `prepare`)
    and every `Attention` as `attend`, so both references are replaced.
    """
    backend = AllGatherKVAttention(model.attention_backend, cp_mesh)
    model.attention_backend = backend
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = backend
