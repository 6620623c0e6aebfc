"""Which model a run trains, resolved once: family, architecture, starting weights and tokenizer.

A run names its model either by flavor (`model.name` + `model.flavor`, a row of flavors.py) or by a
Hugging Face folder (`model.hf_path`), whose config.json gives the architecture, whose tokenizer
files give the tokenizer and whose safetensors give the starting weights.

Every checkpoint titanlm writes carries the resolved spec as `titanlm_model.json` plus a copy of the
tokenizer files under `tokenizer/`, so that export and generation need no model flags and still work
when the original folders are gone.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from titanlm.config.job_config import Model
from titanlm.models.flavors import FLAVORS, ModelArgs, RopeScaling, get_model_args, with_layers
from titanlm.models.hf_adapter import (
    FAMILY_OF_MODEL_TYPE,
    ConversionError,
    StateDict,
    args_from_hf_config,
    check_model_matches,
    model_mismatch,
)
from titanlm.models.hf_checkpoint import (
    check_hf_weights,
    read_hf_model,
    read_json,
    require_dir,
    tokenizer_file,
    tokenizer_file_at,
    tokenizer_files,
)

logger = logging.getLogger("titanlm")

DEFAULT_NAME, DEFAULT_FLAVOR = "llama3", "debug"
RECORD_FILE = "titanlm_model.json"
RECORD_TOKENIZER_DIR = "tokenizer"
RECORD_VERSION = 2  # the version written now
RECORD_VERSION_WITH_MANIFEST = 2  # from this version on, a checkpoint also has a manifest (checkpoint/manifest.py)


class ModelSpecError(ConversionError):
    """A model setting, HF folder or record that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    family: str  # llama3, internlm or internlm2: picks chat format and native HF layout
    args: ModelArgs
    flavor: str = ""  # the flavor's name; "" for a model described by an HF config.json
    hf_path: str = ""  # HF folder the starting weights come from; "" = none
    tokenizer_path: str = ""  # tokenizer file; "" = none

    def describe(self) -> str:
        """For log lines: 'llama3/8B' or 'llama3 from ./Llama-3.2-1B'."""
        return f"{self.family}/{self.flavor}" if self.flavor else f"{self.family} from {self.hf_path}"


def resolve_model_spec(model: Model) -> ModelSpec:
    """The model a [model] config section names. Pure but for reading config.json and listing files.

    With `hf_path`, `name`/`flavor` are optional; when set they must agree with the folder, since a
    user who names both expects one model and must not silently get the other.
    """
    tokenizer = (
        tokenizer_file_at(model.tokenizer_path, "model.tokenizer_path", must_exist=False)
        if model.tokenizer_path
        else ""
    )
    if not model.hf_path:
        name, flavor = model.name or DEFAULT_NAME, model.flavor or DEFAULT_FLAVOR
        return ModelSpec(name, get_model_args(name, flavor, model.n_layers), flavor, tokenizer_path=tokenizer)
    folder = Path(model.hf_path).expanduser()
    require_dir(folder, "model.hf_path")
    config_path = folder / "config.json"
    config = read_json(config_path)
    args = args_from_hf_config(config, str(config_path))
    family = FAMILY_OF_MODEL_TYPE[config["model_type"]]
    source = f"model.hf_path {folder}"
    if model.name and model.name != family:
        raise model_mismatch(
            f"model.name = {model.name!r}",
            source,
            [f"its config.json describes a {family} model"],
            f"drop model.name (the folder decides) or point hf_path at a {model.name} model",
        )
    if model.flavor:
        expected = get_model_args(model.name or family, model.flavor)
        fix = "drop model.flavor (the folder decides) or point hf_path at that model"
        check_model_matches(f"model.flavor = {model.flavor!r}", expected, source, args, fix)
    if not tokenizer:
        found = tokenizer_file(folder)
        if found is None:
            raise ModelSpecError(
                f"model.hf_path {folder} has no tokenizer (tokenizer.json or tokenizer.model); copy the model's "
                "tokenizer files there, or set model.tokenizer_path"
            )
        tokenizer = str(found)
    check_hf_weights(folder, args, config["model_type"])  # before any work, not when loading
    return ModelSpec(family, with_layers(args, model.n_layers), model.flavor, str(folder), tokenizer)


