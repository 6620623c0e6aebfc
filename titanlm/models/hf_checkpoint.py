"""Reading a Hugging Face model folder (config.json + safetensors) as titanlm weights.

Shared by the conversion tool and by training that starts from an HF folder directly. Every
tensor's name and shape is checked against the model config.json describes before any is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from titanlm.errors import MissingFileError
from titanlm.files import give_default_mode, read_json_file
from titanlm.models.flavors import ModelArgs
from titanlm.models.hf_adapter import (
    FAMILY_OF_MODEL_TYPE,
    ConversionError,
    StateDict,
    args_from_hf_config,
    check_flavor,
    from_hf,
    to_hf,
)
from titanlm.models.transformer import Transformer
from titanlm.progress import progress

Shapes = dict[str, tuple[int, ...]]
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
SHOWN_KEYS = 10  # keys listed per kind of mismatch; the rest are counted


def meta_state_dict(args: ModelArgs) -> StateDict:
    """The parameters a model of `args` has, without allocating them."""
    with torch.device("meta"):
        return Transformer(args).state_dict()


def tensor_shapes(state_dict: StateDict) -> Shapes:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def natural_key(key: str) -> list[tuple[int, int, str]]:
    """Sort key putting layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


Mismatch = dict[str, list[str]]  # "missing keys", "unexpected keys", "wrong shapes" -> keys, in natural order


def tensor_mismatch(actual: Shapes, expected: Shapes) -> Mismatch:
    """How the stored tensors `actual` differ from a model's `expected` ones, by name and shape: the one
    comparison behind every check of weights against a model (HF folders, DCP checkpoints, resumes)."""
    return {
        "missing keys": sorted(expected.keys() - actual.keys(), key=natural_key),
        "unexpected keys": sorted(actual.keys() - expected.keys(), key=natural_key),
        "wrong shapes": [
            f"{key} {list(actual[key])} (expected {list(expected[key])})"
            for key in sorted(expected.keys() & actual.keys(), key=natural_key)
            if actual[key] != expected[key]
        ],
    }


def mismatch_line(source: str, mismatch: Mismatch, fix: str) -> str | None:
    """The one error line for a mismatch, naming `source` (plural: "the safetensors in DIR") and the
    `fix`; None when nothing differs."""
    problems = [
        f"{len(items)} {label}: {', '.join(items[:SHOWN_KEYS])}{', ...' if len(items) > SHOWN_KEYS else ''}"
        for label, items in mismatch.items()
        if items
    ]
    return f"{source} do not fit the model: {'; '.join(problems)}. {fix}" if problems else None


def check_tensors(actual: Shapes, expected: Shapes, source: str, fix: str) -> None:
    """One error listing missing keys, unexpected keys and wrong shapes together."""
    line = mismatch_line(source, tensor_mismatch(actual, expected), fix)
    if line:
        raise ConversionError(line)


def require_dir(path: Path, role: str) -> None:
    if not path.is_dir():
        raise ConversionError(f"{role} '{path}' is not an existing folder")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of an HF model folder (config.json, the index), which the folder must have."""
    if not path.is_file():
        raise ConversionError(f"{path} is missing; a Hugging Face model folder needs it")
    return read_json_file(path, ConversionError, "fix it or download it again", dict)


# A tokenizer in an HF folder: the file the tokenizer is read from, in order of preference (the fast
# tokenizer.json, else a SentencePiece or tiktoken tokenizer.model), and the files that go with it.
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_COMPANIONS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "tokenizer.json",
    "generation_config.json",
)


def tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file of an HF model (or tokenizer) folder, or None."""
    for name in TOKENIZER_MAIN_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def tokenizer_file_at(path: str, setting: str, must_exist: bool = True) -> str:
    """The tokenizer file a setting names: the file itself, or the one an HF model or tokenizer folder
    holds (tokenizer.json first); the error names `setting`, the key or flag that gave the path. Without
    `must_exist` a path that is no folder is taken as it is, to be checked where it is read (a dry run
    plans for machines whose files this one may not have)."""
    full = Path(path).expanduser()
    if full.is_dir():
        found = tokenizer_file(full)
        if found is None:
            raise MissingFileError(
                f"tokenizer {path} is a folder without tokenizer.json or tokenizer.model; check {setting} (a "
                "tokenizer file, or a folder that has one)"
            )
        return str(found)
    if must_exist and not full.is_file():
        raise MissingFileError(
            f"tokenizer {path} does not exist; check {setting} (a SentencePiece .model, tiktoken ranks file, "
            "HF tokenizer.json, or a folder that has one)"
        )
    return path


