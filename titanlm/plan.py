"""Resolve once, then build: every decision a run makes from several settings, made in one place.

`resolve(cfg, world_size, device_type)` is a pure function (no process group, no tensors; it reads
an HF model's config.json when `model.hf_path` names one) returning a frozen `RunPlan`: the mesh
degrees, the model, the batch arithmetic, precision, the FSDP / TP / CP / pipeline layouts,
float8, the attention kernel, loss chunking, the dataset and what a checkpoint load takes. Every
rule that relates two or more settings is checked here, once, as a `ConfigError` or
`ParallelismError` naming the keys; the trainer and the builders read the plan instead of
re-deriving it, and the dry run (`python -m titanlm.plan`, see `titanlm/dry_run.py`) shows it for
any world size without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

import torch
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from titanlm.config.job_config import Debug, Float8, GradScaler, JobConfig, LRScheduler, Optimizer, Training
from titanlm.config.manager import config_to_dict, config_to_toml
from titanlm.data.demo import demo_assets
from titanlm.errors import CheckpointError, ConfigError, ParallelismError, UnsupportedError
from titanlm.models.flavors import ModelArgs
from titanlm.models.spec import ModelSpec, resolve_model_spec, warn_beyond_trained_length
from titanlm.optim import warmup_steps
from titanlm.parallel.parallel_dims import ParallelDims

# What a checkpoint holds (titanlm.checkpoint.content saves and loads these parts).
CHECKPOINT_PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")

# V schedules give rank r the stages r and 2 pp - 1 - r, so the first and last stage share a rank.
V_SCHEDULES = ("zbvzerobubble", "dualpipev")
# Schedules that split backward into input- and weight-gradient passes. Their weight pass runs after the
# input pass, so FSDP2 must keep a stage's gathered parameters from forward until then: with blocks
# resharded after forward the weight gradients are lost (measured on torch 2.13, CPU, gloo: grad norm
# 2-23% low). With "never" (the default under PP) they match 1F1B to 1e-6.
SPLIT_BACKWARD_SCHEDULES = ("interleavedzerobubble", "zbvzerobubble", "dualpipev")
# torch 2.11's stage initialization sends the shapes of a rank's two adjacent V stages to the rank
# itself, which fails ("Pair is not connected" on gloo); measured working on 2.13, 2.12 untested.
V_SCHEDULES_MIN_TORCH = (2, 13)


@dataclass(frozen=True)
class BatchPlan:
    """Samples per micro-batch on one data-parallel rank, per optimizer step overall, and the
    micro-batches each step accumulates (InternEvo's micro_bsz, global batch and micro_num)."""

    seq_len: int
    local_batch_size: int
    global_batch_size: int
    accumulation_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclass(frozen=True)
class LoopPlan:
    """The loop's schedule: the last step, which steps log a line, and after which steps validation runs
    (`valid_every` 0: never, also when there is no validation data)."""

    steps: int
    log_freq: int
    valid_every: int

    def logs(self, step: int) -> bool:
        return step % self.log_freq == 0 or step == 1 or step == self.steps

    def validates(self, step: int) -> bool:
        return self.valid_every > 0 and step % self.valid_every == 0


@dataclass(frozen=True)
class TokenizerPlan:
    """The run's one tokenizer: its file and the setting it comes from (for errors and the log). Its ids
    must fit the model's vocabulary (`DataPlan.vocab_size`), checked where the file is read
    (`titanlm.data.load_run_tokenizer`)."""

    path: str
    origin: str  # model.tokenizer_path, model.hf_path or "the demo corpus"


@dataclass(frozen=True)
class DataPlan:
    """What the data loaders read: `kind` random, demo or bin; `valid_folder` empty = no validation."""

    kind: str
    train_folder: str
    valid_folder: str
    cache_folder: str
    seq_len: int
    local_batch_size: int
    seed: int
    num_workers: int
    pack_sample_into_one: bool
    min_length: int
    dataset_weights: tuple[str, ...]
    vocab_size: int


@dataclass(frozen=True)
class LossPlan:
    """`chunk_tokens` > 0: the model computes the output projection and loss that many tokens at a time;
    otherwise the step computes the loss of whole logits (compiled with the blocks under `RunPlan.compile`)."""

    chunk_tokens: int

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens > 0


@dataclass(frozen=True)
class OutputPlan:
    """What a run writes besides checkpoints, and the resolved configuration it records there."""

    dump_folder: str
    description: str
    print_config: bool
    tensorboard: bool
    wandb: bool
    wandb_project: str
    peak_tflops: float  # -1 = look the device up
    config_toml: str  # the whole configuration as TOML, as config.toml records it
    config_values: dict[str, dict]  # the same as nested dicts, for W&B

    @property
    def run_name(self) -> str:
        """The W&B run's name: the description, else the dump folder's name."""
        return self.description or os.path.basename(os.path.abspath(self.dump_folder))


@dataclass(frozen=True)
class PrecisionPlan:
    """`param_dtype`: the dtype parameters compute in; FSDP casts to it when it wraps the model,
    otherwise (one process: fp32 weights, no FSDP) `autocast_dtype` names the dtype torch.autocast
    computes in, or None for fp32. float16 needs dynamic loss scaling."""

    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    loss_scaling: bool


@dataclass(frozen=True)
class FSDPPlan:
    """`enabled`: parameters are FSDP2-wrapped: always with several ranks (parameters must then all be
    DTensors or none) and with CPU offload (FSDP2 is what keeps them in host memory); never for one
    process, which has nothing to shard: FSDP2 would only copy and cast every parameter twice per step
    and re-gather the bf16 copies for backward (measured: 11% of an H100 step on an 8-layer Llama3-8B
    cut), so one process keeps fp32 weights and computes under autocast, as torchtitan does.

    `reshard_after_forward`: "always" frees gathered parameters after forward (ZeRO-3), "never" keeps
    them until backward (ZeRO-2 traffic), "default" does the former for blocks, not the root. Under
    pipeline parallelism "default" resolves to "never": every micro-batch would gather them again.
    """

    enabled: bool
    reshard_after_forward: str
    cpu_offload: bool
    pin_memory: bool  # offloaded shards in pinned host memory, for asynchronous copies: needs CUDA
    shard_degree: int
    replicate_degree: int


@dataclass(frozen=True)
class TensorParallelPlan:
    degree: int
    sequence_parallel: bool
    loss_parallel: bool  # the output stays vocab-sharded and the cross-entropy runs on the shards


@dataclass(frozen=True)
class PipelinePlan:
    """The stages: `layers_per_stage[s]` blocks in stage s, owned by pp rank `stage_owners[s]`.
    Degree 1 is one stage holding every layer. The step's micro-batches are its accumulation steps."""

    degree: int
    schedule: str
    stages_per_rank: int
    layers_per_stage: tuple[int, ...]
    stage_owners: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.layers_per_stage)

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        return tuple(stage for stage, owner in enumerate(self.stage_owners) if owner == pp_rank)

    def first_layer(self, stage: int) -> int:
        return sum(self.layers_per_stage[:stage])


