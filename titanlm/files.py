"""Reading the user's text and JSON files, and publishing files written under a temporary name with the
mode a plain `open` would give them.

Every whole text or JSON file titanlm reads goes through `read_text_file` / `read_json_file`: a
byte-order mark is allowed, and a file that cannot be read, is not UTF-8 or is not the JSON expected
raises one line naming the file, what is wrong and the fix, as the error type of the caller's
family. Line-by-line readers (metrics.jsonl, JSONL inputs) read their lines themselves.

`tempfile` creates files 0600 and folders 0700 (and safetensors writes through such a file), so
output renamed into place from one would be unreadable to the user's group, unlike the rest of
the output. Standard library and the error family only, so every layer can use it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from titanlm.errors import DataError, TitanlmError

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


def read_text_file(path: str | os.PathLike, error: type[TitanlmError] = DataError) -> str:
    """The text of a UTF-8 file (a byte-order mark is allowed); a file that cannot be read or is not
    UTF-8 raises `error`, one line naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason}); convert the file") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})") from None


# What a JSON value is called, by its Python type, for "holds a string, not a JSON object".
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def read_json_file(
    path: str | os.PathLike,
    error: type[TitanlmError] = DataError,
    fix: str = "fix or replace the file",
    expect: type[dict] | type[list] | None = None,
) -> Any:
    """The JSON value a whole UTF-8 file holds (see `read_text_file`); a file that is not valid JSON, or
    whose value is not an `expect` (a JSON object for dict, an array for list), raises `error`, one line
    naming the file, where or what is wrong, and `fix` (left out when empty)."""
    text = read_text_file(path, error)
    end = f"; {fix}" if fix else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){end}") from None
    if expect is not None and not isinstance(value, expect):
        found = _JSON_NAMES.get(type(value), "null")
        raise error(f"{path} holds a JSON {found}, not a JSON {_JSON_NAMES[expect]}{end}")
    return value


TOKENIZER_FILE_FIX = "fix it, or copy the model's tokenizer files again"


def read_tokenizer_json(path: str | os.PathLike, error: type[TitanlmError]) -> dict:
    """A JSON object file that goes with a tokenizer (tokenizer_config.json, tokenizer.json), or {} when
    the tokenizer has none; a malformed one is `error`, naming the file."""
    if not os.path.isfile(path):
        return {}
    return read_json_file(path, error, TOKENIZER_FILE_FIX, dict)
