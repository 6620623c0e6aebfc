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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanlm.checkpoint import layout, manifest
from titanlm.checkpoint.layout import Kind
from titanlm.models.flavors import ModelArgs
from titanlm.models.hf_adapter import ConversionError, StateDict, model_mismatch
from titanlm.models.hf_checkpoint import SHOWN_KEYS, Shapes, check_tensors, meta_state_dict, require_dir, tensor_shapes
from titanlm.models.spec import ModelSpec, checkpoint_spec

MODEL_KEY = "model"


def dcp_model_entries(dcp_dir: Path) -> dict[str, TensorStorageMetadata]:
    """The tensors stored under "model", keyed by titanlm parameter name."""
    require_dir(dcp_dir, "DCP_DIR")
    if layout.classify(str(dcp_dir)) is not Kind.DCP:
        raise ConversionError(
            f"{dcp_dir} has no {layout.METADATA} file, so it is not a DCP checkpoint; pass a folder written by "
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


def checked_checkpoint_spec(dcp_dir: Path, name: str | None = None, flavor: str | None = None) -> ModelSpec:
    """The model of a DCP checkpoint (its record, or the flavor flags of an older one), checked
    against the stored tensors before any is read."""
    shapes = {key: tuple(meta.size) for key, meta in dcp_model_entries(dcp_dir).items()}
    spec = checkpoint_spec(dcp_dir, name, flavor)
    conflicts = _flavor_conflicts(shapes, spec.args)
    if conflicts:
        fix = "pass the --model.name/--model.flavor the checkpoint was trained with"
        raise model_mismatch(f"the model {spec.describe()}", f"the weights in {dcp_dir}", conflicts, fix)
    check_tensors(
        shapes,
        tensor_shapes(meta_state_dict(spec.args)),
        source=f"the '{MODEL_KEY}' entries of {dcp_dir}",
        fix="pass the --model.name/--model.flavor the checkpoint was trained with",
    )
    return spec


def _flavor_conflicts(shapes: Shapes, args: ModelArgs) -> list[str]:
    """The ModelArgs fields that stored shapes contradict, as "field: weights X, flavor Y".

    Shapes reveal head counts only through the rows of wk (n_kv_heads * head_dim), so that
    product stands in for them; a flavor differing only in n_heads at equal widths goes unseen.
    """

    def size(key: str, axis: int = 0) -> int | None:
        return shapes[key][axis] if key in shapes else None

    seen = {
        "dim": size("tok_embeddings.weight", 1),
        "vocab_size": size("tok_embeddings.weight"),
        "n_layers": len({key.split(".")[1] for key in shapes if key.startswith("layers.")}),
        "ffn_dim": size("layers.0.feed_forward.w1.weight"),
        "n_kv_heads * head_dim": size("layers.0.attention.wk.weight"),
        "attn_bias": "layers.0.attention.wq.bias" in shapes,
    }
    wanted = {
        "dim": args.dim,
        "vocab_size": args.vocab_size,
        "n_layers": args.n_layers,
        "ffn_dim": args.ffn_dim,
        "n_kv_heads * head_dim": args.n_kv_heads * args.head_dim,
        "attn_bias": args.attn_bias,
    }
    return [
        f"{field}: weights {value}, flavor {wanted[field]}"
        for field, value in seen.items()
        if value is not None and value != wanted[field]
    ]


def read_model_state(dcp_dir: str | Path, dtype: torch.dtype | None = None) -> StateDict:
    """The "model" entries of a DCP checkpoint as full tensors, in their stored dtype or `dtype`; the
    checkpoint's files are checked against its manifest first, so altered weights are never exported."""
    stored = dcp_model_entries(Path(dcp_dir))
    problem = manifest.damage(str(dcp_dir), checksums=True)
    if problem:
        raise ConversionError(f"{dcp_dir} is damaged: {problem}; use an earlier checkpoint, or save it again")
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    try:
        single_process_dcp(dcp.load, {MODEL_KEY: state}, Path(dcp_dir))
    except CheckpointException as error:
        raise ConversionError(
            f"{dcp_dir} could not be read ({unreadable_reason(error)}); it is damaged or incomplete: use an earlier "
            "checkpoint, or save it again"
        ) from None
    return {key: tensor.to(dtype) for key, tensor in state.items()} if dtype else state


def unreadable_reason(error: CheckpointException) -> str:
    """The first failed rank's reason, on one line: DCP's own message holds every rank's traceback."""
    reason = next(iter(error.failures.values()), (error, None))[0]
    return f"{type(reason).__name__}: {' '.join(str(reason).split())}"


def single_process_dcp(operation: Callable[..., Any], state: dict[str, Any], path: Path) -> None:
    """dcp.save or dcp.load in this one process; no process group is needed."""
    with warnings.catch_warnings():
        # no_dist already says so; torch still warns that it assumes a single process.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=path, no_dist=True)