# Where a run may start from, in the order a start tries them (titanlm/checkpoint/start.py).
START_ORDER = ("resume", "checkpoint.initial_load_path", "model.hf_path")


@dataclass(frozen=True)
class CheckpointPlan:
    """Every setting the checkpointer reads, resolved once: where checkpoints live, when they are
    saved, and what a run may start from. `starts` names the sources of START_ORDER that are
    configured ("resume" when checkpoints are on); with none, or none holding anything, the run
    starts from its freshly initialized model."""

    enabled: bool
    folder: str  # checkpoint.folder, within job.dump_folder unless absolute
    dump_folder: str
    final_step: int  # training.steps: the last save and the exports are of this step
    interval: int
    keep_latest_k: int
    last_save_model_only: bool
    last_save_in_hf: bool
    verify: bool
    stop_file: str  # checkpoint.stop_file, by default STOP in the checkpoint folder
    load_step: int
    initial_load_path: str
    load_parts: tuple[str, ...]  # what a start from initial_load_path takes; a resume takes everything
    starts: tuple[str, ...]
    async_mode: str  # as this device can run it
    export_dtype: torch.dtype


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    device_type: str
    dims: ParallelDims
    model: ModelSpec
    batch: BatchPlan
    precision: PrecisionPlan
    fsdp: FSDPPlan
    tp: TensorParallelPlan
    pipeline: PipelinePlan
    float8: Float8  # the settings in effect: no float8 all-gather without FSDP
    attention_backend: str  # sdpa, flex or varlen: `auto` resolved for the device and layout
    attention_reason: str  # why `auto` chose it, for the dry run; "" when model.attention_backend named it
    activation_checkpoint: str  # none, full or selective
    recomputed_layers: int  # blocks that recompute in backward (all but full mode's layer_fraction rest)
    compile: bool  # torch.compile each block, and the step's loss of whole logits
    loss: LossPlan
    optimizer_implementation: str  # fused, foreach or for-loop: `auto` resolved where the parameters live
    data: DataPlan
    tokenizer: TokenizerPlan | None  # None: the run has no tokenizer (random or bin data without one)
    loop: LoopPlan
    checkpoint: CheckpointPlan
    output: OutputPlan
    # The sections their builders read as they are (copies: the plan does not change with the config).
    training: Training
    optimizer: Optimizer
    lr_scheduler: LRScheduler
    grad_scaler: GradScaler
    debug: Debug
    notes: tuple[str, ...]  # settings the plan adjusted or that look unintended, to be shown as warnings

    @property
    def model_args(self) -> ModelArgs:
        return self.model.args

    @property
    def schedule(self) -> dict[str, float | int | str]:
        """The settings that shape the run's progress, by config key, as checkpoints record them: a resume
        that changes one is told so (`Trainer.restore`)."""
        sched = self.lr_scheduler
        return {
            "training.steps": self.loop.steps,
            "training.global_batch_size": self.batch.global_batch_size,
            "optimizer.lr": self.optimizer.lr,
            "lr_scheduler.warmup_steps": sched.warmup_steps,
            "lr_scheduler.warmup_ratio": sched.warmup_ratio,
            "lr_scheduler.decay_type": sched.decay_type,
            "lr_scheduler.min_lr_factor": sched.min_lr_factor,
        }


