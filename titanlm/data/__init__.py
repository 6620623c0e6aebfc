"""Data: tokenizers, the generated demo corpus, sharded resumable datasets and the dataloader."""

from titanlm.data.datasets import (
    IGNORE_INDEX,
    RandomTokenDataset,
    ShardedStream,
    TextTokenDataset,
    cut_window,
    window_sample,
)
from titanlm.data.demo import DemoAssets, ensure_demo_assets, generate_corpus
from titanlm.data.loader import build_dataloader, tokens_in_batch
from titanlm.data.tokenizer import SentencePieceTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DemoAssets",
    "RandomTokenDataset",
    "SentencePieceTokenizer",
    "ShardedStream",
    "TextTokenDataset",
    "Tokenizer",
    "build_dataloader",
    "build_tokenizer",
    "cut_window",
    "ensure_demo_assets",
    "generate_corpus",
    "tokens_in_batch",
    "window_sample",
]
