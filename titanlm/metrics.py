"""Per-step metrics: one human line, one JSON line in metrics.jsonl, optional TensorBoard scalars.

The human line follows InternEvo's `key=value,...` style so existing log scrapers keep working;
metrics.jsonl carries the same record for scripts (see README "Metrics").
"""

from __future__ import annotations

import json
import logging
import os
import resource
from typing import Any

import torch

logger = logging.getLogger("titanlm")

# Dense bf16 peak FLOP/s by device-name fragment (vendor spec sheets, no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.5e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,
    "H800": 989.5e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}

METRIC_KEYS = (
    "step", "loss", "tgs", "tflops", "mfu", "lr", "loss_scale", "grad_norm", "memory_gib",
    "num_consumed_tokens", "inf_nan_skip_batches", "fwd_bwd_time",
)


def device_peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float) -> float | None:
    """The peak used for MFU: the configured one, else the table's bf16 figure for a known GPU.

    fp32 runs and CPUs have no entry: their MFU is reported as null unless a peak is configured.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return peak
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def format_line(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"{key}={value}")
    return ",".join(parts)


class MetricsLogger:
    """Writes records on the main rank only; every rank calls it so no rank needs special-casing."""

    def __init__(self, dump_folder: str, is_main: bool, enable_tensorboard: bool) -> None:
        self.is_main = is_main
        self._jsonl = None
        self._tb = None
        if not is_main:
            return
        os.makedirs(dump_folder, exist_ok=True)
        self._jsonl = open(os.path.join(dump_folder, "metrics.jsonl"), "a", encoding="utf-8")
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(dump_folder, "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        logger.info(format_line(record))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
