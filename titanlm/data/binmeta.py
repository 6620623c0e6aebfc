"""InternEvo's tokenized data: a folder of `.bin` + `.bin.meta` files, read in place and checked.

Layout (InternLM/InternEvo's tokenized data): ROOT/TYPE/.../NAME.bin with NAME.bin.meta beside it; TYPE (`en`, `cn`,
`code`, any name) is the first folder level under ROOT. A `.bin` holds one `{"tokens": [...]}` JSON
line per document; the `.bin.meta` is an `np.save`d (N, 2) integer array of (byte offset, token
count) per line. Negative ids are prompt tokens (input only, no loss).

Reading never loads a whole `.bin`: the meta alone gives counts and types, and a document is
parsed from its line of a memory map. Everything checkable from the meta and the file sizes, and
the first and last line of each file, are checked when a folder is opened; any other line is
checked when it is read (or by `validate_folder(full=True)`). The writer is here too, so the
format lives in one file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from titanlm.errors import DataError
from titanlm.files import publish

logger = logging.getLogger("titanlm")

BIN_SUFFIX = ".bin"
META_SUFFIX = ".bin.meta"
_REGENERATE = "regenerate the pair with `python -m titanlm.tools.tokenize`"
_MAX_PROBLEMS_PER_FILE = 10


class DataFormatError(DataError):
    """A data file that does not follow the format; the message names the file (and line) and the fix."""


class OutputExistsError(DataError, FileExistsError):
    """An output file is there already and the user did not ask to replace it."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing the meta arrays with == is ambiguous
class BinFile:
    path: str  # the .bin; its meta is path + ".meta"
    type_name: str  # first folder level under the root
    meta: np.ndarray  # (N, 2) int64, read-only: (byte offset, token count) per line


# ---- writing -------------------------------------------------------------------------------


def encode_line(tokens: Sequence[int]) -> bytes:
    """One `.bin` line, byte-identical to InternEvo's tools (`json.dumps` defaults + newline)."""
    return (json.dumps({"tokens": list(tokens)}) + "\n").encode()


class BinWriter:
    """Writes NAME.bin and NAME.bin.meta so that a crash or error leaves no partial output.

    Both files are written under temporary names in the target folder and renamed into place at
    the end, the meta last, so a reader that sees the meta sees the whole .bin; they get the mode
    a plain `open` would give them (0644 under umask 022). After an error the temporary files go,
    and so do the folders the writer created. Meta rows are spooled to a temporary file rather
    than kept in a list, so memory stays flat for any number of documents. `meta_dtype` "int32"
    is InternEvo's pretraining format; if an offset does not fit in int32 (a .bin over 2 GiB) the
    meta is written as int64 instead of wrapping around.
    """

    def __init__(self, bin_path: str, meta_dtype: str = "int32", overwrite: bool = False):
        if meta_dtype not in ("int32", "int64"):
            raise ValueError(f"meta_dtype must be int32 or int64, not {meta_dtype!r}")
        self.bin_path = bin_path
        self.meta_path = bin_path + ".meta"
        self.meta_dtype = meta_dtype
        self.num_documents = 0
        self.num_tokens = 0
        if not bin_path.endswith(BIN_SUFFIX):
            raise DataError(f"output {bin_path!r} must end with {BIN_SUFFIX} (InternEvo finds data by it)")
        existing = [p for p in (self.bin_path, self.meta_path) if os.path.exists(p)]
        if existing and not overwrite:
            raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(bin_path))
        self._made = _make_folders(folder)
        prefix = "." + os.path.basename(bin_path) + ".tmp-"
        self._bin = tempfile.NamedTemporaryFile("wb", dir=folder, prefix=prefix, delete=False)
        self._rows = tempfile.TemporaryFile("w+b", dir=folder)
        self._meta_tmp = self._bin.name + ".meta"
        self._offset = 0

    def write_lines(self, data: bytes, line_sizes: Sequence[int], counts: Sequence[int]) -> None:
        """Append already-encoded lines (`encode_line` outputs joined), their byte sizes and counts."""
        sizes = np.asarray(line_sizes, dtype=np.int64)
        offsets = self._offset + np.cumsum(sizes) - sizes
        self._bin.write(data)
        self._rows.write(np.stack([offsets, np.asarray(counts, dtype=np.int64)], axis=1).tobytes())
        self._offset += int(sizes.sum())
        self.num_documents += len(sizes)
        self.num_tokens += int(np.sum(counts))

    def write(self, tokens: Sequence[int]) -> None:
        line = encode_line(tokens)
        self.write_lines(line, [len(line)], [len(tokens)])

    def _finish(self) -> None:
        self._bin.close()
        fits = self._offset <= np.iinfo(np.int32).max
        dtype = np.int32 if self.meta_dtype == "int32" and fits else np.int64
        meta = np.lib.format.open_memmap(self._meta_tmp, mode="w+", dtype=dtype, shape=(self.num_documents, 2))
        self._rows.seek(0)
        block = 1 << 20
        for start in range(0, self.num_documents, block):
            rows = np.frombuffer(self._rows.read(block * 16), dtype=np.int64).reshape(-1, 2)
            meta[start : start + len(rows)] = rows
        meta.flush()
        del meta
        publish(self._bin.name, self.bin_path)  # NamedTemporaryFile made it 0600
        publish(self._meta_tmp, self.meta_path)

    def __enter__(self) -> BinWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._bin.close()
            self._rows.close()
            for tmp in (self._bin.name, self._meta_tmp):
                if os.path.exists(tmp):
                    os.remove(tmp)
            if exc_type is not None:
                _remove_empty(self._made)


