"""FSDP2: shard each block and the root over the data-parallel mesh (HSDP when it has 2 dims),
optionally keeping the shards in host memory (CPU offload)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from titanlm.models.transformer import Transformer

if TYPE_CHECKING:  # the plan is above the builders; they only read it
    from titanlm.plan import FSDPPlan, PrecisionPlan


def apply_fsdp(model: Transformer, mesh: DeviceMesh, fsdp: FSDPPlan, precision: PrecisionPlan) -> None:
    """Wrap every transformer block and then the root.

    `fsdp.reshard_after_forward`: "always" frees gathered parameters after forward (ZeRO-3 memory),
    "never" keeps them until backward (ZeRO-2 traffic), "default" does the former for blocks and
    skips it for the root, whose parameters backward needs first.

    Gradients are summed, not averaged, across ranks: the loss is already normalised by the
    global token count, so the sum is the exact gradient whatever the number of ranks. Gloo
    has no PREMUL_SUM, hence force-sum reductions.

    `fsdp.cpu_offload`: parameter, gradient and optimizer-state shards live in host memory; FSDP copies
    a block's shards to the device before its all-gather and its gradient shards back after the
    reduce-scatter, asynchronously from pinned memory where the plan pins it (CUDA).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype)
    offload_policy = CPUOffloadPolicy(pin_memory=fsdp.pin_memory) if fsdp.cpu_offload else OffloadPolicy()
    shard = partial(fully_shard, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    block_reshard = fsdp.reshard_after_forward != "never"
    root_reshard = fsdp.reshard_after_forward == "always"
    for block in model.layers.values():
        shard(block, reshard_after_forward=block_reshard)
    shard(model, reshard_after_forward=root_reshard)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
