"""Activation checkpointing: recompute each block's activations in backward instead of storing them."""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from titanlm.models.transformer import Transformer


def apply_ac(model: Transformer, mode: str) -> None:
    if mode == "none":
        return
    if mode != "full":
        raise ValueError(f"activation_checkpoint.mode '{mode}' is unknown; choose none or full")
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, checkpoint_wrapper(block, preserve_rng_state=False))
