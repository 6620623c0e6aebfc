"""The attention backend switch.

Every backend takes q, k, v as [batch, heads, seq, head_dim] (k and v may have fewer heads:
grouped-query attention) and returns [batch, heads, seq, head_dim]. Only causal attention over
the whole sequence exists so far; document-masked backends for packed samples join this table.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention via PyTorch SDPA, which picks flash/memory-efficient/math kernels itself."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_causal}


def get_attention_backend(name: str) -> AttentionFn:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend '{name}' is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]
