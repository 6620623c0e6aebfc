"""Per-step metrics: one human line, one JSON line in metrics.jsonl, optional TensorBoard and W&B scalars.

The human line follows InternEvo's `key=value,...` style so existing log scrapers keep working;
metrics.jsonl carries the same record for scripts (see README "Metrics"), and this module reads it
back for `titanlm.tools.plot`.

metrics.jsonl holds, in order of writing:
- a start record `{"event": "start", "run", "resumed_from_step", "time"}` each time a trainer starts;
  a resumed run repeats its run id, a run from step 0 gets a new one;
- a small record `{"step", "loss", "lr", "grad_norm"}` for every step that is not logged;
- the full record (METRIC_KEYS and more) of every logged step, which is also the human line;
- validation records `{"step", "valid_loss", ...}`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import resource
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from titanlm.data.datasets import TextTokenDataset
from titanlm.data.packing import PackedDataset
from titanlm.models.flops import document_lengths, internevo_tflops, training_flops
from titanlm.plan import OutputPlan, RunPlan

logger = logging.getLogger("titanlm")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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
    "step",
    "loss",
    "tgs",
    "tflops",
    "mfu",
    "lr",
    "loss_scale",
    "grad_norm",
    "memory_gib",
    "num_consumed_tokens",
    "inf_nan_skip_batches",
    "fwd_bwd_time",
    "eta",
)
STEP_KEYS = ("step", "loss", "lr", "grad_norm")  # what every step records, logged or not
ETA_WINDOW = 20  # steps whose mean time predicts the rest


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


def epoch_tokens(dataset: object) -> int | None:
    """Tokens in one pass over the training data, when the dataset has a size (bin and demo data)."""
    if isinstance(dataset, PackedDataset):
        return int(dataset.documents.lengths().sum())
    if isinstance(dataset, TextTokenDataset):
        return dataset.windows_per_epoch * dataset.seq_len
    return None


def plan_line(done_steps: int, steps: int, global_batch: int, seq_len: int, data_tokens: int | None) -> str:
    """What the run is about to cover: steps, tokens, and epochs of the data when its size is known."""
    if done_steps >= steps:
        return f"run: already at step {done_steps} of {steps}, nothing to train"
    tokens = (steps - done_steps) * global_batch * seq_len
    epochs = f"{tokens / data_tokens:.3g} epochs of the data's {data_tokens:,} tokens" if data_tokens else "epochs n/a"
    return (
        f"run: steps {done_steps + 1}-{steps} of {steps}, {steps - done_steps} x {global_batch} x {seq_len} = "
        f"{tokens:,} tokens, {epochs}"
    )


def format_line(record: dict[str, Any]) -> str:
    """The record as the log's key=value line: numbers to 6 significant digits, the ETA as h:mm:ss, and
    figures that are unknown on this device (None, e.g. mfu without a known peak) left out."""
    parts = []
    for key, value in record.items():
        if value is None:
            continue
        if key == "eta":
            value = _clock(value)
        elif isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _as_numbers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with their tensors replaced by Python floats, fetched in one device-to-host copy."""
    tensors = [value for record in records for value in record.values() if isinstance(value, torch.Tensor)]
    if not tensors:
        return records
    device = tensors[0].device
    values = iter(torch.stack([t.detach().to(device, torch.float64) for t in tensors]).tolist())
    return [
        {key: next(values) if isinstance(value, torch.Tensor) else value for key, value in record.items()}
        for record in records
    ]


@dataclass
class Run:
    id: str  # empty for records written before runs had start records
    records: list[dict[str, Any]]


def read_runs(path: str) -> list[Run]:
    """The runs in a metrics.jsonl, in the order they last started (the newest last).

    A resume continues its run from the step it resumed at: records of later steps, written
    before the crash that the resume undoes, are dropped. A line that is not a record (cut short by a
    killed run, not UTF-8, not a JSON object, a step that is not a whole number, a start record without
    its run id) is skipped with one warning naming the file and line, so that one bad line appended to
    the file never blocks a resume or a plot.
    """
    runs: dict[str, Run] = {}
    run = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            record, problem = _record(raw)
            if problem:
                logger.warning(f"{path} line {number} {problem}; skipped it")
                continue
            if record.get("event") == "start":
                run = runs.pop(record["run"], None) or Run(record["run"], [])
                runs[run.id] = run
                run.records = [r for r in run.records if r["step"] <= record["resumed_from_step"]]
            elif "step" in record:
                if run is None:
                    run = runs.setdefault("", Run("", []))
                run.records.append(record)
    return list(runs.values())


