"""Infinite, deterministic, resumable token datasets, sharded over data-parallel ranks.

Every dataset is a numbered global stream of samples: sample i goes to rank i % dp_world_size.
So a global batch holds the same samples whatever the DP degree, and a multi-rank run is
comparable with a single-process one. The state is the number of global samples consumed, the
same on every rank, so a run resumes exactly, at the same or at another DP degree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import IterableDataset, get_worker_info

from titanlm.errors import CheckpointError, DataError

Sample = dict[str, torch.Tensor]  # one sample: tensors [seq]
Batch = dict[str, torch.Tensor]  # collated samples: tensors [batch, seq]


def window_sample(tokens: np.ndarray) -> Sample:
    """A next-token sample from seq_len + 1 consecutive tokens."""
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    # Separate storage: an in-place edit of the labels (e.g. masking) must not touch the inputs.
    return {"input_ids": t[:-1].clone(), "labels": t[1:].clone()}


class ShardedStream(IterableDataset):
    """Base class: walks the global stream, yielding this rank's share, from a resumable counter.

    Within a rank, dataloader workers take turns by blocks of `worker_block` samples; with the
    block equal to the batch size, StatefulDataLoader's round-robin over workers yields the same
    batches as with no workers.
    """

    def __init__(self, seq_len: int, seed: int, dp_rank: int, dp_world_size: int, worker_block: int = 1):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if seq_len < 1 or worker_block < 1:
            raise ValueError(f"seq_len ({seq_len}) and worker_block ({worker_block}) must be >= 1")
        self.seq_len = seq_len
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.worker_block = worker_block
        self._next_local = 0  # this rank's next sample number, consumed or not by this worker

    def sample(self, index: int) -> Sample:
        """Global sample `index`; a pure function of it and the constructor arguments."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            local = self._next_local
            self._next_local += 1  # before the yield: the state then counts the sample as consumed
            if (local // self.worker_block) % num_workers == worker:
                yield self.sample(local * self.dp_world_size + self.dp_rank)

    def state_dict(self) -> dict[str, Any]:
        consumed = self._next_local * self.dp_world_size
        return {"consumed_samples": consumed, "dp_world_size": self.dp_world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed, saved_dp = int(state["consumed_samples"]), int(state["dp_world_size"])
        per_batch = self.dp_world_size * self.worker_block
        if consumed < 0 or consumed % per_batch:
            raise CheckpointError(
                f"cannot resume data at data-parallel degree {self.dp_world_size} x local batch "
                f"{self.worker_block}: the checkpoint (saved at degree {saved_dp}) consumed {consumed} "
                f"samples, not a multiple of {per_batch}; keep training.global_batch_size when resuming"
            )
        self._next_local = consumed // self.dp_world_size


class RandomTokenDataset(ShardedStream):
    """Uniform random ids (InternEvo's behaviour without a data path), for speed and smoke runs.

    Sample i comes from a generator seeded by (seed, i), so it does not depend on the layout.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, dp_rank: int, dp_world_size: int, worker_block: int = 1
    ):
        super().__init__(seq_len, seed, dp_rank, dp_world_size, worker_block)
        self.vocab_size = vocab_size

    def sample(self, index: int) -> Sample:
        rng = np.random.default_rng((self.seed, index))
        return window_sample(rng.integers(0, self.vocab_size, size=self.seq_len + 1))


def cut_window(stream: np.ndarray, k: int, seq_len: int) -> np.ndarray:
    """Window k of a token stream: stride seq_len, length seq_len + 1, so every token is a label once."""
    return stream[k * seq_len : k * seq_len + seq_len + 1]


class TextTokenDataset(ShardedStream):
    """Tokenized documents, shuffled per epoch, concatenated and cut into fixed windows (torchtitan).

    Windows cross document boundaries; the caller adds bos/eos to each document. Every epoch has
    the same number of windows, so global sample i is window i % n of epoch i // n.
    """

    def __init__(
        self,
        documents: Sequence[ArrayLike],
        seq_len: int,
        seed: int,
        dp_rank: int,
        dp_world_size: int,
        worker_block: int = 1,
    ):
        super().__init__(seq_len, seed, dp_rank, dp_world_size, worker_block)
        self._documents = [np.asarray(d) for d in documents]
        num_tokens = sum(len(d) for d in self._documents)
        self.windows_per_epoch = (num_tokens - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise DataError(f"the documents hold {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self._cached: tuple[int, np.ndarray] | None = None

    def _stream(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self._documents))
            self._cached = (epoch, np.concatenate([self._documents[i] for i in order]))
        return self._cached[1]

    def sample(self, index: int) -> Sample:
        epoch, position = divmod(index, self.windows_per_epoch)
        return window_sample(cut_window(self._stream(epoch), position, self.seq_len))
