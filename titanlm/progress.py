"""Progress of a long tool run, through tqdm: a bar with its rate and ETA when stderr is a terminal,
and a plain line every `interval` seconds when it is not (a log file, a job scheduler's output), as a
redrawn bar would fill a log with carriage returns.

    with progress(total=len(records), desc="tokenize", unit="record") as bar:
        for record in records:
            ...
            bar.update(1)

or `for record in progress(records, desc="tokenize", unit="record"): ...`. The result is a tqdm, so
`bar.total`, `bar.set_postfix(...)` and the rest of its API work in both cases.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

# What a log line says, with and without a known total (a stream of unknown length has no ETA).
_LINE_WITH_TOTAL = (
    "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}{postfix}"
)
_LINE_NO_TOTAL = "{desc}: {n_fmt} {unit}, {rate_fmt}, {elapsed} elapsed{postfix}"
LOG_INTERVAL = 30.0  # seconds between two log lines


def progress(
    iterable: Iterable[Any] | None = None,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    file: TextIO | None = None,
    interval: float | None = None,
) -> tqdm:
    """A tqdm over `iterable` (or updated by hand, up to `total`) that writes to `file` (default
    stderr): a live bar on a terminal, else a plain line at most every `interval` seconds (default
    LOG_INTERVAL) and one at the end. A run shorter than `interval` writes no line to a log."""
    stream = sys.stderr if file is None else file
    interval = LOG_INTERVAL if interval is None else interval
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=stream, dynamic_ncols=True)
    return _LogLines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        file=_Lines(stream),
        mininterval=interval,
        maxinterval=max(interval, 1.0),  # else tqdm's monitor thread redraws every 10 s
        miniters=1,  # check the clock on each update: a fixed count between lines would drift with the rate
        delay=interval,
    )


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LogLines(tqdm):
    """A tqdm whose status is a sentence, not a bar, chosen by whether the total is known when drawn."""

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        values["bar_format"] = _LINE_WITH_TOTAL if values["total"] else _LINE_NO_TOTAL
        return values

    def close(self) -> None:
        if self.n == self.last_print_n:  # the last line already says where it ended: no second one
            self.leave = False
        super().close()


class _Lines:
    """The file tqdm writes to, off a terminal: each status it redraws after a carriage return
    becomes one line of `stream`, without the padding that erases a longer previous status."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        for status in text.split("\r"):
            if status.strip():
                self._stream.write(status.rstrip() + "\n")

    def flush(self) -> None:
        self._stream.flush()
