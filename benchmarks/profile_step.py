"""Where a training step's time goes: torch.profiler over a few steps of random batches, as one table.

    python benchmarks/profile_step.py --model.flavor 8B --model.n_layers 8 --training.seq_len 8192 \
        --training.local_batch_size 1 [any other titanlm override] [--steps 3] [--top 25]

Prints the top kernels by device time (CPU ops on a CPU machine) and the step's time split into
kinds (matmul, attention, normalization, elementwise, optimizer, copies/casts, communication).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from titanlm.config import load_config
from titanlm.train import build_trainer

KINDS = [  # first match wins; kernel names vary by library, so these are substrings, lower case
    ("communication", ("nccl", "all_gather", "reduce_scatter", "allreduce", "gloo")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "matmul", "aten::mm", "addmm", "_scaled_mm", "nvjet")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("normalization", ("norm", "rsqrt")),
    ("copies/casts", ("copy", "cast", "to_copy", "cat", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton", "silu", "mul", "add", "neg", "reduce")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def pop_int(argv: list[str], flag: str, default: int) -> int:
    if flag in argv:
        index = argv.index(flag)
        value = int(argv[index + 1])
        del argv[index : index + 2]
        return value
    return default


def main(argv: list[str]) -> None:
    steps, top = pop_int(argv, "--steps", 3), pop_int(argv, "--top", 25)
    cfg = load_config(["--data.dataset", "random", "--training.steps", str(10**9), *argv])
    trainer = build_trainer(cfg)
    vocab, seq, batch = trainer.plan.model_args.vocab_size, cfg.training.seq_len, cfg.training.local_batch_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    micro_batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    for _ in range(3):
        trainer.train_step([micro_batch])
    on_gpu = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as prof:
        records = [trainer.train_step([micro_batch]) for _ in range(steps)]
    trainer.close()

    # Kernels (or CPU ops) by name, in ms per step; user annotations such as "Optimizer.step" or
    # "FSDP::pre_forward" span other work and would count it twice.
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if getattr(event, "is_user_annotation", False):
            continue
        if on_gpu and event.device_type == DeviceType.CUDA:
            spent[event.name][0] += event.time_range.elapsed_us() / 1e3 / steps
        elif not on_gpu and event.device_type == DeviceType.CPU:
            spent[event.name][0] += event.self_cpu_time_total / 1e3 / steps
        else:
            continue
        spent[event.name][1] += 1 / steps
    rows = sorted(spent.items(), key=lambda item: -item[1][0])
    total = sum(ms for ms, _ in spent.values())
    step_ms = 1e3 * sum(r["step_time"] for r in records) / steps
    print(f"step {step_ms:.1f} ms wall; {total:.1f} ms of {'kernels' if on_gpu else 'CPU ops'} per step")
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in rows:
        by_kind[kind_of(name)] += ms
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<14} {ms:8.1f} ms  {ms / total:6.1%}")
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for name, (ms, calls) in rows[:top]:
        print(f"{ms:8.2f} {round(calls):>6}  {' '.join(name.split())[:110]}")


if __name__ == "__main__":
    main(sys.argv[1:])