def resolve(cfg: JobConfig, world_size: int, device_type: str) -> RunPlan:
    """The plan for `cfg` on `world_size` processes of `device_type` ("cpu" or "cuda"), or the first
    error any rule finds."""
    check_settings(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    model = resolve_model_spec(cfg.model)
    warn_beyond_trained_length(model.args, cfg.training.seq_len)
    batch = resolve_batch(cfg, dims)
    tp = resolve_tensor_parallel(cfg, dims, model.args)
    check_context_parallel(cfg, dims)
    pipeline = resolve_pipeline(cfg, dims, model.args, batch)
    fsdp = resolve_fsdp(cfg, dims, pipeline, device_type)
    precision = resolve_precision(cfg, device_type, fsdp)
    checkpoint = resolve_checkpoint(cfg, device_type)
    notes = []
    if checkpoint.enabled and checkpoint.async_mode != cfg.checkpoint.async_mode:
        notes.append(f"checkpoint.async_mode = {cfg.checkpoint.async_mode} needs a GPU; using {checkpoint.async_mode}")
    attention_backend, attention_reason = resolve_attention_backend(cfg, device_type)
    loop, loop_notes = resolve_loop(cfg)
    notes += loop_notes
    data = resolve_data(cfg, model.args.vocab_size, validates=loop.valid_every > 0)
    tokenizer = resolve_tokenizer(cfg, model, data)
    recomputed = {
        "none": 0,
        "full": int(model.args.n_layers * cfg.activation_checkpoint.layer_fraction),
        "selective": model.args.n_layers,
    }[cfg.activation_checkpoint.mode]
    return RunPlan(
        world_size=world_size,
        device_type=device_type,
        dims=dims,
        # The spec records the tokenizer the run really uses in every checkpoint.
        model=replace(model, tokenizer_path=tokenizer.path if tokenizer else ""),
        batch=batch,
        precision=precision,
        fsdp=fsdp,
        tp=tp,
        pipeline=pipeline,
        float8=resolve_float8(cfg, device_type, fsdp),
        attention_backend=attention_backend,
        attention_reason=attention_reason,
        activation_checkpoint=cfg.activation_checkpoint.mode,
        recomputed_layers=recomputed,
        compile=cfg.compile.enable,
        loss=LossPlan(cfg.training.loss_chunk_tokens),
        optimizer_implementation=resolve_optimizer_implementation(cfg, device_type, fsdp),
        data=data,
        tokenizer=tokenizer,
        loop=loop,
        checkpoint=checkpoint,
        output=resolve_output(cfg),
        training=replace(cfg.training),
        optimizer=replace(cfg.optimizer),
        lr_scheduler=replace(cfg.lr_scheduler),
        grad_scaler=replace(cfg.grad_scaler),
        debug=replace(cfg.debug),
        notes=tuple(notes),
    )


def check_settings(cfg: JobConfig) -> None:
    """Checks that relate several settings, or a setting and this machine; each field's own range is
    declared on the field (job_config.py) and enforced by the config loader."""
    if cfg.training.mixed_precision_param == "float16":  # the only precision that scales the loss
        scaler = cfg.grad_scaler
        if not scaler.min_scale <= scaler.initial_scale <= scaler.max_scale:
            raise ConfigError(
                f"grad_scaler.initial_scale {scaler.initial_scale!r} must lie between grad_scaler.min_scale "
                f"{scaler.min_scale!r} and grad_scaler.max_scale {scaler.max_scale!r}"
            )
    if cfg.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "metrics.enable_wandb needs the wandb package: pip install 'titanlm[wandb]' (or pip install wandb), "
            "or set metrics.enable_wandb = false"
        )


