"""The training loss: one token cross-entropy, used by training, chunked training and validation.

Losses are summed over tokens, in float32, and the caller divides by the number of labelled
tokens of the whole step on every rank, so neither accumulation nor the parallel layout changes
the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value the loss skips: prompts, document ends, padding


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of logits [..., vocab] against labels [...] in float32; "sum" over labelled
    tokens, or "none" for one loss per token (0 where the label is IGNORE_INDEX)."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _projected_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_cross_entropy(F.linear(hidden, weight), labels)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, `chunk_tokens` tokens at a
    time (0 = all at once).

    Each chunk's logits are recomputed in backward instead of kept, so at most one chunk of the
    [tokens, vocab] float32 logits exists at once (at 32K tokens and a 128K vocabulary the whole
    would be 16 GiB), for one extra output-projection forward.
    """
    hidden, labels = hidden.flatten(0, 1), labels.flatten()
    if chunk_tokens <= 0 or chunk_tokens >= hidden.shape[0]:
        return _projected_loss(hidden, weight, labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, label_chunk in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)):
        total = total + checkpoint(_projected_loss, hidden_chunk, weight, label_chunk, use_reentrant=False)
    return total
