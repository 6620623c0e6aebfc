"""Validation: mean token loss and perplexity over the whole validation set, overall and per data type.

Sums of token losses and token counts are accumulated per type on every rank and summed over
the ranks that hold different tokens, so the result is the exact token-weighted mean whatever
the parallel layout (padding rows added to even out the ranks carry no labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titanlm.data.datasets import Batch
from titanlm.loss import IGNORE_INDEX, token_cross_entropy


@torch.no_grad()
def validation_metrics(
    logits_of: Callable[[Batch], torch.Tensor | None],
    batches: Iterable[Batch],
    prepare: Callable[[Batch], Batch],
    forward_context: Callable[[], AbstractContextManager],
    types: list[str],
    groups: list[dist.ProcessGroup | None],
    device: torch.device,
) -> dict[str, float]:
    """`prepare` moves a batch to the device and cuts this rank's share (context parallelism);
    `logits_of` runs the model in eval mode and returns None on ranks without logits (pipeline
    stages before the last), which then add nothing; `groups` are the groups to sum over (the
    data x context ranks, and the pipeline ranks; None = absent)."""
    # Index len(types) holds the totals over all labelled tokens; the others one type each.
    loss_sums = torch.zeros(len(types) + 1, device=device, dtype=torch.float64)
    counts = torch.zeros(len(types) + 1, device=device, dtype=torch.float64)
    for batch in batches:
        batch = prepare(batch)
        labels = batch["labels"].flatten()
        with forward_context():
            logits = logits_of(batch)
            if logits is None:
                continue
            losses = token_cross_entropy(logits, labels, reduction="none")
        if isinstance(losses, DTensor):
            losses = losses.full_tensor()
        labelled = labels != IGNORE_INDEX
        losses, type_ids = (
            losses[labelled].double(),
            batch["type_ids"].flatten()[labelled] if "type_ids" in batch else None,
        )
        loss_sums[-1] += losses.sum()
        counts[-1] += losses.numel()
        if type_ids is not None:
            typed = type_ids >= 0
            loss_sums.index_add_(0, type_ids[typed], losses[typed])
            counts.index_add_(0, type_ids[typed], torch.ones_like(losses[typed]))
    for group in filter(None, groups):
        dist.all_reduce(loss_sums, group=group)
        dist.all_reduce(counts, group=group)
    metrics: dict[str, float] = {}
    for name, total, count in zip([*(f"/{t}" for t in types), ""], loss_sums.tolist(), counts.tolist()):
        if count > 0:
            metrics[f"valid_loss{name}"] = total / count
            metrics[f"valid_ppl{name}"] = math.exp(min(total / count, 50.0))
    return metrics