def tokenizer_files(tokenizer: Path) -> list[Path]:
    """The tokenizer file and the companions beside it that HF's AutoTokenizer reads (its config,
    special tokens, remote tokenization code), so a copy of them loads the same anywhere."""
    folder = tokenizer.parent
    companions = [folder / name for name in TOKENIZER_COMPANIONS if (folder / name).is_file()]
    code = sorted(folder.glob("tokenization_*.py"))
    return list(dict.fromkeys([tokenizer, *companions, *code]))


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The shards the index lists, or the single model.safetensors."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no 'weight_map'; re-download it")
        files = [hf_dir / file for file in sorted(set(weight_map.values()))]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise ConversionError(f"{index} lists shards missing from {hf_dir}: {', '.join(absent)}; download them")
        return files
    if (hf_dir / HF_SINGLE).is_file():
        return [hf_dir / HF_SINGLE]
    has_bin = any(hf_dir.glob("*.bin"))
    hint = " (it has *.bin weights: re-save them with safe_serialization=True)" if has_bin else ""
    raise ConversionError(f"{hf_dir} has neither {HF_SINGLE} nor {HF_INDEX}{hint}")


def safetensors_shapes(files: list[Path]) -> Shapes:
    """Tensor shapes from the shard headers, so a mismatch is reported before any data is read."""
    shapes: Shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if not key.endswith("rotary_emb.inv_freq"):  # a buffer older exports saved
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:  # SafetensorError for a damaged header
            raise ConversionError(
                f"{file} cannot be read ({err}); the file is damaged or truncated: re-download it"
            ) from None
    return shapes


def read_hf_model(
    hf_dir: str | Path, name: str | None = None, flavor: str | None = None
) -> tuple[ModelArgs, StateDict]:
    """The HF checkpoint in `hf_dir` as titanlm ModelArgs and a full titanlm state dict.

    The model is derived from config.json; with `flavor` (and `name`, defaulting to the family of
    the config's model_type) it must also equal that titanlm flavor. Every tensor is checked
    against the config before any is read; tensors keep their dtype.
    """
    hf_dir = Path(hf_dir)
    require_dir(hf_dir, "HF_DIR")
    if name is not None and flavor is None:
        raise ConversionError(
            "--model.name needs --model.flavor to check the weights against; add it or drop --model.name"
        )
    config_path = hf_dir / "config.json"
    config = read_json(config_path)
    args = args_from_hf_config(config, str(config_path))
    model_type = config["model_type"]
    if flavor is not None:
        check_flavor(args, name or FAMILY_OF_MODEL_TYPE[model_type], flavor, str(config_path))
    files = check_hf_weights(hf_dir, args, model_type)
    ignored = _tied_output_names(model_type) if args.tie_embeddings else ()
    hf_state: StateDict = {}
    with progress(total=sum(file.stat().st_size for file in files), desc="read", unit="B", unit_scale=True) as bar:
        for file in files:
            hf_state.update(_load_safetensors(file))
            bar.update(file.stat().st_size)
    return args, from_hf({k: v for k, v in hf_state.items() if k not in ignored}, args, model_type)


def check_hf_weights(hf_dir: Path, args: ModelArgs, model_type: str) -> list[Path]:
    """The safetensors files of `hf_dir`, checked from their headers alone (cheap: no tensor is read)
    to hold exactly the tensors of a model of `args`."""
    files = safetensors_files(hf_dir)
    # A tied model's output is its embedding; some exports store the copy anyway, which HF ignores too.
    ignored = _tied_output_names(model_type) if args.tie_embeddings else ()
    check_tensors(
        {key: shape for key, shape in safetensors_shapes(files).items() if key not in ignored},
        tensor_shapes(to_hf(meta_state_dict(args), args, model_type)),
        source=f"the safetensors in {hf_dir}",
        fix=f"the model {hf_dir / 'config.json'} describes needs exactly these tensors; re-download the "
        "checkpoint or correct config.json",
    )
    return files


def _tied_output_names(model_type: str) -> tuple[str, ...]:
    return ("output.weight",) if model_type == "internlm2" else ("lm_head.weight",)


def _load_safetensors(file: Path) -> StateDict:
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises its own SafetensorError for damaged files
        raise ConversionError(
            f"{file} cannot be read ({err}); the file is damaged or truncated: re-download it"
        ) from None


def write_safetensors(state: StateDict, out_dir: Path, shard_bytes: int) -> list[Path]:
    """HF's layout: one model.safetensors, or model-0000i-of-0000n shards plus an index. The files get
    the mode of any other output (safetensors writes them through a 0600 temporary file)."""
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
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = (
        [HF_SINGLE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    files, weight_map = [], {}
    with progress(total=total, desc="write", unit="B", unit_scale=True) as bar:
        for name, shard in zip(names, shards):
            save_file(shard, out_dir / name, metadata=metadata)
            give_default_mode(out_dir / name)
            weight_map.update(dict.fromkeys(shard, name))
            files.append(out_dir / name)
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) == 1:
        return files
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, out_dir / HF_INDEX]
