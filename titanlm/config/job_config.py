"""The job configuration: one dataclass per TOML section.

Every field carries its default, a one-line help string and, where not every value of its type
works, a `check`: the range the config loader enforces. `--help`, the README table and the error
messages are all generated from these, so this file is the single source of truth for
configuration names and their single-key ranges (relations between keys live in plan.py).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """The values a field accepts: `ok(value)`, and `must`, the phrase after "must be" in `--help` and
    in the loader's error; `note`, what a special value means, follows it in the error only, as the
    field's help already says it."""

    ok: Callable[[Any], bool]
    must: str
    note: str = ""


def at_least(low: int, note: str = "") -> Check:
    return Check(lambda v: v >= low, f">= {low}", note)


def at_least_one_or_minus_one(note: str) -> Check:
    """A count, or -1 for a value derived from other settings (`note` says which)."""
    return Check(lambda v: v >= 1 or v == -1, ">= 1, or -1", note)


def between(low: float, high: float, ends: str = "[]") -> Check:
    """low to high, ends written as intervals are: "[)" takes low but not high, "()" neither."""
    above = operator.ge if ends[0] == "[" else operator.gt
    below = operator.le if ends[1] == "]" else operator.lt
    return Check(lambda v: above(v, low) and below(v, high), f"in {ends[0]}{low:g}, {high:g}{ends[1]}")


def finite(note: str = "") -> Check:
    return Check(math.isfinite, "a finite number", note)


def finite_at_least(low: float) -> Check:
    return Check(lambda v: math.isfinite(v) and v >= low, f"a finite number >= {low:g}")


