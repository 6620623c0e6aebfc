"""Tokenize raw text into an InternEvo `.bin` + `.bin.meta` pair (InternLM's `tools/tokenizer.py`).

    python -m titanlm.tools.tokenize --text_input_path raw.jsonl --bin_output_path out/en/data.bin \\
        --tokenizer_path tokenizer.model --workers 8

Input formats, chosen by the file's extension (or --input_format):
- txt: one document per line; lines are stripped and blank lines skipped, as InternEvo does.
- jsonl: one JSON record per line; the text is record[--text_key].
- json: one record, or an array of records.
Every document gets BOS and EOS, as InternEvo's tool adds them. The output is byte-identical to
InternEvo's (`json.dumps` lines, int32 meta), only produced faster: the input is streamed in
chunks, chunks are tokenized by a pool of worker processes, and results are written in input
order, so any --workers value writes the same bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TextIO

import numpy as np

from titanlm.data.binmeta import BinWriter, encode_line
from titanlm.data.tokenizer import Tokenizer, build_tokenizer

FORMATS = ("txt", "json", "jsonl")
_CHUNK_DOCS = 1024
_CHUNK_CHARS = 4 << 20  # also bounds a chunk of very long documents
_READ_CHARS = 1 << 20
_WHITESPACE = re.compile(r"\s*")


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
        yield stream.value()
        return
    stream.pos += 1
    index = 0
    while (c := stream.peek()) != "]":
        if index:
            if c != ",":
                raise ValueError(f"{path}: expected ',' or ']' after record {index - 1}; fix the JSON array")
            stream.pos += 1
        try:
            record = stream.value()
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: record {index} is not valid JSON ({e.msg}); fix or remove it"
            ) from None
        yield record
        index += 1


def _text_of(record: Any, key: str, where: str) -> str:
    if not isinstance(record, dict) or key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where}: no key "{key}" (found {keys}); name the text field with --text_key')
    text = record[key]
    if not isinstance(text, str):
        raise ValueError(f'{where}: "{key}" is a {type(text).__name__}, not a string; fix the record')
    return text


def iter_documents(path: str, input_format: str, text_key: str = "content") -> Iterator[str]:
    """The documents of `path`, one at a time, in file order."""
    with open(path, encoding="utf-8") as f:
        if input_format == "txt":
            yield from (s for line in f if (s := line.strip()))
        elif input_format == "jsonl":
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f"{path} line {line_no} is not valid JSON ({e.msg}); fix or remove it"
                        ) from None
                    yield _text_of(record, text_key, f"{path} line {line_no}")
        else:
            for index, record in enumerate(_json_records(f, path)):
                yield _text_of(record, text_key, f"{path} record {index}")


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) == _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ---- tokenizing ----------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None  # one per process: workers build theirs from the path


def _load_tokenizer(path: str) -> None:
    global _tokenizer
    _tokenizer = build_tokenizer(path)


def encode_chunk(texts: list[str]) -> tuple[bytes, list[int], list[int]]:
    """The `.bin` bytes of `texts`, each line's byte size and token count."""
    ids = _tokenizer.encode_batch(texts, bos=True, eos=True)
    lines = [encode_line(doc) for doc in ids]
    return b"".join(lines), [len(line) for line in lines], [len(doc) for doc in ids]


def _input_format(path: str, input_format: str | None) -> str:
    fmt = input_format or os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(
            f"cannot tell the format of {path} from its extension; pass --input_format txt|json|jsonl"
        )
    return fmt


