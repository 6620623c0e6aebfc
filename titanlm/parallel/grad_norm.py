"""The global gradient norm, and gradient scaling, over parameters sharded in different ways.

Gradients can live on different meshes at once: TP-sharded weights on the (dp, tp) mesh,
norm weights without sequence parallelism on the dp mesh alone, plain tensors in a one-rank
job. Each group with the same mesh and placements gets one fused norm, turned into a full
(replicated) value; the groups are then combined, so the result is the norm a single process
would compute over the full gradients.

Under FSDP CPU offload the gradient shards are in host memory while the mesh communicates on the
GPU (NCCL has no CPU tensors): each group's norm is computed where its gradients are and only that
scalar moves to the mesh's device to be reduced.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _by_layout(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients (or parameters, laid out as their gradients) grouped so that each group can go through
    one foreach kernel."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        key = (tensor.device_mesh, tuple(tensor.placements)) if isinstance(tensor, DTensor) else None
        groups[key].append(tensor)
    return list(groups.values())


def scale_grads_(grads: list[torch.Tensor], factor: float) -> None:
    for group in _by_layout(grads):
        torch._foreach_mul_(group, factor)


def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients of `params` down so that their global norm, `total_norm`, is at most `max_norm`:
    torch's clip_grads_with_norm_ once per layout, as one foreach kernel cannot mix meshes."""
    for group in _by_layout(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm, foreach=True)


def global_grad_norm(
    grads: list[torch.Tensor], norm_type: float = 2.0, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The norm over all gradients of the model; `pp_group` adds the other pipeline stages' shares."""
    norms = []
    for group in _by_layout(grads):
        norm = torch.nn.utils.get_total_norm(group, norm_type=norm_type, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.to(norm.device_mesh.device_type).full_tensor()
        norms.append(norm)
    stacked = torch.stack(norms) if norms else torch.zeros(1)
    if norm_type == float("inf"):
        total = stacked.max()
        if pp_group is not None:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
        return total
    total = stacked.pow(norm_type).sum()
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.pow(1.0 / norm_type)