def resolve_batch(cfg: JobConfig, dims: ParallelDims) -> BatchPlan:
    tr = cfg.training
    per_step = tr.local_batch_size * dims.dp
    global_batch = tr.global_batch_size if tr.global_batch_size > 0 else per_step
    if global_batch % per_step:
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not a multiple of training.local_batch_size "
            f"{tr.local_batch_size} x data-parallel degree {dims.dp} = {per_step}"
        )
    return BatchPlan(tr.seq_len, tr.local_batch_size, global_batch, global_batch // per_step)


def resolve_tensor_parallel(cfg: JobConfig, dims: ParallelDims, args: ModelArgs) -> TensorParallelPlan:
    for name in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        value = getattr(args, name)
        if value % dims.tp:
            raise ParallelismError(
                f"parallelism.tensor_parallel_degree {dims.tp} does not divide the model's {name} ({value}); "
                f"choose a degree that divides {name}"
            )
    parallel = dims.tp > 1
    return TensorParallelPlan(
        dims.tp,
        sequence_parallel=parallel and cfg.parallelism.sequence_parallel,
        loss_parallel=parallel and not cfg.parallelism.disable_loss_parallel,
    )


def check_context_parallel(cfg: JobConfig, dims: ParallelDims) -> None:
    """Each cp rank keeps a head and a tail chunk of every row, which sequence parallelism splits further."""
    seq_len, cp = cfg.training.seq_len, dims.cp
    if cp == 1:
        return
    if seq_len % (2 * cp):
        raise ParallelismError(
            f"training.seq_len {seq_len} is not divisible by 2 x parallelism.context_parallel_degree = {2 * cp} "
            "(each cp rank keeps a head and a tail chunk of every row); choose a seq_len that is"
        )
    sp = dims.tp if cfg.parallelism.sequence_parallel else 1
    if (seq_len // cp) % sp:
        raise ParallelismError(
            f"training.seq_len {seq_len} / parallelism.context_parallel_degree {cp} = {seq_len // cp} tokens per "
            f"cp rank is not divisible by parallelism.tensor_parallel_degree {sp} (sequence parallelism splits "
            "them further); choose a seq_len divisible by cp x tp x 2, or set parallelism.sequence_parallel = false"
        )


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def schedule_available(schedule: str) -> bool:
    """Whether this torch has the schedule and runs it correctly."""
    try:
        get_schedule_class(schedule)
    except ValueError:
        return False
    return schedule.lower() not in V_SCHEDULES or _torch_version() >= V_SCHEDULES_MIN_TORCH


def stages_of_rank(pp_rank: int, pp_size: int, stages_per_rank: int, v_style: bool) -> list[int]:
    if v_style:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def stage_layer_counts(n_layers: int, num_stages: int, explicit: list[int]) -> tuple[int, ...]:
    """Layers per stage: the configured list, or an even split with the extra layers in the middle
    (the first and last stages also carry the embedding and the output projection)."""
    if explicit:
        if len(explicit) != num_stages or sum(explicit) != n_layers or min(explicit) < 0:
            raise ParallelismError(
                f"parallelism.pipeline_parallel_stage_layers {list(explicit)} must list {num_stages} non-negative "
                f"layer counts (one per stage) adding up to the model's {n_layers} layers"
            )
        return tuple(explicit)
    if num_stages > n_layers:
        raise ParallelismError(
            f"{num_stages} pipeline stages but the model has only {n_layers} layers; lower "
            "parallelism.pipeline_parallel_degree or pipeline_parallel_virtual_stages"
        )
    base, extra = divmod(n_layers, num_stages)
    counts = [base] * num_stages
    middle_first = sorted(range(num_stages), key=lambda s: abs(s - (num_stages - 1) / 2))
    for stage in middle_first[:extra]:
        counts[stage] += 1
    return tuple(counts)


def resolve_pipeline(cfg: JobConfig, dims: ParallelDims, args: ModelArgs, batch: BatchPlan) -> PipelinePlan:
    par = cfg.parallelism
    schedule = par.pipeline_parallel_schedule
    if dims.pp == 1:
        return PipelinePlan(1, schedule, 1, (args.n_layers,), (0,))
    if not schedule_available(schedule):
        raise UnsupportedError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' is not in torch {torch.__version__} or does not "
            "run correctly there (the V schedules need torch >= 2.13); choose another schedule or a newer torch"
        )
    if schedule.lower() in SPLIT_BACKWARD_SCHEDULES and par.fsdp_reshard_after_forward == "always":
        raise ParallelismError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' computes weight gradients after FSDP2 has "
            "resharded them under parallelism.fsdp_reshard_after_forward = 'always'; use 'default' or 'never'"
        )
    if args.tie_embeddings:
        raise ParallelismError(
            "the model ties its input and output embeddings, which pipeline parallelism would place on the "
            "first and last stages with no shared gradient; set parallelism.pipeline_parallel_degree = 1 "
            "(use FSDP or tensor parallelism for this model)"
        )
    v_style = schedule.lower() in V_SCHEDULES
    single = issubclass(get_schedule_class(schedule), PipelineScheduleSingle)
    stages_per_rank = 1 if single else (2 if v_style else par.pipeline_parallel_virtual_stages)
    if not single and stages_per_rank < 2:
        raise ParallelismError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' runs several stages per rank; set "
            "parallelism.pipeline_parallel_virtual_stages >= 2"
        )
    num_stages = dims.pp * stages_per_rank
    counts = stage_layer_counts(args.n_layers, num_stages, par.pipeline_parallel_stage_layers)
    owners = [0] * num_stages
    for rank in range(dims.pp):
        for stage in stages_of_rank(rank, dims.pp, stages_per_rank, v_style):
            owners[stage] = rank
    if batch.accumulation_steps < dims.pp:
        raise ParallelismError(
            f"pipeline parallelism runs the step's micro-batches through {dims.pp} stages but the step has "
            f"{batch.accumulation_steps}; raise training.global_batch_size to at least training.local_batch_size "
            f"x data-parallel degree x pipeline_parallel_degree = {batch.local_batch_size * dims.dp * dims.pp}"
        )
    return PipelinePlan(dims.pp, schedule, stages_per_rank, counts, tuple(owners))


