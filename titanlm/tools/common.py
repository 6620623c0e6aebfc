"""What the tools share: the one wrapper that turns a user's error into one line and an exit code;
the tokenizer, loaded and checked once before any worker starts; a pool of worker processes that
returns results in input order and never hangs; and the train/valid splits the SFT tools write.

`multiprocessing.Pool` replaces a worker that dies in its initializer with a new one, which dies
the same way, forever. Here the fallible work (loading the tokenizer) happens in the parent, the
workers only receive the result, and a worker that dies anyway breaks the pool, which ends the run
with one error.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from titanlm.data.binmeta import OutputExistsError
from titanlm.data.tokenizer import Tokenizer, build_tokenizer
from titanlm.errors import USER_ERROR_EXIT_CODE, ConfigError, TitanlmError
from titanlm.files import give_default_mode
from titanlm.models.hf_checkpoint import tokenizer_file_at

Main = Callable[[Sequence[str] | None], int]
Item = TypeVar("Item")
Result = TypeVar("Result")


def run_cli(main: Main) -> Main:
    """Every tool's `main(argv) -> exit code`, wrapped: an error the user can fix (a TitanlmError, or an
    OSError such as an output folder that cannot be written) is printed as one line on stderr and
    returns USER_ERROR_EXIT_CODE (a TitanlmError's own `exit_code`). Any other exception is a bug
    and keeps its traceback."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (TitanlmError, OSError) as error:
            print(f"error: {error}".replace("\n", " "), file=sys.stderr)  # one line, whatever a library says
            return error.exit_code if isinstance(error, TitanlmError) else USER_ERROR_EXIT_CODE

    return run


# ---- the tokenizer, and the worker pool of the tokenizing tools ---------------------------


class WorkerDiedError(ChildProcessError):
    """A worker process was killed or crashed, as opposed to an exception of the work it ran."""


def load_tokenizer(path: str, argument: str) -> Tokenizer:
    """The tokenizer at `path`, a file or (as model.tokenizer_path allows) an HF model or tokenizer folder
    holding one; the errors name `argument`, the tool's flag or positional argument that gave the path
    (`build_tokenizer`'s own messages name the trainer's config key)."""
    path = tokenizer_file_at(path, argument)
    return build_tokenizer(path, setting=argument)


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1 (1 = tokenize in this process)")


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[Result]:
    """`function(item)` for each item, in input order: in this process when `workers` is 1, else in
    a pool of `workers` processes, each set up by `initializer(*initargs)` (which must not fail: do
    the fallible work before). At most 2 x workers items are in flight, so memory stays bounded
    whatever the input size. An exception `function` raises in a worker reaches the caller as it
    was raised; the items not started yet are dropped and the pool is shut down before it does."""
    check_workers(workers)
    if workers == 1:
        initializer(*initargs)
        yield from map(function, items)
        return
    pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise WorkerDiedError(
            f"a worker process stopped unexpectedly ({e}); if the system ran out of memory use fewer --workers, "
            "else rerun with --workers 1 to see the error"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- the SFT tools' train/valid split: which records go where -----------------------------

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


def check_output_folder(folder: str | os.PathLike, argument: str) -> None:
    """Refuse a file where the output folder `folder`, or a folder above it, must go, in one line naming
    the file and `argument` (the flag or argument that gave the output); missing folders are fine."""
    path = Path(os.path.abspath(folder))
    nearest = next(p for p in (path, *path.parents) if p.exists())  # the root exists
    if not nearest.is_dir():
        raise OutputExistsError(
            f"{nearest} is a file, where an output folder must go; move it away or choose another {argument}"
        )


def check_outputs(output_dir: str, splits: list[str], overwrite: bool) -> None:
    """Refuse a file where a split's folder must go; unless `overwrite`, refuse to replace the files of
    the `splits` written, or to leave those of a split not written beside them, from an earlier run."""
    for split in SPLITS:
        check_output_folder(_split_files(output_dir, split)[0].parent, "OUTPUT_DIR")
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
