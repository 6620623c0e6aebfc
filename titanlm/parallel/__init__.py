"""Parallelism: the mesh (`ParallelDims`) and one function per technique, applied by `parallelize`."""

from titanlm.parallel.parallel_dims import Meshes, ParallelDims, ParallelismError
from titanlm.parallel.parallelize import parallelize

__all__ = ["Meshes", "ParallelDims", "ParallelismError", "parallelize"]