def finite_above(low: float) -> Check:
    return Check(lambda v: math.isfinite(v) and v > low, f"a finite number > {low:g}")


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, check: Check | None = None) -> Any:
    """A dataclass field with a default, the one-line help shown by `--help`, for string fields with a
    fixed set of values the allowed `choices`, and for others the `check` of their range; the config
    loader enforces both."""
    metadata = {"help": help, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Job:
    config_file: str = opt("", "TOML file to read; CLI overrides win over it")
    dump_folder: str = opt("./outputs", "folder for logs, metrics.jsonl, TensorBoard and checkpoints")
    description: str = opt("", "free text shown in the first log line")
    print_config: bool = opt(False, "print the resolved configuration at start")


@dataclass
class Model:
    name: str = opt(
        "",
        "model family: llama3, internlm (v1) or internlm2; empty = llama3, or the family of model.hf_path",
        choices=("", "llama3", "internlm", "internlm2"),
    )
    flavor: str = opt(
        "",
        "size within the family, e.g. debug, 8B, 3.1-8B, 3.2-1B, 1.8B, 7B, 20B; empty = debug, or the model "
        "of model.hf_path",
    )
    hf_path: str = opt(
        "",
        "Hugging Face model folder (config.json, safetensors, tokenizer files): the architecture, the tokenizer "
        "and, when there is no checkpoint to resume, the starting weights",
    )
    n_layers: int = opt(
        0,
        "override the flavor's layer count, keeping its width (0 = the flavor's own)",
        check=at_least(0, "0 = the flavor's own"),
    )
    tokenizer_path: str = opt(
        "",
        "tokenizer file (SentencePiece .model, tiktoken ranks or tokenizer.json) or a folder holding one; "
        "empty = model.hf_path's, the demo's, or none",
    )
    attention_backend: str = opt(
        "auto",
        "attention kernel: auto (sdpa on CPU; varlen or flex on CUDA), sdpa, flex or varlen; "
        "packed documents stay separate with every backend",
        choices=("auto", "sdpa", "flex", "varlen"),
    )


@dataclass
class Training:
    steps: int = opt(100, "number of optimizer steps", check=at_least(1))
    seq_len: int = opt(128, "tokens per sample (InternEvo SEQ_LEN)", check=at_least(1))
    local_batch_size: int = opt(8, "samples per micro-batch on each data-parallel rank (micro_bsz)", check=at_least(1))
    global_batch_size: int = opt(
        -1,
        "samples per optimizer step over all ranks; -1 = local_batch_size x dp degree. "
        "Accumulation steps (micro_num) = global / (local x dp)",
        check=at_least_one_or_minus_one("-1 = local_batch_size x data-parallel degree"),
    )
    loss_chunk_tokens: int = opt(
        0,
        "compute the output projection and loss this many tokens at a time, recomputing each chunk in "
        "backward, so the full [tokens, vocab] logits never exist (long sequences, large vocabularies); "
        "also under TP (a rank's chunk holds its vocabulary share) and PP (on the last stage); 0 = off",
        check=at_least(0, "0 = off"),
    )
    max_norm: float = opt(
        1.0,
        "gradient clipping norm; <= 0 disables clipping (the norm is still logged)",
        check=finite("<= 0 = no clipping"),
    )
    mixed_precision_param: str = opt(
        "auto",
        "parameter/compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    mixed_precision_reduce: str = opt(
        "float32", "gradient reduce-scatter dtype: float32 or bfloat16", choices=("float32", "bfloat16")
    )
    skip_nan_inf_steps: bool = opt(True, "skip an optimizer step whose grad norm is inf/NaN and count it")
    max_consecutive_skips: int = opt(
        20,
        "stop the run (exit 3; the stopping step is not saved) after this many skipped inf/NaN steps in a row: "
        "the run has diverged; 0 = never stop",
        check=at_least(0, "0 = never stop"),
    )


@dataclass
class GradScaler:
    """Dynamic loss scaling for float16, with InternEvo's knobs (the grad_scaler section of InternLM's 7B_sft.py).
    The loader checks these ranges only where training.mixed_precision_param is float16, the one precision
    that reads them: InternEvo configs carry the section whatever their precision."""

    initial_scale: float = opt(2.0**16, "starting loss scale", check=finite_above(0))
    min_scale: float = opt(1.0, "the scale never drops below this", check=finite_above(0))
    max_scale: float = opt(2.0**24, "the scale never grows above this", check=finite_above(0))
    growth_interval: int = opt(1000, "finite steps in a row before the scale grows", check=at_least(1))
    growth_factor: float = opt(2.0, "multiplier applied when the scale grows", check=finite_above(1))
    backoff_factor: float = opt(0.5, "multiplier applied when the scale shrinks", check=between(0, 1, "()"))
    hysteresis: int = opt(2, "overflowing steps tolerated before the scale shrinks", check=at_least(1))


@dataclass
class Data:
    dataset: str = opt(
        "auto",
        "random (random tokens), demo (bundled generated corpus + its tokenizer), bin (InternEvo "
        "bin/meta folder); auto = bin when train_folder is set, else demo",
        choices=("auto", "random", "demo", "bin"),
    )
    train_folder: str = opt("", "InternEvo tokenized folder (type sub-folders of *.bin + *.bin.meta)")
    cache_folder: str = opt("~/.cache/titanlm", "where the demo corpus and its tokenizer are generated")
    num_workers: int = opt(0, "dataloader worker processes", check=at_least(0, "0 = load in the training process"))
    pack_sample_into_one: bool = opt(
        False,
        "bin data: attend across the documents packed in a row, positions 0..seq_len-1; false = attention "
        "and positions restart at every document (InternEvo pack_sample_into_one)",
    )
    min_length: int = opt(
        0,
        "bin data: drop documents with fewer tokens than this (InternEvo MIN_LENGTH)",
        check=at_least(0, "0 = keep every document"),
    )
    dataset_weights: list[str] = opt(
        [],
        "bin data: token share per type folder as TYPE:WEIGHT items, e.g. en:0.7,code:0.3 (TOML: ['en:0.7', "
        "'code:0.3']); types left out are not used; empty = natural proportions",
    )
    valid_folder: str = opt("", "bin/meta folder of validation data; empty = no validation")
    valid_every: int = opt(0, "validate every this many steps; 0 = never", check=at_least(0, "0 = never"))


@dataclass
class Optimizer:
    name: str = opt("AdamW", "optimizer: AdamW or Adam", choices=("AdamW", "Adam"))
    lr: float = opt(3e-4, "peak learning rate", check=finite_at_least(0))
    beta1: float = opt(0.9, "Adam beta1", check=between(0, 1, "[)"))
    beta2: float = opt(0.95, "Adam beta2", check=between(0, 1, "[)"))
    eps: float = opt(1e-8, "Adam epsilon", check=finite_above(0))
    weight_decay: float = opt(0.1, "decoupled weight decay", check=finite_at_least(0))
    implementation: str = opt(
        "auto",
        "kernel: auto (fused on GPU, foreach on CPU), fused, foreach or for-loop",
        choices=("auto", "fused", "foreach", "for-loop"),
    )


@dataclass
class LRScheduler:
    warmup_steps: int = opt(0, "linear warmup steps (set this or warmup_ratio, not both)", check=at_least(0))
    warmup_ratio: float = opt(
        0.0, "warmup as a fraction of training.steps (InternEvo warmup_ratio)", check=between(0, 1, "[)")
    )
    decay_type: str = opt(
        "cosine", "decay after warmup: cosine, linear or constant", choices=("cosine", "linear", "constant")
    )
    min_lr_factor: float = opt(
        0.0, "floor of the decay as a fraction of lr (InternEvo eta_min / lr)", check=between(0, 1)
    )


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "HSDP replicas (pure DDP-style replication)", check=at_least(1))
    data_parallel_shard_degree: int = opt(
        -1,
        "FSDP shard group size; -1 = whatever the other degrees leave",
        check=at_least_one_or_minus_one("-1 = whatever the other degrees leave"),
    )
    fsdp_reshard_after_forward: str = opt(
        "default",
        "free gathered params after forward: default (yes, except the root; never under pipeline "
        "parallelism), always (ZeRO-3), never (ZeRO-2: keep them for backward)",
        choices=("default", "always", "never"),
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "keep parameters, gradients and optimizer state in host memory (FSDP2 CPUOffloadPolicy, also on one "
        "GPU); costs a host-device copy of each block per pass, and the optimizer step runs on the CPU",
    )
    tensor_parallel_degree: int = opt(1, "tensor parallel size (InternEvo tensor)", check=at_least(1))
    sequence_parallel: bool = opt(
        True, "with tensor parallelism, split norms/residuals along the sequence (Megatron SP)"
    )
    disable_loss_parallel: bool = opt(
        False, "with tensor parallelism, gather full logits instead of a vocab-sharded cross-entropy"
    )
    pipeline_parallel_degree: int = opt(1, "pipeline parallel size (InternEvo pipeline)", check=at_least(1))
    pipeline_parallel_schedule: str = opt(
        "1F1B",
        "pipeline schedule: GPipe, 1F1B (one stage per rank), Interleaved1F1B, LoopedBFS, "
        "InterleavedZeroBubble (pipeline_parallel_virtual_stages per rank), ZBVZeroBubble, DualPipeV (2 per rank)",
        choices=(
            "GPipe",
            "1F1B",
            "Interleaved1F1B",
            "LoopedBFS",
            "InterleavedZeroBubble",
            "ZBVZeroBubble",
            "DualPipeV",
        ),
    )
    pipeline_parallel_virtual_stages: int = opt(2, "stages per rank for the looped schedules")
    pipeline_parallel_stage_layers: list[int] = opt(
        [],
        "layers per stage, e.g. 3,5,5,3 (TOML: [3, 5, 5, 3]) to lighten the embedding/output stages; "
        "empty = even split",
    )
    context_parallel_degree: int = opt(1, "context parallel size (sequence split across ranks)", check=at_least(1))