def _make_folders(folder: str) -> list[str]:
    """Create `folder` and its missing parents; returns those it created, deepest first."""
    made = []
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(made):
        os.makedirs(path, exist_ok=True)
    return made


def _remove_empty(folders: list[str]) -> None:
    """Remove the folders a failed write created, deepest first, stopping at one that is not empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


# ---- finding and checking files ------------------------------------------------------------


def _find_bins(root: str, setting: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(.bin path, type name) pairs in sorted path order, and the layout problems found; `setting`
    names where the user gave `root`."""
    if not os.path.isdir(root):
        return [], [f"data folder {root} does not exist or is not a folder; check {setting}"]
    found, problems = [], []
    reached = {os.path.realpath(root): root}  # real folder -> the path the walk reached it by
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = _new_folders(folder, sorted(dirs), reached)
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.endswith(META_SUFFIX):
                bin_name = name[: -len(".meta")]
                if not os.path.isfile(os.path.join(folder, bin_name)):
                    problems.append(f"{path} has no {bin_name} beside it; restore the .bin or delete the stray .meta")
            elif name.endswith(BIN_SUFFIX):
                if not os.path.isfile(path + ".meta"):
                    problems.append(f"{path} has no {name}.meta beside it; {_REGENERATE}")
                elif folder == root:
                    problems.append(
                        f"{path} lies directly in the data folder, so it has no type; move it into a "
                        f"type sub-folder such as {os.path.join(root, 'en', name)} (with its .meta)"
                    )
                else:
                    found.append((path, os.path.relpath(path, root).split(os.sep)[0]))
    if not found and not problems:
        problems.append(
            f"no {BIN_SUFFIX} files under {root} ({setting}); expected {root}/TYPE/NAME.bin with NAME.bin.meta "
            f"beside it (TYPE e.g. en, cn, code); create them with `python -m titanlm.tools.tokenize`"
        )
    found.sort()
    return found, problems


def _new_folders(folder: str, names: list[str], reached: dict[str, str]) -> list[str]:
    """The sub-folders of `folder` that lead to a real folder the walk has not reached yet. Symlinks are
    followed, but one back to a folder above (a loop, which os.walk would follow 40 levels deep, reading
    every file 41 times) or a second way to the same folder is skipped, with a warning naming it."""
    kept = []
    for name in names:
        path = os.path.join(folder, name)
        real = os.path.realpath(path)
        if real not in reached:
            reached[real] = path
            kept.append(name)
        elif (os.path.realpath(folder) + os.sep).startswith(real + os.sep):
            logger.warning(
                f"{path} links back to {real}, which holds it (a symlink loop): its files are read once, not "
                "again through the link; remove the link"
            )
        else:
            logger.warning(
                f"{path} leads to {real}, which {reached[real]} already leads to: its files are read once, "
                f"through {reached[real]}; remove one of the links"
            )
    return kept


