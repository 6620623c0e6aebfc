"""Dynamic loss scaling for float16 training, with InternEvo's grad_scaler semantics.

torch.amp.GradScaler cannot be used here: it expects plain tensors and unscales per device,
while FSDP2 gradients are DTensor shards and the overflow check must agree across all ranks.
The trainer unscales with `1 / scale` and feeds the (global) grad-norm's finiteness to `update`.
"""

from __future__ import annotations

from titanlm.config.job_config import GradScaler


class DynamicLossScaler:
    def __init__(self, cfg: GradScaler) -> None:
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
