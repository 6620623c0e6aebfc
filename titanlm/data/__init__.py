"""Data: tokenizers, the generated demo corpus, bin/meta folders, packing and mixing, sharded
resumable datasets and the dataloaders."""

from titanlm.data.binmeta import BinMetaFolder
from titanlm.data.datasets import (
    RandomTokenDataset,
    ShardedStream,
    TextTokenDataset,
    cut_window,
    window_sample,
)
from titanlm.data.demo import DemoAssets, ensure_demo_assets, generate_corpus
from titanlm.data.loader import build_dataloader, build_valid_dataloader, load_run_tokenizer
from titanlm.data.mixing import parse_dataset_weights
from titanlm.data.packing import Documents, PackedDataset, PackedRows, PackPlan, pack, packed_sample
from titanlm.data.tokenizer import SentencePieceTokenizer, Tokenizer, build_tokenizer
from titanlm.loss import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "BinMetaFolder",
    "DemoAssets",
    "Documents",
    "PackPlan",
    "PackedDataset",
    "PackedRows",
    "RandomTokenDataset",
    "SentencePieceTokenizer",
    "ShardedStream",
    "TextTokenDataset",
    "Tokenizer",
    "build_dataloader",
    "load_run_tokenizer",
    "build_valid_dataloader",
    "build_tokenizer",
    "cut_window",
    "ensure_demo_assets",
    "generate_corpus",
    "pack",
    "packed_sample",
    "parse_dataset_weights",
    "window_sample",
]
