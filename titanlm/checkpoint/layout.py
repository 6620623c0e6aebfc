"""Where checkpoints live on disk, and the one rule that makes a checkpoint visible: its name.

    {job.dump_folder}/{checkpoint.folder}/
        step-500/                    complete full checkpoint (DCP: .metadata + one .distcp per rank)
        step-1000/
        step-1000-model/             complete model-only export (checkpoint.last_save_model_only)
        step-1000-hf/                Hugging Face folder of the last step (checkpoint.last_save_in_hf)
        step-1500.tmp-<attempt>/     a save in progress, or left by a crash: never loaded
        step-500.deleting/           being removed by keep_latest_k (a crash may leave it)
        STOP                         the default stop file

A save writes into `<name>.tmp-<attempt>` and is renamed to `<name>` only after every rank's files
are on disk, so a complete-looking name is always a complete checkpoint: a rename is atomic on
POSIX file systems. Nothing here deletes a `.tmp`: whether it is a crash's leftover or another
job's live save is not knowable from its name, so it is reported and left for a person. Only
complete checkpoints are removed, by keep_latest_k, and they lose their name before their files.
These functions touch the file system; the manager calls them on rank 0 only.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
from pathlib import Path

METADATA = ".metadata"  # written by DCP last, by the coordinator rank
STEP_PREFIX = "step-"  # the start of the name of every folder below: checkpoints, exports, .tmp and .deleting
_COMPLETE = re.compile(r"step-(\d+)")
_OURS = re.compile(r"step-\d+(-model|-hf)?(\.tmp-.+|\.deleting)")


def step_dir(folder: str, step: int, model_only: bool = False) -> str:
    return os.path.join(folder, f"step-{step}-model" if model_only else f"step-{step}")


def hf_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}-hf")


def tmp_dir(final: str, attempt: str) -> str:
    """The save folder of `final` for this attempt; unique per attempt, so a crash's leftover is never reused."""
    return f"{final}.tmp-{attempt}"


def complete_steps(folder: str) -> list[int]:
    """Steps of the complete full checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    steps = (_COMPLETE.fullmatch(entry.name) for entry in os.scandir(folder) if entry.is_dir())
    return sorted(int(match.group(1)) for match in steps if match)


def leftovers(folder: str) -> list[str]:
    """Names of interrupted saves or deletions in `folder`, which loading ignores."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry.name for entry in os.scandir(folder) if _OURS.fullmatch(entry.name))


class Kind(enum.Enum):
    DCP = "a DCP checkpoint"  # step-N, step-N-model or a converted model: DCP wrote its .metadata last
    RUN = "a run's checkpoint folder"  # holds step-N folders
    HF = "a Hugging Face model folder"  # config.json or safetensors
    NONE = "none of these"  # also a path that is no folder


def classify(path: str) -> Kind:
    """What kind of folder `path` is, the one answer every loader and tool acts on. A folder that is
    both (a converted model keeping an HF file) is read as DCP, the format titanlm writes."""
    if os.path.isfile(os.path.join(path, METADATA)):
        return Kind.DCP
    if os.path.isfile(os.path.join(path, "config.json")) or any(Path(path).glob("*.safetensors")):
        return Kind.HF
    return Kind.RUN if complete_steps(path) else Kind.NONE


def publish(tmp: str, final: str) -> None:
    """Make a finished save visible under its final name."""
    os.rename(tmp, final)


def prune(folder: str, keep: int, spare: int | None = None) -> list[int]:
    """Remove all but the `keep` newest complete checkpoints (keep >= 1) and `spare`; return the removed steps."""
    doomed = [step for step in complete_steps(folder)[:-keep] if step != spare]
    for step in doomed:
        path = step_dir(folder, step)
        # Renamed first: a crash inside rmtree must not leave a half-deleted folder under a complete name.
        os.rename(path, f"{path}.deleting")
        shutil.rmtree(f"{path}.deleting")
    return doomed
