"""One job per folder: an advisory lock that rank 0 holds on the run's folders for the whole run.

Two jobs writing one checkpoint folder race each other's publishes and prunes, and interleave
metrics.jsonl; a restarted job must not start while an old one still writes. The lock is an
`flock` on `.titanlm.lock` in the folder, so the kernel releases it when its process dies, however
it dies: a lock left by a dead job is simply taken over. The file names its holder (host, pid,
start time) for the refusal message, and is removed when the run ends, so a finished run leaves
nothing behind; so are the folders the lock created, if the run left them empty (a refused start).

A job writes its folders and nothing above or below them that another job locked: a folder that lies
inside another live job's locked folder, or holds one, is refused like the locked folder itself (job B's
checkpoint.folder pointing into job A's dump folder would prune A's checkpoints). Folders are compared
by their real paths, so a symlink or a relative path leads to the same refusal. File systems without
flock support (some network mounts) get a warning, and the run goes on unlocked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

from titanlm.checkpoint.layout import STEP_PREFIX
from titanlm.errors import CheckpointError

logger = logging.getLogger("titanlm")

LOCK_FILE = ".titanlm.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; titanlm runs on Linux and macOS
    fcntl = None  # type: ignore[assignment]


# Locks this process holds, by lock-file path. A second lock taken in the same process replaces the first:
# flock would refuse it, yet the holder can only be an abandoned run of this process (a failed start
# whose objects are still referenced, e.g. by a traceback), never another job.
_held: dict[str, FolderLock] = {}

_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)  # what flock raises when another process holds the lock


class FolderInUse(CheckpointError):
    """Another live job holds the folder's lock; the message names it."""


def _holder_text(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def _flock(lock_file: IO[str], mode: int) -> None:
    """flock without waiting, raising OSError when it is held; retried briefly, because another job's
    start-up may hold it for a moment to see whether the folder is in use (`_live_holder`)."""
    for attempt in range(5):
        try:
            fcntl.flock(lock_file.fileno(), mode | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in _BUSY or attempt == 4:
                raise
            time.sleep(0.02)


def _live_holder(lock_path: str) -> str | None:
    """The holder of the lock file `lock_path` (its text) while a live process other than this one holds it;
    None for no file, a lock left by a job that ended, or one of this process's own locks."""
    if fcntl is None or lock_path in _held:
        return None
    try:
        lock_file = open(lock_path, encoding="utf-8")
    except OSError:
        return None
    with lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            return lock_file.read() if error.errno in _BUSY else None
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return None


def _other_jobs_folder(folder: str) -> tuple[str, str, str] | None:
    """A folder above or inside `folder` that a live other job locked: ("lies inside" or "holds", that
    folder's real path, its holder); None if there is none. Checkpoints (step-N...) are not searched:
    no job locks a folder inside one."""
    real = os.path.realpath(folder)
    for above in Path(real).parents:
        holder = _live_holder(str(above / LOCK_FILE))
        if holder is not None:
            return "lies inside", str(above), holder
    for root, folders, files in os.walk(real):  # symlinks are not followed: a job writes into its own tree
        folders[:] = [name for name in folders if not name.startswith(STEP_PREFIX)]
        holder = _live_holder(os.path.join(root, LOCK_FILE)) if LOCK_FILE in files and root != real else None
        if holder is not None:
            return "holds", root, holder
    return None


def _refuse_overlap(key: str, folder: str) -> None:
    """Raise FolderInUse if `folder`, which the setting `key` names, lies inside or holds another live job's."""
    overlap = _other_jobs_folder(folder)
    if overlap is not None:
        relation, other, holder = overlap
        raise FolderInUse(
            f"{key} {folder} {relation} {other}, a folder of another titanlm job ({_holder_text(holder)}); "
            "wait for it to end or stop it, or give this run a folder of its own"
        )


def _missing_folders(folder: str) -> list[str]:
    """`folder` and those of its ancestors that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


class FolderLock:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, folder: str, key: str) -> None:
        """`key` names the setting that chose the folder, for messages (e.g. job.dump_folder)."""
        self.folder = folder
        self.key = key
        self._file: IO[str] | None = None
        self._path = ""
        self._created: list[str] = []

    def acquire(self) -> None:
        """Take the lock or raise FolderInUse naming its holder; a dead holder's lock is taken over."""
        path = os.path.realpath(os.path.join(self.folder, LOCK_FILE))
        if path in _held:
            _held[path].release()  # first: it may remove the folder, if it created it and it is empty
        self._created = _missing_folders(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            lock_file = open(path, "a+", encoding="utf-8")
            if fcntl is None:
                break
            try:
                _flock(lock_file, fcntl.LOCK_EX)
            except OSError as error:
                self._refuse(lock_file, error)
                return
            # The holder removes the file when it ends; a lock taken on a file no longer at `path` is void.
            try:
                if os.path.samestat(os.fstat(lock_file.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            lock_file.close()
        lock_file.seek(0)
        previous = lock_file.read().strip()
        if previous:
            logger.info(f"took over the lock of {self.folder} from a job that ended ({_holder_text(previous)})")
        lock_file.seek(0)
        lock_file.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}))
        lock_file.flush()
        self._file = lock_file
        self._path = path
        _held[path] = self

    def _refuse(self, lock_file: IO[str], error: OSError) -> None:
        """The lock is held (raise, naming the holder), or the file system has no locks (warn, go on)."""
        lock_file.seek(0)
        holder = lock_file.read()
        lock_file.close()
        if error.errno in _BUSY:
            raise FolderInUse(
                f"{self.key} {self.folder} is in use by another titanlm job ({_holder_text(holder)}); "
                "wait for it to end or stop it, or give this run another folder"
            ) from None
        logger.warning(
            f"{self.key} {self.folder}: the file system does not support locks ({error.strerror}); "
            "make sure no other job uses this folder"
        )

    def release(self) -> None:
        """Remove the lock file, then give the lock up (a job that opened the old file sees it gone and retries);
        then remove the folders `acquire` created, as far as they are empty."""
        if self._file is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            _held.pop(self._path, None)
        created, self._created = self._created, []
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:  # the run wrote there (or another job did): keep it and what holds it
                break


def lock_run_folders(dump_folder: str, checkpoint_folder: str | None) -> list[FolderLock]:
    """Lock the dump folder (metrics, logs) and, when it lies elsewhere, the checkpoint folder (None with
    checkpoints off): both, or neither and an error naming the setting of the folder that failed or that
    overlaps another live job's folder. Overlaps are looked for before the locks are taken, so that a refused
    job touches nothing, and again after, so that of two jobs starting together at least one sees the other."""
    folders = [("job.dump_folder", dump_folder)]
    if checkpoint_folder is not None:
        real_dump = os.path.realpath(dump_folder)
        if os.path.commonpath([os.path.realpath(checkpoint_folder), real_dump]) != real_dump:
            folders.append(("checkpoint.folder", checkpoint_folder))
    for key, folder in folders:
        _refuse_overlap(key, folder)
    locks: list[FolderLock] = []
    try:
        for key, folder in folders:
            lock = FolderLock(folder, key)
            try:
                lock.acquire()
            except OSError as error:
                raise CheckpointError(
                    f"{key} {folder} is not writable ({error.strerror}); fix its permissions or set {key} to "
                    "a folder this job can write"
                ) from None
            locks.append(lock)
        for key, folder in folders:
            _refuse_overlap(key, folder)
    except BaseException:
        for lock in reversed(locks):  # the last lock's folders may lie inside those the first one created
            lock.release()
        raise
    return locks
