"""The run's data: `load_run_tokenizer` reads the plan's one tokenizer, `build_dataloader` batches the
planned dataset with a resumable StatefulDataLoader, `build_valid_dataloader` makes one fixed pass
over the validation folder. A folder whose rows sampled at start hold no token to predict is refused, and
a user error met in a dataloader worker comes out as the one line it is in the main process."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.data.binmeta import BinMetaFolder
from titanlm.data.datasets import Batch, RandomTokenDataset, ShardedStream, TextTokenDataset
from titanlm.data.demo import ensure_demo_assets
from titanlm.data.mixing import parse_dataset_weights
from titanlm.data.packing import PackedDataset, PackedRows
from titanlm.data.tokenizer import Tokenizer, build_tokenizer
from titanlm.errors import ConfigError, DataError, TitanlmError

if TYPE_CHECKING:  # the plan imports this package, so its types are only annotations here
    from titanlm.plan import DataPlan, TokenizerPlan


def load_run_tokenizer(plan: TokenizerPlan | None, data: DataPlan) -> Tokenizer | None:
    """The run's tokenizer (None when it has none), whose ids must fit the model's vocabulary. The demo
    corpus's tokenizer is generated with the corpus, here on first use."""
    if plan is None:
        return None
    if data.kind == "demo":
        ensure_demo_assets(data.cache_folder)
    tokenizer = build_tokenizer(plan.path)
    if tokenizer.vocab_size > data.vocab_size:
        raise ConfigError(
            f"the tokenizer {plan.path!r} (from {plan.origin}) has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {data.vocab_size}; pick a model with vocab_size >= {tokenizer.vocab_size}, or "
            "another model.tokenizer_path"
        )
    return tokenizer


def _encode_lines(tokenizer: Tokenizer, corpus_path: str) -> list[np.ndarray]:
    with open(corpus_path, encoding="utf-8") as f:
        return [np.asarray(tokenizer.encode(line.rstrip("\n")), dtype=np.int32) for line in f]


def build_dataloader(
    data: DataPlan, tokenizer: Tokenizer | None, dp_rank: int, dp_world_size: int
) -> StatefulDataLoader:
    """This rank's loader of {"input_ids", "labels"} LongTensor [local_batch_size, seq_len] batches;
    bin data adds "position_ids", "document_ids" and "type_ids" (see `titanlm.data.packing`).

    Batches do not depend on data.num_workers (workers take turns by whole batches), and the
    loader's state_dict/load_state_dict resume the exact stream; for bin data also at another
    data-parallel degree with the same global batch size. The demo corpus is encoded with
    `tokenizer` (the plan's, see `load_run_tokenizer`).
    """
    common = dict(
        seq_len=data.seq_len,
        seed=data.seed,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        worker_block=data.local_batch_size,
    )
    dataset: ShardedStream
    if data.kind == "demo":
        assert tokenizer is not None, "the plan gives demo data the demo corpus's tokenizer"
        corpus = _encode_lines(tokenizer, ensure_demo_assets(data.cache_folder).corpus_path)
        dataset = TextTokenDataset(corpus, **common)
    elif data.kind == "random":
        dataset = RandomTokenDataset(vocab_size=data.vocab_size, **common)
    else:  # bin: already tokenized
        documents = BinMetaFolder(data.train_folder, data.min_length, data.vocab_size)
        dataset = PackedDataset(
            documents,
            pack_sample_into_one=data.pack_sample_into_one,
            weights=parse_dataset_weights(list(data.dataset_weights), documents.types),
            **common,
        )
        _require_labels(dataset, "data.train_folder", data.train_folder, "training would run at loss 0")
    return _stateful_loader(dataset, data.local_batch_size, data.num_workers)


def build_valid_dataloader(data: DataPlan, dp_rank: int, dp_world_size: int) -> StatefulDataLoader | None:
    """This rank's finite loader over the validation folder, or None when the run does not validate.

    The documents are packed in stored order (no shuffle) like the training data; ranks take
    disjoint rows, and every rank gets the same number of full batches (the last ones padded:
    labels -100, type_ids -1), so no rank waits alone in a collective. Per-token "type_ids"
    index `loader.dataset.types` (the valid folder's types) for a loss per type.
    """
    if not data.valid_folder:
        return None
    batch_size, min_length = data.local_batch_size, data.min_length
    documents = BinMetaFolder(data.valid_folder, min_length, data.vocab_size, setting="data.valid_folder")
    if not documents.num_documents:
        raise DataError(
            f"data.valid_folder = {data.valid_folder!r} holds no documents of at least data.min_length = "
            f"{min_length} tokens, so validation would measure nothing; point it at validation data or set it to ''"
        )
    dataset = PackedRows(
        documents,
        data.seq_len,
        dp_rank,
        dp_world_size,
        row_multiple=dp_world_size * batch_size,
        pack_sample_into_one=data.pack_sample_into_one,
    )
    _require_labels(dataset, "data.valid_folder", data.valid_folder, "validation would measure nothing")
    return _stateful_loader(dataset, batch_size, data.num_workers)


def _require_labels(dataset: PackedDataset | PackedRows, setting: str, folder: str, consequence: str) -> None:
    """Refuse a folder whose rows sampled at start hold no label; cheap, and it leaves the stream as it was."""
    if not dataset.any_labelled():
        raise DataError(
            f"{setting} = {folder!r} holds no token to predict in the rows sampled across it: every token is a "
            f"prompt token (stored negative) or the last of its document (one-token documents), so {consequence}; "
            "tokenize it with the responses to learn, or raise data.min_length to drop short documents"
        )


def _stateful_loader(dataset: ShardedStream | PackedRows, batch_size: int, num_workers: int) -> StatefulDataLoader:
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return _Loader(dataset, batch_size=batch_size, num_workers=num_workers)


class _Loader(StatefulDataLoader):
    """A StatefulDataLoader that re-raises a user error from a worker process as the worker raised it.

    torch re-raises a worker's exception in the main process as the same type with, for its message,
    "Caught X in DataLoader worker process N." and the worker's traceback: the trainer's one error line
    would be twenty. The workers start, and may fail (loading a state), in `iter`."""

    def __iter__(self) -> Iterator[Batch]:
        try:
            return _Batches(super().__iter__())
        except TitanlmError as error:
            _raise_as_in_the_worker(error)
            raise


class _Batches:
    def __init__(self, batches: Iterator[Batch]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        try:
            return next(self._batches)
        except TitanlmError as error:
            _raise_as_in_the_worker(error)
            raise


def _raise_as_in_the_worker(error: TitanlmError) -> None:
    """Raise `error` with the message it had in the dataloader worker that raised it; return when it was
    raised in this process."""
    text, kind = str(error), type(error)
    if not text.startswith(f"Caught {kind.__name__} in DataLoader worker process "):
        return
    # The traceback, which torch formats into the message, ends with "module.Class: message".
    marker = f"\n{kind.__module__}.{kind.__qualname__}: "
    at = text.rfind(marker)
    if at >= 0:
        raise kind(text[at + len(marker) :].rstrip("\n")) from None