def resolve_fsdp(cfg: JobConfig, dims: ParallelDims, pipeline: PipelinePlan, device_type: str) -> FSDPPlan:
    par = cfg.parallelism
    reshard = par.fsdp_reshard_after_forward
    if reshard == "default" and pipeline.degree > 1:
        reshard = "never"
    return FSDPPlan(
        enabled=dims.world_size > 1 or par.fsdp_cpu_offload,
        reshard_after_forward=reshard,
        cpu_offload=par.fsdp_cpu_offload,
        pin_memory=par.fsdp_cpu_offload and device_type == "cuda",
        shard_degree=dims.dp_shard * dims.cp,
        replicate_degree=dims.dp_replicate,
    )


def resolve_precision(cfg: JobConfig, device_type: str, fsdp: FSDPPlan) -> PrecisionPlan:
    name = cfg.training.mixed_precision_param
    if name == "auto":
        # bf16 matmuls on CPUs without AMX run ~45x slower than fp32: CPU defaults to fp32.
        param_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    else:
        param_dtype = getattr(torch, name)
    autocast = None if fsdp.enabled or param_dtype == torch.float32 else param_dtype
    return PrecisionPlan(
        param_dtype=param_dtype,
        reduce_dtype=getattr(torch, cfg.training.mixed_precision_reduce),
        autocast_dtype=autocast,
        loss_scaling=param_dtype == torch.float16,
    )


