"""A checkpoint's manifest: the size and CRC-32 of every file, written before publishing, checked before loading.

A checkpoint that a disk error, a bad copy or a stray write has altered would otherwise load
silently, or fail deep inside DCP. The manifest is a JSON file inside the checkpoint:

    {"format": 1, "checksum": "crc32", "step": 1000, "consecutive_skips": 0,
     "files": {"__0_0.distcp": {"size": 123, "crc32": "1a2b3c4d"}, ".metadata": {...}, ...}}

CRC-32 (zlib, about 2 GiB/s per core) catches changed bytes; re-reading what was just written costs
about a quarter of the save time (docs/benchmarks.md), and async saves pay it in the background.
Each rank checksums the files it wrote (DCP names them `__<rank>_<n>.distcp`), so the cost is
spread like the write; rank 0 adds the rest (.metadata, the model record) and writes the file.
Loads check every size, and the checksums unless `checkpoint.verify = false`, again spread over
the ranks; a file the manifest does not list is damage too, as nothing is written into a checkpoint
after its manifest. Checkpoints written before manifests existed have none and are loaded unchecked;
their model record (titanlm_model.json, written just before the manifest) tells them apart: from
version 2 on, a checkpoint without a manifest has lost it.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from titanlm.errors import CheckpointError
from titanlm.files import read_json_file
from titanlm.models.spec import RECORD_FILE, RECORD_VERSION_WITH_MANIFEST, record_version

MANIFEST = "titanlm_manifest.json"
FORMAT = 1
_CHUNK = 16 << 20

FileEntry = dict[str, Any]  # {"size": int, "crc32": "8 hex digits"}


def crc32_of(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _entry(folder: str, name: str) -> FileEntry:
    path = os.path.join(folder, name)
    return {"size": os.path.getsize(path), "crc32": crc32_of(path)}


def _files(folder: str) -> list[str]:
    """Every file under `folder`, as relative paths with '/', the manifest itself excepted."""
    root = Path(folder)
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def rank_entries(folder: str, rank: int) -> dict[str, FileEntry]:
    """Size and checksum of the shard files that `rank` wrote into `folder`."""
    prefix = f"__{rank}_"
    return {name: _entry(folder, name) for name in _files(folder) if name.startswith(prefix)}


def write_manifest(folder: str, pieces: list[dict[str, FileEntry]], **facts: Any) -> None:
    """Rank 0: merge the ranks' entries, checksum every other file, and write the manifest last.

    `facts` (e.g. step, consecutive_skips) are stored next to the files for later decisions."""
    files: dict[str, FileEntry] = {}
    for piece in pieces:
        files.update(piece)
    for name in _files(folder):
        if name not in files:
            files[name] = _entry(folder, name)
    manifest = {"format": FORMAT, "checksum": "crc32", **facts, "files": files}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of a checkpoint, or None for one saved without (older titanlm, other tools). A manifest
    that is unreadable, lists no files, or is missing from a checkpoint whose record shows a titanlm that
    writes one is returned as {"problem": what is wrong, "files": {}}: damage."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if record_version(folder) < RECORD_VERSION_WITH_MANIFEST:
            return None
        return {"problem": f"{MANIFEST} is missing, though {RECORD_FILE} shows a titanlm that writes one", "files": {}}
    try:
        manifest = read_json_file(path, CheckpointError, fix="", expect=dict)
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("crc32"), str)
            for entry in files.values()
        ):
            raise ValueError("no table of files with size and crc32")
        if not files:
            raise ValueError("its table of files is empty")
    except ValueError as error:  # read_json_file's CheckpointError (an unreadable file too) is one
        return {"problem": f"{MANIFEST} is unreadable ({error})", "files": {}}
    return manifest


def size_problem(folder: str, manifest: dict[str, Any]) -> str | None:
    """The first file that is missing, has another size than at save time or is not listed, described; None
    if all match."""
    if "problem" in manifest:
        return manifest["problem"]
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{name} has {size:,} bytes, {entry['size']:,} when saved (truncated or overwritten)"
    unlisted = [name for name in _files(folder) if name not in manifest["files"]]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        return f"{unlisted[0]}{more} is not listed in {MANIFEST} (added or renamed after the save)"
    return None


def checksum_problem(folder: str, manifest: dict[str, Any], rank: int = 0, world_size: int = 1) -> str | None:
    """Check this rank's share of the files (every world_size-th, largest first); the first mismatch described."""
    by_size = sorted(manifest["files"].items(), key=lambda item: (-item[1]["size"], item[0]))
    for name, entry in by_size[rank::world_size]:
        if crc32_of(os.path.join(folder, name)) != entry["crc32"]:
            return f"{name} does not match the checksum recorded when it was saved (its bytes changed)"
    return None


def damage(folder: str, checksums: bool) -> str | None:
    """One process's full check: the first problem of `folder`, or None (also for a checkpoint without manifest)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    return size_problem(folder, manifest) or (checksum_problem(folder, manifest) if checksums else None)
