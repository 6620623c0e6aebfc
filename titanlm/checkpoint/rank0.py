"""Decisions that one rank takes for all: reading the file system once, so that ranks never disagree.

A decision that depends on files (what to start from, whether a folder is usable) taken on every
rank could differ between nodes; one that fails on rank 0 alone would leave the others waiting in
their next collective. `on_rank0` runs it on rank 0 and gives every rank its result or its error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from titanlm.errors import CheckpointError, TitanlmError

T = TypeVar("T")


def on_rank0(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 and give every rank its result, or raise its user error (a TitanlmError,
    e.g. CheckpointError or FolderInUse) everywhere as a CheckpointError. Any other exception is a
    bug: rank 0 re-raises it with its traceback and the other ranks raise too, instead of waiting."""
    box: list[Any] = [None]
    raised: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = (decide(), None, None)
        except TitanlmError as error:
            box[0] = (None, str(error), None)
        except Exception as error:
            raised = error
            box[0] = (None, None, f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(box, src=0)
    result, error, bug = box[0]
    if raised is not None:
        raise raised
    if bug is not None:
        raise RuntimeError(f"rank 0 failed while deciding for all ranks ({bug}); see its traceback")
    if error is not None:
        raise CheckpointError(error)
    return result
