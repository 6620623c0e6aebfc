"""Convert between Hugging Face safetensors checkpoints and titanlm's DCP checkpoints.

    python -m titanlm.tools.convert hf_to_dcp HF_DIR OUT_DIR [--model.name NAME --model.flavor FLAVOR]
    python -m titanlm.tools.convert dcp_to_hf DCP_DIR OUT_DIR --model.name NAME --model.flavor FLAVOR
        [--layout llama|native] [--dtype bfloat16|float16|float32] [--max_shard_size 5GB]

The DCP side keeps the model under the top-level key "model", as the trainer's checkpoints do, so
a converted HF model can be the trainer's `checkpoint.initial_load_path` and a trainer's `step-N/`
folder can be exported. Keys, shapes and the flavor are checked in full before anything is
written, and inputs are only ever read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanlm.models import FLAVORS, ModelArgs
from titanlm.models.hf_adapter import (
    NATIVE_MODEL_TYPE,
    ConversionError,
    StateDict,
    flavor_args,
    hf_config,
    to_hf,
)
from titanlm.models.hf_checkpoint import (
    HF_INDEX,
    HF_SINGLE,
    SHOWN_KEYS,
    Shapes,
    check_tensors,
    meta_state_dict,
    read_hf_model,
    require_dir,
    tensor_shapes,
)

MODEL_KEY = "model"
LAYOUTS = ("llama", "native")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What each direction writes, so that --overwrite replaces exactly its own earlier output.
_HF_OUTPUTS = ("model*.safetensors", HF_INDEX, "config.json")
_DCP_OUTPUTS = ("*.distcp", ".metadata")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}



def hf_to_dcp(
    hf_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    flavor: str | None = None,
    overwrite: bool = False,
) -> ModelArgs:
    """Write the HF checkpoint in `hf_dir` as a DCP checkpoint {"model": titanlm state dict}."""
    args, state = read_hf_model(hf_dir, name, flavor)
    out_dir = Path(out_dir)
    _prepare_output(out_dir, Path(hf_dir), overwrite, _DCP_OUTPUTS)
    _single_process_dcp(dcp.save, {MODEL_KEY: state}, out_dir)
    return args


def dcp_to_hf(
    dcp_dir: str | Path,
    out_dir: str | Path,
    name: str,
    flavor: str,
    layout: str = "llama",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> list[Path]:
    """Write the "model" entries of a DCP checkpoint as HF safetensors + config.json.

    `layout` "llama" loads in stock transformers whatever the family; "native" writes the
    family's own HF layout (InternLM2's packed wqkv, InternLM's config), which needs the
    release's remote code. `dtype` None keeps the checkpoint's. Returns the files written.
    """
    dcp_dir, out_dir = Path(dcp_dir), Path(out_dir)
    if layout not in LAYOUTS:
        raise ConversionError(f"--layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    args = flavor_args(name, flavor)
    model_type = "llama" if layout == "llama" else NATIVE_MODEL_TYPE[name]
    shard_bytes = parse_size(max_shard_size)
    stored = _dcp_model_entries(dcp_dir)
    shapes = {key: tuple(meta.size) for key, meta in stored.items()}
    conflicts = _flavor_conflicts(shapes, args)
    if conflicts:
        raise ConversionError(
            f"--model.name {name} --model.flavor {flavor} is a flavor that does not match the weights in "
            f"{dcp_dir} ({'; '.join(conflicts)}); pass the flavor the checkpoint was trained with"
        )
    check_tensors(
        shapes,
        tensor_shapes(meta_state_dict(args)),
        source=f"the '{MODEL_KEY}' entries of {dcp_dir}",
        fix="pass the --model.name/--model.flavor the checkpoint was trained with",
    )
    target = DTYPES[dtype] if dtype else stored["tok_embeddings.weight"].properties.dtype
    config = hf_config(args, model_type, target)

    _prepare_output(out_dir, dcp_dir, overwrite, _HF_OUTPUTS)
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    _single_process_dcp(dcp.load, {MODEL_KEY: state}, dcp_dir)
    hf_state = to_hf({key: tensor.to(target) for key, tensor in state.items()}, args, model_type)
    files = _write_safetensors(hf_state, out_dir, shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [*files, out_dir / "config.json"]


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, as Hugging Face's max_shard_size reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConversionError(f"--max_shard_size '{text}' is not a size; use e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


# ---------------------------------------------------------------------------------------------
# Checks


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


def _prepare_output(out_dir: Path, in_dir: Path, overwrite: bool, outputs: Sequence[str]) -> None:
    """Create `out_dir`, refusing a non-empty one unless --overwrite, and never the input folder."""
    if out_dir.resolve() == in_dir.resolve():
        raise ConversionError(
            f"OUT_DIR '{out_dir}' is the input folder; write the conversion to another folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"OUT_DIR '{out_dir}' exists and is not a folder; choose another path")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"OUT_DIR '{out_dir}' exists and is not empty; choose a new or empty folder, or pass "
                "--overwrite to replace the files an earlier conversion wrote there"
            )
        # Stale shards of an earlier run would otherwise sit beside the new index.
        for pattern in outputs:
            for path in out_dir.glob(pattern):
                if path.is_file():
                    path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors


def _write_safetensors(state: StateDict, out_dir: Path, shard_bytes: int) -> list[Path]:
    """HF's layout: one model.safetensors, or model-0000i-of-0000n shards plus an index."""
    shards: list[StateDict] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], out_dir / HF_SINGLE, metadata=metadata)
        return [out_dir / HF_SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file.name))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, out_dir / HF_INDEX]


