"""Tokenize Alpaca instruction data for SFT (InternEvo's `tools/alpaca_tokenizer.py`).

    python -m titanlm.tools.tokenize_alpaca alpaca_data.json OUT_DIR tokenizer.model --split_ratio 0.1

Writes OUT_DIR/train/en/dataset.bin(.meta) and OUT_DIR/valid/en/dataset.bin(.meta) with int64 metas.
Prompt tokens are stored negated (input only, no loss), response tokens positive; the templates
are in `titanlm.data.chat_templates`. Unlike InternEvo, which samples the validation set with
replacement (so fewer than split_ratio of the records end up there, some twice), the split here
is a seeded permutation: exactly round(n * split_ratio) distinct records go to valid, the rest to
train, each split in input order. No split is ever written empty: --split_ratio 0 writes train
only, 1 valid only, and a ratio that would leave either split with no record is refused.

Both splits are written in a temporary folder beside OUT_DIR and moved into place together at the
end, so an error leaves nothing behind. OUT_DIR never pairs splits of two runs: with --overwrite, the
files of a split this run does not write are removed, and without it they are refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from titanlm.data.binmeta import BinWriter, OutputExistsError
from titanlm.data.chat_templates import TEMPLATES, encode_alpaca
from titanlm.data.tokenizer import Tokenizer
from titanlm.errors import ConfigError, DataError, MissingFileError, TitanlmError
from titanlm.files import give_default_mode
from titanlm.tools.common import load_tokenizer, read_json_file

SPLITS = ("train", "valid")


def split_indices(n: int, split_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) record indices, sorted, disjoint, covering 0..n-1; valid has round(n * ratio).

    A split is empty only when asked for (ratio 0: no valid; ratio 1: no train): a ratio that
    rounds one of them to no record is refused, as an empty split would fail only later, in training.
    """
    _check_ratio(split_ratio)
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    num_valid = round(n * split_ratio)
    if split_ratio > 0 and num_valid == 0:
        fix = f"--split_ratio {1 / n:.3g} or more for at least one record" if n > 1 else "--split_ratio 1 (valid only)"
        raise ConfigError(
            f"--split_ratio {split_ratio} puts round({n} x {split_ratio}) = 0 of the {n} records into valid, so "
            f"the validation split would be empty; pass {fix}, or --split_ratio 0 to write no validation split"
        )
    if split_ratio < 1 and num_valid == n:
        raise ConfigError(
            f"--split_ratio {split_ratio} puts all {n} records into valid, so the train split would be empty; "
            "lower --split_ratio, or pass --split_ratio 1 to write only a validation split"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


def written_splits(split_ratio: float) -> list[str]:
    """The splits written: both, or train alone for ratio 0, valid alone for ratio 1 (`split_indices`
    refuses a ratio that would leave one of both empty)."""
    _check_ratio(split_ratio)
    return [split for split in SPLITS if (split_ratio < 1 if split == "train" else split_ratio > 0)]


def not_written(split: str) -> str:
    """What the summary says of a split `written_splits` leaves out."""
    return f"{split}: not written (--split_ratio {0 if split == 'valid' else 1})"


def _check_ratio(split_ratio: float) -> None:
    if not 0.0 <= split_ratio <= 1.0:
        raise ConfigError(f"--split_ratio {split_ratio} is not in [0, 1]")


# ---- writing the splits: OUTPUT_DIR/SPLIT/en/dataset.bin(.meta), all at once ----------------


def _split_files(output_dir: str | Path, split: str) -> tuple[Path, Path]:
    target = Path(output_dir) / split / "en" / "dataset.bin"
    return target, Path(f"{target}.meta")


def check_outputs(output_dir: str, splits: list[str], overwrite: bool) -> None:
    """Unless `overwrite`, refuse to replace the files of the `splits` written, or to leave those of
    a split not written beside them, from an earlier run."""
    if overwrite:
        return
    for split in SPLITS:
        for path in _split_files(output_dir, split):
            if not path.exists():
                continue
            if split in splits:
                raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
            raise OutputExistsError(
                f"{path} is left from an earlier run, and this run writes no {split} split; "
                "pass --overwrite to remove it, or write to another folder"
            )


@contextmanager
def staged_splits(output_dir: str, splits: list[str]) -> Iterator[dict[str, str]]:
    """The .bin path of each split in `splits`, in a temporary folder beside `output_dir` that is moved
    into place when the block ends without an error, with the modes a plain `open` and `mkdir` would
    give it; after an error it goes. Moving into place replaces the splits written and removes the
    files of the others (`check_outputs` comes first)."""
    out = Path(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_existing_ancestor(out)))
    try:
        give_default_mode(staging)  # mkdtemp's 0700 would stay on OUTPUT_DIR after the rename
        staged = {split: staging / split / "en" / "dataset.bin" for split in splits}
        yield {split: str(path) for split, path in staged.items()}
        _move_into_place(staging, out, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _existing_ancestor(path: Path) -> Path:
    """The folder the staging folder goes in: beside `path` when its parent exists, so that the final
    rename stays on one file system, else in its nearest existing ancestor."""
    folder = path.absolute().parent
    while not folder.is_dir():
        folder = folder.parent
    return folder


def _move_into_place(staging: Path, out: Path, staged: dict[str, Path]) -> None:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
        return
    # A split not written goes first, so that an interruption never leaves it beside a new one.
    for split in SPLITS:
        if split not in staged:
            target, meta = _split_files(out, split)
            meta.unlink(missing_ok=True)  # the meta first, as BinWriter publishes it last
            target.unlink(missing_ok=True)
            for folder in (target.parent, target.parent.parent):
                try:
                    folder.rmdir()
                except OSError:  # not empty, or not there
                    break
    for split, path in staged.items():
        target, meta = _split_files(out, split)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        os.replace(f"{path}.meta", meta)  # meta last, as BinWriter does


def tokenize_alpaca(
    input_json: str,
    output_dir: str,
    tokenizer_path: str,
    split_ratio: float = 0.1,
    template: str = "internlm",
    max_length: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write the splits that get records (see `split_indices`); returns per split written its
    documents, tokens and masked (negative) tokens."""
    if not os.path.isfile(input_json):
        raise MissingFileError(f"input {input_json} does not exist")
    tokenizer = load_tokenizer(tokenizer_path, "the TOKENIZER argument")
    records = read_json_file(input_json)
    if not isinstance(records, list):
        raise DataError(f"{input_json} holds a {type(records).__name__}; expected a JSON array of Alpaca records")
    if not records:
        raise DataError(f"{input_json} holds no records")
    splits = written_splits(split_ratio)
    check_outputs(output_dir, splits, overwrite)
    samples = [_encoded(tokenizer, r, i, template, max_length, input_json) for i, r in enumerate(records)]
    indices = dict(zip(SPLITS, split_indices(len(samples), split_ratio, seed)))
    summary = {}
    with staged_splits(output_dir, splits) as staged, ExitStack() as stack:
        for split in splits:
            writer = stack.enter_context(BinWriter(staged[split], "int64"))
            for i in indices[split]:
                writer.write(samples[i])
            masked = sum(sum(t < 0 for t in samples[i]) for i in indices[split])
            summary[split] = {"documents": len(indices[split]), "tokens": writer.num_tokens, "masked_tokens": masked}
    return summary


def _encoded(tok: Tokenizer, record: dict, index: int, template: str, max_length: int, input_json: str) -> list[int]:
    """`encode_alpaca`, with a text the tokenizer library refuses (e.g. a UnicodeEncodeError for a lone
    surrogate) named by its file and record."""
    try:
        return encode_alpaca(tok, record, index, template, max_length)
    except TitanlmError:
        raise
    except ValueError as e:
        raise DataError(
            f"{input_json} record {index}: cannot tokenize it ({type(e).__name__}: {e}); fix or remove it"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize_alpaca",
        description="Tokenize Alpaca records into masked SFT data: OUTPUT_DIR/{train,valid}/en/dataset.bin(.meta).",
    )
    parser.add_argument("input_json", help='JSON array of {"instruction", "input", "output"} records')
    parser.add_argument("output_dir", help="folder that receives train/ and valid/")
    parser.add_argument(
        "tokenizer", metavar="TOKENIZER", help="SentencePiece .model, tiktoken ranks (Llama 3) or tokenizer.json"
    )
    parser.add_argument(
        "--split_ratio",
        type=float,
        default=0.1,
        help="share of records for valid: 0 = write train only, 1 = valid only; a split is never written empty",
    )
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="internlm", help="chat template")
    parser.add_argument("--max_length", type=int, default=2048, help="cut each sample to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    try:
        summary = tokenize_alpaca(
            args.input_json,
            args.output_dir,
            args.tokenizer,
            args.split_ratio,
            args.template,
            args.max_length,
            args.seed,
            args.overwrite,
        )
    except (TitanlmError, OSError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)  # one line, whatever a library says
        return 2
    for split in SPLITS:
        if split not in summary:
            print(not_written(split))
            continue
        s = summary[split]
        share = s["masked_tokens"] / max(s["tokens"], 1)
        print(f"{split}: {s['documents']:,} samples, {s['tokens']:,} tokens ({share:.1%} masked prompt tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
