"""Tokenize raw text into an InternEvo `.bin` + `.bin.meta` pair (InternLM's `tools/tokenizer.py`).

    python -m titanlm.tools.tokenize --text_input_path raw.jsonl --bin_output_path out/en/data.bin \\
        --tokenizer_path tokenizer.model --workers 8

Input formats, chosen by the file's extension (or --input_format):
- txt: one document per line; lines are stripped and blank lines skipped, as InternEvo does.
- jsonl: one JSON record per line; the text is record["content"] (InternEvo's key), else
  record["text"], or record[--text_key] when given.
- json: one record, or an array of records, read the same way.
Every document gets BOS and EOS, as InternEvo's tool adds them. The output is byte-identical to
InternEvo's (`json.dumps` lines, int32 meta), only produced faster: the input is streamed in
chunks, chunks are tokenized by a pool of worker processes, and results are written in input
order, so any --workers value writes the same bytes.

The tokenizer is loaded and checked once, before any worker starts. Any error (a bad record, a
text the tokenizer refuses, a worker that dies) ends the run with one line naming the file and
the line or record, and leaves nothing behind: the output is written under temporary names and
renamed into place at the end, with the mode a plain `open` would give it.
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from titanlm.data.binmeta import BinWriter, encode_line
from titanlm.data.tokenizer import Tokenizer
from titanlm.errors import ConfigError, DataError, MissingFileError
from titanlm.progress import progress
from titanlm.tools.common import check_output_folder, check_workers, load_tokenizer, ordered_map, run_cli

FORMATS = ("txt", "json", "jsonl")
TEXT_KEYS = ("content", "text")  # read in this order; InternEvo's tool reads "content"
_CHUNK_DOCS = 1024
_CHUNK_CHARS = 4 << 20  # also bounds a chunk of very long documents
_READ_CHARS = 1 << 20
_WHITESPACE = re.compile(r"\s*")
_EMPTY = {"txt": "line with text", "jsonl": "record", "json": "record"}  # what an empty input lacks


@dataclass(frozen=True)
class Stats:
    documents: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# ---- reading the input, streamed -----------------------------------------------------------


class _JsonStream:
    """Incremental parsing of a JSON file, so a multi-GB array of records is never read whole."""

    def __init__(self, f: TextIO):
        self._f = f
        self._decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False

    def _more(self) -> None:
        # Reads at least as much as is buffered: a huge record costs O(size) retries, not O(size²).
        data = self._f.read(max(_READ_CHARS, len(self.buf) - self.pos))
        self.buf, self.pos, self.eof = self.buf[self.pos :] + data, 0, not data

    def peek(self) -> str:
        """The next non-whitespace character, "" at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self._more()

    def value(self) -> Any:
        self.peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # else a number may continue past the buffer
                    self.pos = end
                    return value
            except json.JSONDecodeError:
                if self.eof:
                    raise
            self._more()


def _json_records(f: TextIO, path: str) -> Iterator[Any]:
    stream = _JsonStream(f)
    if stream.peek() != "[":
        try:
            record = stream.value()
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg}); fix it") from None
        yield record
        return
    stream.pos += 1
    index = 0
    while (c := stream.peek()) != "]":
        if index:
            if c != ",":
                raise DataError(f"{path}: expected ',' or ']' after record {index - 1}; fix the JSON array")
            stream.pos += 1
        try:
            record = stream.value()
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: record {index} is not valid JSON ({e.msg}); fix or remove it") from None
        yield record
        index += 1


def _text_of(record: Any, keys: tuple[str, ...], where: str) -> str:
    key = next((k for k in keys if k in record), None) if isinstance(record, dict) else None
    if key is None:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        wanted = " or ".join(f'"{k}"' for k in keys)
        raise DataError(f"{where}: no key {wanted} (found {found}); name the text field with --text_key")
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f'{where}: "{key}" is a {type(text).__name__}, not a string; fix the record')
    return text


