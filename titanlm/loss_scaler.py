"""Dynamic loss scaling for float16 training, with InternEvo's grad_scaler semantics.

torch.amp.GradScaler cannot be used here: it expects plain tensors and unscales per device,
while FSDP2 gradients are DTensor shards and the overflow check must agree across all ranks.
The trainer unscales with `1 / scale` and feeds the (global) grad-norm's finiteness to `update`.
"""

from __future__ import annotations

import math

from titanlm.config import ConfigError
from titanlm.config.job_config import GradScaler


def check_grad_scaler(cfg: GradScaler) -> None:
    """Refuse settings under which the scale could never shrink, grow, or stay positive, naming the key."""
    scales = {"initial_scale": cfg.initial_scale, "min_scale": cfg.min_scale, "max_scale": cfg.max_scale}
    rules = {
        **{name: (math.isfinite(value) and value > 0, "a finite number > 0") for name, value in scales.items()},
        "growth_interval": (cfg.growth_interval >= 1, ">= 1"),
        "growth_factor": (math.isfinite(cfg.growth_factor) and cfg.growth_factor > 1, "a finite number > 1"),
        "backoff_factor": (0 < cfg.backoff_factor < 1, "in (0, 1)"),
        "hysteresis": (cfg.hysteresis >= 1, ">= 1"),
    }
    for name, (ok, must) in rules.items():
        if not ok:
            raise ConfigError(f"grad_scaler.{name} must be {must}, got {getattr(cfg, name)!r}")
    if not cfg.min_scale <= cfg.initial_scale <= cfg.max_scale:
        raise ConfigError(
            f"grad_scaler.initial_scale {cfg.initial_scale!r} must lie between grad_scaler.min_scale "
            f"{cfg.min_scale!r} and grad_scaler.max_scale {cfg.max_scale!r}"
        )


class DynamicLossScaler:
    def __init__(self, cfg: GradScaler) -> None:
        """`cfg` as the plan checked it (`check_grad_scaler`)."""
        self.cfg = cfg
        self.scale = float(cfg.initial_scale)
        self._finite_streak = 0
        self._hysteresis_left = cfg.hysteresis

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

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self._finite_streak = int(state["finite_streak"])
        self._hysteresis_left = int(state["hysteresis_left"])
