"""Look inside an InternEvo bin/meta folder before training on it.

    python -m titanlm.tools.inspect_data data/train --tokenizer tokenizer.model --samples 3 --validate

Prints documents and tokens per type, a length histogram, the share of masked (negative, prompt)
tokens and a few decoded documents with masked spans wrapped in ⟦…⟧. Counts and lengths come
from the metas alone; the masked share is measured on an evenly spread subset of documents, so
the report stays quick on folders of any size. With --validate it checks the folder first and
exits 1 listing every problem.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from titanlm.data.binmeta import BinMetaFolder, DataFormatError, validate_folder
from titanlm.data.tokenizer import Tokenizer
from titanlm.errors import ConfigError, MissingFileError
from titanlm.tools.common import load_tokenizer, run_cli

_MASK_SCAN_DOCUMENTS = 1000
_SAMPLE_CHARS = 1000
_BAR = 40


def _spread(n: int, k: int) -> list[int]:
    """Up to k distinct indices spread evenly over 0..n-1, first and last included."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))}) if n and k else []


def type_table(folder: BinMetaFolder) -> list[str]:
    lengths, type_ids = folder.lengths(), folder.type_ids()
    lines = [f"{'type':<12}{'files':>7}{'documents':>14}{'tokens':>16}{'mean length':>13}"]
    for t, name in enumerate(folder.types):
        mine = lengths[type_ids == t]
        files = sum(f.type_name == name for f in folder.files)
        mean = mine.mean() if len(mine) else 0.0
        lines.append(f"{name:<12}{files:>7}{len(mine):>14,}{int(mine.sum()):>16,}{mean:>13.1f}")
    lines.append(f"{'all':<12}{len(folder.files):>7}{len(lengths):>14,}{int(lengths.sum()):>16,}")
    return lines


def length_histogram(lengths: np.ndarray) -> list[str]:
    """Power-of-two buckets [2^k, 2^(k+1)) of document lengths, as text bars."""
    if not len(lengths):
        return ["(no documents)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    lo = int(buckets.min())
    lines = []
    for k in range(lo, len(counts)):
        low = 0 if k == 0 else 2**k  # bucket 0 also holds empty documents
        bar = "#" * int(round(_BAR * counts[k] / counts.max()))
        lines.append(f"[{low:>7}, {2 ** (k + 1):>7}) {counts[k]:>10,} {bar}")
    return lines


def render(ids: np.ndarray, tokenizer: Tokenizer | None) -> str:
    """The document as text with masked runs in ⟦…⟧ (ids when there is no tokenizer)."""
    if tokenizer is None:
        return " ".join(map(str, ids[:64])) + (" …" if len(ids) > 64 else "")
    parts = []
    masked = ids < 0
    edges = np.flatnonzero(np.diff(masked)) + 1
    for run in np.split(ids, edges):
        if len(run):
            text = tokenizer.decode(np.abs(run).tolist())
            parts.append(f"⟦{text}⟧" if run[0] < 0 else text)
    text = "".join(parts)
    return text[:_SAMPLE_CHARS] + (" …" if len(text) > _SAMPLE_CHARS else "")


def report(folder: BinMetaFolder, tokenizer: Tokenizer | None, samples: int) -> list[str]:
    lines = [f"{folder.root}: {len(folder.files)} files, types {', '.join(folder.types)}", ""]
    lines += type_table(folder) + ["", "document lengths (tokens):"] + length_histogram(folder.lengths())
    scanned = _spread(folder.num_documents, _MASK_SCAN_DOCUMENTS)
    if scanned:
        docs = [folder.read(i) for i in scanned]
        total = sum(len(d) for d in docs)
        masked = sum(int((d < 0).sum()) for d in docs)
        lines += [
            "",
            f"masked (negative) tokens: {masked / max(total, 1):.1%} of {total:,} tokens "
            f"in {len(scanned):,} of {folder.num_documents:,} documents",
        ]
    for i in _spread(folder.num_documents, samples):
        ids = folder.read(i)
        lines += [
            "",
            f"--- document {i} ({folder.document_type(i)}, {len(ids)} tokens) ---",
            render(ids, tokenizer),
        ]
    return lines


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titanlm.tools.inspect_data", description=__doc__.split("\n")[0])
    parser.add_argument("root", metavar="ROOT", help="data folder holding type sub-folders (en, cn, code, ...)")
    parser.add_argument(
        "--tokenizer",
        help="decode samples (and check ids against its vocabulary) with this tokenizer file, or the folder holding it",
    )
    parser.add_argument("--samples", type=int, default=3, help="documents to print, spread over the folder")
    parser.add_argument("--min_length", type=int, default=0, help="drop documents shorter than this, as training does")
    parser.add_argument("--validate", action="store_true", help="check the folder; exit 1 listing the problems")
    parser.add_argument(
        "--full", action="store_true", help="with --validate: parse every line, not only the first and last"
    )
    args = parser.parse_args(argv)
    if args.min_length < 0:
        raise ConfigError(f"--min_length {args.min_length} is negative; pass 0 (keep every document) or more")
    if args.samples < 0:
        raise ConfigError(f"--samples {args.samples} is negative; pass 0 (print no document) or more")
    if not os.path.isdir(args.root):  # nothing to inspect, as opposed to a folder with problems (exit 1)
        raise MissingFileError(f"data folder {args.root} does not exist or is not a folder; check the ROOT argument")
    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else None
    vocab_size = tokenizer.vocab_size if tokenizer else None
    if args.validate:
        problems = validate_folder(args.root, vocab_size, full=args.full, setting="the ROOT argument")
        if problems:
            print(f"{len(problems)} problem(s) in {args.root}:", *problems, sep="\n- ")
            return 1
        scope = "every line parsed" if args.full else "first and last line of each file; --full parses all"
        print(f"validation: no problems found ({scope})")
    try:
        folder = BinMetaFolder(args.root, args.min_length, vocab_size, setting="the ROOT argument")
        print("\n".join(report(folder, tokenizer, args.samples)))
    except DataFormatError as e:  # a folder with problems exits 1, as --validate does
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
