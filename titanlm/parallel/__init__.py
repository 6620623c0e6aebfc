"""Parallelism: the mesh (`ParallelDims`) and one function per technique, applied by `parallelize.parallelize`."""

from titanlm.parallel.parallel_dims import Meshes, ParallelDims, ParallelismError

__all__ = ["Meshes", "ParallelDims", "ParallelismError"]