@dataclass
class Checkpoint:
    """DCP checkpoints in {job.dump_folder}/{folder}/step-N (InternEvo's ckpt section); layout and
    resume rules: titanlm/checkpoint/start.py and manager.py."""

    enable: bool = opt(
        False,
        "save checkpoints, resume from the newest complete one, and save then exit 0 on SIGTERM/SIGUSR1 "
        "(InternEvo auto_resume)",
    )
    folder: str = opt("checkpoint", "checkpoint folder, relative to job.dump_folder")
    interval: int = opt(500, "save every this many steps, and at the last step", check=at_least(1))
    keep_latest_k: int = opt(0, "keep only the newest k complete checkpoints; 0 = keep all", check=at_least(0))
    async_mode: str = opt(
        "disabled",
        "disabled; async (write in a background thread while training goes on); async_with_pinned_mem "
        "(a background process fed through pinned shared memory; GPU only, else async)",
        choices=("disabled", "async", "async_with_pinned_mem"),
    )
    load_step: int = opt(-1, "resume from step-N of folder; -1 = the newest complete checkpoint")
    initial_load_path: str = opt(
        "",
        "DCP checkpoint to start from when folder holds none: a step-N folder of another run, a "
        "step-N-model export or a converted HF model (InternEvo load_ckpt_info path)",
    )
    load_content: list[str] = opt(
        ["all"],
        "what to take from initial_load_path: all, or some of model, optimizer, lr_scheduler, dataloader, "
        "train_state (e.g. model = weights only, from step 0; TOML: ['model']; InternEvo content). A resume "
        "from folder always loads all",
    )
    last_save_model_only: bool = opt(
        False, "at the last step save only the weights, as step-N-model in export_dtype, not a full checkpoint"
    )
    export_dtype: str = opt(
        "float32",
        "dtype of the last_save_model_only and last_save_in_hf weights",
        choices=("float32", "bfloat16", "float16"),
    )
    last_save_in_hf: bool = opt(
        False,
        "at the last step also write a Hugging Face folder (safetensors, config.json, tokenizer) as step-N-hf, "
        "loadable with transformers' AutoModelForCausalLM",
    )
    verify: bool = opt(
        True,
        "check every file of the checkpoint to load against the checksums its manifest recorded at save time "
        "(sizes are always checked); false = sizes only, for very large checkpoints on slow file systems",
    )
    stop_file: str = opt(
        "",
        "InternEvo stop file, read every step: N = save at step N and exit 0, -N = save at step N and "
        "go on; empty = {job.dump_folder}/{folder}/STOP",
    )


