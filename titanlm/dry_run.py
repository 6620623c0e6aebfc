"""Check a job before it queues: `python -m titanlm.plan --job.config_file X.toml --world_size 32`.

It resolves the same plan the trainer would (every rule, the same one-line errors), prints it with
each rank's place in the mesh, and estimates each rank's peak memory. Exit 0 when the plan is
valid and every rank fits in --gpu_memory_gib, 2 otherwise. Any trainer flag is accepted too.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from titanlm.config import load_config_or_exit
from titanlm.errors import USER_ERROR_EXIT_CODE, TitanlmError
from titanlm.memory_estimate import MemoryEstimate, estimate_memory, formula_memory
from titanlm.plan import RunPlan, resolve

RANKS_LISTED = 64  # larger jobs list their first ranks of each stage only


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.plan",
        description="Resolve a training job's plan for a world size and device without running it: print the "
        "plan and each rank's estimated peak memory; exit 0 if valid and it fits, 2 otherwise. Trainer flags "
        "(--job.config_file X.toml, --section.field VALUE) are accepted too.",
    )
    parser.add_argument("--world_size", type=int, required=True, help="number of processes (GPUs) of the job")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device the job runs on")
    parser.add_argument(
        "--gpu_memory_gib",
        type=_positive_gib,
        default=80.0,
        help="memory of one GPU; ranks whose estimate exceeds it are flagged (cuda only; default 80)",
    )
    parser.add_argument(
        "--memory",
        choices=("auto", "formula", "none"),
        default="auto",
        help="auto: trace one step of the real model under fake tensors where it can (seconds to a minute for a "
        "7B model), else the closed form; formula: the closed form only (instant); none: no estimate",
    )
    return parser.parse_known_args(argv)


def _positive_gib(text: str) -> float:
    """--gpu_memory_gib: a finite number of GiB above 0 (nan would make every plan fit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of GiB above 0, got {text!r}")
    return value


def stage_layers(plan: RunPlan, pp_rank: int) -> str:
    pipeline = plan.pipeline
    parts = []
    for stage in pipeline.stages_of(pp_rank):
        first = pipeline.first_layer(stage)
        count = pipeline.layers_per_stage[stage]
        parts.append(f"stage {stage}: layers {first}-{first + count - 1}" if count else f"stage {stage}: no layers")
    return "; ".join(parts)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(plan: RunPlan) -> list[str]:
    """The plan as the lines the dry run prints."""
    d, b, p, f, tp, pipe = plan.dims, plan.batch, plan.precision, plan.fsdp, plan.tp, plan.pipeline
    args = plan.model_args
    compute = (
        f"autocast to {_name(p.autocast_dtype)}"
        if p.autocast_dtype
        else f"FSDP casts to {_name(p.param_dtype)}"
        if f.enabled and p.param_dtype != torch.float32
        else _name(p.param_dtype)
    )
    lines = [
        f"plan for {plan.world_size} x {plan.device_type}",
        f"  model       {plan.model.describe()}: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
        f"({args.n_kv_heads} kv), ffn {args.ffn_dim}, vocab {args.vocab_size}",
        "  mesh        " + " x ".join(f"{name} {size}" for name, size in d.sizes().items()),
        f"  batch       seq_len {b.seq_len}, local batch {b.local_batch_size}, global batch {b.global_batch_size} "
        f"({b.tokens_per_step:,} tokens/step), {b.accumulation_steps} micro-batch(es) per step",
        f"  precision   weights float32, compute {compute}, gradient reduce {_name(p.reduce_dtype)}"
        + (", dynamic loss scaling (float16)" if p.loss_scaling else ""),
        "  fsdp        "
        + (
            f"shard over {f.shard_degree} rank(s)"
            + (f" x {f.replicate_degree} replicas (HSDP)" if f.replicate_degree > 1 else "")
            + f", reshard after forward: {f.reshard_after_forward}"
            + (", CPU offload" if f.cpu_offload else "")
            if f.enabled
            else "off (one process)"
        ),
        "  tensor      "
        + (
            f"{tp.degree}-way, sequence parallel {'on' if tp.sequence_parallel else 'off'}, "
            f"loss parallel {'on' if tp.loss_parallel else 'off'}"
            if tp.degree > 1
            else "off"
        ),
        "  context     "
        + (f"{d.cp}-way (head + tail chunk per rank, keys/values all-gathered)" if d.cp > 1 else "off"),
        "  pipeline    "
        + (
            f"{pipe.schedule}, {pipe.num_stages} stages ({pipe.stages_per_rank} per rank), layers per "
            f"stage {list(pipe.layers_per_stage)}"
            if pipe.degree > 1
            else "off"
        ),
        f"  attention   {plan.attention_backend}" + (f" ({plan.attention_reason})" if plan.attention_reason else ""),
        f"  recompute   {plan.activation_checkpoint}"
        + (f" ({plan.recomputed_layers} of {args.n_layers} blocks)" if plan.activation_checkpoint != "none" else ""),
        f"  compile     {'on' if plan.compile else 'off'}",
        "  float8      "
        + (
            f"{plan.float8.recipe_name}" + (", float8 all-gather" if plan.float8.enable_fsdp_float8_all_gather else "")
            if plan.float8.enable
            else "off"
        ),
        "  loss        " + (f"chunks of {plan.loss.chunk_tokens} tokens" if plan.loss.chunked else "whole logits"),
        f"  data        {plan.data.kind}",
        "  checkpoint  "
        + (
            (
                "on, "
                + (
                    "synchronous saves"
                    if plan.checkpoint.async_mode == "disabled"
                    else f"{plan.checkpoint.async_mode} saves"
                )
            )
            if plan.checkpoint.enabled
            else "off"
        )
        + (
            f"; from checkpoint.initial_load_path it takes {', '.join(plan.checkpoint.load_parts)}"
            if plan.checkpoint.initial_load_path
            else ""
        ),
    ]
    lines += [f"  note        {note}" for note in plan.notes]
    return lines


def rank_lines(plan: RunPlan) -> list[str]:
    """Each rank's coordinates and, under pipeline parallelism, its stages."""
    per_stage = len(plan.dims.ranks_of_pp_rank(0))
    listed = (
        range(plan.world_size)
        if plan.world_size <= RANKS_LISTED
        else [rank for pp_rank in range(plan.dims.pp) for rank in plan.dims.ranks_of_pp_rank(pp_rank)[:4]]
    )
    lines = ["ranks" + ("" if plan.world_size <= RANKS_LISTED else f" (the first 4 of each pp rank's {per_stage})")]
    for rank in listed:
        coords = plan.dims.coordinates(rank)
        where = " ".join(f"{name}={value}" for name, value in coords.items())
        stages = f"  {stage_layers(plan, coords['pp'])}" if plan.dims.pp > 1 else ""
        lines.append(f"  rank {rank:>4}: {where}{stages}")
    return lines


def memory_lines(
    estimates: dict[int, MemoryEstimate], plan: RunPlan, limit_gib: float | None
) -> tuple[list[str], bool]:
    """The estimate table, with what each column counts, and whether every rank fits."""
    lines = [
        "peak memory per rank, GiB (params / grads / optimizer / activations / other = peak)",
        "  params: the rank's fp32 weights (its shard under FSDP); grads: their fp32 gradients; optimizer: AdamW's",
        "  two fp32 moments; activations: what forward keeps for backward at the peak; other: the rest at that",
        "  moment (FSDP's gathered low-precision weights and gradients, the loss's temporaries, autocast's copies)",
    ]
    fits = True
    for pp_rank, est in estimates.items():
        if plan.dims.pp > 1:
            ranks = plan.dims.ranks_of_pp_rank(pp_rank)
            who = f"pp rank {pp_rank} (ranks {ranks[0]}-{ranks[-1]})"
        else:
            who = f"every rank (0-{plan.world_size - 1})" if plan.world_size > 1 else "the one rank"
        over = limit_gib is not None and est.peak_gib > limit_gib
        fits &= not over
        lines.append(
            f"  {who}: {est.params_gib:.2f} / {est.grads_gib:.2f} / {est.optimizer_gib:.2f} / "
            f"{est.activations_gib:.2f} / {est.other_gib:.2f} = {est.peak_gib:.2f}"
            + (f"  DOES NOT FIT in {limit_gib:g} GiB: {advice(est, plan, limit_gib)}" if over else "")
        )
    methods = {f"{est.method}: {est.note}" if est.note else est.method for est in estimates.values()}
    lines.append("  method: " + "; ".join(sorted(methods)))
    return lines, fits


def advice(est: MemoryEstimate, plan: RunPlan, limit_gib: float) -> str:
    """Which settings to change, by what takes the memory: first whether the training state alone is
    too much, which no recomputation or smaller batch can help."""
    state = est.params_gib + est.grads_gib + est.optimizer_gib
    if state >= limit_gib:
        whole = state * (plan.fsdp.shard_degree if plan.fsdp.enabled else 1) * plan.dims.tp * plan.dims.pp
        gpus = math.ceil(2 * whole / limit_gib)  # the state in at most half of each GPU, the rest for activations
        return (
            f"the weights, gradients and AdamW state alone take {state:.1f} GiB of the {limit_gib:g} GiB, whatever "
            f"the activations: shard them over more GPUs (FSDP over {gpus} GPUs, "
            f"parallelism.data_parallel_shard_degree, holds {whole / gpus:.1f} GiB of it on each; or tensor/pipeline "
            "parallelism), or keep them in host memory with parallelism.fsdp_cpu_offload = true"
        )
    if est.activations_gib >= state:
        return (
            "activations dominate: set activation_checkpoint.mode = 'selective' or 'full', lower "
            "training.local_batch_size or training.seq_len, or add context_parallel_degree"
        )
    return (
        "weights, gradients and optimizer state dominate: shard further (more ranks in data_parallel_shard_degree, "
        "or tensor/pipeline parallelism), or set parallelism.fsdp_cpu_offload = true"
    )


def main(argv: list[str] | None = None) -> None:
    options, trainer_flags = parse_args(argv)
    cfg = load_config_or_exit(trainer_flags)
    try:
        plan = resolve(cfg, options.world_size, options.device)
        print("\n".join(describe(plan) + rank_lines(plan)))
        if options.memory == "none":
            return
        limit = options.gpu_memory_gib if options.device == "cuda" else None
        first_ranks = {pp_rank: plan.dims.ranks_of_pp_rank(pp_rank)[0] for pp_rank in range(plan.dims.pp)}
        estimates = {
            pp_rank: estimate_memory(plan, rank) if options.memory == "auto" else formula_memory(plan, rank)
            for pp_rank, rank in first_ranks.items()
        }
    except TitanlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    lines, fits = memory_lines(estimates, plan, limit)
    print("\n".join(lines))
    if not fits:
        print(f"error: the plan does not fit in {limit:g} GiB per GPU (--gpu_memory_gib); see above", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
