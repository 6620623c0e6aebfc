"""Convert between Hugging Face model folders and titanlm's DCP checkpoints.

    python -m titanlm.tools.convert hf_to_dcp HF_DIR OUT_DIR [--model.name NAME --model.flavor FLAVOR]
    python -m titanlm.tools.convert dcp_to_hf DCP_DIR OUT_DIR [--layout llama|native]
        [--dtype bfloat16|float16|float32] [--max_shard_size 5GB] [--tokenizer_path PATH]

The DCP side keeps the model under the top-level key "model", as the trainer's checkpoints do, and
carries the model record (titanlm_model.json + tokenizer copy), so a converted HF model can be the
trainer's `checkpoint.initial_load_path` and any trainer checkpoint exports with no model flags.
Checkpoints from before records existed need `--model.name`/`--model.flavor`. Keys, shapes and
the model are checked in full before anything is written, and inputs are only ever read.

Output is written into a temporary sibling folder and moved into place only when complete, so a
failed conversion (a full or read-only disk: one line) never damages an earlier one in OUT_DIR.
--overwrite replaces only such an earlier conversion (an HF export for dcp_to_hf, a DCP checkpoint
for hf_to_dcp); another checkpoint, a run's checkpoint folder or other files are refused.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from titanlm.checkpoint.diagnosis import file_system_failure
from titanlm.checkpoint.hf_export import LAYOUTS, export_hf_folder
from titanlm.checkpoint.layout import Kind, classify
from titanlm.checkpoint.manifest import write_manifest
from titanlm.checkpoint.single_process import (
    MODEL_KEY,
    checked_checkpoint_spec,
    dcp_model_entries,
    read_model_state,
    single_process_dcp,
)
from titanlm.models import FLAVORS, ModelArgs
from titanlm.models.hf_adapter import ConversionError, flavor_differences
from titanlm.models.hf_checkpoint import HF_INDEX
from titanlm.models.spec import ModelSpec, read_hf_folder, write_record
from titanlm.tools.common import run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What each direction writes, so that --overwrite replaces exactly its own earlier output.
_HF_OUTPUTS = (
    "model*.safetensors",
    HF_INDEX,
    "config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "tokenization_*.py",
)
_DCP_OUTPUTS = ("*.distcp", ".metadata", "titanlm_model.json", "tokenizer")
_OUTPUT_NAMES = {Kind.HF: "Hugging Face export", Kind.DCP: "DCP conversion"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def hf_to_dcp(
    hf_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    flavor: str | None = None,
    overwrite: bool = False,
) -> ModelSpec:
    """Write the HF checkpoint in `hf_dir` as a DCP checkpoint {"model": titanlm state dict} with
    its model record and, when the folder has one, its tokenizer."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    spec, state = read_hf_folder(hf_dir, name, flavor)
    with _staged_output(out_dir, hf_dir, overwrite, _DCP_OUTPUTS, Kind.DCP) as staging:
        single_process_dcp(dcp.save, {MODEL_KEY: state}, staging)
        write_record(staging, spec)
        write_manifest(str(staging), [], step=0, consecutive_skips=0)  # written last: covers every file above
    return spec


