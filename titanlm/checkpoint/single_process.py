"""Reading and writing a DCP checkpoint's model in one process, without a process group.

For the tools that work on checkpoints offline (convert, generate) and for the Hugging Face export
at the end of training, which rank 0 makes from the checkpoint just saved: DCP reassembles the
shards of any parallel layout into full tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanlm.models.hf_adapter import ConversionError, StateDict
from titanlm.models.hf_checkpoint import SHOWN_KEYS, require_dir

MODEL_KEY = "model"


def dcp_model_entries(dcp_dir: Path) -> dict[str, TensorStorageMetadata]:
    """The tensors stored under "model", keyed by titanlm parameter name."""
    require_dir(dcp_dir, "DCP_DIR")
    if not (dcp_dir / ".metadata").is_file():
        raise ConversionError(
            f"{dcp_dir} has no .metadata file, so it is not a DCP checkpoint; pass a folder written by "
            "hf_to_dcp or a trainer checkpoint folder such as <dump_folder>/checkpoint/step-1000"
        )
    stored = FileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    prefix = f"{MODEL_KEY}."
    entries = {
        key.removeprefix(prefix): meta
        for key, meta in stored.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not entries:
        top = sorted({key.split(".")[0] for key in stored})
        raise ConversionError(
            f"{dcp_dir} has no '{MODEL_KEY}' entries (top-level keys: {', '.join(top[:SHOWN_KEYS])}); "
            f"titanlm checkpoints keep the model under '{MODEL_KEY}'"
        )
    return entries


def read_model_state(dcp_dir: str | Path, dtype: torch.dtype | None = None) -> StateDict:
    """The "model" entries of a DCP checkpoint as full tensors, in their stored dtype or `dtype`."""
    stored = dcp_model_entries(Path(dcp_dir))
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    single_process_dcp(dcp.load, {MODEL_KEY: state}, Path(dcp_dir))
    return {key: tensor.to(dtype) for key, tensor in state.items()} if dtype else state


def single_process_dcp(operation: Callable[..., Any], state: dict[str, Any], path: Path) -> None:
    """dcp.save or dcp.load in this one process; no process group is needed."""
    with warnings.catch_warnings():
        # no_dist already says so; torch still warns that it assumes a single process.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=path, no_dist=True)
