"""Per-rank memory of Llama3-8B width on 32K-token rows, per activation-checkpointing mode, loss chunking
and layout: the dry run's estimate (titanlm.memory_estimate) on any machine, no GPU.

    python benchmarks/long_context_memory.py                  # every row traced at full depth (~16 min, 2 cores)
    python benchmarks/long_context_memory.py --extrapolate    # from 2 and 4 blocks only (~2 min)

Each row is one steady-state training step of local batch 1 (bfloat16 compute, fp32 weights, AdamW),
for a CUDA target. Traced rows run that step under FakeTensorMode in a fake process group with torch's
memory tracker (`trace_memory`), at the flavor's depth, or with --extrapolate on the line through the
two --layers depths (which misses a peak that moves with depth: full recomputation's moves from the
loss's backward to the gradients' end of backward). "per block" is the activations the peak holds per
added block between the two --layers depths with the whole logits, where the peak is the loss's
backward: what a block keeps until its backward. The one-GPU CPU-offload rows use the closed form
(`formula_memory`), as the trace cannot tell host from device memory; their state is in host memory.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from titanlm.config import load_config
from titanlm.memory_estimate import MemoryEstimate, formula_memory, trace_memory
from titanlm.plan import resolve

FIGURES = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "other_gib", "peak_gib")
COLUMNS = (
    "layout",
    "recompute",
    "loss chunk",
    "params",
    "grads",
    "optimizer",
    "activations",
    "other",
    "peak",
    "per block",
    "fits",
    "method",
    "trace s",
)


@dataclass(frozen=True)
class Layout:
    name: str
    world_size: int
    cp: int
    flags: tuple[str, ...]


LAYOUTS = {
    "1gpu": Layout("1 GPU, cp 1", 1, 1, ()),
    "1gpu-offload": Layout("1 GPU, cp 1, CPU offload", 1, 1, ("--parallelism.fsdp_cpu_offload", "true")),
    "cp2": Layout("2 GPUs, cp 2", 2, 2, ()),
    "cp2xdp4": Layout("8 GPUs, cp 2 x dp_shard 4", 8, 2, ("--parallelism.data_parallel_shard_degree", "4")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="8B", help="llama3 flavor (debug for a quick check)")
    parser.add_argument("--seq_len", type=int, default=32768)
    parser.add_argument("--layers", default="2,4", help="the two block counts of the per-block figure")
    parser.add_argument(
        "--extrapolate",
        action="store_true",
        help="extrapolate every figure from the two --layers depths instead of tracing the whole depth",
    )
    parser.add_argument("--modes", default="none,selective,full", help="activation_checkpoint.mode values")
    parser.add_argument("--loss_chunks", default="0,4096", help="training.loss_chunk_tokens values (0 = off)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"some of {', '.join(LAYOUTS)}")
    parser.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one GPU, for the fits column")
    return parser.parse_args(argv)


class Estimates:
    """One rank's estimates, each made once: traced, or by the formula where the trace cannot run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.made: dict[tuple, tuple[MemoryEstimate, float | None]] = {}

    def flags(self, layout: Layout, mode: str, chunk: int, layers: int) -> list[str]:
        return [
            "--model.name",
            "llama3",
            "--model.flavor",
            self.args.flavor,
            "--model.n_layers",
            str(layers),
            "--training.seq_len",
            str(self.args.seq_len),
            "--training.local_batch_size",
            "1",
            "--training.global_batch_size",
            "-1",
            "--training.mixed_precision_param",
            "bfloat16",
            "--training.loss_chunk_tokens",
            str(chunk),
            "--activation_checkpoint.mode",
            mode,
            "--parallelism.context_parallel_degree",
            str(layout.cp),
            *layout.flags,
        ]

    def get(self, layout: Layout, mode: str, chunk: int, layers: int) -> tuple[MemoryEstimate, float | None]:
        """The estimate and, the first time a trace makes it, its seconds."""
        key = (layout, mode, chunk, layers)
        if key in self.made:
            return self.made[key][0], None
        cfg = load_config(self.flags(layout, mode, chunk, layers))
        start = time.perf_counter()
        if resolve(cfg, layout.world_size, "cuda").fsdp.cpu_offload:
            estimate, seconds = formula_memory(resolve(cfg, layout.world_size, "cuda")), None
        else:
            estimate = trace_memory(resolve(cfg, layout.world_size, "cuda"))
            seconds = time.perf_counter() - start
        self.made[key] = (estimate, seconds)
        return estimate, seconds


