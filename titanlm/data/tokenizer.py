"""Tokenizers behind one small interface, and `build_tokenizer`, which picks one from the file.

Three file formats are read: a SentencePiece protobuf (InternLM, Llama 2), tiktoken ranks (Llama 3's
`tokenizer.model`: one `base64token rank` line per token) and a Hugging Face `tokenizer.json`.
The format is recognised from the file's first bytes, so a file's name does not matter.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import tiktoken
import tokenizers

from titanlm.data.tokenizer_json import sentencepiece_json, tiktoken_json, with_bos_first
from titanlm.errors import DataError, MissingFileError
from titanlm.files import read_tokenizer_json
from titanlm.models.hf_checkpoint import tokenizer_files

logger = logging.getLogger("titanlm")


def _hint(setting: str) -> str:
    return f"set {setting} to a SentencePiece .model, tiktoken ranks file or HF tokenizer.json"


TOKENIZER_TYPES = ("auto", "sentencepiece", "tiktoken", "huggingface")


class TokenizerFileError(DataError):
    """A tokenizer file that exists but cannot be read; the message names the file and the fix."""


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

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        """`encode` of each text; subclasses override it where their library encodes lists faster."""
        return [self.encode(text, bos, eos) for text in texts]

    def token_id(self, piece: str) -> int | None:
        """The id of a single token spelled `piece` (a special token such as `<|eot_id|>`), or None.

        Chat templates use it to insert special tokens as ids rather than tokenizing their text.
        """
        return None

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids


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
        return self._wrap(self._sp.encode(text), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        return [self._wrap(ids, bos, eos) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def token_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to <unk>


# Llama 3's pre-tokenizer split pattern and special tokens (llama-models, llama3/tokenizer.py).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, numbered right after the ordinary ranks (128000 onward)."""
    reserved = (
        f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIALS))
    )
    names = (*_LLAMA3_NAMED_SPECIALS, *reserved)
    return {name: num_base_tokens + i for i, name in enumerate(names)}


# tiktoken panics above ~400k characters and is quadratic on very long runs of (non-)whitespace,
# so long texts are cut into pieces first; a cut only ever falls inside such a run.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")


def _safe_pieces(text: str) -> Iterator[str]:
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    start = 0
    for run in _RUN.finditer(text):
        for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
            yield from _fixed_pieces(text[start:cut])
            start = cut
    yield from _fixed_pieces(text[start:])


def _fixed_pieces(text: str) -> Iterator[str]:
    for i in range(0, len(text), _MAX_ENCODE_CHARS):
        yield text[i : i + _MAX_ENCODE_CHARS]


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The `base64token rank` lines of a tiktoken file, checked to number 0..n-1 without gaps
    (special tokens are numbered from n, so a gap or duplicate would give two tokens one id)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                token_b64, rank = parts
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:  # wrong field count, bad base64 (binascii.Error) or bad rank
                raise TokenizerFileError(f"{path} line {line_no} is not `base64token rank`: {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(
            f"{path}: the {len(ranks)} ranks are not 0..{len(ranks) - 1} without duplicates; "
            "the file is corrupt or not a tiktoken BPE file"
        )
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE with Llama 3's split pattern and special tokens.

    Text is always encoded as ordinary text: a document that contains `<|eot_id|>` yields the
    characters, never the special id, so data cannot inject control tokens; templates insert
    specials by id through `token_id`.
    """

    def __init__(self, path: str):
        self.path = path
        ranks = load_tiktoken_ranks(path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._enc = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _safe_pieces(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        return self._wrap(self._encode_plain(text), bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def token_id(self, piece: str) -> int | None:
        return self.special_tokens.get(piece)


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizer.json` through the `tokenizers` package.

    bos/eos come from a `tokenizer_config.json` beside the file when there is one, else from the
    usual names (`<s>`, `<|begin_of_text|>`, ...); the file's own post-processor is not used, so
    bos/eos follow the same `bos=`/`eos=` switches as the other tokenizers.
    """

    _BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
    _EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

    def __init__(self, path: str):
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = read_tokenizer_json(os.path.join(os.path.dirname(path), "tokenizer_config.json"), TokenizerFileError)
        self.bos_id = self._find(config.get("bos_token"), self._BOS_NAMES)
        self.eos_id = self._find(config.get("eos_token"), self._EOS_NAMES)
        pad = self._find(config.get("pad_token"), ())
        self.pad_id = pad if pad >= 0 else max(self.eos_id, 0)

    def _find(self, configured: str | dict | None, names: tuple[str, ...]) -> int:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in (configured,) if configured else names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return -1

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?")

_BUILDERS: dict[str, Callable[[str], Tokenizer]] = {
    "sentencepiece": SentencePieceTokenizer,
    "tiktoken": TiktokenTokenizer,
    "huggingface": HuggingFaceTokenizer,
}


