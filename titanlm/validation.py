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
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from titanlm.data.datasets import IGNORE_INDEX, Batch



@torch.no_grad()
def validation_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    prepare: Callable[[Batch], Batch],
    forward_context: Callable[[], AbstractContextManager],
    types: list[str],
    group: dist.ProcessGroup,
    device: torch.device,
) -> dict[str, float]:
    """`prepare` moves a batch to the device and cuts this rank's share (context parallelism)."""
    was_training = model.training
    model.eval()
    # Index len(types) holds the totals over all labelled tokens; the others one type each.
    loss_sums = torch.zeros(len(types) + 1, device=device, dtype=torch.float64)
    counts = torch.zeros(len(types) + 1, device=device, dtype=torch.float64)
    for batch in batches:
        batch = prepare(batch)
        labels = batch["labels"].flatten()
        with forward_context():
            logits = model(batch["input_ids"], batch.get("position_ids"), batch.get("document_ids"))
            losses = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        if isinstance(losses, DTensor):
            losses = losses.full_tensor()
        labelled = labels != IGNORE_INDEX
        losses, type_ids = losses[labelled].double(), batch["type_ids"].flatten()[labelled] if "type_ids" in batch else None
        loss_sums[-1] += losses.sum()
        counts[-1] += losses.numel()
        if type_ids is not None:
            typed = type_ids >= 0
            loss_sums.index_add_(0, type_ids[typed], losses[typed])
            counts.index_add_(0, type_ids[typed], torch.ones_like(losses[typed]))
    dist.all_reduce(loss_sums, group=group)
    dist.all_reduce(counts, group=group)
    model.train(was_training)
    metrics: dict[str, float] = {}
    for name, total, count in zip([*(f"/{t}" for t in types), ""], loss_sums.tolist(), counts.tolist()):
        if count > 0:
            metrics[f"valid_loss{name}"] = total / count
            metrics[f"valid_ppl{name}"] = math.exp(min(total / count, 50.0))
    return metrics
