"""Tokenizers behind one small interface, and `build_tokenizer`, which picks one from the file."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable

import sentencepiece as spm

_HINT = "set --model.tokenizer_path to a SentencePiece .model file"


class Tokenizer(ABC):
    """What the data pipeline and generation need from a tokenizer.

    An id of -1 means the model has no such token; `pad_id` falls back to eos (or 0) so padding
    always has a valid id, and is only ever paired with ignored labels.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Token ids of `text`; bos/eos are added only when asked and the model has them."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


def _load_sentencepiece(path: str) -> Tokenizer | None:
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError):  # not a SentencePiece protobuf
        return None


# Tried in order; each returns None when the file is not its format (tiktoken ranks slot in here).
_LOADERS: tuple[Callable[[str], Tokenizer | None], ...] = (_load_sentencepiece,)


def build_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer stored at `path`, detecting its type from the file's content."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}; {_HINT}")
    for load in _LOADERS:
        tokenizer = load(full)
        if tokenizer is not None:
            return tokenizer
    raise ValueError(f"cannot load {path!r} as a tokenizer (not a SentencePiece model); {_HINT}")
