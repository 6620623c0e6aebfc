"""Process-group setup that runs the same under torchrun, Slurm-launched torchrun, or a plain process,
and the worker's side of the launcher: one error line per job, and no worker outliving its launcher."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from titanlm.errors import TitanlmError

logger = logging.getLogger("titanlm")

# titanlm.launch tells its workers its pid, so that one whose launcher died while it was still starting
# (before it could watch), or that runs under a wrapper process (nsys, a shell script), notices too.
LAUNCHER_PID_ENV = "TITANLM_LAUNCHER_PID"
# How long a worker whose launcher died may take to save and stop before it exits regardless.
ORPHAN_GRACE_S = 60.0
# How long a rank other than 0 waits after leaving its error line for the launcher (see report_error).
REPORT_DELAY_S = 3.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# How long a collective may wait for a peer before the job fails; the checkpoint save group uses it too.
PROCESS_GROUP_TIMEOUT_S = 600


def init_distributed(timeout_s: int = PROCESS_GROUP_TIMEOUT_S) -> DistInfo:
    """CUDA + NCCL when a GPU is present, else CPU + gloo; never assume CUDA.

    Without torchrun's RANK/WORLD_SIZE variables (or with WORLD_SIZE=1 and no MASTER_ADDR) a
    one-process group is created in memory, so the single-process path runs the very same FSDP
    code as a multi-process job.
    """
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    joins = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size, local_rank = job_position() if joins else (0, 1, 0)
    # Under `srun --gpus-per-task=1` each task sees one GPU whatever its local rank.
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if world_size > 1 or os.environ.get("MASTER_ADDR"):
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, local_rank, world_size, device)


class LaunchError(TitanlmError):
    """A variable torchrun sets for each process (RANK, WORLD_SIZE, ...) that cannot make a job."""


_LAUNCH_HINT = (
    "launch with scripts/run_train.sh or torchrun, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
    "MASTER_PORT for each process, or unset RANK and WORLD_SIZE to train in one process"
)


def job_position() -> tuple[int, int, int]:
    """(rank, world size, local rank) of a process that joins a job, from torchrun's variables, checked."""
    values = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        try:
            values.append(int(text))
        except ValueError:
            raise LaunchError(f"{name}={text!r} is not a whole number; {_LAUNCH_HINT}") from None
    rank, world_size, local_rank = values
    if not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(
            f"RANK={rank} must be from 0 to WORLD_SIZE - 1 (WORLD_SIZE={world_size}) and LOCAL_RANK={local_rank} "
            f"not negative; {_LAUNCH_HINT}"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if world_size > 1 and missing:
        raise LaunchError(
            f"RANK={rank} and WORLD_SIZE={world_size} make this process one of a {world_size}-process job, but "
            f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} not set (rank 0's host and a free "
            f"port); {_LAUNCH_HINT}"
        )
    port = os.environ.get("MASTER_PORT", "")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise LaunchError(f"MASTER_PORT={port!r} is not a port number (1 to 65535); {_LAUNCH_HINT}")
    return rank, world_size, local_rank


def env_rank() -> int:
    """This process's rank as RANK gives it, for logging and error lines: 0 without RANK, and when RANK is
    not a number (init_distributed refuses it; the error has to be printed first)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def traceback_requested() -> bool:
    """Whether TITANLM_TRACEBACK asks `main` to re-raise a user error with its traceback: any value but
    empty, 0, false, no or off."""
    return os.environ.get("TITANLM_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or titanlm.launch, which runs torchrun's agent) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def report_error(line: str) -> None:
    """Report a one-line error once for the whole job, not once per rank.

    Rank 0 prints it on stderr, and leaves it in torchrun's error file too, for titanlm.launch to print
    when --local-ranks-filter hides rank 0's output. Another rank, whose output the launcher usually
    hides, only leaves it in the error file: titanlm.launch prints it when rank 0 did not fail the same
    way (an error only some ranks meet, e.g. a file missing on one node), and torchrun's own failure
    summary shows it. That rank then waits a moment, so that rank 0, which in the common case meets the
    same error, has failed too when the launcher looks. Without an error file (Slurm's task per GPU, a
    rank started by hand) another rank prints the line on stderr, prefixed with its rank.
    """
    rank = env_rank()
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        if rank != 0:
            print(f"rank {rank}: {line}", file=sys.stderr, flush=True)
        return
    try:
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        return
    if rank != 0:
        time.sleep(REPORT_DELAY_S)


def exit_with_launcher(grace_s: float = ORPHAN_GRACE_S) -> None:
    """In a torchrun worker, stop when the launcher dies instead of training on as an orphan.

    torchrun starts each worker in a session of its own, so killing torchrun's process group, or kill -9
    of torchrun, leaves the workers running and publishing checkpoints while a restarted job starts. A
    thread sees the parent change (or titanlm.launch's process end, when a wrapper process stands
    between them) within a second and sends this process SIGTERM: the ranks save after the current step
    and stop, as for scancel. After `grace_s` it ends the process if it is still there
    (a collective whose peers died blocks for the whole process-group timeout). A thread rather than
    prctl(PR_SET_PDEATHSIG): it works on any OS, it follows the launcher process rather than the thread
    that forked the worker, and it can bound the time to exit.
    """
    if not launched_by_torchrun():
        return  # a plain process may outlive its shell (nohup); Slurm ends its own tasks
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or parent)
    threading.Thread(
        target=_watch_launcher, args=(parent, launcher, grace_s), name="launcher-watch", daemon=True
    ).start()


def _watch_launcher(parent: int, launcher: int, grace_s: float) -> None:
    while os.getppid() == parent and _exists(launcher):
        time.sleep(1.0)
    logger.warning(
        f"the launcher (pid {launcher}) is gone: stopping after the current step, or in {grace_s:.0f} s without saving"
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    logger.warning(f"still running {grace_s:.0f} s after the launcher died: exiting without saving")
    os._exit(128 + signal.SIGTERM)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's (a pid the variable leaked from elsewhere)
        pass
    return True
