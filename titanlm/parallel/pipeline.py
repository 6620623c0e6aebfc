"""Pipeline parallelism: split the model by layers into stages and run a torch.distributed.pipelining schedule.

Each stage is a copy of the meta-device model that keeps only its layers (the first stage also
keeps the embedding, the last the final norm and output). Layer keys stay `layers.<i>` so the
weights and checkpoints match the unsplit model. How many layers each stage holds and which pp
rank owns it is the plan's decision (`titanlm.plan.PipelinePlan`).

The micro-batches of a pipeline step are the gradient-accumulation micro-batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _PipelineSchedule, get_schedule_class

from titanlm.models.transformer import Transformer

if TYPE_CHECKING:  # the plan is above the builders; they only read it
    from titanlm.plan import PipelinePlan


def split_stage(model: Transformer, stage: int, pipeline: PipelinePlan) -> Transformer:
    """A copy of the (meta-device) model holding only this stage's share."""
    part = copy.deepcopy(model)
    first_layer = pipeline.first_layer(stage)
    keep = {str(i) for i in range(first_layer, first_layer + pipeline.layers_per_stage[stage])}
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
    if stage != pipeline.num_stages - 1:
        part.norm = None
        part.output = None
    return part


def pipeline_parts(model: Transformer, pp_rank: int, pipeline: PipelinePlan) -> list[Transformer]:
    """This rank's stage models, in the order of `pipeline.stages_of(pp_rank)`."""
    return [split_stage(model, stage, pipeline) for stage in pipeline.stages_of(pp_rank)]


def build_schedule(
    parts: list[Transformer],
    stage_ids: tuple[int, ...],
    pp_mesh: DeviceMesh,
    device: torch.device,
    pipeline: PipelinePlan,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    stages = [
        PipelineStage(part, stage_id, pipeline.num_stages, device, group=pp_mesh.get_group())
        for part, stage_id in zip(parts, stage_ids)
    ]
    schedule_class = get_schedule_class(pipeline.schedule)
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
