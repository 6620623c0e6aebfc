"""The optimizer update after a step's backward: unscale, clip and step, or skip a step whose
gradients are inf/NaN, count the skips and stop a run that has diverged."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from titanlm.config.job_config import Training
from titanlm.loss_scaler import LossScaler
from titanlm.parallel.float8 import precompute_scales
from titanlm.parallel.grad_norm import clip_grads_, global_grad_norm
from titanlm.plan import RunPlan

logger = logging.getLogger("titanlm")


class OptimizerUpdate:
    """Applies the accumulated gradients. Every rank takes the same branches: the grad norm is global.

    `skipped` counts all skipped steps (InternEvo's inf_nan_skip_batches); `consecutive_skips` those
    in a row, toward training.max_consecutive_skips. Under float16, an overflow while the loss scale
    can still back off is the scaler finding its level, not divergence, and is not counted in a row.
    """

    def __init__(
        self,
        plan: RunPlan,
        cfg: Training,
        parts: list[nn.Module],
        optimizer: Optimizer,
        lr_scheduler: LRScheduler,
        loss_scaler: LossScaler,
        pp_group: dist.ProcessGroup | None,
        is_main: bool,
    ) -> None:
        self.plan, self.cfg = plan, cfg
        self.parts, self.optimizer, self.lr_scheduler = parts, optimizer, lr_scheduler
        self.loss_scaler = loss_scaler
        self.pp_group = pp_group
        self.is_main = is_main
        self.skipped = 0
        self.consecutive_skips = 0
        self.warned_zero_grads = False

    def __call__(self, step: int) -> torch.Tensor:
        """Update for `step` (the step being finished); returns the global grad norm, on the device."""
        params = [p for part in self.parts for p in part.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        self.loss_scaler.unscale_(grads)
        grad_norm = global_grad_norm(grads, pp_group=self.pp_group)
        norm = grad_norm.item()  # a host sync the update needs: whether to step at all
        finite = math.isfinite(norm)
        calibrating = self.loss_scaler.can_back_off  # before update() moves the scale
        self.loss_scaler.update(overflow=not finite)
        if finite or not self.cfg.skip_nan_inf_steps:
            # A NaN norm is not clipped: its factor would turn every gradient NaN, not only the NaN ones.
            if self.cfg.max_norm > 0 and not math.isnan(norm):
                clip_grads_(params, self.cfg.max_norm, grad_norm)
            self.optimizer.step()
            precompute_scales(self.parts, self.plan.float8)
            self.consecutive_skips = 0
        else:
            self.skipped += 1
            if not calibrating:
                self.consecutive_skips += 1
            self._warn_skipped(step, norm, calibrating)
        if norm == 0.0:
            self._warn_zero_grads(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return grad_norm

    def diverged(self) -> bool:
        """training.max_consecutive_skips steps in a row were skipped: the run should stop."""
        limit = self.cfg.max_consecutive_skips
        return bool(limit) and self.consecutive_skips >= limit

    def _warn_skipped(self, step: int, norm: float, calibrating: bool) -> None:
        if not self.is_main:
            return
        if calibrating:
            logger.warning(
                f"step {step}: grad norm is {norm}, update skipped; the float16 loss scale backs off "
                f"(now {self.loss_scaler.scale:g}), not counted toward training.max_consecutive_skips"
            )
            return
        limit = self.cfg.max_consecutive_skips
        stop = f"the run stops at {limit}" if limit else "0: the run never stops"
        logger.warning(
            f"step {step}: grad norm is {norm}, update skipped ({self.consecutive_skips} in a row; "
            f"training.max_consecutive_skips = {limit}: {stop})"
        )

    def _warn_zero_grads(self, step: int) -> None:
        """Once per run: with every gradient exactly zero the step learns nothing."""
        if self.warned_zero_grads or not self.is_main:
            return
        self.warned_zero_grads = True
        cause = (
            f"the float16 gradients underflowed at loss scale {self.loss_scaler.scale:g} (raise "
            "grad_scaler.initial_scale and grad_scaler.min_scale)"
            if self.plan.precision.loss_scaling
            else "the loss does not depend on the weights"
        )
        logger.warning(
            f"step {step}: every gradient is zero (grad norm 0), so the step learns nothing: {cause}, "
            "or none of the step's labels counts toward the loss; check the loss (warned once per run)"
        )
