"""The training loss: one token cross-entropy, used by training, chunked training and validation.

Losses are summed over tokens, in float32, and the caller divides by the number of labelled
tokens of the whole step on every rank, so neither accumulation nor the parallel layout changes
the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value the loss skips: prompts, document ends, padding


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of logits [..., vocab] against labels [...] in float32; "sum" over labelled
    tokens, or "none" for one loss per token (0 where the label is IGNORE_INDEX)."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _projected_loss(
    project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return token_cross_entropy(project(hidden), labels)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int,
    seq_shards: int = 1,
) -> torch.Tensor:
    """Summed cross-entropy of `project(hidden)` against `labels`, `chunk_tokens` tokens of logits at
    a time (0 = all at once).

    Each chunk's logits are recomputed in backward instead of kept, so at most one chunk of the
    [tokens, vocab] float32 logits exists at once (at 32K tokens and a 128K vocabulary the whole
    would be 16 GiB), for one extra output-projection forward.

    `project` is the output projection module, called on chunks [1, tokens, dim] so that tensor
    parallelism's hooks apply to each: under loss parallelism a chunk's logits are split over the
    vocabulary and its loss is a replicated DTensor. Under sequence parallelism `hidden` [batch,
    seq / seq_shards, dim] is this rank's share of the sequence and the projection all-gathers each
    chunk from the `seq_shards` ranks, so a chunk takes chunk_tokens / seq_shards tokens from each.
    """
    batch, local_seq, dim = hidden.shape
    local_tokens = batch * local_seq
    hidden = hidden.reshape(1, local_tokens, dim)
    # Row r: the labels of sequence shard r's tokens, in the order of the flattened hidden states, so
    # that labels[:, a:b] lines up with the all-gather of every shard's hidden[:, a:b].
    labels = labels.reshape(batch, seq_shards, local_seq).transpose(0, 1).reshape(seq_shards, local_tokens)
    step = max(chunk_tokens // seq_shards, 1)
    if chunk_tokens <= 0 or step >= local_tokens:
        return _projected_loss(project, hidden, labels)
    # sum() starts from 0, which adds to both plain tensors and replicated DTensors (they do not mix).
    return sum(
        checkpoint(
            _projected_loss,
            project,
            hidden[:, start : start + step],
            labels[:, start : start + step],
            use_reentrant=False,
        )
        for start in range(0, local_tokens, step)
    )
