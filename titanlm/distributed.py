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

    Without torchrun's RANK/WORLD_SIZE variables a one-process group is created in memory,
    so the single-process path runs the very same FSDP code as a multi-process job.
    """
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # Under `srun --gpus-per-task=1` each task sees one GPU whatever its local rank.
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    else:
        rank, world_size, local_rank = 0, 1, 0
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
            )
    return DistInfo(rank, local_rank, world_size, device)


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
    rank = int(os.environ.get("RANK", "0"))
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
