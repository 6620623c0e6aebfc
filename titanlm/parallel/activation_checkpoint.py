"""Activation checkpointing: recompute activations in backward instead of storing them.

- full: every block (or the first `layer_fraction` of them, InternEvo's `checkpoint = 0.5`) keeps
  only its input and recomputes everything in backward.
- selective: per operator, inside every block: outputs of the expensive ops (matmuls, attention)
  are kept, the cheap elementwise ones (norms, rope, SwiGLU gating, residual adds) recomputed, so
  most of the memory of elementwise activations is saved for a few percent of recompute time.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titanlm.models.transformer import Transformer

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_mm.default,
}


def _keep_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Transformer, mode: str, recomputed_layers: int) -> None:
    """`recomputed_layers`: full mode wraps the blocks with a smaller global index (pipeline stages keep
    global layer keys, so the fraction applies to the whole model)."""
    if mode == "none":
        return
    blocks = list(model.layers.named_children())
    if mode == "full":
        for layer_id, block in blocks:
            if int(layer_id) < recomputed_layers:
                model.layers.register_module(layer_id, checkpoint_wrapper(block, preserve_rng_state=False))
        return
    context_fn = partial(create_selective_checkpoint_contexts, _keep_expensive_ops)
    for layer_id, block in blocks:
        model.layers.register_module(
            layer_id, checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
        )