def _record(raw: bytes) -> tuple[dict[str, Any], str]:
    """A metrics.jsonl line as a record, or what is wrong with it (blank lines are empty records)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return {}, f"is not UTF-8 text ({e.reason})"
    if not text.strip():
        return {}, ""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, f"is not valid JSON ({e.msg}; cut short by a killed run?)"
    if not isinstance(record, dict):
        return {}, "is not a JSON object"
    if record.get("event") == "start":
        if not isinstance(record.get("run"), str) or not _is_step(record.get("resumed_from_step")):
            return {}, 'is a start record without its "run" id (a string) and "resumed_from_step" (an integer)'
    elif "step" in record and not _is_step(record["step"]):
        return {}, f'has "step" {record["step"]!r}, not an integer'
    return record, ""


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ends_a_line(path: str) -> bool:
    """Whether the file is empty or its last byte ends a line."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class MetricsLogger:
    """Writes the dump folder's records on the main rank only: train.log (the log lines), config.toml,
    metrics.jsonl and the optional TensorBoard and W&B scalars. Every rank calls it, so no rank needs
    special-casing, and every rank gets the logged records back as numbers."""

    def __init__(self, output: OutputPlan, steps: int, is_main: bool) -> None:
        """`output`: the plan's dump folder, writers and configuration record; `steps`: the run's last step."""
        self.is_main = is_main
        self.steps = steps
        self._step_seconds: deque[float] = deque(maxlen=ETA_WINDOW)
        self._kept: list[dict[str, Any]] = []  # the steps since the last log, tensors still on the device
        self._output = output
        self.folder = output.dump_folder
        self._jsonl_path = os.path.join(self.folder, "metrics.jsonl")
        self._log_file = self._jsonl = self._tb = self._wandb = self._early = None
        if not is_main:
            return
        # Nothing is written before `start`, which comes once the start-up has loaded what it loads, so that a
        # refused start leaves no files behind; the log lines until then wait here for train.log.
        self._early = logging.handlers.MemoryHandler(1 << 20, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        logger.addHandler(self._early)

    def start(self, resumed_from_step: int) -> None:
        """Write the dump folder's files, and open the run's record: a resumed run continues the newest run
        in metrics.jsonl (same id, in W&B too), a run from step 0 starts a new one."""
        if not self.is_main:
            return
        output = self._output
        os.makedirs(self.folder, exist_ok=True)
        self._log_file = logging.FileHandler(os.path.join(self.folder, "train.log"), encoding="utf-8")
        self._log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.removeHandler(self._early)
        self._early.setTarget(self._log_file)
        self._early.flush()
        self._early.close()
        self._early = None
        logger.addHandler(self._log_file)
        with open(os.path.join(self.folder, "config.toml"), "w", encoding="utf-8") as f:
            f.write(output.config_toml)
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
        if not _ends_a_line(self._jsonl_path):  # a run killed mid-write: never glue the next record onto it
            self._jsonl.write("\n")
        if output.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.folder, "tb"))
        runs = read_runs(self._jsonl_path) if resumed_from_step else []
        run_id = runs[-1].id if runs and runs[-1].id else f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        start = {
            "event": "start",
            "run": run_id,
            "resumed_from_step": resumed_from_step,
            "time": datetime.now().isoformat(timespec="seconds"),
        }
        self._jsonl.write(json.dumps(start) + "\n")
        self._jsonl.flush()
        if self._output.wandb:
            import wandb

            self._wandb = wandb.init(
                project=self._output.wandb_project,
                name=self._output.run_name,
                id=run_id,
                resume="allow",
                dir=self.folder,
                config=self._output.config_values,
            )

    def keep_step(self, record: dict[str, Any]) -> None:
        """A step that is not logged: its loss, lr and grad norm wait, on the device, for the next log."""
        self._step_seconds.append(record["step_time"] + record["data_time"])
        self._kept.append({key: record[key] for key in STEP_KEYS})

    def log_step(self, record: dict[str, Any]) -> dict[str, Any]:
        """A logged step: the full record with `eta` (seconds left at the recent step rate) added."""
        self._step_seconds.append(record["step_time"] + record["data_time"])
        eta = sum(self._step_seconds) / len(self._step_seconds) * (self.steps - record["step"])
        return self.log({**record, "eta": eta})

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the kept steps' records, then `record` as a line and a record; return it as numbers."""
        *kept, record = _as_numbers([*self._kept, record])
        self._kept = []
        if self.is_main:
            for small in kept:
                self._write(small)
            logger.info(format_line(record))
            self._write(record)
            self._jsonl.flush()
        return record

    def flush(self) -> None:
        """Write the steps kept since the last log (a run that stops between two logs)."""
        kept, self._kept = _as_numbers(self._kept), []
        if self.is_main and kept:
            for small in kept:
                self._write(small)
            self._jsonl.flush()

    def _write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._early is not None:  # a start that was refused: its lines were on the console
            logger.removeHandler(self._early)
            self._early.close()
        if self._log_file is not None:
            logger.removeHandler(self._log_file)
            self._log_file.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Step timing and the throughput figures of logged steps (tgs, tflops, mfu, memory).

    Only timed steps wait for the device (`torch.cuda.synchronize`) and count documents; the others
    pay nothing for metrics, so a run's speed does not depend on metrics.log_freq.
    """

    def __init__(self, plan: RunPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.peak_flops = device_peak_flops(device, plan.precision.param_dtype, plan.output.peak_tflops)

    def now(self, timed: bool) -> float:
        """The time, after the device has finished the work queued so far when `timed`."""
        if timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def of(self, micro_batches: list[dict[str, torch.Tensor]], step_time: float) -> dict[str, float | None]:
        """tgs (tokens per GPU per second), InternEvo's tflops, MFU and peak memory of a timed step.
        This rank's rows stand for 1/dp of the global batch; attention counts real documents."""
        plan, world = self.plan, self.plan.world_size
        batch, args = plan.batch, plan.model_args
        lengths = [n for mb in micro_batches for n in document_lengths(mb)]
        useful_flops = training_flops(args, lengths) * plan.dims.dp
        return {
            "tgs": batch.tokens_per_step / world / step_time,
            "tflops": internevo_tflops(
                args,
                batch.global_batch_size,
                batch.seq_len,
                step_time,
                world,
                recompute=plan.activation_checkpoint != "none",
            ),
            "mfu": useful_flops / (step_time * world * self.peak_flops) if self.peak_flops else None,
            "memory_gib": peak_memory_gib(self.device),
        }