def read_hf_folder(folder: Path, name: str | None = None, flavor: str | None = None) -> tuple[ModelSpec, StateDict]:
    """The model of an HF folder (family from its model_type, tokenizer file if it has one) and its
    weights as a titanlm state dict; `flavor` (with `name`) must match it when given."""
    args, state = read_hf_model(folder, name, flavor)
    family = name or FAMILY_OF_MODEL_TYPE[read_json(folder / "config.json")["model_type"]]
    tokenizer = tokenizer_file(folder)
    return ModelSpec(family, args, flavor or "", str(folder), str(tokenizer) if tokenizer else ""), state


def warn_beyond_trained_length(args: ModelArgs, seq_len: int) -> None:
    """Say when a run trains past the model's length with "dynamic" RoPE scaling, which would only
    start acting there: titanlm keeps plain RoPE, so the model learns the longer positions as such."""
    if args.rope_scaling and args.rope_scaling.kind == "dynamic" and seq_len > args.max_seq_len:
        logger.warning(
            f"training.seq_len {seq_len} is beyond the model's max_position_embeddings {args.max_seq_len}, where its "
            "'dynamic' (NTK) RoPE scaling would rescale positions; titanlm trains plain RoPE at every length, so "
            "the fine-tuned model learns these positions unscaled"
        )


# ---------------------------------------------------------------------------------------------
# The record in every checkpoint


def write_record(folder: str | Path, spec: ModelSpec) -> None:
    """`titanlm_model.json` and a copy of the tokenizer files in checkpoint `folder`."""
    folder = Path(folder)
    tokenizer = ""
    if spec.tokenizer_path:
        target = folder / RECORD_TOKENIZER_DIR
        target.mkdir(parents=True, exist_ok=True)
        for file in tokenizer_files(Path(spec.tokenizer_path)):
            shutil.copy2(file, target / file.name)
        tokenizer = f"{RECORD_TOKENIZER_DIR}/{Path(spec.tokenizer_path).name}"
    record = {
        "version": RECORD_VERSION,
        "family": spec.family,
        "flavor": spec.flavor,
        "args": asdict(spec.args),
        "tokenizer": tokenizer,
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def record_version(folder: str | Path) -> int:
    """The version of a checkpoint's model record; 0 without one, or with one that cannot tell (an
    unreadable record is reported where `read_record` reads it)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return 0
    try:
        version = read_json(path).get("version")
    except ValueError:
        return 0
    return version if isinstance(version, int) else 0


def read_record(folder: str | Path) -> ModelSpec | None:
    """The spec a checkpoint records, with its tokenizer path inside the checkpoint; None for
    checkpoints written before records existed."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    try:
        fields = dict(record["args"])
        if fields.get("rope_scaling"):
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        args = ModelArgs(**fields)
        family = record["family"]
    except (KeyError, TypeError) as err:
        raise ModelSpecError(f"{path} is not a titanlm model record ({err}); it was edited or damaged") from None
    if family not in FLAVORS:
        raise ModelSpecError(f"{path}: family {family!r} is unknown; it was edited or damaged")
    tokenizer = str(Path(folder) / record["tokenizer"]) if record.get("tokenizer") else ""
    return ModelSpec(family, args, record.get("flavor", ""), tokenizer_path=tokenizer)


def checkpoint_spec(folder: str | Path, name: str | None = None, flavor: str | None = None) -> ModelSpec:
    """The model of a DCP checkpoint: its record, or for older checkpoints the flavor named by flags.

    Flags given next to a record must agree with it."""
    recorded = read_record(folder)
    if recorded is None:
        if not (name and flavor):
            raise ModelSpecError(
                f"{folder} has no {RECORD_FILE} (it predates checkpoints that record their model); pass "
                "--model.name and --model.flavor as the checkpoint was trained"
            )
        return ModelSpec(name, get_model_args(name, flavor), flavor)
    source = f"{folder}/{RECORD_FILE}"
    if name and name != recorded.family:
        raise model_mismatch(f"--model.name {name}", source, [f"it records a {recorded.family} model"], "drop it")
    if flavor:
        expected = get_model_args(name or recorded.family, flavor)
        check_model_matches(f"--model.flavor {flavor}", expected, source, recorded.args, "drop it")
    return recorded
