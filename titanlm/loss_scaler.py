"""Loss scaling: dynamic for float16 training, with InternEvo's grad_scaler semantics, and a fixed scale
of 1 for every other precision, as nanoGPT's `GradScaler(enabled=...)`, so that no caller asks which.

torch.amp.GradScaler cannot be used here: it expects plain tensors and unscales per device,
while FSDP2 gradients are DTensor shards and the overflow check must agree across all ranks.
The trainer scales the loss by `scale`, unscales the gradients with `unscale_` and feeds the (global)
grad-norm's finiteness to `update`.
"""

from __future__ import annotations

import torch

from titanlm.config.job_config import GradScaler
from titanlm.parallel.grad_norm import scale_grads_


class DynamicLossScaler:
    def __init__(self, cfg: GradScaler) -> None:
        """`cfg` as the config loader and the plan checked it (each field's range; min <= initial <= max)."""
        self.cfg = cfg
        self.scale = float(cfg.initial_scale)
        self._finite_streak = 0
        self._hysteresis_left = cfg.hysteresis

    @property
    def can_back_off(self) -> bool:
        """Whether an overflow can still shrink the scale: until then overflows are the scaler finding its level."""
        return self.scale > self.cfg.min_scale

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        scale_grads_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """Shrink after `hysteresis` overflows; grow after `growth_interval` clean steps in a row."""
        if overflow:
            self._finite_streak = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.cfg.backoff_factor, self.cfg.min_scale)
            return
        self._finite_streak += 1
        if self._finite_streak == self.cfg.growth_interval:
            self._finite_streak = 0
            self._hysteresis_left = self.cfg.hysteresis
            self.scale = min(self.scale * self.cfg.growth_factor, self.cfg.max_scale)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "finite_streak": self._finite_streak, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict[str, float | int] | None) -> None:
        """None: the checkpoint comes from a run that did not scale its loss; start from initial_scale."""
        if state is None:
            return
        self.scale = float(state["scale"])
        self._finite_streak = int(state["finite_streak"])
        self._hysteresis_left = int(state["hysteresis_left"])


class NoLossScaler:
    """The scaler of a run that does not scale its loss: scale 1, nothing to unscale, no overflow to
    back off from, and nothing to save (a checkpoint records None, as before this class existed)."""

    scale = 1.0
    can_back_off = False

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        pass

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict[str, float | int] | None) -> None:
        """A float16 checkpoint's scale has no use at this precision: ignored."""


LossScaler = DynamicLossScaler | NoLossScaler


def build_loss_scaler(cfg: GradScaler, enabled: bool) -> LossScaler:
    """The dynamic scaler where the plan scales the loss (`PrecisionPlan.loss_scaling`: float16), else NoLossScaler."""
    return DynamicLossScaler(cfg) if enabled else NoLossScaler()