def tokenize_file(
    text_input_path: str,
    bin_output_path: str,
    tokenizer_path: str,
    text_key: str = "content",
    workers: int = 1,
    input_format: str | None = None,
    overwrite: bool = False,
) -> Stats:
    """Write `bin_output_path` and its `.meta` from the documents of `text_input_path`.

    With workers > 1, chunks go to a process pool through a window of at most 2 x workers chunks
    in flight (Pool.imap would read the whole input ahead of the workers), so memory stays
    bounded whatever the input size, and results are written in submission order.
    """
    if not os.path.isfile(text_input_path):
        raise FileNotFoundError(f"input {text_input_path} does not exist; check --text_input_path")
    fmt = _input_format(text_input_path, input_format)
    start = time.perf_counter()
    chunks = _chunks(iter_documents(text_input_path, fmt, text_key))
    with BinWriter(bin_output_path, meta_dtype="int32", overwrite=overwrite) as writer:
        if workers <= 1:
            _load_tokenizer(tokenizer_path)
            for chunk in chunks:
                writer.write_lines(*encode_chunk(chunk))
        else:
            with multiprocessing.Pool(
                workers, initializer=_load_tokenizer, initargs=(tokenizer_path,)
            ) as pool:
                pending: deque = deque()
                for chunk in chunks:
                    pending.append(pool.apply_async(encode_chunk, (chunk,)))
                    if len(pending) >= 2 * workers:
                        writer.write_lines(*pending.popleft().get())
                while pending:
                    writer.write_lines(*pending.popleft().get())
    return Stats(writer.num_documents, writer.num_tokens, time.perf_counter() - start)


def tokenize_one_at_a_time(
    text_input_path: str,
    bin_output_path: str,
    tokenizer_path: str,
    text_key: str = "content",
    input_format: str | None = None,
) -> Stats:
    """The baseline `--compare_baseline` measures against: InternEvo's way, one `encode` and one
    `write` per document in one process, then a second pass that re-reads the .bin for the meta.
    Loading the tokenizer is timed, as it is in `tokenize_file`."""
    fmt = _input_format(text_input_path, input_format)
    start = time.perf_counter()
    tokenizer = build_tokenizer(tokenizer_path)
    with open(bin_output_path, "wb") as out:
        for text in iter_documents(text_input_path, fmt, text_key):
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
            filecmp.cmp(baseline_bin + suffix, args.bin_output_path + suffix, shallow=False)
            for suffix in ("", ".meta")
        )
    print(
        f"baseline (one document at a time, 1 process): {base.tokens_per_second:,.0f} tokens/s "
        f"({base.seconds:.2f} s); this tool: {stats.tokens_per_second:,.0f} tokens/s "
        f"({stats.seconds:.2f} s, {args.workers} workers): "
        f"{stats.tokens_per_second / base.tokens_per_second:.2f}x; "
        f"outputs {'identical' if same else 'DIFFER'}"
    )
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize",
        description="Tokenize raw text into an InternEvo .bin + .bin.meta pair (BOS and EOS around each "
        "document).",
    )
    parser.add_argument(
        "--text_input_path", required=True, help="input: .txt (a document per line), .json or .jsonl"
    )
    parser.add_argument(
        "--bin_output_path",
        required=True,
        help="output .bin under a type folder, e.g. data/train/en/part0.bin; its .bin.meta goes beside it",
    )
    parser.add_argument(
        "--tokenizer_path", required=True, help="SentencePiece .model, tiktoken ranks or tokenizer.json"
    )
    parser.add_argument("--text_key", default="content", help="record field holding the text (json/jsonl)")
    parser.add_argument("--input_format", choices=FORMATS, help="override the format told by the extension")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--compare_baseline",
        action="store_true",
        help="also run InternEvo's one-document-at-a-time loop on the same input, check that it writes "
        "the same bytes and print both speeds",
    )
    args = parser.parse_args(argv)
    try:
        stats = tokenize_file(
            args.text_input_path,
            args.bin_output_path,
            args.tokenizer_path,
            args.text_key,
            args.workers,
            args.input_format,
            args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.documents:,} documents, {stats.tokens:,} tokens to {args.bin_output_path} (+ .meta) "
        f"in {stats.seconds:.2f} s: {stats.tokens_per_second:,.0f} tokens/s with {args.workers} workers"
    )
    if args.compare_baseline and not _compare_with_baseline(args, stats):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