def dcp_to_hf(
    dcp_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    flavor: str | None = None,
    layout: str = "llama",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizer_path: str = "",
) -> list[Path]:
    """Write the "model" entries of a DCP checkpoint as an HF folder: safetensors, config.json and
    the tokenizer the checkpoint records (or `tokenizer_path`).

    The model comes from the checkpoint's record; `name`/`flavor` are needed only for checkpoints
    without one. `dtype` None keeps the checkpoint's. Returns the files written.
    """
    dcp_dir, out_dir = Path(dcp_dir), Path(out_dir)
    if layout not in LAYOUTS:
        raise ConversionError(f"--layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    shard_bytes = parse_size(max_shard_size)
    spec = checked_checkpoint_spec(dcp_dir, name, flavor)
    if tokenizer_path:
        spec = replace(spec, tokenizer_path=tokenizer_path)
    target = DTYPES[dtype] if dtype else dcp_model_entries(dcp_dir)["tok_embeddings.weight"].properties.dtype
    with _staged_output(out_dir, dcp_dir, overwrite, _HF_OUTPUTS, Kind.HF) as staging:
        files = export_hf_folder(read_model_state(dcp_dir), spec, staging, target, layout, shard_bytes)
    return [out_dir / file.name for file in files]


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, as Hugging Face's max_shard_size reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConversionError(f"--max_shard_size '{text}' is not a size; use e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


class _staged_output:
    """A temporary sibling of OUT_DIR to write into, moved into place only when the block succeeds.

    OUT_DIR is checked first: never the input folder; empty or absent, or with --overwrite a folder of
    the kind this direction writes (`kind`: an earlier conversion), never another checkpoint, a run's
    checkpoint folder or a folder of other files. On success an --overwrite replaces only the files an
    earlier conversion wrote there (`outputs`), so stale shards cannot sit beside a new index; on
    failure the staging folder is removed and OUT_DIR is untouched, and a failure of the file system
    (a full disk, a read-only one) is one line naming OUT_DIR.
    """

    def __init__(self, out_dir: Path, in_dir: Path, overwrite: bool, outputs: Sequence[str], kind: Kind) -> None:
        if out_dir.resolve() == in_dir.resolve():
            raise ConversionError(f"OUT_DIR '{out_dir}' is the input folder; write the conversion to another folder")
        if out_dir.exists() and not out_dir.is_dir():
            raise ConversionError(f"OUT_DIR '{out_dir}' exists and is not a folder; choose another path")
        if out_dir.exists() and any(out_dir.iterdir()):
            if not overwrite:
                raise ConversionError(
                    f"OUT_DIR '{out_dir}' exists and is not empty; choose a new or empty folder, or pass "
                    "--overwrite to replace the files an earlier conversion wrote there"
                )
            found = classify(str(out_dir))
            if found is not kind:
                what = f"is {found.value}" if found is not Kind.NONE else f"holds files that are not {kind.value}"
                raise ConversionError(
                    f"OUT_DIR '{out_dir}' {what}; --overwrite replaces only an earlier {_OUTPUT_NAMES[kind]} or an "
                    "empty folder: choose another OUT_DIR"
                )
        self.out_dir, self.outputs = out_dir, outputs
        self.staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"

    def __enter__(self) -> Path:
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
        except OSError as error:
            where = error.filename if error.filename != str(self.staging) else self.out_dir.parent
            raise ConversionError(
                f"OUT_DIR '{self.out_dir}' cannot be written ({error.strerror}: {where}); nothing was written; "
                "choose another OUT_DIR"
            ) from None
        return self.staging

    def __exit__(self, error_type: type | None, error: BaseException | None, *rest: Any) -> None:
        if error is not None:
            failure = _file_system_failure(error, self.out_dir.parent)
            shutil.rmtree(self.staging, ignore_errors=True)
            if failure is not None:
                free = shutil.disk_usage(self.out_dir.parent).free
                raise ConversionError(
                    f"OUT_DIR '{self.out_dir}' cannot be written ({failure}; {free / 2**20:.1f} MiB free there); the "
                    "partial output was removed and the earlier files there are untouched; free space or choose "
                    "another OUT_DIR"
                ) from None
            return
        if not self.out_dir.exists():
            self.staging.rename(self.out_dir)
            return
        for pattern in self.outputs:
            for path in self.out_dir.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        for path in self.staging.iterdir():
            path.rename(self.out_dir / path.name)
        self.staging.rmdir()


def _file_system_failure(error: BaseException, folder: Path) -> str | None:
    """What went wrong when writing the output failed on the file system (a full or read-only disk), or
    None for anything else: a bug keeps its traceback."""
    if not isinstance(error, (OSError, RuntimeError, SafetensorError, CheckpointException)):
        return None
    failure = file_system_failure(error, str(folder))
    return failure[1] if failure else None


# ---------------------------------------------------------------------------------------------
# Command line


def _matching_flavors(args: ModelArgs) -> list[str]:
    return [
        f"--model.name {name} --model.flavor {flavor}"
        for name, flavors in FLAVORS.items()
        for flavor, known in flavors.items()
        if not flavor_differences(args, known)
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.convert",
        description="Convert between Hugging Face safetensors and titanlm DCP checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_dcp = commands.add_parser("hf_to_dcp", help="HF model folder -> DCP checkpoint {'model': ...}")
    to_dcp.add_argument("hf_dir", help="folder with config.json and model*.safetensors")
    to_dcp.add_argument("out_dir", help="new or empty folder for the DCP checkpoint")
    to_dcp.add_argument(
        "--model.name",
        dest="name",
        choices=sorted(FLAVORS),
        help="family of --model.flavor (default: from config.json's model_type)",
    )
    to_dcp.add_argument(
        "--model.flavor",
        dest="flavor",
        help="check the weights against this flavor (default: derive the model from config.json)",
    )

    to_hf_cmd = commands.add_parser("dcp_to_hf", help="DCP checkpoint (e.g. a trainer step-N folder) -> HF folder")
    to_hf_cmd.add_argument("dcp_dir", help="DCP checkpoint folder (with .metadata)")
    to_hf_cmd.add_argument("out_dir", help="new or empty folder for the HF model")
    to_hf_cmd.add_argument(
        "--model.name",
        dest="name",
        choices=sorted(FLAVORS),
        help="model family the checkpoint was trained as (only for checkpoints without titanlm_model.json)",
    )
    to_hf_cmd.add_argument(
        "--model.flavor",
        dest="flavor",
        help="flavor the checkpoint was trained as (only for checkpoints without titanlm_model.json)",
    )
    to_hf_cmd.add_argument(
        "--tokenizer_path",
        default="",
        help="tokenizer to ship with the export (default: the one the checkpoint records)",
    )
    to_hf_cmd.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="llama",
        help="llama: LlamaForCausalLM, loads in stock transformers (default); "
        "native: the family's own HF names and config (needs its remote code)",
    )
    to_hf_cmd.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the weights (default: the checkpoint's)")
    to_hf_cmd.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")

    for command in (to_dcp, to_hf_cmd):
        command.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an earlier conversion in OUT_DIR (its files only; a folder of any other kind is refused)",
        )
    return parser


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    """Run one conversion; an input it cannot use prints one line and exits with status 2."""
    options = _parser().parse_args(argv)
    if options.command == "hf_to_dcp":
        spec = hf_to_dcp(options.hf_dir, options.out_dir, options.name, options.flavor, options.overwrite)
        model = _matching_flavors(spec.args) or [f"--model.hf_path {options.hf_dir}"]
        print(
            f"wrote DCP checkpoint {options.out_dir} ({spec.family}, {spec.args.n_layers} layers, dim "
            f"{spec.args.dim}{', tokenizer included' if spec.tokenizer_path else ', no tokenizer found'}); "
            f"train from it with {' or '.join(model)} --checkpoint.initial_load_path {options.out_dir} "
            "--checkpoint.load_content model"
        )
    else:
        files = dcp_to_hf(
            options.dcp_dir,
            options.out_dir,
            options.name,
            options.flavor,
            options.layout,
            options.dtype,
            options.max_shard_size,
            options.overwrite,
            options.tokenizer_path,
        )
        print(f"wrote {len(files)} files to {options.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