def _load_meta(bin_path: str) -> np.ndarray:
    """The meta of `bin_path` as a read-only (N, 2) int64 array, checked against the .bin's size."""
    meta_path = bin_path + ".meta"
    try:
        raw = np.load(meta_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(f"{meta_path} is not a NumPy array written by np.save ({e}); {_REGENERATE}") from None
    if raw.ndim != 2 or raw.shape[1] != 2 or raw.dtype.kind not in "iu":
        raise DataFormatError(
            f"{meta_path} holds a {raw.dtype} array of shape {raw.shape}; expected (N, 2) integers "
            f"(byte offset, token count per line); {_REGENERATE}"
        )
    meta = raw.astype(np.int64, copy=False)
    meta.setflags(write=False)
    offsets, counts = meta[:, 0], meta[:, 1]
    size = os.path.getsize(bin_path)
    if len(meta) == 0:
        if size:
            raise DataFormatError(f"{meta_path} lists no lines but {bin_path} is not empty; {_REGENERATE}")
        return meta
    if offsets[0] < 0:
        raise DataFormatError(f"{meta_path} row 0 has a negative byte offset {offsets[0]}; {_REGENERATE}")
    bad = np.flatnonzero(np.diff(offsets) <= 0)
    if len(bad):
        row = int(bad[0]) + 1
        raise DataFormatError(
            f"{meta_path} row {row}: byte offsets are not strictly increasing ({offsets[row - 1]} then "
            f"{offsets[row]}); the meta does not belong to this .bin; {_REGENERATE}"
        )
    if offsets[-1] >= size:
        row = int(np.argmax(offsets >= size))
        raise DataFormatError(
            f"{meta_path} row {row} points at byte {offsets[row]}, past the end of {bin_path} ({size} "
            f"bytes): the .bin is truncated or the meta belongs to another file; re-copy the .bin or "
            f"regenerate both"
        )
    if counts.min() < 0:
        row = int(np.argmax(counts < 0))
        raise DataFormatError(f"{meta_path} row {row} has a negative token count {counts[row]}; {_REGENERATE}")
    with open(bin_path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            raise DataFormatError(
                f"{bin_path} does not end with a newline: its last line (line {len(meta)}) is incomplete, "
                f"so the file was truncated (an interrupted copy?); re-copy the .bin or regenerate both"
            )
    return meta


def _open_file(path: str, type_name: str, vocab_size: int | None) -> BinFile:
    """`path` with its meta, checked against the file size and on the first and last line: cheap,
    and where a truncated copy, a garbled tail or a stale meta shows, so it fails at open rather
    than mid-training."""
    file = BinFile(path, type_name, _load_meta(path))
    problems = _check_lines(file, _first_and_last(file), vocab_size)
    if problems:
        raise DataFormatError(problems[0])
    return file


def _first_and_last(file: BinFile) -> list[int]:
    n = len(file.meta)
    return sorted({0, n - 1}) if n else []


def _parse_line(file: BinFile, line: int, raw: bytes, vocab_size: int | None) -> np.ndarray:
    """The tokens of line `line` (0-based) of `file`, checked against the meta and the vocabulary."""
    where = f"{file.path} line {line + 1} (byte {file.meta[line, 0]})"
    try:
        tokens = json.loads(raw)["tokens"]
        if not isinstance(tokens, list):
            raise TypeError(f'"tokens" is a {type(tokens).__name__}')
        ids = np.asarray(tokens) if tokens else np.empty(0, np.int64)
        if ids.ndim != 1 or ids.dtype.kind != "i":  # floats, strings, nested lists, ids beyond int64
            raise TypeError(f'"tokens" is not a flat list of integers (numpy reads it as {ids.dtype})')
        ids = ids.astype(np.int64, copy=False)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise DataFormatError(
            f'{where} is not a JSON object with a "tokens" list of integers ({type(e).__name__}: {e}); '
            f"if the meta offsets are off, the line was cut in the wrong place; {_REGENERATE}"
        ) from None
    expected = int(file.meta[line, 1])
    if len(ids) != expected:
        raise DataFormatError(
            f"{where} holds {len(ids)} tokens but {file.path}.meta says {expected}; the meta is stale or "
            f"belongs to another file; {_REGENERATE}"
        )
    if vocab_size is not None and len(ids):
        worst = int(np.argmax(np.abs(ids)))
        if abs(ids[worst]) >= vocab_size:
            raise DataFormatError(
                f"{where} holds token id {ids[worst]} (|id| >= vocab_size {vocab_size}); the data was "
                f"tokenized with another tokenizer: re-tokenize it with the model's tokenizer or use a "
                f"model whose vocab_size exceeds {abs(ids[worst])}"
            )
    return ids


def _line_bytes(buffer: mmap.mmap, meta: np.ndarray, line: int) -> bytes:
    start = int(meta[line, 0])
    end = int(meta[line + 1, 0]) if line + 1 < len(meta) else len(buffer)
    return buffer[start:end]  # with wrong offsets the span holds a partial or a second line: parsing fails


def _open_map(path: str) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# ---- reading -------------------------------------------------------------------------------


class BinMetaFolder:
    """The documents of a bin/meta folder, numbered 0..num_documents-1 over sorted file paths,
    then line order, after dropping documents with fewer than `min_length` tokens.

    Picklable: memory maps are opened lazily per file and reopened in each dataloader worker.
    """

    def __init__(
        self, root: str, min_length: int = 0, vocab_size: int | None = None, setting: str = "data.train_folder"
    ):
        """`setting` names where the user gave `root` (a config key or a tool's argument), for the errors."""
        self.root = root
        self.min_length = min_length
        self.vocab_size = vocab_size
        found, problems = _find_bins(root, setting)
        if problems:
            more = (
                f" (and {len(problems) - 1} more problems: list them with "
                f"`python -m titanlm.tools.inspect_data {root} --validate`)"
                if len(problems) > 1
                else ""
            )
            raise DataFormatError(problems[0] + more)
        self.files = [_open_file(path, type_name, vocab_size) for path, type_name in found]
        self.types = sorted({f.type_name for f in self.files})
        self._kept = [np.flatnonzero(f.meta[:, 1] >= min_length) for f in self.files]
        self._starts = np.cumsum([0] + [len(k) for k in self._kept])
        self.num_documents = int(self._starts[-1])
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return self.num_documents

    def _locate(self, index: int) -> tuple[int, int]:
        """(file number, line number) of kept document `index`."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} is out of range [0, {self.num_documents}) in {self.root}")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, int(self._kept[f][index - self._starts[f]])

    def document_type(self, index: int) -> str:
        return self.files[self._locate(index)[0]].type_name

    def lengths(self) -> np.ndarray:
        return np.concatenate([f.meta[k, 1] for f, k in zip(self.files, self._kept)])

    def type_ids(self) -> np.ndarray:
        ids = [self.types.index(f.type_name) for f in self.files]
        return np.repeat(np.asarray(ids, dtype=np.int64), [len(k) for k in self._kept])

    def read(self, index: int) -> np.ndarray:
        """The int64 tokens of document `index`, signed as stored (negative = prompt, no loss)."""
        f, line = self._locate(index)
        if f not in self._maps:
            self._maps[f] = _open_map(self.files[f].path)
        file = self.files[f]
        return _parse_line(file, line, _line_bytes(self._maps[f], file.meta, line), self.vocab_size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # mmaps do not pickle; each process maps the files itself
        return state


# ---- validation ----------------------------------------------------------------------------


def _check_lines(file: BinFile, lines: Iterable[int], vocab_size: int | None) -> list[str]:
    if not len(file.meta):
        return []  # an empty .bin cannot be memory-mapped, and has nothing to check
    problems: list[str] = []
    buffer = _open_map(file.path)
    try:
        for line in lines:
            try:
                _parse_line(file, line, _line_bytes(buffer, file.meta, line), vocab_size)
            except DataFormatError as e:
                problems.append(str(e))
                if len(problems) == _MAX_PROBLEMS_PER_FILE:
                    problems.append(f"{file.path}: stopped after {_MAX_PROBLEMS_PER_FILE} bad lines")
                    break
    finally:
        buffer.close()
    return problems


def validate_folder(
    root: str, vocab_size: int | None = None, full: bool = False, setting: str = "data.train_folder"
) -> list[str]:
    """Every problem found in the folder, one message each; [] when it is clean.

    Always checked: what opening the folder checks (the layout, each meta against its .bin's size,
    the first and last line of each file). `full=True` parses every line.
    """
    found, problems = _find_bins(root, setting)
    for path, type_name in found:
        try:
            file = BinFile(path, type_name, _load_meta(path))
        except DataFormatError as e:
            problems.append(str(e))
            continue
        lines = range(len(file.meta)) if full else _first_and_last(file)
        problems += _check_lines(file, lines, vocab_size)
    return problems
