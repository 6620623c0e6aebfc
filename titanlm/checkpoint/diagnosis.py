"""What went wrong with a checkpoint folder, and what to do next: one line for the user.

A save that fails on the file system (disk full, quota, permissions) is told apart from a bug,
and reported with the folder, its free space and the last complete checkpoint, which is never
touched. A damaged checkpoint is reported with the way to go on from it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

from titanlm.checkpoint import layout
from titanlm.errors import CheckpointError

# Rust libraries (safetensors) raise their own error types, with the OS error only in the message:
# "Error while serializing: I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Below this much free space a failed write is taken for a full disk: torch.save's zip writer turns the
# ENOSPC of a short write into "RuntimeError: ... unexpected pos", losing the OSError.
_FULL_BYTES = 64 << 20


def _nearest_existing(folder: str) -> str:
    """`folder`, or its nearest ancestor that exists (a folder a save would create need not exist yet)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_writable(folder: str) -> None:
    """Refuse a folder that saves could not create or write into, without creating it: a start that
    fails later must not leave an empty checkpoint folder behind."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} does not allow writing"
    else:
        return
    raise CheckpointError(
        f"checkpoint folder {folder} is not writable ({reason}); fix its permissions or point "
        "job.dump_folder / checkpoint.folder elsewhere"
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _free_bytes(folder: str) -> int:
    existing = _nearest_existing(folder)
    return shutil.disk_usage(existing if os.path.isdir(existing) else os.path.dirname(existing)).free


def _os_error(error: BaseException) -> OSError | None:
    """The file-system error behind a failed save, looking inside DCP's CheckpointException (which
    carries each failed rank's exception), through exception chains, and into the message of an error
    that names an OS error (safetensors')."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        named = _RUST_OS_ERROR.search(str(current))
        if named:
            code = int(named.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
        pending += [current.__cause__, current.__context__]
    return None


def file_system_failure(error: BaseException, folder: str) -> tuple[int, str] | None:
    """(errno, reason) of a save that failed on the file system, or None when `error` is something else
    (a bug). Call it before the partial save is removed: a full disk is recognised by its free space."""
    found = _os_error(error)
    if found is not None:
        reason = found.strerror or str(found)
        return found.errno, f"{reason}: {found.filename}" if found.filename else reason
    if _free_bytes(folder) < _FULL_BYTES:
        return errno.ENOSPC, os.strerror(errno.ENOSPC)
    return None


def failure_line(folder: str, step: int, code: int, reason: str, action: str = "saving", retry: str = "") -> str:
    """What went wrong with the save (or export) of `step` in `folder`, what is left, and what to do
    (`retry`, or restarting the run)."""
    free = _gib(_free_bytes(folder))
    steps = layout.complete_steps(folder)
    if steps:
        last = layout.step_dir(folder, steps[-1])
        kept = f"step-{steps[-1]} ({_gib(_folder_size(last))}) is the last complete checkpoint, untouched"
        restart = retry or "restart to resume"
    else:
        kept, restart = "there is no earlier checkpoint", retry or "restart"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"checkpoint.folder {folder} is full ({free} free): {action} step-{step} failed and its partial "
            f"files were removed; {kept}. Free space there (checkpoint.keep_latest_k keeps fewer checkpoints) or "
            f"point checkpoint.folder at a larger disk, then {restart}"
        )
    return (
        f"checkpoint.folder {folder}: {action} step-{step} failed ({reason}; {free} free) and its partial "
        f"files were removed; {kept}. Fix the folder, then {restart}"
    )


def damage_fix(source: str, origin: str, folder: str, load_step: int) -> str:
    """How to go on from the damaged checkpoint `source`, which the run's start (`origin`) named: resume
    from the one before it, or replace it."""
    aside = f"mv {source} {source}.damaged"
    if origin != "resume":
        return f"copy, convert or save it again, or set {origin} to another checkpoint"
    damaged_step = int(os.path.basename(source).removeprefix("step-"))
    earlier = [step for step in layout.complete_steps(folder) if step < damaged_step]
    load_step_fix = " and set checkpoint.load_step = -1" if load_step >= 0 else ""
    if earlier:
        return (
            f"move it aside ({aside}){load_step_fix} and restart to resume from step-{earlier[-1]}, the previous "
            "complete checkpoint"
        )
    return f"move it aside ({aside}){load_step_fix}; there is no earlier complete checkpoint, so the run starts over"
