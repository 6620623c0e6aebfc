"""`build_dataloader`: the dataset named by the config, batched by a resumable StatefulDataLoader."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.config.job_config import JobConfig
from titanlm.data.datasets import IGNORE_INDEX, RandomTokenDataset, ShardedStream, TextTokenDataset
from titanlm.data.demo import ensure_demo_assets
from titanlm.data.tokenizer import Tokenizer, build_tokenizer

DATASETS = ("auto", "random", "demo", "bin")


def _checked_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    tokenizer = build_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"model.tokenizer_path {path!r} has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {vocab_size}; pick a model flavor with vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def _encode_lines(tokenizer: Tokenizer, corpus_path: str) -> list[np.ndarray]:
    with open(corpus_path, encoding="utf-8") as f:
        return [np.asarray(tokenizer.encode(line.rstrip("\n")), dtype=np.int32) for line in f]


def build_dataloader(
    cfg: JobConfig, dp_rank: int, dp_world_size: int, vocab_size: int
) -> tuple[StatefulDataLoader, Tokenizer | None]:
    """This rank's loader of {"input_ids", "labels"} LongTensor [local_batch_size, seq_len] batches.

    Batches do not depend on data.num_workers (workers take turns by whole batches), and the
    loader's state_dict/load_state_dict resume the exact stream. The tokenizer is None only for
    random data without model.tokenizer_path.
    """
    kind = cfg.data.dataset
    if kind not in DATASETS:
        raise ValueError(f"data.dataset = {kind!r} is not one of {', '.join(DATASETS)}")
    if kind == "auto":
        kind = "bin" if cfg.data.train_folder else "random"
    if kind == "bin":
        raise NotImplementedError(
            "data.dataset = 'bin' (InternEvo bin/meta folders) lands with the data issue; use demo or random"
        )
    seq_len, batch_size, seed = cfg.training.seq_len, cfg.training.local_batch_size, cfg.debug.seed
    common = dict(seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_world_size=dp_world_size,
                  worker_block=batch_size)
    path = cfg.model.tokenizer_path
    dataset: ShardedStream
    if kind == "random":
        tokenizer = _checked_tokenizer(path, vocab_size) if path else None
        dataset = RandomTokenDataset(vocab_size=vocab_size, **common)
    else:  # demo
        assets = ensure_demo_assets(cfg.data.cache_folder)
        tokenizer = _checked_tokenizer(path or assets.tokenizer_path, vocab_size)
        dataset = TextTokenDataset(_encode_lines(tokenizer, assets.corpus_path), **common)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        loader = StatefulDataLoader(dataset, batch_size=batch_size, num_workers=cfg.data.num_workers)
    return loader, tokenizer


def tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss, the denominator for per-token loss and throughput."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
