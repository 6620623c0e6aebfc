"""Apply every parallelism and wrapper to a meta-device model, in the one order that works.

float8 conversion first (it swaps nn.Linear for torchao's Float8Linear), then tensor parallelism
(it rewrites the linear layers into DTensor ones), then context
parallelism swaps the shared attention backend (before wrappers hide the modules), activation
checkpointing wraps blocks before compile (so recomputation is compiled too), and FSDP last,
because it must see the final module tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from titanlm.models.attention import build_attention_backend
from titanlm.models.transformer import Transformer, materialize
from titanlm.parallel.activation_checkpoint import apply_ac
from titanlm.parallel.compile import apply_compile
from titanlm.parallel.context_parallel import apply_cp
from titanlm.parallel.float8 import apply_float8
from titanlm.parallel.fsdp import apply_fsdp
from titanlm.parallel.parallel_dims import Meshes
from titanlm.parallel.pipeline import pipeline_parts
from titanlm.parallel.tensor_parallel import apply_tp

if TYPE_CHECKING:  # the plan is above the builders; they only read it
    from titanlm.plan import RunPlan


def parallelize(model: Transformer, meshes: Meshes, plan: RunPlan) -> None:
    """Apply the plan's float8, TP, CP, AC (and loss chunking), compile and FSDP to a meta-device
    model, in place."""
    if plan.float8.enable:
        apply_float8(model, plan.float8)
    if plan.tp.degree > 1:
        apply_tp(model, meshes.world["tp"], plan.tp.sequence_parallel, plan.tp.loss_parallel)
    if plan.dims.cp > 1:
        apply_cp(model, meshes.world["cp"])
    apply_ac(model, plan.activation_checkpoint, plan.recomputed_layers)
    model.loss_chunk_tokens = plan.loss.chunk_tokens  # the loss's own recomputation, chunk by chunk
    if plan.compile:
        apply_compile(model)
    if plan.fsdp.enabled:
        apply_fsdp(model, meshes.fsdp, plan.fsdp, plan.precision)


def build_model_parts(plan: RunPlan, meshes: Meshes, device: torch.device, seed: int) -> list[Transformer]:
    """This rank's model: the meta-device Transformer, cut to its pipeline stages (one part without
    pipeline parallelism), parallelized, then allocated on `device` and filled from `seed`."""
    with torch.device("meta"):
        model = Transformer(plan.model_args, build_attention_backend(plan.attention_backend))
    if plan.pipeline.degree > 1:
        parts = pipeline_parts(model, meshes.world["pp"].get_local_rank(), plan.pipeline)
    else:
        parts = [model]
    for part in parts:
        parallelize(part, meshes, plan)
        materialize_parallelized(part, device, plan.fsdp.cpu_offload)
        part.init_weights(seed)
        part.train()
    return parts


def materialize_parallelized(model: Transformer, device: torch.device, cpu_offload: bool) -> None:
    """Allocate a parallelized meta-device model (values still to be filled by `init_weights`).

    Under CPU offload the parameters go to host memory, where FSDP2 keeps their shards (it refuses
    any others), and the buffers (the rope frequencies) to `device`, where the blocks compute.
    """
    if not cpu_offload:
        materialize(model, device)
        return
    materialize(model, torch.device("cpu"))
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
