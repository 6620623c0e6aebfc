"""Packing documents into rows of exactly seq_len tokens (InternEvo's packed data), as a plan.

A plan lists, per row, the document segments (document, start, length) that fill it, so any
row can be built from its index alone: the dataset never has to stream through earlier rows.

Packing rule: documents longer than seq_len are cut into seq_len chunks (the last one shorter);
chunks fill rows greedily in order, and a chunk that does not fit the rest of a row starts the
next row ("next fit"). Nothing else is split across rows, so each document segment is seen with
its own context; the rest of a row is padding. Every token of every document lands in exactly
one row per pass. (InternEvo cuts its pack_sample_into_one stream at row ends instead; here both
modes share one plan and differ only in positions and document ids.)

A packed sample (every value a LongTensor [seq_len]):
- `input_ids`: the token ids, abs() of the stored ones (a negative stored id marks a prompt
  token: input |id|, no loss); padding is 0.
- `labels`: next-token targets inside each segment: the label at t is the token at t + 1 of the
  same segment; -100 at each segment's last token (no label crosses a document or chunk end),
  -100 where the target is a prompt token (InternEvo's collator: only response tokens are
  predicted; a prompt token may still be the *input* whose target is the first response token),
  and -100 on padding. A stored id 0 is a real token and is predicted (padding is masked by
  position, so no id has to be reserved).
- `position_ids`: restart at 0 for every segment (a chunk of a long document too, as InternEvo
  does), padding counting 0, 1, ... as its own segment; 0..seq_len-1 with pack_sample_into_one.
- `document_ids`: 0, 1, 2, ... per segment in the row, padding taking the next id; the model
  lets a token attend only to earlier tokens of the same id (block-diagonal causal mask). With
  pack_sample_into_one all zeros: plain causal attention over the row. Kept in both modes so a
  batch always has the same keys.
- `type_ids`: the document type index (into the documents' `types`) per token, -1 on padding,
  for token shares and loss per type.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from titanlm.data.datasets import Sample, ShardedStream
from titanlm.data.mixing import shuffled_order, weighted_order
from titanlm.errors import ConfigError, DataError
from titanlm.loss import IGNORE_INDEX

# How many rows, spread over the data, the start-up check reads for a token to predict.
LABEL_CHECK_ROWS = 16


class Documents(Protocol):
    """What packing reads from a document collection; `BinMetaFolder` is one."""

    types: list[str]

    def lengths(self) -> np.ndarray: ...

    def type_ids(self) -> np.ndarray: ...

    def read(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class PackPlan:
    """Rows as runs of segments: row r holds segments row_start[r]:row_start[r + 1].

    `doc`, `start` and `length` are parallel int64 arrays, one entry per segment.
    """

    seq_len: int
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_start: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_start) - 1

    def segments(self, row: int) -> slice:
        return slice(int(self.row_start[row]), int(self.row_start[row + 1]))

    def type_tokens(self, doc_types: np.ndarray, num_types: int, first_row: int, end_row: int) -> np.ndarray:
        """Tokens per type in rows [first_row, end_row), from the plan alone (nothing is read)."""
        segs = slice(int(self.row_start[first_row]), int(self.row_start[end_row]))
        return np.bincount(doc_types[self.doc[segs]], weights=self.length[segs], minlength=num_types)


def pack(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackPlan:
    """The plan that packs documents `order` (indices into `lengths`) in that order.

    Vectorised but for one Python step per row: fine for millions of documents.
    """
    order = np.asarray(order, dtype=np.int64)
    doc_len = np.asarray(lengths, dtype=np.int64)[order]
    num_chunks = -(-doc_len // seq_len)  # an empty document yields no chunk
    doc = np.repeat(order, num_chunks)
    first_chunk = np.cumsum(num_chunks) - num_chunks
    start = (np.arange(len(doc)) - np.repeat(first_chunk, num_chunks)) * seq_len
    length = np.minimum(np.repeat(doc_len, num_chunks) - start, seq_len)
    # A row that begins at chunk i holds chunks i .. after[i] - 1: the longest run that fits.
    # Every chunk fits a row alone, so after[i] > i and walking it from 0 visits each row once.
    ends = np.concatenate(([0], np.cumsum(length)))
    after = (np.searchsorted(ends, ends[:-1] + seq_len, side="right") - 1).tolist()
    row_start, i = [0], 0
    while i < len(after):
        i = after[i]
        row_start.append(i)
    return PackPlan(seq_len, doc, start, length, np.asarray(row_start, dtype=np.int64))


def packed_sample(
    documents: Documents, doc_types: np.ndarray, plan: PackPlan, row: int | None, pack_sample_into_one: bool
) -> Sample:
    """Row `row` of `plan` as a sample (see the module docstring); None gives an all-padding row."""
    seq_len = plan.seq_len
    input_ids = np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    document_ids = np.zeros(seq_len, dtype=np.int64)
    type_ids = np.full(seq_len, -1, dtype=np.int64)
    segments = range(0) if row is None else range(plan.row_start[row], plan.row_start[row + 1])
    offset = 0
    for k, s in enumerate(segments):
        doc, start, n = int(plan.doc[s]), int(plan.start[s]), int(plan.length[s])
        tokens = documents.read(doc)[start : start + n]
        end = offset + n
        input_ids[offset:end] = np.abs(tokens)
        targets = tokens[1:]
        labels[offset : end - 1] = np.where(targets < 0, IGNORE_INDEX, targets)
        position_ids[offset:end] = np.arange(n)
        document_ids[offset:end] = k
        type_ids[offset:end] = doc_types[doc]
        offset = end
    if pack_sample_into_one:
        position_ids = np.arange(seq_len)
        document_ids[:] = 0
    else:
        position_ids[offset:] = np.arange(seq_len - offset)
        document_ids[offset:] = len(segments)
    arrays = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "type_ids": type_ids,
    }
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def any_labelled(row: Callable[[int], Sample], num_rows: int) -> bool:
    """Whether any of LABEL_CHECK_ROWS rows spread evenly over rows 0..num_rows-1 has a label: a cheap check
    at start that the data is not all prompt tokens or one-token documents, which would train at loss 0.
    `row` must be a pure function of the row number, so the check leaves the data stream as it was."""
    picks = np.unique(np.linspace(0, num_rows - 1, min(LABEL_CHECK_ROWS, num_rows)).round().astype(np.int64))
    return any(bool((row(int(r))["labels"] != IGNORE_INDEX).any()) for r in picks)


class PackedDataset(ShardedStream):
    """The endless stream of packed rows: epoch after epoch, each reshuffled (or re-mixed by type
    `weights`, see `weighted_order`) with `np.random.default_rng((seed, epoch))`.

    Sample i is a pure function of i. Epochs differ in row count, so the dataset remembers where
    each epoch it has planned ends (one int per epoch) and caches the current epoch's plan.

    The state is global: the number of samples all ranks together have consumed, which is the
    same on every rank of a run in lockstep (so rank 0's state is enough). Loaded at another
    data-parallel degree, each rank starts at its share of that count, which continues the global
    stream with no sample skipped or repeated.
    """

    def __init__(
        self,
        documents: Documents,
        seq_len: int,
        seed: int,
        dp_rank: int,
        dp_world_size: int,
        worker_block: int = 1,
        pack_sample_into_one: bool = False,
        weights: np.ndarray | None = None,
    ):
        super().__init__(seq_len, seed, dp_rank, dp_world_size, worker_block)
        self.documents = documents
        self.pack_sample_into_one = pack_sample_into_one
        self._lengths = np.asarray(documents.lengths(), dtype=np.int64)
        self._doc_types = np.asarray(documents.type_ids(), dtype=np.int64)
        if self._lengths.sum() == 0:
            raise DataError("no tokens to pack: every document was dropped or empty (see data.min_length)")
        if weights is not None:
            counts = np.bincount(self._doc_types, minlength=len(weights))
            empty = [name for name, w, c in zip(documents.types, weights, counts) if w > 0 and c == 0]
            if empty:
                raise ConfigError(f"data.dataset_weights weights type(s) {empty} that hold no documents")
        self._weights = weights
        self._epoch_ends: list[int] = []  # global index one past the last row of each planned epoch
        self._plan: tuple[int, PackPlan] | None = None

    @property
    def types(self) -> list[str]:
        return list(self.documents.types)

    def epoch_plan(self, epoch: int) -> PackPlan:
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            if self._weights is None:
                order = shuffled_order(len(self._lengths), rng)
            else:
                order = weighted_order(self._lengths, self._doc_types, self._weights, rng)
            self._plan = (epoch, pack(order, self._lengths, self.seq_len))
        return self._plan[1]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of global sample `index`."""
        while not self._epoch_ends or self._epoch_ends[-1] <= index:
            start = self._epoch_ends[-1] if self._epoch_ends else 0
            self._epoch_ends.append(start + self.epoch_plan(len(self._epoch_ends)).num_rows)
        epoch = bisect_right(self._epoch_ends, index)
        return epoch, index - (self._epoch_ends[epoch - 1] if epoch else 0)

    def sample(self, index: int) -> Sample:
        epoch, row = self.locate(index)
        plan = self.epoch_plan(epoch)
        return packed_sample(self.documents, self._doc_types, plan, row, self.pack_sample_into_one)

    def any_labelled(self) -> bool:
        """Whether rows sampled over the first epoch have a token to predict (see `any_labelled`)."""
        return any_labelled(self.sample, self.epoch_plan(0).num_rows)

    def type_token_shares(self, start: int, stop: int) -> dict[str, float]:
        """Share of the (non-padding) tokens per type in global samples [start, stop), e.g. the
        samples a run has consumed, to log the achieved mix next to `data.dataset_weights`."""
        counts = np.zeros(len(self.types))
        index = start
        while index < stop:
            epoch, row = self.locate(index)
            plan = self.epoch_plan(epoch)
            end_row = min(plan.num_rows, row + stop - index)
            counts += plan.type_tokens(self._doc_types, len(counts), row, end_row)
            index += end_row - row
        total = counts.sum()
        return {name: float(c / total) if total else 0.0 for name, c in zip(self.types, counts)}


class PackedRows(Dataset):
    """One fixed pass over documents packed in their stored order (validation): this rank's rows.

    Row j * dp_world_size + dp_rank is this rank's sample j, so ranks hold disjoint shares. The
    rows are padded with all-padding rows (labels -100, type_ids -1) up to a multiple of
    `row_multiple` (dp x batch): every rank then runs the same number of
    full batches, as one with fewer would leave the others waiting in a collective.
    """

    def __init__(
        self,
        documents: Documents,
        seq_len: int,
        dp_rank: int,
        dp_world_size: int,
        row_multiple: int = 1,
        pack_sample_into_one: bool = False,
    ):
        if not 0 <= dp_rank < dp_world_size or row_multiple % dp_world_size:
            raise ValueError(
                f"dp_rank {dp_rank} must be in [0, {dp_world_size}) and row_multiple {row_multiple} "
                f"a multiple of dp_world_size"
            )
        self.documents = documents
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.pack_sample_into_one = pack_sample_into_one
        lengths = np.asarray(documents.lengths(), dtype=np.int64)
        self._doc_types = np.asarray(documents.type_ids(), dtype=np.int64)
        self.plan = pack(np.arange(len(lengths)), lengths, seq_len)
        padded_rows = -(-self.plan.num_rows // row_multiple) * row_multiple
        self._len = padded_rows // dp_world_size

    @property
    def types(self) -> list[str]:
        return list(self.documents.types)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> Sample:
        if not 0 <= j < self._len:
            raise IndexError(j)
        return self.row(j * self.dp_world_size + self.dp_rank)

    def row(self, row: int) -> Sample:
        """Row `row` of all ranks' rows; an all-padding row past the packed ones."""
        packed = row if row < self.plan.num_rows else None
        return packed_sample(self.documents, self._doc_types, self.plan, packed, self.pack_sample_into_one)

    def any_labelled(self) -> bool:
        """Whether rows sampled over the packed ones have a token to score (see `any_labelled`)."""
        return any_labelled(self.row, self.plan.num_rows)
