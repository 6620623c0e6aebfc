"""Reading the user's text files, and publishing files written under a temporary name with the mode a
plain `open` would give them.

`tempfile` creates files 0600 and folders 0700 (and safetensors writes through such a file), so
output renamed into place from one would be unreadable to the user's group, unlike the rest of
the output. Standard library and the error family only, so every layer can use it.
"""

from __future__ import annotations

import os
import re

from titanlm.errors import DataError

_UMASK_LINE = re.compile(rb"^Umask:\s*([0-7]+)$", re.MULTILINE)


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux): setting it to
    read it back would briefly apply 0 to files another thread creates meanwhile."""
    try:
        with open("/proc/self/status", "rb") as f:
            found = _UMASK_LINE.search(f.read())
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode `open` (0666) or `mkdir` (0777) gives a new file or folder under the umask."""
    return (0o777 if folder else 0o666) & ~umask()


def give_default_mode(path: str | os.PathLike) -> None:
    """Set `path`, made by `tempfile` or a library that writes through one, to the default mode."""
    os.chmod(path, default_mode(os.path.isdir(path)))


def publish(tmp_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished `tmp_path` to `path` (atomically, replacing it), with the default mode."""
    give_default_mode(tmp_path)
    os.replace(tmp_path, path)


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a byte-order mark is allowed), or one line naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert the file") from None
