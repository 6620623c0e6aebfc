"""Training throughput of titanlm against the loops users would otherwise run, in one invocation.

    python benchmarks/benchmark.py --model.flavor debug --seq_len 512 --batch 4 --steps 10
    python benchmarks/benchmark.py --model.flavor 8B --n_layers 8 --seq_len 8192 --batch 1 \
        --compile --ac selective --float8          # one GPU: an 8-layer cut of Llama3-8B

Each system trains the same model shape on the same random batch with the same AdamW settings and
gradient clipping; titanlm and the HF loop also start from the same weights (titanlm's init). Peers:
  hf          a plain PyTorch loop over transformers.LlamaForCausalLM with SDPA attention (what
              LLaMA-Factory/XTuner users run); fp32 master weights under bf16 autocast when titanlm
              trains in bf16, HF gradient checkpointing for --ac full, torchao float8 for --float8
              (HF has no op-level selective checkpointing: --ac selective runs it without any);
  torchtitan  torchtitan's own trainer, launched with torchrun on a generated job config of the same
              shape (CUDA only; see benchmarks/torchtitan_peer.py).
On CPU, titanlm and the HF loop run in interleaved rounds (A B A B ...) so drifting machine load
hits both alike. On CUDA (or with --sequential) a large model and its optimizer state fit only once, so systems run one
after another, each freed before the next starts, and each gets its own peak-memory figure.
The figure per system is the median step time over all timed steps, after warm-up steps in every
round. Each system's spread is printed too: the min / median / max over rounds of each round's median
step time, with a warning when (max - min) / median exceeds 10% (torchtitan runs its rounds back to
back in one process, so its "rounds" are consecutive blocks of --steps steps).
Tokens counted: batch x seq_len per step (no padding in random batches). MFU uses the same
useful-FLOPs formula as training (titanlm/models/flops.py) against the bf16 peak of `--peak_tflops`
or the known-device table (float8 runs too, as torchtitan reports them); on CPU it is null unless
--peak_tflops is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from titanlm.config import load_config
from titanlm.config.job_config import Float8
from titanlm.distributed import shutdown
from titanlm.metrics import device_peak_flops, peak_memory_gib
from titanlm.models.flavors import ModelArgs
from titanlm.models.flops import training_flops
from titanlm.models.hf_adapter import hf_config, to_hf_state_dict
from titanlm.models.transformer import canonical_param_name, param_count
from titanlm.parallel.float8 import apply_float8
from titanlm.train import Trainer, build_trainer

Batch = dict[str, torch.Tensor]

# Rounds of one system whose median step times differ by more than this share of their median mean its
# figure moved during the run (machine load, too few warm-up steps): ratios between systems built on it
# are then not worth much.
SPREAD_WARNING = 0.10


@dataclass
class System:
    name: str
    step: Callable[[], None] | None  # None once a sequential run has released the system
    rounds: list[list[float]] = field(default_factory=list)  # timed step seconds, one list per round
    peak_memory_gib: float | None = None

    @property
    def times(self) -> list[float]:
        return [t for round_times in self.rounds for t in round_times]


def round_spread(rounds: list[list[float]]) -> dict[str, float | int | None]:
    """min / median / max over rounds of each round's median step time, and (max - min) / median
    (None with a single round: one round has no spread to show)."""
    medians = [statistics.median(times) for times in rounds]
    low, middle, high = min(medians), statistics.median(medians), max(medians)
    return {
        "rounds": len(medians),
        "min_s": low,
        "median_s": middle,
        "max_s": high,
        "spread": (high - low) / middle if len(medians) > 1 else None,
    }


def spread_warning(name: str, spread: dict[str, float | int | None]) -> str:
    """The warning to print when a system's rounds disagree by more than SPREAD_WARNING, else ""."""
    if spread["spread"] is None or spread["spread"] <= SPREAD_WARNING:
        return ""
    return (
        f"WARNING: {name}'s rounds differ by {spread['spread']:.1%} of their median (more than "
        f"{SPREAD_WARNING:.0%}), so its figure is not stable: check the machine's load, or raise --warmup "
        "and --rounds"
    )


def titanlm_trainer(args: argparse.Namespace) -> Trainer:
    overrides = [
        "--model.name",
        args.model_name,
        "--model.flavor",
        args.flavor,
        "--model.n_layers",
        str(args.n_layers),
        "--training.seq_len",
        str(args.seq_len),
        "--training.local_batch_size",
        str(args.batch),
        "--training.mixed_precision_param",
        args.dtype,
        "--training.steps",
        str(10**9),
        "--data.dataset",
        "random",
        "--job.dump_folder",
        args.dump_folder,
        "--activation_checkpoint.mode",
        args.ac,
        "--model.attention_backend",
        args.attention_backend,
        "--optimizer.lr",
        "1e-4",
    ]
    if args.compile:
        overrides.append("--compile.enable")
    if args.float8:
        overrides.append("--float8.enable")
    return build_trainer(load_config(overrides))


