"""Tokenize chat conversations for SFT: the loss falls on the assistant replies only.

    python -m titanlm.tools.tokenize_chat chats.jsonl OUT_DIR TOKENIZER --template llama3 --workers 4

Input: JSONL (one record per line) or one JSON array of records. A record is OpenAI-style,
`{"messages": [{"role", "content"}, ...]}` (roles system, user, assistant), or ShareGPT,
`{"conversations": [{"from", "value"}, ...]}` (from system, human, gpt; user and assistant too).
Templates: `llama3` (Meta's format), `internlm2` (ChatML after BOS), `internlm` (InternLM v1), or
`hf`: the chat_template of the tokenizer's folder, rendered with Jinja2 as transformers does, so
any model's own format works. With the official Llama 3 and InternLM2 templates, either way gives
the ids of transformers' `apply_chat_template` (tested with Meta's Llama 3 tokenizer and a byte-level
BPE that has ChatML's tokens). As in transformers, special-token text inside a message becomes the
special token under `hf`; the built-in formats leave it to the tokenizer (plain text for SentencePiece
and tiktoken files, added tokens for a tokenizer.json).

Writes OUT_DIR/train/en/dataset.bin(.meta) and OUT_DIR/valid/en/dataset.bin(.meta), int64 metas as
`tokenize_alpaca` writes them: each assistant reply and its end-of-turn token stored as positive ids
(trained), every other token negated (input only). The split is `tokenize_alpaca`'s (both use
`titanlm.tools.common`'s): a seeded permutation puts round(records * split_ratio) records in valid,
each split keeps input order; --split_ratio 0 writes train only, 1 valid only, and a ratio that
leaves a split with no record is refused.

A conversation longer than --max_length loses whole trailing turns (it ends after the last reply
that fits); if even its first reply does not fit, that reply is cut at --max_length, and if the
prompt before it fills --max_length the record is dropped. The tool reports how many of each.

A bad record stops the run with its line (JSONL) or element (array) number, and nothing is written:
the output is built in a temporary folder beside OUT_DIR and moved into place at the end, with
the modes a plain `open` and `mkdir` would give it. OUT_DIR never pairs splits of two runs: with
--overwrite, the files of a split this run does not write are removed, and without it they are
refused. The tokenizer and template are checked once, before any worker starts. With --workers N,
chunks of records are tokenized by N processes and written in input order, so any N writes the
same bytes; a worker that fails ends the run with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from titanlm.data.binmeta import BinWriter, encode_line
from titanlm.data.chat_templates import (
    CHAT_FORMATS,
    Chat,
    HFChatTemplate,
    conversation_messages,
    load_hf_chat_template,
    render_chat,
)
from titanlm.data.tokenizer import Tokenizer
from titanlm.errors import ConfigError, DataError, MissingFileError
from titanlm.files import read_json_file
from titanlm.models.hf_checkpoint import tokenizer_file_at
from titanlm.progress import progress
from titanlm.tools.common import (
    SPLITS,
    check_outputs,
    check_workers,
    load_tokenizer,
    not_written,
    ordered_map,
    run_cli,
    split_indices,
    staged_splits,
    written_splits,
)

TEMPLATES = (*CHAT_FORMATS, "hf")
_CHUNK_RECORDS = 128


# ---- one conversation ----------------------------------------------------------------------


def fit_length(chat: Chat, max_length: int) -> tuple[Chat | None, str]:
    """`chat` in at most `max_length` tokens, and how: "whole"; "turns" when it ends after the last
    reply that fits; "reply" when its first reply is cut at `max_length`; (None, "dropped") when
    not one reply token fits."""
    if len(chat.ids) <= max_length:
        return chat, "whole"
    kept = [span for span in chat.assistant_spans if span[1] <= max_length]
    if kept:
        return Chat(chat.ids[: kept[-1][1]], kept), "turns"
    start = chat.assistant_spans[0][0]
    if start < max_length:
        return Chat(chat.ids[:max_length], [(start, max_length)]), "reply"
    return None, "dropped"


@dataclass(frozen=True)
class Encoded:
    """One conversation as written: its .bin line (None when dropped) and what it holds."""

    line: bytes | None
    fit: str
    tokens: int = 0
    trained: int = 0
    turns: int = 0
    # Input-only tokens with id 0 that are some position's target: -0 is 0, so a loader reads
    # them as trained (InternEvo's masks id 0 as padding; titanlm's predicts it).
    zero_targets: int = 0
    # Oddities trained as they are, which the summary warns about: a conversation whose first turn
    # (after any system message) is the assistant's, so its first reply answers nothing; replies
    # with no text, so only their end-of-turn token is trained.
    assistant_first: bool = False
    empty_replies: int = 0


@dataclass(frozen=True)
class ChatEncoder:
    """Records to signed ids: the tokenizer and template are checked once, in the parent process,
    before any worker starts."""

    tok: Tokenizer
    template: str | HFChatTemplate
    system: str
    max_length: int

    def encode(self, record: Any) -> Encoded:
        messages = conversation_messages(record)
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        chat = render_chat(self.tok, self.template, messages)
        if not chat.assistant_spans:
            raise ConfigError("the template renders none of its assistant messages, so nothing would be trained")
        oddities = {
            "assistant_first": next(m["role"] for m in messages if m["role"] != "system") == "assistant",
            "empty_replies": sum(m["role"] == "assistant" and not m["content"].strip() for m in messages),
        }
        chat, fit = fit_length(chat, self.max_length)
        if chat is None:
            return Encoded(None, fit, **oddities)
        ids = chat.ids
        signed = [-i for i in ids]
        for start, end in chat.assistant_spans:
            signed[start:end] = ids[start:end]
        zeros = signed[1:].count(0) - sum(ids[max(start, 1) : end].count(0) for start, end in chat.assistant_spans)
        trained = sum(end - start for start, end in chat.assistant_spans)
        return Encoded(encode_line(signed), fit, len(ids), trained, len(chat.assistant_spans), zeros, **oddities)


# ---- reading the input ---------------------------------------------------------------------

# (split, where, the raw JSONL line or None, the parsed record or None): JSONL lines are parsed in the
# workers, which also learn each record's split, so that they hand back whole lines per split.
Item = tuple[str, str, str | None, Any]


def read_records(path: str) -> tuple[int, Iterator[tuple[str, str | None, Any]]]:
    """The number of records in `path` (a JSON array, else JSONL) and an iterator over them, each
    as (where, raw JSONL line or None, parsed record or None), named by its 1-based element or
    line number. A JSONL file is streamed: counting its records reads the lines without parsing them."""
    with open(path, "rb") as f:
        first = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first == b"[":
        records = read_json_file(path, fix="fix the array")
        items = ((f"{path} record {number}", None, r) for number, r in enumerate(records, start=1))
        return len(records), items
    count = sum(1 for _ in _jsonl_lines(path))
    return count, ((f"{path} line {number}", line, None) for number, line in _jsonl_lines(path))


def _jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines that are not blank."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {number} is not UTF-8 text ({e.reason}); convert the file") from None
            if line.strip():
                yield number, line


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == _CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- tokenizing, in this process or a pool -------------------------------------------------


@dataclass
class SplitSummary:
    conversations: int = 0
    turns: int = 0
    tokens: int = 0
    trained: int = 0


@dataclass
class Summary:
    records: int = 0
    seconds: float = 0.0
    splits: dict[str, SplitSummary] = field(default_factory=lambda: {split: SplitSummary() for split in SPLITS})
    fits: Counter = field(default_factory=Counter)
    zero_targets: int = 0
    assistant_first: int = 0
    empty_replies: int = 0
    written: list[str] = field(default_factory=lambda: list(SPLITS))  # the splits that get records

    def add(self, encoded: Encoded, split: str) -> None:
        self.records += 1
        self.fits[encoded.fit] += 1
        self.zero_targets += encoded.zero_targets
        self.assistant_first += encoded.assistant_first
        self.empty_replies += encoded.empty_replies
        if encoded.line is not None:
            s = self.splits[split]
            s.conversations += 1
            s.turns += encoded.turns
            s.tokens += encoded.tokens
            s.trained += encoded.trained

    def merge(self, other: Summary) -> None:
        self.records += other.records
        self.fits += other.fits
        self.zero_targets += other.zero_targets
        self.assistant_first += other.assistant_first
        self.empty_replies += other.empty_replies
        for split, s in self.splits.items():
            o = other.splits[split]
            s.conversations += o.conversations
            s.turns += o.turns
            s.tokens += o.tokens
            s.trained += o.trained


@dataclass
class Chunk:
    """A run of records as written: per split, the arguments of `BinWriter.write_lines`."""

    parts: dict[str, tuple[bytes, list[int], list[int]]]
    summary: Summary


_encoder: ChatEncoder | None = None  # one per process, handed over when a worker starts


def _set_encoder(encoder: ChatEncoder) -> None:
    global _encoder
    _encoder = encoder


def encode_chunk(items: list[Item]) -> Chunk:
    """The records of one chunk, stopping at the first bad one with its name in the error."""
    lines: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    counts: dict[str, list[int]] = {split: [] for split in SPLITS}
    summary = Summary()
    for split, where, raw, record in items:
        if raw is not None:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); fix or remove it") from None
        try:
            encoded = _encoder.encode(record)
        except ValueError as e:  # the record's own errors, and a tokenizer library's refusal of its text
            raise DataError(f"{where}: {e}") from None
        summary.add(encoded, split)
        if encoded.line is not None:
            lines[split].append(encoded.line)
            counts[split].append(encoded.tokens)
    parts = {split: (b"".join(lines[split]), [len(line) for line in lines[split]], counts[split]) for split in SPLITS}
    return Chunk(parts, summary)


# ---- the tool ------------------------------------------------------------------------------


def build_encoder(tokenizer_path: str, template: str, system: str = "", max_length: int = 2048) -> ChatEncoder:
    """The encoder of `template` for the tokenizer at `tokenizer_path` (a file or a folder), checked on
    a short conversation so that a template the tokenizer cannot express fails here, once."""
    if template not in TEMPLATES:
        raise ConfigError(f"--template {template} is unknown; choose one of {', '.join(TEMPLATES)}")
    if max_length < 1:
        raise ConfigError(f"--max_length {max_length} must be at least 1")
    path = tokenizer_file_at(tokenizer_path, "the TOKENIZER argument")
    tok = load_tokenizer(path, "the TOKENIZER argument")
    chat_format = load_hf_chat_template(tok, path) if template == "hf" else template
    encoder = ChatEncoder(tok, chat_format, system, max_length)
    encoder.encode({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    return encoder


def tokenize_chat(
    input_path: str,
    output_dir: str,
    tokenizer_path: str,
    template: str,
    split_ratio: float = 0.1,
    max_length: int = 2048,
    seed: int = 0,
    system: str = "",
    workers: int = 1,
    overwrite: bool = False,
) -> Summary:
    """Write the splits of `input_path` that get records (see `split_indices`) under `output_dir`;
    returns what was written."""
    start_time = time.perf_counter()
    check_workers(workers)
    encoder = build_encoder(tokenizer_path, template, system, max_length)
    splits = written_splits(split_ratio)
    check_outputs(output_dir, splits, overwrite)
    if not os.path.isfile(input_path):
        raise MissingFileError(f"input {input_path} does not exist")
    num_records, items = read_records(input_path)
    if not num_records:
        raise DataError(f"{input_path} holds no records")
    try:
        valid = split_indices(num_records, split_ratio, seed)[1]
    except ConfigError:  # a bad record is the first thing to fix: name it, as a run would (a few records)
        _set_encoder(encoder)
        encode_chunk([("train", *item) for item in items])
        raise
    in_valid = np.zeros(num_records, dtype=bool)
    in_valid[valid] = True
    split_items = (("valid" if in_valid[i] else "train", *item) for i, item in enumerate(items))
    summary = Summary(written=splits)
    with staged_splits(output_dir, splits) as staged, ExitStack() as stack:
        writers = {split: stack.enter_context(BinWriter(staged[split], "int64")) for split in splits}
        bar = stack.enter_context(progress(total=num_records, desc="tokenize_chat", unit="record"))
        for chunk in ordered_map(encode_chunk, _chunks(split_items), workers, _set_encoder, (encoder,)):
            for split, (data, sizes, counts) in chunk.parts.items():
                if sizes:
                    writers[split].write_lines(data, sizes, counts)
            summary.merge(chunk.summary)
            bar.update(chunk.summary.records)
        for split in splits:  # raised inside the staging block, so that nothing is written
            if not summary.splits[split].conversations:
                raise DataError(
                    f"every record of the {split} split was dropped (the prompt before its first reply fills "
                    f"--max_length {max_length}), so the split would be empty; nothing written: raise --max_length"
                )
    summary.seconds = time.perf_counter() - start_time
    return summary


def format_summary(summary: Summary, max_length: int, workers: int) -> list[str]:
    lines = []
    for split, s in summary.splits.items():
        if split not in summary.written:
            lines.append(not_written(split))
            continue
        share = s.trained / max(s.tokens, 1)
        lines.append(
            f"{split}: {s.conversations:,} conversations, {s.turns:,} assistant turns, {s.tokens:,} tokens "
            f"({share:.1%} trained)"
        )
    fits = summary.fits
    if fits["turns"] or fits["reply"] or fits["dropped"]:
        lines.append(
            f"--max_length {max_length}: cut {fits['turns']:,} after the last reply that fits and {fits['reply']:,} "
            f"inside its first reply; dropped {fits['dropped']:,} (the prompt before the first reply fills it)"
        )
    if summary.assistant_first:
        lines.append(
            f"warning: {summary.assistant_first:,} conversations start with an assistant reply (no user turn before "
            "it), which is trained as an answer to nothing"
        )
    if summary.empty_replies:
        lines.append(
            f"warning: {summary.empty_replies:,} assistant replies are empty: only their end-of-turn token is trained"
        )
    if summary.zero_targets:
        lines.append(
            f"warning: {summary.zero_targets:,} input-only tokens have id 0, which cannot be stored negated: "
            "titanlm's loader trains on them (InternEvo's masks id 0)"
        )
    rate = summary.records / max(summary.seconds, 1e-9)
    lines.append(f"{summary.records:,} records in {summary.seconds:.2f} s ({rate:,.0f} records/s, {workers} workers)")
    return lines


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize_chat",
        description="Tokenize chat conversations (OpenAI messages or ShareGPT, JSONL or a JSON array) into "
        "SFT data with the loss on the assistant replies: OUTPUT_DIR/{train,valid}/en/dataset.bin(.meta).",
    )
    parser.add_argument("input", help='JSONL or JSON array of {"messages": [...]} or {"conversations": [...]}')
    parser.add_argument("output_dir", help="folder that receives train/ and valid/")
    parser.add_argument(
        "tokenizer",
        metavar="TOKENIZER",
        help="tokenizer file (SentencePiece, tiktoken, tokenizer.json) or a folder holding one",
    )
    parser.add_argument(
        "--template",
        required=True,
        choices=TEMPLATES,
        help="chat format: llama3, internlm2 (ChatML), internlm (v1), or hf: the chat_template beside the tokenizer",
    )
    parser.add_argument("--system", default="", help="system message for conversations that have none")
    parser.add_argument(
        "--split_ratio",
        type=float,
        default=0.1,
        help="share of records for valid: 0 = write train only, 1 = valid only; a split is never written empty",
    )
    parser.add_argument("--max_length", type=int, default=2048, help="most tokens per conversation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizing processes (default: one per CPU; 1 = in this process)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    summary = tokenize_chat(
        args.input,
        args.output_dir,
        args.tokenizer,
        args.template,
        args.split_ratio,
        args.max_length,
        args.seed,
        args.system,
        args.workers,
        args.overwrite,
    )
    print("\n".join(format_summary(summary, args.max_length, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