# ---------------------------------------------------------------------------------------------
# DCP


def _dcp_model_entries(dcp_dir: Path) -> dict[str, TensorStorageMetadata]:
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


def read_dcp_model_state(dcp_dir: str | Path, dtype: torch.dtype | None = None) -> StateDict:
    """The "model" entries of a DCP checkpoint as full tensors in this one process (any saving
    layout: DCP reassembles the shards), in their stored dtype or `dtype`."""
    stored = _dcp_model_entries(Path(dcp_dir))
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    _single_process_dcp(dcp.load, {MODEL_KEY: state}, Path(dcp_dir))
    return {key: tensor.to(dtype) for key, tensor in state.items()} if dtype else state


def _single_process_dcp(operation: Callable[..., Any], state: dict[str, Any], path: Path) -> None:
    """dcp.save or dcp.load in this one process; no process group is needed."""
    with warnings.catch_warnings():
        # no_dist already says so; torch still warns that it assumes a single process.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=path, no_dist=True)


# ---------------------------------------------------------------------------------------------
# Command line


def _matching_flavors(args: ModelArgs) -> list[str]:
    return [f"--model.name {name} --model.flavor {flavor}"
            for name, flavors in FLAVORS.items() for flavor, known in flavors.items() if known == args]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.convert",
        description="Convert between Hugging Face safetensors and titanlm DCP checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_dcp = commands.add_parser("hf_to_dcp", help="HF model folder -> DCP checkpoint {'model': ...}")
    to_dcp.add_argument("hf_dir", help="folder with config.json and model*.safetensors")
    to_dcp.add_argument("out_dir", help="new or empty folder for the DCP checkpoint")
    to_dcp.add_argument("--model.name", dest="name", choices=sorted(FLAVORS),
                        help="family of --model.flavor (default: from config.json's model_type)")
    to_dcp.add_argument("--model.flavor", dest="flavor",
                        help="check the weights against this flavor (default: derive the model "
                        "from config.json)")

    to_hf_cmd = commands.add_parser("dcp_to_hf",
                                    help="DCP checkpoint (e.g. a trainer step-N folder) -> HF folder")
    to_hf_cmd.add_argument("dcp_dir", help="DCP checkpoint folder (with .metadata)")
    to_hf_cmd.add_argument("out_dir", help="new or empty folder for the HF model")
    to_hf_cmd.add_argument("--model.name", dest="name", choices=sorted(FLAVORS), required=True,
                           help="model family the checkpoint was trained as")
    to_hf_cmd.add_argument("--model.flavor", dest="flavor", required=True,
                           help="flavor the checkpoint was trained as")
    to_hf_cmd.add_argument("--layout", choices=LAYOUTS, default="llama",
                           help="llama: LlamaForCausalLM, loads in stock transformers (default); "
                           "native: the family's own HF names and config (needs its remote code)")
    to_hf_cmd.add_argument("--dtype", choices=sorted(DTYPES),
                           help="dtype of the weights (default: the checkpoint's)")
    to_hf_cmd.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")

    for command in (to_dcp, to_hf_cmd):
        command.add_argument("--overwrite", action="store_true",
                             help="write into a non-empty OUT_DIR, replacing an earlier conversion's files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one conversion; a conversion error prints one line and exits with status 2."""
    options = _parser().parse_args(argv)
    try:
        if options.command == "hf_to_dcp":
            args = hf_to_dcp(options.hf_dir, options.out_dir, options.name, options.flavor, options.overwrite)
            flavors = _matching_flavors(args) or ["a new flavor in titanlm/models/flavors.py (none matches)"]
            print(f"wrote DCP checkpoint {options.out_dir} for {args}; "
                  f"train from it with {' or '.join(flavors)}")
        else:
            files = dcp_to_hf(options.dcp_dir, options.out_dir, options.name, options.flavor, options.layout,
                              options.dtype, options.max_shard_size, options.overwrite)
            print(f"wrote {len(files)} files to {options.out_dir}")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
