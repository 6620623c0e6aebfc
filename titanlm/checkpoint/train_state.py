"""The training loop's own state: what a resume needs besides model, optimizer, schedule and data."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch


def capture_rng() -> dict[str, torch.Tensor]:
    """The torch CPU generator and, on a GPU run, this rank's CUDA generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    """Set the generators; a CUDA state is skipped when this run has no GPU (e.g. a GPU checkpoint on CPU)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """The loop's counters and loss scale, plus the process RNG at the moment of saving.

    A DCP `Stateful`. Every rank seeds and draws the same way (no dropout, no per-rank seeds),
    so the ranks' RNG states are equal and one copy serves any world size; DCP keeps a single
    copy of a key that all ranks save. The loss-scaler state and the RNG are saved as opaque
    blobs so that a run may switch float16 on or off, or move between CPU and GPU, on resume.

    `consecutive_skips` is the number of inf/NaN steps skipped in a row up to and including
    `step` (0 when `step` updated the weights). It travels in the RNG blob: DCP refuses to load
    a key that the checkpoint lacks, so a new key would make every older checkpoint unloadable.
    So does `schedule`, the settings that shaped the saved run's schedule (`RunPlan.schedule`), which
    a resume compares with its own; None for checkpoints saved before it was recorded.
    """

    step: int = 0
    num_consumed_tokens: int = 0
    inf_nan_skip_batches: int = 0
    loss_scaler: dict[str, float | int] | None = None
    consecutive_skips: int = 0
    schedule: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "num_consumed_tokens": self.num_consumed_tokens,
            "inf_nan_skip_batches": self.inf_nan_skip_batches,
            "loss_scaler": pickle.dumps(self.loss_scaler),
            "rng": pickle.dumps(
                {**capture_rng(), "consecutive_skips": self.consecutive_skips, "schedule": self.schedule}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved counters and put the process RNG back where it was at the save."""
        self.step = int(state["step"])
        self.num_consumed_tokens = int(state["num_consumed_tokens"])
        self.inf_nan_skip_batches = int(state["inf_nan_skip_batches"])
        self.loss_scaler = pickle.loads(state["loss_scaler"])
        rng = pickle.loads(state["rng"])
        self.consecutive_skips = int(rng.get("consecutive_skips", 0))  # absent before the counter existed
        self.schedule = rng.get("schedule")
        restore_rng(rng)