def iter_documents(path: str, input_format: str, text_keys: tuple[str, ...] = TEXT_KEYS) -> Iterator[tuple[int, str]]:
    """The documents of `path`, one at a time, in file order, each with where it is: its line
    number (txt, jsonl) or record index (json). A record's text is under the first of `text_keys`
    it has."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is allowed
            if input_format == "txt":
                yield from ((line_no, s) for line_no, line in enumerate(f, start=1) if (s := line.strip()))
            elif input_format == "jsonl":
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(
                                f"{path} line {line_no} is not valid JSON ({e.msg}); fix or remove it"
                            ) from None
                        yield line_no, _text_of(record, text_keys, f"{path} line {line_no}")
            else:
                for index, record in enumerate(_json_records(f, path)):
                    yield index, _text_of(record, text_keys, f"{path} record {index}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert the file") from None


def _where(path: str, input_format: str) -> str:
    """How a document of `path` is named, before its number."""
    return f"{path} record" if input_format == "json" else f"{path} line"


# A run of documents: their numbers (see `iter_documents`) and texts.
Chunk = tuple[list[int], list[str]]


def _chunks(documents: Iterable[tuple[int, str]]) -> Iterator[Chunk]:
    numbers: list[int] = []
    texts: list[str] = []
    chars = 0
    for number, text in documents:
        numbers.append(number)
        texts.append(text)
        chars += len(text)
        if len(texts) == _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield numbers, texts
            numbers, texts, chars = [], [], 0
    if texts:
        yield numbers, texts


# ---- tokenizing ----------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None  # one per process, loaded by the parent and handed to workers


def _set_tokenizer(tokenizer: Tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer


def encode_chunk(texts: list[str]) -> tuple[bytes, list[int], list[int]]:
    """The `.bin` bytes of `texts`, each line's byte size and token count."""
    ids = _tokenizer.encode_batch(texts, bos=True, eos=True)
    lines = [encode_line(doc) for doc in ids]
    return b"".join(lines), [len(line) for line in lines], [len(doc) for doc in ids]


def _encode_named(where: str, chunk: Chunk) -> tuple[bytes, list[int], list[int]]:
    """`encode_chunk`, with a text the tokenizer refuses named by `where` and its number."""
    numbers, texts = chunk
    try:
        return encode_chunk(texts)
    except Exception:  # each tokenizer library has its own error types
        for number, text in zip(numbers, texts):  # find the document, to name it
            try:
                _tokenizer.encode(text)
            except Exception as e:
                raise DataError(
                    f"{where} {number}: cannot tokenize the text ({_why(text, e)}); fix or remove it"
                ) from None
        raise


def _why(text: str, error: Exception) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"it holds {text[e.start]!r}, a lone UTF-16 surrogate, which is not valid Unicode "
            "(a broken \\u escape in the input?)"
        )
    return f"{type(error).__name__}: {error}"


def _input_format(path: str, input_format: str | None) -> str:
    fmt = input_format or os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"cannot tell the format of {path} from its extension; pass --input_format txt|json|jsonl")
    return fmt


def _text_keys(text_key: str | None) -> tuple[str, ...]:
    return (text_key,) if text_key else TEXT_KEYS


def tokenize_file(
    text_input_path: str,
    bin_output_path: str,
    tokenizer_path: str,
    text_key: str | None = None,
    workers: int = 1,
    input_format: str | None = None,
    overwrite: bool = False,
) -> Stats:
    """Write `bin_output_path` and its `.meta` from the documents of `text_input_path`; a record's
    text is under `text_key`, or by default the first of TEXT_KEYS it has.

    Everything that can be checked up front (the input, the tokenizer, --workers) is checked before
    any worker starts or any file is created. With workers > 1, chunks go to a process pool (see
    `ordered_map`) and results are written in input order.
    """
    if not os.path.isfile(text_input_path):
        raise MissingFileError(f"input {text_input_path} does not exist; check --text_input_path")
    fmt = _input_format(text_input_path, input_format)
    check_workers(workers)
    check_output_folder(os.path.dirname(bin_output_path) or ".", "--bin_output_path")
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path, "--tokenizer_path")
    chunks = _chunks(iter_documents(text_input_path, fmt, _text_keys(text_key)))
    encode = functools.partial(_encode_named, _where(text_input_path, fmt))
    with (
        BinWriter(bin_output_path, meta_dtype="int32", overwrite=overwrite) as writer,
        progress(desc="tokenize", unit="doc") as bar,
    ):
        for result in ordered_map(encode, chunks, workers, _set_tokenizer, (tokenizer,)):
            writer.write_lines(*result)
            bar.set_postfix_str(f"{writer.num_tokens:,} tokens", refresh=False)
            bar.update(len(result[1]))
        if not writer.num_documents:  # raised inside the writer's block, so that it writes nothing
            raise DataError(f"{text_input_path} holds no {_EMPTY[fmt]}; nothing written")
    return Stats(writer.num_documents, writer.num_tokens, time.perf_counter() - start)