def row(
    estimates: Estimates, layout: Layout, mode: str, chunk: int, depth: int
) -> tuple[dict[str, float], str, list[float]]:
    """(figures at `depth` blocks and "per_block_gib", method, seconds of the traces made for the row)."""
    args, (a, b) = estimates.args, estimates.args.depths
    made = {layers: estimates.get(layout, mode, 0, layers) for layers in (a, b)}
    per_block = (made[b][0].activations_gib - made[a][0].activations_gib) / (b - a)
    if args.extrapolate:
        low, high = (estimates.get(layout, mode, chunk, layers) for layers in (a, b))
        figures = {
            f: getattr(low[0], f) + (depth - a) * (getattr(high[0], f) - getattr(low[0], f)) / (b - a) for f in FIGURES
        }
        seconds = [s for _, s in (*made.values(), low, high) if s is not None]
        method = f"traced at {a} and {b} blocks, extrapolated"
    else:
        estimate, whole = estimates.get(layout, mode, chunk, depth)
        figures = {f: getattr(estimate, f) for f in FIGURES}
        seconds = [s for _, s in (*made.values(), (None, whole)) if s is not None]
        method = "traced"
    if made[a][0].method == "formula":
        method = "formula"
    return {**figures, "per_block_gib": per_block}, method, seconds


def block_shares(args: argparse.Namespace, depth_flags: list[str], cp: int) -> dict[str, float]:
    """What one block keeps for backward without recomputation on a rank, GiB, by shape: bfloat16
    tensors and CUDA's fused norms, as under FSDP (one process computes under autocast and keeps more)."""
    m = resolve(load_config(depth_flags), 1, "cuda").model_args
    tokens, h, g = args.seq_len // cp, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    return {
        "MLP intermediates (w1, w3, silu, their product)": 4 * m.ffn_dim * 2 * tokens / 2**30,
        "attention (q, gathered k and v, output, fp32 logsumexp)": ((2 * h + 2 * g * cp) * 2 + 4 * m.n_heads)
        * tokens
        / 2**30,
        "norm inputs and outputs": 4 * m.dim * 2 * tokens / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.depths = tuple(int(n) for n in args.layers.split(","))
    assert len(args.depths) == 2 and args.depths[0] < args.depths[1], "--layers takes two block counts, e.g. 2,4"
    modes, chunks = args.modes.split(","), [int(c) for c in args.loss_chunks.split(",")]
    layouts = [LAYOUTS[name] for name in args.layouts.split(",")]
    estimates = Estimates(args)
    whole_flags = estimates.flags(LAYOUTS["1gpu"], "none", 0, 0)  # n_layers 0: the flavor's own
    depth = resolve(load_config(whole_flags), 1, "cuda").model_args.n_layers
    print(
        f"llama3 {args.flavor} ({depth} blocks), seq_len {args.seq_len}, local batch 1, bfloat16 compute, "
        f"CUDA target, one rank's estimate, GiB; fits: peak <= 90% of {args.gpu_gib:g} GiB (tight: <= 100%)"
    )
    print(" ".join(__doc__.split("\n\n")[2].split()))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    backends, total = {}, 0.0
    for layout in layouts:
        whole = load_config(estimates.flags(layout, "none", 0, 0))
        backends[layout.name] = resolve(whole, layout.world_size, "cuda").attention_backend
        for mode in modes:
            for chunk in chunks:
                figures, method, seconds = row(estimates, layout, mode, chunk, depth)
                total += sum(seconds)
                peak = figures["peak_gib"]
                fits = "yes" if peak <= 0.9 * args.gpu_gib else "tight" if peak <= args.gpu_gib else "no"
                cells = [layout.name, mode, str(chunk or "off")]
                cells += [f"{figures[f]:.1f}" for f in FIGURES] + [f"{figures['per_block_gib']:.2f}", fits, method]
                cells.append(" + ".join(f"{s:.0f}" for s in seconds) or "-")
                print("| " + " | ".join(cells) + " |", flush=True)
    print(
        "attention backend the plan resolves (flex and varlen traced as sdpa without a mask): "
        + "; ".join(f"{name}: {backend}" for name, backend in backends.items())
    )
    for cp in sorted({layout.cp for layout in layouts}):
        shares = block_shares(args, whole_flags, cp)
        print(
            f"one block without recomputation at cp {cp}, by shape: {sum(shares.values()):.2f} GiB = "
            + " + ".join(f"{value:.2f} {name}" for name, value in shares.items())
        )
    print(f"tracing took {total:.0f} s in all")


if __name__ == "__main__":
    main()
