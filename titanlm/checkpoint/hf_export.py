"""Writing a titanlm model as a Hugging Face folder: safetensors, config.json and the tokenizer.

Shared by `convert dcp_to_hf` and by training's `checkpoint.last_save_in_hf`, so both give a folder
that transformers' AutoModelForCausalLM and AutoTokenizer load as they are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from titanlm.checkpoint import layout
from titanlm.checkpoint.diagnosis import failure_line, file_system_failure
from titanlm.checkpoint.single_process import read_model_state
from titanlm.data.tokenizer import export_hf_tokenizer
from titanlm.errors import CheckpointError
from titanlm.models.hf_adapter import NATIVE_MODEL_TYPE, ConversionError, StateDict, hf_config, to_hf
from titanlm.models.hf_checkpoint import write_safetensors
from titanlm.models.spec import ModelSpec

logger = logging.getLogger("titanlm")

LAYOUTS = ("llama", "native")


def export_hf_folder(
    state: StateDict,
    spec: ModelSpec,
    out_dir: Path,
    dtype: torch.dtype,
    layout: str = "llama",
    shard_bytes: int = 5 * 10**9,
) -> list[Path]:
    """Write the titanlm state dict `state` of model `spec` into the existing folder `out_dir`.

    `layout` "llama" loads in stock transformers whatever the family; "native" writes the family's
    own HF layout (InternLM2's packed wqkv, InternLM's config), which needs the release's remote
    code. Returns the files written.
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"--layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    model_type = "llama" if layout == "llama" else NATIVE_MODEL_TYPE[spec.family]
    written: list[Path] = []
    bos = eos = None
    if spec.tokenizer_path:
        before = set(out_dir.iterdir())
        tokenizer = export_hf_tokenizer(spec.tokenizer_path, out_dir)
        written += sorted(set(out_dir.iterdir()) - before)
        bos, eos = (i if i >= 0 else None for i in (tokenizer.bos_id, tokenizer.eos_id))
    config = hf_config(spec.args, model_type, dtype, bos, eos)
    hf_state = to_hf({key: tensor.to(dtype) for key, tensor in state.items()}, spec.args, model_type)
    written += write_safetensors(hf_state, out_dir, shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [*written, out_dir / "config.json"]


def export_final(saved: str, folder: str, step: int, attempt: str, spec: ModelSpec, dtype: torch.dtype) -> None:
    """checkpoint.last_save_in_hf, on rank 0: the checkpoint `saved` of step `step` as the Hugging Face
    folder step-N-hf of the checkpoint folder `folder`, written in this `attempt`'s .tmp folder and
    published like a save. A file-system failure removes the .tmp folder and raises its one line."""
    started = time.perf_counter()
    final = layout.hf_dir(folder, step)
    tmp = layout.tmp_dir(final, attempt)
    try:
        os.makedirs(tmp)
        export_hf_folder(read_model_state(saved), spec, Path(tmp), dtype)
    except BaseException as error:
        written = isinstance(error, (OSError, RuntimeError, SafetensorError))  # what a failed write raises
        failure = file_system_failure(error, folder) if written else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        retry = f"export it with python -m titanlm.tools.convert dcp_to_hf {saved} {final}"
        raise CheckpointError(failure_line(folder, step, *failure, "exporting", retry)) from None
    layout.publish(tmp, final)
    logger.info(f"exported {final} for transformers in {time.perf_counter() - started:.1f}s")
