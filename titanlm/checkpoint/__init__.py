"""Checkpointing through torch.distributed.checkpoint (DCP): save, resume exactly, start from other weights."""

from titanlm.checkpoint.content import PARTS, CheckpointError
from titanlm.checkpoint.manager import CheckpointManager
from titanlm.checkpoint.train_state import TrainState

__all__ = ["PARTS", "CheckpointError", "CheckpointManager", "TrainState"]