def tokenize_one_at_a_time(
    text_input_path: str,
    bin_output_path: str,
    tokenizer_path: str,
    text_key: str | None = None,
    input_format: str | None = None,
) -> Stats:
    """The baseline `--compare_baseline` measures against: InternEvo's way, one `encode` and one
    `write` per document in one process, then a second pass that re-reads the .bin for the meta.
    Loading the tokenizer is timed, as it is in `tokenize_file`."""
    fmt = _input_format(text_input_path, input_format)
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path, "--tokenizer_path")
    with open(bin_output_path, "wb") as out:
        for _, text in iter_documents(text_input_path, fmt, _text_keys(text_key)):
            out.write(str.encode(json.dumps({"tokens": tokenizer.encode(text)}) + "\n"))
    rows, offset = [], 0
    with open(bin_output_path, "rb") as f:
        for line in f:
            rows.append((offset, len(json.loads(line)["tokens"])))
            offset += len(line)
    with open(bin_output_path + ".meta", "wb") as f:
        np.save(f, np.array(rows, dtype=np.int32).reshape(-1, 2))
    return Stats(len(rows), sum(n for _, n in rows), time.perf_counter() - start)


def _compare_with_baseline(args: argparse.Namespace, stats: Stats) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        baseline_bin = os.path.join(tmp, "baseline.bin")
        base = tokenize_one_at_a_time(
            args.text_input_path,
            baseline_bin,
            args.tokenizer_path,
            args.text_key,
            args.input_format,
        )
        same = all(
            filecmp.cmp(baseline_bin + suffix, args.bin_output_path + suffix, shallow=False) for suffix in ("", ".meta")
        )
    print(
        f"baseline (one document at a time, 1 process): {base.tokens_per_second:,.0f} tokens/s "
        f"({base.seconds:.2f} s); this tool: {stats.tokens_per_second:,.0f} tokens/s "
        f"({stats.seconds:.2f} s, {args.workers} workers): "
        f"{stats.tokens_per_second / base.tokens_per_second:.2f}x; "
        f"outputs {'identical' if same else 'DIFFER'}"
    )
    return same


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize",
        description="Tokenize raw text into an InternEvo .bin + .bin.meta pair (BOS and EOS around each document).",
    )
    parser.add_argument("--text_input_path", required=True, help="input: .txt (a document per line), .json or .jsonl")
    parser.add_argument(
        "--bin_output_path",
        required=True,
        help="output .bin under a type folder, e.g. data/train/en/part0.bin; its .bin.meta goes beside it",
    )
    parser.add_argument(
        "--tokenizer_path", required=True, help="SentencePiece .model, tiktoken ranks or tokenizer.json"
    )
    parser.add_argument(
        "--text_key",
        help='json/jsonl: the record field holding the text (default: "content", else "text", in that order)',
    )
    parser.add_argument("--input_format", choices=FORMATS, help="override the format told by the extension")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizing processes (default: one per CPU; 1 = in this process)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--compare_baseline",
        action="store_true",
        help="also run InternEvo's one-document-at-a-time loop on the same input, check that it writes "
        "the same bytes and print both speeds",
    )
    args = parser.parse_args(argv)
    stats = tokenize_file(
        args.text_input_path,
        args.bin_output_path,
        args.tokenizer_path,
        args.text_key,
        args.workers,
        args.input_format,
        args.overwrite,
    )
    print(
        f"wrote {stats.documents:,} documents, {stats.tokens:,} tokens to {args.bin_output_path} (+ .meta) "
        f"in {stats.seconds:.2f} s: {stats.tokens_per_second:,.0f} tokens/s with {args.workers} workers"
    )
    if args.compare_baseline and not _compare_with_baseline(args, stats):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
