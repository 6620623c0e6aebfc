"""The parallel layout: degrees from `[parallelism]`, checked against the world size, and the mesh.

The mesh has the dimensions (pp, dp_replicate, dp_shard, cp, tp), outermost first, so that
tensor parallelism, the most communication-hungry, stays on neighbouring ranks (same node).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titanlm.config.job_config import Parallelism
from titanlm.errors import ParallelismError

# Outermost first: tensor parallelism, the most communication-hungry, stays on neighbouring ranks.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Meshes:
    """The world mesh and the views each consumer needs.

    `dp`: 1-D over every rank that sees different data (data sharding).
    `fsdp`: where parameters are sharded, dp_shard x cp; 2-D (replicate, shard) for HSDP.
    `loss`: 1-D over every rank that holds different tokens, dp x cp (loss and token counts).
    """

    world: DeviceMesh
    dp: DeviceMesh
    fsdp: DeviceMesh
    loss: DeviceMesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> ParallelDims:
        if world_size < 1:
            raise ParallelismError(f"the world size must be >= 1 process, got {world_size}")
        dp_replicate = cfg.data_parallel_replicate_degree
        tp, pp, cp = cfg.tensor_parallel_degree, cfg.pipeline_parallel_degree, cfg.context_parallel_degree
        others = dp_replicate * tp * pp * cp
        dp_shard = cfg.data_parallel_shard_degree
        if dp_shard == -1:
            if world_size % others:
                raise ParallelismError(
                    f"world size {world_size} is not divisible by data_parallel_replicate_degree x "
                    f"tensor_parallel_degree x pipeline_parallel_degree x context_parallel_degree = {others}; "
                    "change the degrees in [parallelism] or the number of processes"
                )
            dp_shard = world_size // others
        product = others * dp_shard
        if product != world_size:
            raise ParallelismError(
                f"[parallelism] degrees multiply to {product} (dp_replicate {dp_replicate} x dp_shard "
                f"{dp_shard} x cp {cp} x tp {tp} x pp {pp}) but the world size is {world_size}; "
                "make them equal, or set data_parallel_shard_degree = -1 to infer it"
            )
        return cls(dp_replicate, dp_shard, cp, tp, pp, world_size)

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> dict[str, int]:
        """The mesh's dimensions, outermost first, and their sizes."""
        return {name: getattr(self, name) for name in MESH_DIMS}

    def coordinates(self, rank: int) -> dict[str, int]:
        """A global rank's index along each mesh dimension (ranks fill the mesh row-major)."""
        coords = {}
        for name, size in reversed(self.sizes().items()):
            coords[name] = rank % size
            rank //= size
        return {name: coords[name] for name in MESH_DIMS}

    def ranks_of_pp_rank(self, pp_rank: int) -> range:
        """The global ranks holding pipeline rank `pp_rank`'s stages (pp is the outermost dimension)."""
        per_stage = self.world_size // self.pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)

    def build_meshes(self, device_type: str) -> Meshes:
        sizes = self.sizes()
        world = init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes))
        dp = world["dp_replicate", "dp_shard"]._flatten("dp")
        if self.cp == 1:
            fsdp = world["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else world["dp_shard"]
            return Meshes(world=world, dp=dp, fsdp=fsdp, loss=dp)
        # cp ranks split the same rows: each holds part of the loss, and they shard parameters along
        # with dp_shard. (replicate, shard x cp) is built as a view of dp x cp because torch deprecates
        # slicing a flattened dim out of the root mesh.
        loss = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        hsdp = loss._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp"))
        fsdp = hsdp if self.dp_replicate > 1 else hsdp["dp_shard_cp"]
        return Meshes(world=world, dp=dp, fsdp=fsdp, loss=loss)