def cpu_takes_row_scales() -> bool:
    """Whether the CPU float8 matmul accepts per-row scales (torch 2.11's does not; 2.13's does)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def resolve_float8(cfg: JobConfig, device_type: str, fsdp: FSDPPlan) -> Float8:
    """The float8 settings in effect. Contradictions are refused whatever the world size: one process
    has no all-gather, yet the same config must not start on one rank and fail on two."""
    f8 = cfg.float8
    if not f8.enable:
        return replace(f8, enable_fsdp_float8_all_gather=False)
    if f8.enable_fsdp_float8_all_gather and f8.recipe_name != "tensorwise":
        raise ConfigError(
            f"float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = 'tensorwise', not "
            f"'{f8.recipe_name}' (torchao all-gathers only tensorwise-scaled weights in float8); set "
            "float8.recipe_name = 'tensorwise' or float8.enable_fsdp_float8_all_gather = false"
        )
    if f8.recipe_name == "rowwise" and device_type == "cpu" and not cpu_takes_row_scales():
        raise UnsupportedError(
            f"float8.recipe_name 'rowwise' needs a GPU or torch >= 2.13 on CPU (torch {torch.__version__}'s CPU "
            "float8 matmul takes one scale per tensor); use float8.recipe_name = 'tensorwise'"
        )
    if fsdp.cpu_offload and f8.enable_fsdp_float8_all_gather:
        # torchao's wrapper drops the precomputed scale when FSDP copies a shard to the GPU, and
        # computing it all-reduces host tensors, which NCCL cannot carry.
        raise ParallelismError(
            "parallelism.fsdp_cpu_offload does not combine with float8.enable_fsdp_float8_all_gather (the float8 "
            "weight scales would be computed in host memory); set float8.enable_fsdp_float8_all_gather = false, "
            "the matmuls still run in float8"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("float8.enable = true needs torchao: pip install 'titanlm[gpu]' (or pip install torchao)")
    # A copy: the plan must not change when the config object does.
    return replace(f8, enable_fsdp_float8_all_gather=f8.enable_fsdp_float8_all_gather and fsdp.enabled)


def varlen_kernel_installed() -> bool:
    """flash-attn or torch's varlen attention is importable (whether CUDA is present is the caller's fact)."""
    return any(importlib.util.find_spec(name) is not None for name in ("flash_attn", "torch.nn.attention.varlen"))


def resolve_attention_backend(cfg: JobConfig, device_type: str) -> tuple[str, str]:
    """The kernel, and why `auto` chose it ("" when named): sdpa on CPU; on CUDA varlen when a varlen
    kernel is installed, else flex. The same holds under context parallelism: every backend describes a
    rank's queries against the gathered keys (`AttentionBackend.prepare_shard`)."""
    name = cfg.model.attention_backend
    if name == "varlen" and device_type != "cuda":
        raise UnsupportedError(
            "model.attention_backend = 'varlen' needs CUDA and flash-attn (pip install flash-attn) or a "
            "torch with torch.nn.attention.varlen; use 'sdpa' or 'flex' here"
        )
    if name == "flex" and device_type != "cuda":
        raise UnsupportedError(
            "model.attention_backend = 'flex' trains on CUDA only (flex attention has no backward on CPU); "
            "use 'sdpa' or 'auto' here"
        )
    if name != "auto":
        return name, ""
    if device_type != "cuda":
        return "sdpa", "auto: sdpa on CPU"
    if varlen_kernel_installed():
        return "varlen", "auto: varlen where flash-attn or torch's varlen attention is installed, as here, else flex"
    return "flex", "auto: varlen where flash-attn or torch's varlen attention is installed, not here"


