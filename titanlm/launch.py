"""torchrun, with the signals and exit codes a cluster job needs: `python -m titanlm.launch` takes torchrun's
arguments (scripts/run_train.sh runs it) and runs torchrun's agent in this process, with four changes.

- SIGTERM and SIGUSR1 (scancel, `sbatch --signal`) are relayed to the workers, which save after their
  current step and stop (titanlm/stop.py); the launcher waits for them however long the save
  takes and exits 0. torchrun would kill them after a 30 s grace and exit 1, and dies at once on SIGUSR1.
- Ctrl-C (SIGINT) is relayed the same way and the launcher exits 130; a second Ctrl-C kills the workers
  and exits 130 at once, without the restarts --max-restarts would allow.
- A failed worker's exit code becomes the launcher's (2 for a user error, whose line rank 0 has
  printed), and the failure is one line instead of torchrun's ChildFailedError report: rank 0's error
  line when --local-ranks-filter hides rank 0's output, another rank's when only that rank failed, else
  the exit code. A worker killed by signal N gives 128 + N, as a shell would.
- Arguments that cannot start a job (no process per node, several nodes but no --node_rank) are one
  line and exit 2, not a traceback, nor a wait for a node that never comes.

SIGHUP and SIGQUIT keep torchrun's handling. The relay finds the workers as this process's children in
/proc, so it needs Linux; elsewhere the workers only learn of the launcher's end from its death
(titanlm.distributed.exit_with_launcher).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from titanlm.distributed import LAUNCHER_PID_ENV
from titanlm.errors import INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE

RELAYED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Relay:
    """The handler of the relayed signals; it remembers what it did, for the exit code."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def __call__(self, signum: int, frame: object) -> None:
        sig = signal.Signals(signum)
        workers = worker_pids()
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            # Workers take every SIGINT as a stop request (they may get each Ctrl-C twice under Slurm).
            say("second Ctrl-C: aborting the workers without saving")
            send(workers, signal.SIGKILL)
            # Out of torchrun's agent loop, which would restart them (--max-restarts) and which reaps them
            # on its way out.
            raise SystemExit(INTERRUPTED_EXIT_CODE)
        if sig == signal.SIGINT:
            say(
                "Ctrl-C: the ranks stop after their current step, saving it when checkpoints are on; "
                "Ctrl-C again aborts"
            )
        else:
            say(f"{sig.name}: the ranks stop after their current step, saving it when checkpoints are on")
        if self.received != signal.SIGINT:
            self.received = sig
        if not workers:  # still in the rendezvous: nothing runs, nothing to save
            raise SystemExit(self.stopped_code())
        send(workers, sig)

    def stopped_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.received == signal.SIGINT else 0


def worker_pids() -> list[int]:
    """This process's children: the workers torchrun's agent started (Linux; elsewhere none are found)."""
    me = str(os.getpid())
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]  # the name in (...) may hold spaces
        except (OSError, IndexError):
            continue
        if parent == me:
            pids.append(int(entry))
    return pids


def send(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def say(line: str) -> None:
    """One line on stderr, written straight to the file descriptor (safe inside a signal handler)."""
    try:
        os.write(2, f"[launcher]: {line}\n".encode())
    except OSError:
        pass


class _DropFailureReports(logging.Filter):
    """torchrun's own lines about a failed worker, which the launcher replaces with one of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("failed (exitcode") or message.startswith("Sending process"))


def failure_code(error: ChildFailedError, relay: Relay, local_ranks_filter: str = "") -> int:
    """The launcher's exit code for failed workers, after at most one line saying what failed.

    `local_ranks_filter` is torchrun's --local-ranks-filter: the local ranks whose output is shown
    (empty: all)."""
    rank, first = error.get_first_failure()
    if relay.received is not None and first.exitcode in (-relay.received, INTERRUPTED_EXIT_CODE):
        return relay.stopped_code()  # stopped while starting up: nothing to save yet
    rank0 = error.failures.get(0)
    if rank0 is not None and (error_line(rank0) or rank0.exitcode == USER_ERROR_EXIT_CODE):
        rank, first = 0, rank0  # the error every rank usually meets, which rank 0 reports for the job
    code = 128 - first.exitcode if first.exitcode < 0 else first.exitcode
    line = error_line(first)
    if rank == 0 and (line or code == USER_ERROR_EXIT_CODE) and shown(first.local_rank, local_ranks_filter):
        return code  # rank 0 has printed its line
    if line:
        say(f"rank {rank}: {line}")
    elif first.exitcode < 0:
        say(f"rank {rank} was killed by {first.signal_name()}")
    else:
        say(f"rank {rank} exited with code {first.exitcode}")
    return code


def error_line(failure: ProcessFailure) -> str | None:
    """The line a rank left in its error file (titanlm.distributed.report_error), if it left one."""
    if not os.path.isfile(failure.error_file):
        return None  # torchrun's stand-in message then is "<NONE>"
    message = failure.error_file_data.get("message")
    return message if isinstance(message, str) and message and message != "<NONE>" else None


def shown(local_rank: int, local_ranks_filter: str) -> bool:
    """Whether torchrun shows this local rank's output on the console."""
    return not local_ranks_filter or local_rank in {int(r) for r in local_ranks_filter.split(",")}


def launch_problem(args: argparse.Namespace) -> str | None:
    """What in torchrun's arguments cannot start a job, as the line to say; None when nothing.

    `args.node_rank` is None when --node_rank was left out: torchrun's default 0 would make every node of a
    multi-node job node 0, and each wait for the others."""
    nproc = args.nproc_per_node
    if nproc not in ("auto", "cpu", "gpu", "xpu") and not (nproc.isdigit() and int(nproc) >= 1):
        return f"--nproc_per_node {nproc!r} is not a number of processes per node (1 or more), nor auto, cpu or gpu"
    try:
        min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        min_nodes = max_nodes = 0
    if not 1 <= min_nodes <= max_nodes:
        return f"--nnodes {args.nnodes!r} is not a number of nodes (1 or more), nor a range MIN:MAX of them"
    if args.standalone or args.rdzv_backend != "static" or max_nodes == 1:
        return None
    if args.node_rank is None:
        return f"--nnodes {args.nnodes} needs --node_rank, this node's number from 0 to {max_nodes - 1}, one per node"
    if not 0 <= args.node_rank < max_nodes:
        return f"--node_rank {args.node_rank} is not from 0 to {max_nodes - 1} (--nnodes {args.nnodes})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = torchrun.get_args_parser()
    if "PET_NODE_RANK" not in os.environ:  # torchrun's other way to give it
        parser.set_defaults(node_rank=None)  # to tell a node rank left out from torchrun's default 0
    args = parser.parse_args(argv)
    problem = launch_problem(args)
    if problem:
        say(f"error: {problem}")
        return USER_ERROR_EXIT_CODE
    args.node_rank = args.node_rank or 0
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # not the relayed ones: torchrun would install its own handlers
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    relay = Relay()
    for sig in RELAYED:
        signal.signal(sig, relay)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureReports())
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        return failure_code(error, relay, args.local_ranks_filter)
    except SignalException as error:  # SIGHUP or SIGQUIT: torchrun has stopped the workers
        say(f"{error.sigval.name}: the workers were stopped")
        return 128 + error.sigval
    return relay.stopped_code()


if __name__ == "__main__":
    sys.exit(main())