@dataclass
class Metrics:
    log_freq: int = opt(10, "log a metrics line every this many steps", check=at_least(1))
    enable_tensorboard: bool = opt(False, "write TensorBoard scalars under job.dump_folder/tb")
    peak_tflops: float = opt(-1.0, "device peak TFLOP/s for MFU; -1 = look the device up in the known table")
    enable_wandb: bool = opt(
        False,
        "log the same records to Weights & Biases (pip install 'titanlm[wandb]'), as a run named after "
        "job.description or else the dump folder; WANDB_MODE=offline keeps them under job.dump_folder/wandb",
    )
    wandb_project: str = opt("titanlm", "Weights & Biases project of the run")


@dataclass
class ActivationCheckpoint:
    mode: str = opt(
        "none",
        "recompute activations in backward: none, full (whole blocks) or selective (keep matmul and "
        "attention outputs, recompute the elementwise ops)",
        choices=("none", "full", "selective"),
    )
    layer_fraction: float = opt(
        1.0,
        "full mode: share of the blocks (the first ones) to recompute (InternEvo checkpoint = 0.5)",
        check=between(0, 1, "(]"),
    )


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each transformer block and the loss")


@dataclass
class Float8:
    enable: bool = opt(False, "train Linear layers in float8 through torchao (all but the output layer)")
    recipe_name: str = opt("tensorwise", "torchao float8 scaling recipe", choices=("tensorwise", "rowwise"))
    enable_fsdp_float8_all_gather: bool = opt(False, "all-gather FSDP parameters in float8 (tensorwise recipe only)")


@dataclass
class Debug:
    seed: int = opt(
        42,
        "seed for weights, data order and dropout-free RNG use",
        check=Check(lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    )
    deterministic: bool = opt(False, "use deterministic kernels only (slower, bitwise repeatable)")


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    grad_scaler: GradScaler = field(default_factory=GradScaler)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    debug: Debug = field(default_factory=Debug)