def resolve_optimizer_implementation(cfg: JobConfig, device_type: str, fsdp: FSDPPlan) -> str:
    """`auto`: fused on a GPU; foreach where the parameters live in host memory (a CPU job, or FSDP CPU
    offload, under which the optimizer step runs on the CPU)."""
    name = cfg.optimizer.implementation
    if name != "auto":
        return name
    return "fused" if device_type == "cuda" and not fsdp.cpu_offload else "foreach"


def resolve_dataset(cfg: JobConfig) -> str:
    """data.dataset with `auto` resolved. A data.train_folder that the chosen dataset would ignore is
    refused, so a path the user gave is never silently unused."""
    kind = cfg.data.dataset
    if kind == "auto":
        return "bin" if cfg.data.train_folder else "demo"
    if kind != "bin" and cfg.data.train_folder:
        raise ConfigError(
            f"data.train_folder = {cfg.data.train_folder!r} is set but data.dataset = {kind!r} would not read it; "
            "set data.dataset = 'bin' (or 'auto') to train on the folder, or drop data.train_folder"
        )
    if kind == "bin" and not cfg.data.train_folder:
        raise ConfigError("data.dataset = 'bin' needs data.train_folder (type sub-folders of *.bin files)")
    if cfg.data.dataset_weights and kind != "bin":
        raise ConfigError(
            f"data.dataset_weights mixes the type folders of data.train_folder, but data.dataset = {kind!r} has "
            "none; drop data.dataset_weights or train on a bin folder"
        )
    return kind


def resolve_data(cfg: JobConfig, vocab_size: int, validates: bool) -> DataPlan:
    """The loaders' settings for a model of `vocab_size`; the validation folder only when validation runs
    (see `resolve_loop`)."""
    d, tr = cfg.data, cfg.training
    return DataPlan(
        kind=resolve_dataset(cfg),
        train_folder=d.train_folder,
        valid_folder=d.valid_folder if validates else "",
        cache_folder=d.cache_folder,
        seq_len=tr.seq_len,
        local_batch_size=tr.local_batch_size,
        seed=cfg.debug.seed,
        num_workers=d.num_workers,
        pack_sample_into_one=d.pack_sample_into_one,
        min_length=d.min_length,
        dataset_weights=tuple(d.dataset_weights),
        vocab_size=vocab_size,
    )


def resolve_tokenizer(cfg: JobConfig, model: ModelSpec, data: DataPlan) -> TokenizerPlan | None:
    """The one tokenizer: model.tokenizer_path, else model.hf_path's (both as the model spec found them),
    else the demo corpus's own; None for random or bin data without one."""
    if model.tokenizer_path:
        origin = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.hf_path"
        return TokenizerPlan(model.tokenizer_path, origin)
    if data.kind == "demo":
        return TokenizerPlan(demo_assets(data.cache_folder).tokenizer_path, "the demo corpus")
    return None


