"""Gradient clipping: one global norm over gradients laid out in different ways, and torch's
clip_grads_with_norm_ applied to each layout, so clipping matches torch's clip_grad_norm_ on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from titanlm.parallel.grad_norm import clip_grads_, global_grad_norm


def with_grads(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(grad)) for grad in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    return params


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def test_clipping_scales_gradients_exactly_as_torch_clip_grad_norm_does() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5) * 3, torch.randn(4, 7) * 3]
    ours, theirs = with_grads(grads), with_grads(grads)
    norm = global_grad_norm([p.grad for p in ours])
    clip_grads_(ours, 1.0, norm)
    assert torch.equal(norm, nn.utils.clip_grad_norm_(theirs, 1.0))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])).item() <= 1.0 + 1e-6


def test_gradients_within_max_norm_are_left_bit_for_bit() -> None:
    grads = [torch.randn(5), torch.randn(3, 3)]
    params = with_grads(grads)
    clip_grads_(params, 1e3, global_grad_norm([p.grad for p in params]))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_gradients_on_two_meshes_and_plain_tensors_are_clipped_together() -> None:
    """TP weights live on the (dp, tp) mesh, norm weights without sequence parallelism on dp alone, and
    one foreach kernel cannot mix them; clipping must still scale all of them by one factor."""
    if dist.is_initialized():  # a trainer run earlier in this process leaves its one-rank group
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        grads = [torch.randn(4, 4) * 3, torch.randn(4) * 3, torch.randn(3) * 3]
        reference = with_grads(grads)
        expected_norm = nn.utils.clip_grad_norm_(reference, 1.0)
        layouts = [(mesh, [Shard(0), Shard(1)]), (mesh["dp"], [Shard(0)]), None]
        params = []
        for grad, layout in zip(grads, layouts):
            param = nn.Parameter(
                distribute_tensor(torch.zeros_like(grad), *layout) if layout else torch.zeros_like(grad)
            )
            param.grad = distribute_tensor(grad.clone(), *layout) if layout else grad.clone()
            params.append(param)
        norm = global_grad_norm([p.grad for p in params])
        clip_grads_(params, 1.0, norm)
        assert torch.allclose(norm, expected_norm)
        assert all(torch.allclose(full(p.grad), r.grad) for p, r in zip(params, reference))
    finally:
        dist.destroy_process_group()
