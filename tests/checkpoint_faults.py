"""Faults a cluster produces, made on purpose: a full disk under DCP's writes and altered checkpoint files.

Also the torchrun worker of tests/test_checkpoint_integrity.py: `python -m torch.distributed.run ...
tests/checkpoint_faults.py WORKDIR` runs its scenarios on every rank and writes what each rank saw
to WORKDIR/rank-<r>.json.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from torch.distributed.checkpoint.filesystem import FileSystem

sys.path.insert(0, str(Path(__file__).resolve().parent))


@contextmanager
def full_disk(shard_prefix: str = "__", during: str = ".tmp-") -> Iterator[None]:
    """DCP shard files whose name starts with `shard_prefix`, in a folder whose path holds `during`, fail
    with ENOSPC after a few bytes, as on a disk that fills up mid-save."""
    original = FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):  # noqa: ANN001 - DCP's signature
        with original(self, path, mode) as stream:
            if "w" in mode and Path(path).name.startswith(shard_prefix) and during in str(path):
                stream.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            yield stream

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = original


@contextmanager
def full_disk_for_safetensors() -> Iterator[None]:
    """safetensors files (HF exports) fail after a few bytes as on a full disk, with the error safetensors
    raises there: its own type, the OS error only in the message (as seen on a full tmpfs)."""
    import titanlm.models.hf_checkpoint as hf_checkpoint

    original = hf_checkpoint.save_file

    def save_file(tensors, filename, metadata=None):  # noqa: ANN001, ANN202 - safetensors' signature
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    hf_checkpoint.save_file = save_file
    try:
        yield
    finally:
        hf_checkpoint.save_file = original


def overwrite_bytes(path: Path, count: int = 64) -> None:
    """Change `count` bytes in the middle of a file, keeping its size: what a stray write does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(255 - b for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def _outcome(run: Callable[[], object]) -> str:
    from titanlm.checkpoint import CheckpointError

    try:
        run()
    except CheckpointError as error:
        return f"error: {error}"
    return "ok"


def _worker(workdir: str) -> None:
    import torch.distributed as dist
    from trainer_runs import run_in_process

    work = Path(workdir)
    every_step = ["--checkpoint.enable", "--checkpoint.interval", "1"]
    seen: dict[str, str] = {}

    damaged = work / "damaged"
    seen["first"] = _outcome(lambda: run_in_process(damaged, [*every_step, "--training.steps", "2"]))
    rank = dist.get_rank()
    if rank == 0:  # a shard that rank 1 wrote; whichever rank checks it, both must refuse
        overwrite_bytes(damaged / "checkpoint" / "step-2" / "__1_0.distcp")
    dist.barrier()
    seen["damaged"] = _outcome(lambda: run_in_process(damaged, ["--checkpoint.enable", "--training.steps", "3"]))
    if rank == 0:
        shutil.move(damaged / "checkpoint" / "step-2", damaged / "checkpoint" / "step-2.damaged")
    dist.barrier()
    seen["resumed"] = _outcome(lambda: run_in_process(damaged, ["--checkpoint.enable", "--training.steps", "3"]))

    with full_disk(shard_prefix="__1_", during="step-2.tmp-"):
        seen["full"] = _outcome(lambda: run_in_process(work / "full", [*every_step, "--training.steps", "3"]))
    (work / f"rank-{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    _worker(sys.argv[1])
    from titanlm.distributed import shutdown

    shutdown()
