"""torch.compile per transformer block: identical blocks share one compiled graph."""

from __future__ import annotations

import torch

from titanlm.models.transformer import Transformer


def apply_compile(model: Transformer) -> None:
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, fullgraph=True))
