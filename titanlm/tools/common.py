"""What the tokenizing tools share: the tokenizer, loaded and checked once before any worker starts,
and a pool of worker processes that returns results in input order and never hangs.

`multiprocessing.Pool` replaces a worker that dies in its initializer with a new one, which dies
the same way, forever. Here the fallible work (loading the tokenizer) happens in the parent, the
workers only receive the result, and a worker that dies anyway breaks the pool, which ends the run
with one error.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from titanlm.data.tokenizer import Tokenizer, TokenizerFileError, build_tokenizer
from titanlm.errors import ConfigError, DataError, MissingFileError
from titanlm.files import read_text_file

Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerDiedError(ChildProcessError):
    """A worker process was killed or crashed, as opposed to an exception of the work it ran."""


def load_tokenizer(path: str, argument: str) -> Tokenizer:
    """The tokenizer at `path`; the errors name `argument`, the tool's flag or positional argument
    that gave the path (`build_tokenizer`'s own messages name the trainer's config key)."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        problem = "is a folder, not a file" if os.path.isdir(full) else "does not exist"
        raise MissingFileError(
            f"tokenizer {path} {problem}; check {argument} (a SentencePiece .model, tiktoken ranks file or "
            "HF tokenizer.json)"
        )
    try:
        return build_tokenizer(path)
    except TokenizerFileError as e:  # its fix says to set the trainer's key; here the user sets `argument`
        raise TokenizerFileError(str(e).replace("--model.tokenizer_path", argument)) from None


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


def read_json_file(path: str) -> Any:
    """The JSON value a whole file holds (a byte-order mark is allowed), or one line naming the file and
    where it is malformed."""
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the array"
        ) from None
