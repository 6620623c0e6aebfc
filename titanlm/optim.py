"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titanlm.config.job_config import LRScheduler, Optimizer


def build_optimizer(params: list[nn.Parameter], cfg: Optimizer, implementation: str) -> torch.optim.Optimizer:
    """`cfg` as the config loader checked it (each field's range); `implementation`: fused, foreach or
    for-loop, as the plan resolved `auto` (`RunPlan.optimizer_implementation`)."""
    impl = implementation
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )
    optimizer_cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name]
    return optimizer_cls(params, **kwargs)


def warmup_steps(cfg: LRScheduler, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, cfg: LRScheduler, total_steps: int) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`.

    Linear warmup from lr/warmup to lr, then decay to `min_lr_factor` x lr at the last step.
    """
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.decay_type == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def continue_schedule(scheduler: LambdaLR, peak_lr: float, step: int) -> None:
    """Set the learning rate of the step after `step` by this run's schedule and peak `peak_lr`.

    A resumed optimizer and scheduler carry what the saved run's schedule set (its peak, and the lr it
    computed for the next step); a run that changed training.steps, the warmup or optimizer.lr must
    follow its own from the first resumed step. Unchanged settings give the saved values exactly."""
    scheduler.base_lrs = [peak_lr for _ in scheduler.optimizer.param_groups]
    scheduler.last_epoch = step
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = peak_lr, rate
    scheduler._last_lr = rates  # what get_last_lr() reports: LambdaLR keeps it only in this attribute
