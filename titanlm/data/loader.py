"""`build_dataloader`: the dataset named by the config, batched by a resumable StatefulDataLoader;
`build_valid_dataloader`: one fixed pass over `data.valid_folder`."""

from __future__ import annotations

import warnings

import numpy as np
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.config.job_config import JobConfig
from titanlm.data.binmeta import BinMetaFolder
from titanlm.data.datasets import RandomTokenDataset, ShardedStream, TextTokenDataset
from titanlm.data.demo import ensure_demo_assets
from titanlm.data.mixing import parse_dataset_weights
from titanlm.data.packing import PackedDataset, PackedRows
from titanlm.data.tokenizer import Tokenizer, build_tokenizer
from titanlm.errors import ConfigError, DataError


def _checked_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    tokenizer = build_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"the tokenizer {path!r} has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {vocab_size}; pick a model with vocab_size >= {tokenizer.vocab_size}, or another model.tokenizer_path"
        )
    return tokenizer


def _encode_lines(tokenizer: Tokenizer, corpus_path: str) -> list[np.ndarray]:
    with open(corpus_path, encoding="utf-8") as f:
        return [np.asarray(tokenizer.encode(line.rstrip("\n")), dtype=np.int32) for line in f]


def build_dataloader(
    cfg: JobConfig,
    dataset_kind: str,
    dp_rank: int,
    dp_world_size: int,
    vocab_size: int,
    tokenizer_path: str | None = None,
) -> tuple[StatefulDataLoader, Tokenizer | None]:
    """This rank's loader of {"input_ids", "labels"} LongTensor [local_batch_size, seq_len] batches;
    bin data adds "position_ids", "document_ids" and "type_ids" (see `titanlm.data.packing`).

    Batches do not depend on data.num_workers (workers take turns by whole batches), and the
    loader's state_dict/load_state_dict resume the exact stream; for bin data also at another
    data-parallel degree with the same global batch size. `tokenizer_path` is the model's as the
    trainer resolved it (model.tokenizer_path, or model.hf_path's; None = model.tokenizer_path as
    set); the demo corpus brings its own when it is empty.
    The tokenizer is None only for random or bin data without one. `dataset_kind`: random, demo or
    bin, as the plan resolved data.dataset.
    """
    seq_len, batch_size, seed = cfg.training.seq_len, cfg.training.local_batch_size, cfg.debug.seed
    common = dict(seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_world_size=dp_world_size, worker_block=batch_size)
    path = cfg.model.tokenizer_path if tokenizer_path is None else tokenizer_path
    dataset: ShardedStream
    if dataset_kind == "demo":
        assets = ensure_demo_assets(cfg.data.cache_folder)
        tokenizer = _checked_tokenizer(path or assets.tokenizer_path, vocab_size)
        dataset = TextTokenDataset(_encode_lines(tokenizer, assets.corpus_path), **common)
    elif dataset_kind == "random":
        tokenizer = _checked_tokenizer(path, vocab_size) if path else None
        dataset = RandomTokenDataset(vocab_size=vocab_size, **common)
    else:  # bin: already tokenized, the tokenizer is only for whoever decodes
        tokenizer = _checked_tokenizer(path, vocab_size) if path else None
        documents = BinMetaFolder(cfg.data.train_folder, cfg.data.min_length, vocab_size)
        dataset = PackedDataset(
            documents,
            pack_sample_into_one=cfg.data.pack_sample_into_one,
            weights=parse_dataset_weights(cfg.data.dataset_weights, documents.types),
            **common,
        )
    return _stateful_loader(dataset, batch_size, cfg.data.num_workers), tokenizer


def build_valid_dataloader(
    cfg: JobConfig, dp_rank: int, dp_world_size: int, vocab_size: int
) -> StatefulDataLoader | None:
    """This rank's finite loader over `data.valid_folder`, or None when it is not set.

    The documents are packed in stored order (no shuffle) like the training data; ranks take
    disjoint rows, and every rank gets the same number of full batches (the last ones padded:
    labels -100, type_ids -1), so no rank waits alone in a collective. Per-token "type_ids"
    index `loader.dataset.types` (the valid folder's types) for a loss per type.
    """
    if not cfg.data.valid_folder:
        return None
    batch_size = cfg.training.local_batch_size
    min_length = cfg.data.min_length
    documents = BinMetaFolder(cfg.data.valid_folder, min_length, vocab_size, setting="data.valid_folder")
    if not documents.num_documents:
        raise DataError(
            f"data.valid_folder = {cfg.data.valid_folder!r} holds no documents of at least data.min_length = "
            f"{min_length} tokens, so validation would measure nothing; point it at validation data or set it to ''"
        )
    dataset = PackedRows(
        documents,
        cfg.training.seq_len,
        dp_rank,
        dp_world_size,
        row_multiple=dp_world_size * batch_size,
        pack_sample_into_one=cfg.data.pack_sample_into_one,
    )
    return _stateful_loader(dataset, batch_size, cfg.data.num_workers)


def _stateful_loader(dataset: ShardedStream | PackedRows, batch_size: int, num_workers: int) -> StatefulDataLoader:
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