def full_state_on_cpu(trainer: Trainer) -> dict[str, torch.Tensor]:
    """titanlm's weights as plain full tensors, kept on the host so the GPU can be freed."""
    return {
        canonical_param_name(name): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for name, p in trainer.model.state_dict().items()
    }


def hf_system(
    model_args: ModelArgs,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    compute_dtype: torch.dtype,
    args: argparse.Namespace,
    batch: Batch,
) -> tuple[System | None, str]:
    """The plain transformers loop, or None and why it cannot run; the second value notes deviations."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    # The config.json titanlm exports for this model (RoPE scaling and tying included).
    spelled = hf_config(model_args, "llama", torch.float32)
    spelled.pop("torch_dtype")
    config = transformers.LlamaConfig(**spelled, attn_implementation="sdpa")
    # What a careful user writes: fp32 master weights, low-precision compute under autocast.
    model = transformers.LlamaForCausalLM(config).to(device)
    model.load_state_dict(to_hf_state_dict(weights), strict=not model_args.tie_embeddings)
    note = ""
    if args.ac == "full":
        model.gradient_checkpointing_enable()
    elif args.ac == "selective":
        note = "no op-level selective checkpointing in transformers: the HF loop ran without any"
    if args.float8:
        apply_float8(model, Float8(enable=True), output_name="lm_head")
    forward = torch.compile(model) if args.compile else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=not fused, fused=fused
    )
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)

    def step() -> None:
        with autocast:
            logits = forward(input_ids=input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return System("hf", step), note


def time_steps(system: System, warmup: int, steps: int) -> None:
    for _ in range(warmup):
        system.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        system.step()
        times.append(time.perf_counter() - start)
    system.rounds.append(times)


def run_interleaved(systems: list[System], rounds: int, warmup: int, steps: int) -> None:
    for _ in range(rounds):
        for system in systems:
            time_steps(system, warmup, steps)


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_sequential(system: System, device: torch.device, rounds: int, warmup: int, steps: int) -> str:
    """Time one system alone (built after the previous one was freed), record its peak memory and
    release what its step holds; returns why it could not finish ("" when it did)."""
    outcome = ""
    try:
        for _ in range(rounds):
            time_steps(system, warmup, steps)
        system.peak_memory_gib = peak_memory_gib(device)
    except torch.OutOfMemoryError:
        system.rounds.clear()
        outcome = f"out of GPU memory ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated at the peak)"
    system.step = None
    release_device_memory(device)
    return outcome


def torchtitan_result(model_args: ModelArgs, args: argparse.Namespace) -> dict:
    from benchmarks.torchtitan_peer import run_torchtitan

    return run_torchtitan(
        dim=model_args.dim,
        n_layers=model_args.n_layers,
        n_heads=model_args.n_heads,
        n_kv_heads=model_args.n_kv_heads,
        ffn_dim=model_args.ffn_dim,
        vocab_size=model_args.vocab_size,
        rope_theta=model_args.rope_theta,
        norm_eps=model_args.norm_eps,
        seq_len=args.seq_len,
        batch=args.batch,
        steps=args.rounds * args.steps,
        warmup=args.warmup,
        compile=args.compile,
        ac=args.ac,
        float8=args.float8,
        work_folder=f"{args.dump_folder}/torchtitan",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model.name", dest="model_name", default="llama3")
    parser.add_argument("--model.flavor", dest="flavor", default="debug")
    parser.add_argument("--n_layers", type=int, default=0, help="cut the flavor to this many layers (0 = all)")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--ac", default="none", choices=("none", "full", "selective"), help="activation checkpointing")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--float8", action="store_true", help="torchao float8 training (tensorwise)")
    parser.add_argument("--attention_backend", default="auto")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system per round")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="hf,torchtitan", help="comma list of hf, torchtitan; empty = none")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one system after another, each freed before the next (always on CUDA)",
    )
    parser.add_argument("--peak_tflops", type=float, default=-1.0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--dump_folder", default="./outputs/benchmark")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    trainer = titanlm_trainer(args)
    device, model_args = trainer.device, trainer.plan.model_args
    num_params, compute_dtype = param_count(model_args), trainer.plan.precision.param_dtype
    tokens = torch.randint(
        0, model_args.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    titanlm = System("titanlm", partial(trainer.train_step, [batch]))
    weights = full_state_on_cpu(trainer) if "hf" in peers else {}
    notes: dict[str, str] = {}
    systems = [titanlm]
    sequential = args.sequential or device.type == "cuda"
    if sequential:
        trainer.close()  # its files; the model and optimizer live on in the step until the run releases it
        del trainer
        notes["titanlm"] = run_sequential(titanlm, device, args.rounds, args.warmup, args.steps)
    if "hf" in peers:
        try:
            hf, notes["hf"] = hf_system(model_args, weights, device, compute_dtype, args, batch)
        except torch.OutOfMemoryError:
            hf, notes["hf"] = None, "out of GPU memory while building the model"
        weights.clear()
        if hf is not None:
            systems.append(hf)
            if sequential:
                notes["hf"] += run_sequential(hf, device, args.rounds, args.warmup, args.steps)
    if not sequential:
        run_interleaved(systems, args.rounds, args.warmup, args.steps)
        trainer.close()

    tokens_per_step = args.batch * args.seq_len
    flops = training_flops(model_args, [args.seq_len] * args.batch)
    peak = device_peak_flops(device, compute_dtype, args.peak_tflops)
    results = {}
    for system in systems:
        if not system.times:
            continue
        median = statistics.median(system.times)
        results[system.name] = {
            "median_step_s": median,
            "tokens_per_s": tokens_per_step / median,
            "achieved_tflops": flops / median / 1e12,
            "mfu": flops / median / peak if peak else None,
            "peak_memory_gib": system.peak_memory_gib,
            "timed_steps": len(system.times),
            "round_spread": round_spread(system.rounds),
        }
    if "torchtitan" in peers:
        if device.type != "cuda":
            notes["torchtitan"] = "not run: torchtitan's trainer needs CUDA"
        else:
            titan = torchtitan_result(model_args, args)
            if "error" in titan:
                notes["torchtitan"] = f"not run: {titan['error']}"
            else:
                results["torchtitan"] = {
                    "median_step_s": tokens_per_step / titan["tokens_per_s"],
                    "tokens_per_s": titan["tokens_per_s"],
                    "achieved_tflops": flops * titan["tokens_per_s"] / tokens_per_step / 1e12,
                    "mfu": flops * titan["tokens_per_s"] / tokens_per_step / peak if peak else None,
                    "peak_memory_gib": titan.get("peak_memory_gib"),
                    "timed_steps": len(titan["tps_timed"]),
                    "round_spread": round_spread(
                        [
                            [tokens_per_step / tps for tps in titan["tps_timed"][i : i + args.steps]]
                            for i in range(0, len(titan["tps_timed"]), args.steps)
                        ]
                    ),
                }
                notes["torchtitan"] = (
                    f"torchtitan {titan.get('torchtitan_version')}: {titan['command']}; "
                    f"its own logged MFU {titan.get('mfu')}"
                )
    warnings = [line for name, r in results.items() if (line := spread_warning(name, r["round_spread"]))]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": f"{args.model_name}/{args.flavor}" + (f" cut to {args.n_layers} layers" if args.n_layers else ""),
        "params": num_params,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dtype": str(compute_dtype),
        "compile": args.compile,
        "ac": args.ac,
        "float8": args.float8,
        "results": results,
        "notes": notes,
        "warnings": warnings,
    }
    print(
        f"{report['model']}, {num_params:,} params, seq {args.seq_len} x batch {args.batch}, {compute_dtype}, "
        f"compile={args.compile}, ac={args.ac}, float8={args.float8}, {report['device']}"
    )
    print(f"{'system':<11} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}  vs titanlm")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        ratio = (
            f"titanlm/{name} = {results['titanlm']['tokens_per_s'] / r['tokens_per_s']:.3f}"
            if "titanlm" in results
            else ""
        )
        print(
            f"{name:<11} {r['median_step_s']:>8.4f} {r['tokens_per_s']:>10.1f} {r['achieved_tflops']:>8.2f} "
            f"{mfu:>6} {memory:>8}  {ratio}"
        )
    print("step s over rounds (each round's median):")
    for name, r in results.items():
        spread = r["round_spread"]
        share = (
            f"{spread['rounds']} rounds, spread {spread['spread']:.1%}"
            if spread["spread"] is not None
            else "one round: no spread"
        )
        print(
            f"{name:<11} min {spread['min_s']:.4f}  median {spread['median_s']:.4f}  max {spread['max_s']:.4f}  "
            f"({share})"
        )
    for name, note in notes.items():
        if note:
            print(f"{name}: {note}")
    for line in warnings:
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.torchtitan_peer` when run as a file
    main()
    shutdown()
