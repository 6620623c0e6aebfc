"""One job per folder: an advisory lock that rank 0 holds on the run's folders for the whole run.

Two jobs writing one checkpoint folder race each other's publishes and prunes, and interleave
metrics.jsonl; a restarted job must not start while an old one still writes. The lock is an
`flock` on `.titanlm.lock` in the folder, so the kernel releases it when its process dies, however
it dies: a lock left by a dead job is simply taken over. The file names its holder (host, pid,
start time) for the refusal message, and is removed when the run ends, so a finished run leaves
nothing behind. File systems without flock support (some network mounts) get a warning, and the
run goes on unlocked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import IO

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


class FolderInUse(CheckpointError):
    """Another live job holds the folder's lock; the message names it."""


def _holder_text(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


class FolderLock:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, folder: str, key: str) -> None:
        """`key` names the setting that chose the folder, for messages (e.g. job.dump_folder)."""
        self.folder = folder
        self.key = key
        self._file: IO[str] | None = None
        self._path = ""

    def acquire(self) -> None:
        """Take the lock or raise FolderInUse naming its holder; a dead holder's lock is taken over."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.realpath(os.path.join(self.folder, LOCK_FILE))
        if path in _held:
            _held[path].release()
        while True:
            lock_file = open(path, "a+", encoding="utf-8")
            if fcntl is None:
                break
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise FolderInUse(
                f"{self.key} {self.folder} is in use by another titanlm job ({_holder_text(holder)}); "
                "wait for it to end or stop it, or give this run another folder"
            ) from None
        logger.warning(
            f"{self.key} {self.folder}: the file system does not support locks ({error.strerror}); "
            "make sure no other job uses this folder"
        )

    def release(self) -> None:
        """Remove the lock file, then give the lock up (a job that opened the old file sees it gone and retries)."""
        if self._file is None:
            return
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        if fcntl is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        _held.pop(self._path, None)


def lock_run_folders(dump_folder: str, checkpoint_folder: str | None) -> list[FolderLock]:
    """Lock the dump folder (metrics, logs) and, when it lies elsewhere, the checkpoint folder (None with
    checkpoints off): both, or neither and an error naming the setting of the folder that failed."""
    folders = [("job.dump_folder", dump_folder)]
    if checkpoint_folder is not None:
        inside = os.path.commonpath([os.path.abspath(checkpoint_folder), os.path.abspath(dump_folder)])
        if inside != os.path.abspath(dump_folder):
            folders.append(("checkpoint.folder", checkpoint_folder))
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
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
