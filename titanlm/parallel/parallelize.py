"""Apply every parallelism and wrapper to a meta-device model, in the one order that works.

float8 conversion first (it swaps nn.Linear for torchao's Float8Linear), then tensor parallelism
(it rewrites the linear layers into DTensor ones), then context
parallelism swaps the shared attention backend (before wrappers hide the modules), activation
checkpointing wraps blocks before compile (so recomputation is compiled too), and FSDP last,
because it must see the final module tree.
"""

from __future__ import annotations

import torch

from titanlm.config.job_config import Float8, JobConfig
from titanlm.models.transformer import Transformer, materialize
from titanlm.parallel.activation_checkpoint import apply_ac
from titanlm.parallel.compile import apply_compile
from titanlm.parallel.context_parallel import apply_cp, check_cp_divisibility
from titanlm.parallel.float8 import apply_float8
from titanlm.parallel.fsdp import apply_fsdp, reshard_policy
from titanlm.parallel.parallel_dims import Meshes, ParallelismError
from titanlm.parallel.tensor_parallel import apply_tp


def fsdp_applies(world_size: int, cpu_offload: bool) -> bool:
    """Whether parameters are FSDP2-wrapped: always with several ranks (where parameters must all
    be DTensors or none) and with CPU offload (FSDP2 is what keeps them in host memory, so a model
    too large for one GPU trains there), otherwise never.

    One process has nothing to shard: FSDP2 would only copy and cast every parameter twice per
    step and re-gather the bf16 copies for backward (measured: 11% of an H100 step on an 8-layer
    Llama3-8B cut). Such a job keeps fp32 weights and gets its low-precision compute from autocast
    (`autocast_dtype`), as torchtitan does; checkpoints hold the same fp32 weights either way.
    """
    return world_size > 1 or cpu_offload


def autocast_dtype(fsdp: bool, param_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a job computes in under torch.autocast (one without FSDP: `fsdp_applies`), or None."""
    return None if fsdp or param_dtype == torch.float32 else param_dtype


def check_cpu_offload(cpu_offload: bool, float8: Float8) -> None:
    """Refuse, in one line, what FSDP CPU offload does not combine with."""
    if cpu_offload and float8.enable and float8.enable_fsdp_float8_all_gather:
        # torchao's wrapper drops the precomputed scale when FSDP copies a shard to the GPU, and
        # computing it all-reduces host tensors, which NCCL cannot carry.
        raise ParallelismError(
            "parallelism.fsdp_cpu_offload does not combine with float8.enable_fsdp_float8_all_gather (the float8 "
            "weight scales would be computed in host memory); set float8.enable_fsdp_float8_all_gather = false, "
            "the matmuls still run in float8"
        )


def parallelize(
    model: Transformer, meshes: Meshes, cfg: JobConfig, param_dtype: torch.dtype, float8: Float8
) -> None:
    """`float8`: the settings in effect (`float8_settings` of cfg.float8 for this world)."""
    check_cpu_offload(cfg.parallelism.fsdp_cpu_offload, float8)
    if float8.enable:
        apply_float8(model, float8)
    if meshes.world["tp"].size() > 1:
        apply_tp(
            model,
            meshes.world["tp"],
            sequence_parallel=cfg.parallelism.sequence_parallel,
            loss_parallel=not cfg.parallelism.disable_loss_parallel,
        )
    cp, tp = meshes.world["cp"].size(), meshes.world["tp"].size()
    if cp > 1:
        check_cp_divisibility(cfg.training.seq_len, cp, tp if cfg.parallelism.sequence_parallel else 1)
        apply_cp(model, meshes.world["cp"])
    apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile.enable:
        apply_compile(model)
    if not fsdp_applies(meshes.world.size(), cfg.parallelism.fsdp_cpu_offload):
        return
    reduce_dtype = getattr(torch, cfg.training.mixed_precision_reduce)
    reshard = reshard_policy(cfg.parallelism.fsdp_reshard_after_forward, meshes.world["pp"].size() > 1)
    apply_fsdp(model, meshes.fsdp, param_dtype, reduce_dtype, reshard, cfg.parallelism.fsdp_cpu_offload)


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