def detect_tokenizer_type(path: str) -> str:
    """The type of the file: "huggingface" for JSON, "tiktoken" when the first line is
    `base64token rank`, else "sentencepiece" (a binary protobuf, checked when it is loaded)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip().startswith(b"{"):
        return "huggingface"
    if _TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0]):
        return "tiktoken"
    return "sentencepiece"


def build_tokenizer(path: str, kind: str = "auto", setting: str = "--model.tokenizer_path") -> Tokenizer:
    """Load the tokenizer stored at `path`; `kind` is one of TOKENIZER_TYPES, "auto" = detect it
    from the file's content. Errors name `setting`, the key or flag that gave the path, as the fix."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise MissingFileError(f"tokenizer file not found: {path!r}; {_hint(setting)}")
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer type {kind!r}; use one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "auto":
        try:
            kind = detect_tokenizer_type(full)
        except OSError as e:  # e.g. no read permission
            raise TokenizerFileError(f"cannot read {path!r} ({e.strerror}); {_hint(setting)}") from None
    try:
        return _BUILDERS[kind](full)
    except TokenizerFileError as e:  # a file its builder found malformed: the builder says where
        raise TokenizerFileError(f"{e}; {_hint(setting)}") from None
    except Exception as e:  # each library has its own error types for a malformed file
        raise TokenizerFileError(f"cannot load {path!r} as a {kind} tokenizer ({e}); {_hint(setting)}") from e


def export_hf_tokenizer(tokenizer_path: str, out_dir: Path) -> Tokenizer:
    """Copy a tokenizer into an HF model folder so that transformers' AutoTokenizer loads it; return it.

    An HF tokenizer folder is copied with its companions (tokenizer_config.json, special tokens,
    generation_config.json, remote tokenization code). A bare SentencePiece or tiktoken file is
    copied as tokenizer.model beside the tokenizer.json built from it (see tokenizer_json.py), which
    every transformers version loads and which encodes as the file does, and the tokenizer_config.json
    with its bos/eos (and, for tiktoken, Llama 3's 256 special tokens); without one transformers would
    guess Llama 2's.
    """
    tokenizer = build_tokenizer(tokenizer_path)
    source = Path(tokenizer_path).expanduser()
    companions = tokenizer_files(source)
    has_config = any(file.name == "tokenizer_config.json" for file in companions)
    kind = detect_tokenizer_type(str(source))
    for file in companions:
        name = file.name if has_config or file != source else _HF_TOKENIZER_NAME[kind]
        shutil.copy2(file, out_dir / name)
    if not has_config:
        built = _tokenizer_json(tokenizer, kind)
        if built is not None:
            (out_dir / "tokenizer.json").write_text(built)
        config = _hf_tokenizer_config(tokenizer, kind, fast=kind == "huggingface" or built is not None)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def _tokenizer_json(tokenizer: Tokenizer, kind: str) -> str | None:
    """The tokenizer.json to write for a bare tokenizer file, or None to keep the copy (or write none)."""
    bos = _piece(tokenizer, tokenizer.bos_id) if tokenizer.bos_id >= 0 else None
    if kind == "huggingface":
        return with_bos_first(tokenizer.path, bos)
    if isinstance(tokenizer, TiktokenTokenizer):
        ranks = load_tiktoken_ranks(tokenizer.path)
        return tiktoken_json(ranks, tokenizer.special_tokens, LLAMA3_SPLIT_PATTERN, bos)
    built = sentencepiece_json(tokenizer.path, bos)
    if built is None:
        logger.warning(
            f"{tokenizer.path} is a SentencePiece word or char model, which a tokenizer.json cannot express: the "
            "export has its tokenizer.model only, which transformers reads with the sentencepiece package "
            "(LlamaTokenizer)"
        )
    return built


_HF_TOKENIZER_NAME = {
    "sentencepiece": "tokenizer.model",
    "tiktoken": "tokenizer.model",
    "huggingface": "tokenizer.json",
}


def _hf_tokenizer_config(tokenizer: Tokenizer, kind: str, fast: bool) -> dict:
    """What transformers reads beside the tokenizer: the tokenizer.json (`fast`) or a SentencePiece file."""
    tokenizer_class = "PreTrainedTokenizerFast" if fast else "LlamaTokenizer"
    config: dict = {"tokenizer_class": tokenizer_class, "add_bos_token": True, "add_eos_token": False}
    for role, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if token_id >= 0:
            config[role] = _piece(tokenizer, token_id)
    if kind == "tiktoken":
        config["added_tokens_decoder"] = {
            str(token_id): {
                "content": name,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for name, token_id in tokenizer.special_tokens.items()
        }
    return config


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    """The spelling of a special token (decoding would drop SentencePiece's <s>)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return next(name for name, i in tokenizer.special_tokens.items() if i == token_id)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer._sp.id_to_piece(token_id)
    return tokenizer.decode([token_id])
