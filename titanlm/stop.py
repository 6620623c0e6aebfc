"""Requests to save and stop from outside the job: InternEvo's stop file, SIGTERM, SIGUSR1 and Ctrl-C.

Slurm sends SIGTERM (or, with `--signal`, SIGUSR1) some time before it kills a job. The handler only
records the signal: saving inside a handler could interrupt a collective half-way. After each step
the ranks combine their requests with one all_reduce(MAX), so either every rank saves or none does,
even when the signal reached only some of them.

Ctrl-C (SIGINT) asks for the same stop. A second Ctrl-C aborts at once, but only in a process that
owns the terminal: a torchrun worker lives in a session of its own, so a SIGINT reaching it was
relayed by the launcher or sent by Slurm to every process of the step, possibly both for one Ctrl-C;
there aborting is the launcher's job (titanlm.launch kills the workers on the second Ctrl-C).

The trainer owns one, polls it after every step and hands the agreed action to the checkpointer,
which saves; it starts listening only once the start-up has loaded what it loads, so that a Ctrl-C
before then interrupts at once: there is nothing to save yet.
"""

from __future__ import annotations

import codecs
import enum
import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

from titanlm.distributed import launched_by_torchrun
from titanlm.errors import INTERRUPTED_EXIT_CODE, CheckpointError

logger = logging.getLogger("titanlm")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Action(enum.IntEnum):
    """Ordered so that MAX over ranks picks the strongest request."""

    NONE = 0
    SAVE = 1  # stop file -N at step N
    SAVE_AND_STOP = 2  # stop file N at step N, or a signal


def check_stop_file(stop_file: str) -> None:
    """Refuse a folder where the stop file goes: it could never be read. Rank 0 checks, as it alone reads
    the file (`titanlm.checkpoint.rank0.on_rank0` gives every rank its verdict)."""
    if os.path.isdir(stop_file):
        raise CheckpointError(
            f"checkpoint.stop_file {stop_file} is a folder; the stop file is a file holding N or -N: remove "
            "the folder, or set checkpoint.stop_file to a file's path"
        )


class StopRequests:
    def __init__(self, stop_file: str, is_main: bool, device: torch.device) -> None:
        """Requests from `stop_file` now, and from signals once `listen` is called. Only rank 0 reads the
        stop file, so that ranks never act on different versions of it (`check_stop_file` vets its path)."""
        self.stop_file = stop_file
        self.is_main = is_main
        self.device = device
        self._signal = 0
        self.stopped_by: signal.Signals | None = None  # the signal the ranks agreed to stop for, if any
        self._count_interrupts = not launched_by_torchrun()
        self._interrupted = False
        self._warned: set[str] = set()
        self._previous: dict[int, object] = {}

    def listen(self) -> None:
        """Take signals as stop requests from now on; the previous handlers come back on `close`."""
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self._count_interrupts:
            if self._interrupted:
                self._say("second Ctrl-C: aborting without saving")
                os._exit(INTERRUPTED_EXIT_CODE)
            self._interrupted = True
            self._say(
                "Ctrl-C: stopping after the current step (saving it when checkpoints are on); Ctrl-C again aborts"
            )
        self._signal = max(self._signal, signum)

    def _say(self, line: str) -> None:
        """One line on stderr from rank 0, written straight to the file descriptor: a handler may run while
        the main thread is inside a print to the same stream, which a second print would break."""
        if self.is_main:
            try:
                os.write(2, f"{line}\n".encode())
            except OSError:
                pass

    def poll(self, step: int) -> Action:
        """What to do after `step`, agreed by all ranks (a collective: every rank calls it every step)."""
        request = torch.tensor(
            [self._read_stop_file(step) if self.is_main else Action.NONE, self._signal], device=self.device
        )
        dist.all_reduce(request, op=dist.ReduceOp.MAX)
        file_action, signum = (int(v) for v in request.tolist())
        if signum:
            self.stopped_by = signal.Signals(signum)
            logger.warning(f"{self.stopped_by.name} received: stopping after step {step}")
            return Action.SAVE_AND_STOP
        if file_action:
            verb = "stopping" if file_action == Action.SAVE_AND_STOP else "continuing"
            logger.info(f"stop file {self.stop_file} asks for step {step}: saving and {verb}")
        return Action(file_action)

    def _read_stop_file(self, step: int) -> Action:
        """InternEvo's convention: the file holds N (save at step N, then stop) or -N (save and go on), as
        UTF-8 (with or without BOM) or UTF-16 with BOM (PowerShell's `>`). A file that cannot be read or
        holds something else is ignored with a warning: it never stops the run."""
        try:
            with open(self.stop_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return Action.NONE
        except OSError as error:  # e.g. made a folder, or unreadable, while the run goes on
            self._warn_once(f"stop file {self.stop_file} cannot be read ({error.strerror}); ignored")
            return Action.NONE
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        text = raw.decode("utf-16" if utf16 else "utf-8-sig", errors="replace").strip()
        try:
            target = int(text)
        except ValueError:
            self._warn_once(f"stop file {self.stop_file} holds {text!r}, not an integer step N or -N; ignored")
            return Action.NONE
        if abs(target) == step:
            return Action.SAVE_AND_STOP if target > 0 else Action.SAVE
        if 0 < abs(target) < step:
            self._warn_once(f"stop file {self.stop_file} asks for step {abs(target)}, already past; ignored")
        return Action.NONE

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    @property
    def exit_code(self) -> int:
        """The process's exit code after the run: 0, or 130 after a Ctrl-C stop in a process that owns the
        terminal. A torchrun worker exits 0 even then, since its launcher would take any other code for a
        failure (and restart the workers under --max-restarts); titanlm.launch itself exits 130."""
        return INTERRUPTED_EXIT_CODE if self.stopped_by == signal.SIGINT and self._count_interrupts else 0

    def close(self) -> None:
        """Give the signal handlers back, if `listen` took them."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
