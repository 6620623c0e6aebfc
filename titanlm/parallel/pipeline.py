"""Pipeline parallelism: split the model by layers into stages and run a torch.distributed.pipelining schedule.

Each stage is a copy of the meta-device model that keeps only its layers (the first stage also
keeps the embedding, the last the final norm and output). Layer keys stay `layers.<i>` so the
weights and checkpoints match the unsplit model. Single-stage schedules (GPipe, 1F1B) give each
pp rank one stage; looped schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) give rank
r the stages r, r + pp, ...; V schedules (ZBVZeroBubble, DualPipeV) give rank r the stages r
and 2 pp - 1 - r, so the first and last stage share a rank.

The micro-batches of a pipeline step are the gradient-accumulation micro-batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)

from titanlm.config.job_config import JobConfig
from titanlm.models.transformer import Transformer
from titanlm.parallel.parallel_dims import ParallelismError

V_SCHEDULES = ("zbvzerobubble", "dualpipev")


# Schedules that split backward into input- and weight-gradient passes. Their weight pass runs
# after the input pass, so FSDP2 must keep a stage's gathered parameters from forward until then:
# with blocks resharded after forward the weight gradients are lost (measured on torch 2.13, CPU,
# gloo: grad norm 2-23% low). With "never" (the default under PP) they match 1F1B to 1e-6.
SPLIT_BACKWARD_SCHEDULES = ("interleavedzerobubble", "zbvzerobubble", "dualpipev")


# V schedules put two adjacent stages on one rank. torch 2.11's stage initialization sends their
# shapes to the rank itself, which fails ("Pair is not connected" on gloo); measured working on
# 2.13, 2.12 untested.
V_SCHEDULES_MIN_TORCH = (2, 13)


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


def check_pipeline_supported(cfg: JobConfig) -> None:
    """Refuse schedules this torch lacks and the combinations that do not train correctly (measured)."""
    schedule = cfg.parallelism.pipeline_parallel_schedule
    if not schedule_available(schedule):
        raise ParallelismError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' is not in torch {torch.__version__} or does not "
            "run correctly there (the V schedules need torch >= 2.13); choose another schedule or a newer torch"
        )
    if schedule.lower() in SPLIT_BACKWARD_SCHEDULES and cfg.parallelism.fsdp_reshard_after_forward == "always":
        raise ParallelismError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' computes weight gradients after FSDP2 has "
            "resharded them under parallelism.fsdp_reshard_after_forward = 'always'; use 'default' or 'never'"
        )


def stage_layer_counts(n_layers: int, num_stages: int, explicit: str) -> list[int]:
    """Layers per stage: the configured list, or an even split with the extra layers in the middle.

    Middle stages get the remainder because the first and last stages also carry the embedding
    and the output projection.
    """
    if explicit:
        counts = [int(part) for part in explicit.split(",")]
        if len(counts) != num_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ParallelismError(
                f"parallelism.pipeline_parallel_stage_layers '{explicit}' must list {num_stages} non-negative "
                f"layer counts (one per stage) adding up to the model's {n_layers} layers"
            )
        return counts
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
    return counts


def stages_of_rank(pp_rank: int, pp_size: int, stages_per_rank: int, v_style: bool) -> list[int]:
    if v_style:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def split_stage(model: Transformer, stage: int, num_stages: int, counts: list[int]) -> Transformer:
    """A copy of the (meta-device) model holding only this stage's share."""
    part = copy.deepcopy(model)
    first_layer = sum(counts[:stage])
    keep = {str(i) for i in range(first_layer, first_layer + counts[stage])}
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    return part


def pipeline_parts(
    model: Transformer, pp_mesh: DeviceMesh, schedule: str, virtual_stages: int, stage_layers: str
) -> tuple[list[Transformer], list[int], list[int]]:
    """This rank's stage models, their stage indices, and the pp rank that owns each stage."""
    if model.args.tie_embeddings:
        raise ParallelismError(
            "the model ties its input and output embeddings, which pipeline parallelism would place on the "
            "first and last stages with no shared gradient; set parallelism.pipeline_parallel_degree = 1 "
            "(use FSDP or tensor parallelism for this model)"
        )
    schedule_class = get_schedule_class(schedule)
    v_style = schedule.lower() in V_SCHEDULES
    single = issubclass(schedule_class, PipelineScheduleSingle)
    stages_per_rank = 1 if single else (2 if v_style else virtual_stages)
    if not single and stages_per_rank < 2:
        raise ParallelismError(
            f"parallelism.pipeline_parallel_schedule '{schedule}' runs several stages per rank; set "
            "parallelism.pipeline_parallel_virtual_stages >= 2"
        )
    pp_size = pp_mesh.size()
    num_stages = pp_size * stages_per_rank
    counts = stage_layer_counts(model.args.n_layers, num_stages, stage_layers)
    stage_ids = stages_of_rank(pp_mesh.get_local_rank(), pp_size, stages_per_rank, v_style)
    owners = [0] * num_stages
    for rank in range(pp_size):
        for stage in stages_of_rank(rank, pp_size, stages_per_rank, v_style):
            owners[stage] = rank
    return [split_stage(model, s, num_stages, counts) for s in stage_ids], stage_ids, owners


def build_schedule(
    parts: list[Transformer],
    stage_ids: list[int],
    num_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    stages = [
        PipelineStage(part, stage_id, num_stages, device, group=pp_mesh.get_group())
        for part, stage_id in zip(parts, stage_ids)
    ]
    schedule_class = get_schedule_class(schedule)
    # scale_grads=False: the loss is already divided by the step's global token count.
    if issubclass(schedule_class, PipelineScheduleMulti):
        return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


@torch.no_grad()
def pipeline_forward(
    parts: list[Transformer],
    stage_ids: list[int],
    owners: list[int],
    pp_group: dist.ProcessGroup,
    tokens: torch.Tensor,
    **stage_kwargs: torch.Tensor | None,
) -> torch.Tensor | None:
    """Forward only, one batch through every stage in order (validation; no schedule, no
    micro-batches): returns the last stage's output on the rank that owns it, None elsewhere.

    Every rank walks the stages in increasing order, so each send meets the matching receive.
    Activations between stages are plain tensors; their shape and dtype travel first, since a
    later stage cannot know them (sequence sharding, compute dtype) without asking.
    """
    me = dist.get_rank(pp_group)
    local = dict(zip(stage_ids, parts))
    hidden: torch.Tensor | None = tokens
    for stage, owner in enumerate(owners):
        if owner != me:
            continue
        if stage > 0 and owners[stage - 1] != me:
            hidden = _receive(dist.get_global_rank(pp_group, owners[stage - 1]), pp_group, tokens.device)
        hidden = local[stage](hidden, **stage_kwargs)
        if stage + 1 < len(owners) and owners[stage + 1] != me:
            _send(hidden, dist.get_global_rank(pp_group, owners[stage + 1]), pp_group)
    return hidden if owners[-1] == me else None


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER = 8  # dtype index, ndim, then up to 6 dimensions


def _send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    header = torch.zeros(_HEADER, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.send(header, dst, group=group)
    dist.send(tensor.contiguous(), dst, group=group)


def _receive(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype_index, ndim, *dims = header.tolist()
    tensor = torch.empty(dims[:ndim], dtype=_DTYPES[dtype_index], device=device)
    dist.recv(tensor, src, group=group)
    return tensor