def resolve_loop(cfg: JobConfig) -> tuple[LoopPlan, list[str]]:
    """The loop's schedule, and a note for each setting that cannot take effect as written: a warmup
    that never ends, validation without data or data never validated on."""
    valid_folder, valid_every, notes = cfg.data.valid_folder, cfg.data.valid_every, []
    warmup = warmup_steps(cfg.lr_scheduler, cfg.training.steps)
    if warmup >= cfg.training.steps:
        key = "warmup_steps" if cfg.lr_scheduler.warmup_steps else "warmup_ratio"
        notes.append(
            f"lr_scheduler.{key} gives {warmup} warmup steps, but training.steps is {cfg.training.steps}: the "
            "learning rate never reaches optimizer.lr and never decays; shorten the warmup or train longer"
        )
    if valid_every and not valid_folder:
        notes.append(f"data.valid_every = {valid_every} has no data.valid_folder to validate on; no validation runs")
        valid_every = 0
    elif valid_folder and not valid_every:
        notes.append(
            f"data.valid_folder = {valid_folder!r} is not read: data.valid_every is 0 (never validate); set it to "
            "validate every that many steps"
        )
    return LoopPlan(cfg.training.steps, cfg.metrics.log_freq, valid_every), notes


def resolve_output(cfg: JobConfig) -> OutputPlan:
    return OutputPlan(
        dump_folder=cfg.job.dump_folder,
        description=cfg.job.description,
        print_config=cfg.job.print_config,
        tensorboard=cfg.metrics.enable_tensorboard,
        wandb=cfg.metrics.enable_wandb,
        wandb_project=cfg.metrics.wandb_project,
        peak_tflops=cfg.metrics.peak_tflops,
        config_toml=config_to_toml(cfg),
        config_values=config_to_dict(cfg),
    )


def resolve_checkpoint(cfg: JobConfig, device_type: str) -> CheckpointPlan:
    ck = cfg.checkpoint
    if ck.last_save_in_hf and not ck.enable:
        raise CheckpointError(
            "checkpoint.last_save_in_hf exports the final checkpoint, but checkpoint.enable is off; set "
            "checkpoint.enable = true as well"
        )
    async_mode = ck.async_mode
    if async_mode == "async_with_pinned_mem" and device_type != "cuda":
        async_mode = "async"  # pinned shared memory needs CUDA; the background thread works anywhere
    folder = os.path.join(cfg.job.dump_folder, ck.folder)
    configured = (ck.enable, bool(ck.initial_load_path), bool(cfg.model.hf_path))
    return CheckpointPlan(
        enabled=ck.enable,
        folder=folder,
        dump_folder=cfg.job.dump_folder,
        final_step=cfg.training.steps,
        interval=ck.interval,
        keep_latest_k=ck.keep_latest_k,
        last_save_model_only=ck.last_save_model_only,
        last_save_in_hf=ck.last_save_in_hf,
        verify=ck.verify,
        stop_file=ck.stop_file or os.path.join(folder, "STOP"),
        load_step=ck.load_step,
        initial_load_path=ck.initial_load_path,
        load_parts=load_parts(ck.load_content, ck.initial_load_path),
        starts=tuple(source for source, on in zip(START_ORDER, configured) if on),
        async_mode=async_mode,
        export_dtype=getattr(torch, ck.export_dtype),
    )


def load_parts(content: list[str], initial_load_path: str) -> tuple[str, ...]:
    """The parts checkpoint.load_content names, in CHECKPOINT_PARTS order."""
    named = [part.strip() for part in content]
    if named == ["all"]:
        return CHECKPOINT_PARTS
    unknown = sorted(set(named) - set(CHECKPOINT_PARTS))
    if unknown or not named:
        raise CheckpointError(
            f"checkpoint.load_content = {list(content)}: unknown part(s) {', '.join(unknown) or '(none given)'}; "
            f"use all, or a comma list of {', '.join(CHECKPOINT_PARTS)}"
        )
    if not initial_load_path:
        raise CheckpointError(
            f"checkpoint.load_content = {list(content)} selects what to take from checkpoint.initial_load_path, "
            "which is empty (a resume from checkpoint.folder always loads everything); set "
            "initial_load_path, e.g. to a pretraining run's step-N folder"
        )
    return tuple(part for part in CHECKPOINT_PARTS if part in named)


if __name__ == "__main__":
    from titanlm.dry_run import main

    main()
