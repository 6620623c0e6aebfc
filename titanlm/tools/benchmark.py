"""Training throughput of titanlm against the loops users would otherwise run, in one invocation.

    python -m titanlm.tools.benchmark --model.flavor debug --seq_len 512 --batch 4 --steps 10

Each system trains the same model (same initial weights, copied from titanlm's init), on the same
random batch, with the same AdamW settings and gradient clipping. Peers:
  hf          a plain PyTorch loop over transformers.LlamaForCausalLM with SDPA attention (what
              LLaMA-Factory/XTuner users run), when transformers is installed;
  torchtitan  not run by this tool yet: it only reports whether the package is importable (torchtitan
              hard-codes CUDA, so it can never run in the CPU mode).
Systems run in interleaved rounds (A B A B ...) so drifting machine load hits all of them alike;
the figure per system is the median step time over all timed steps, after warm-up steps in
every round. Tokens counted: batch x seq_len per step (no padding in random batches).
MFU uses the same useful-FLOPs formula as training (titanlm/models/flops.py) against the peak of
`--peak_tflops` or the known-device table; on CPU it is null unless --peak_tflops is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanlm.config import load_config
from titanlm.metrics import device_peak_flops, peak_memory_gib
from titanlm.models.flops import training_flops
from titanlm.models.hf_adapter import to_hf_state_dict
from titanlm.models.transformer import canonical_param_name
from titanlm.train import Trainer


@dataclass
class System:
    name: str
    step: Callable[[], None]
    times: list[float]


def titanlm_system(args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> tuple[System, Trainer]:
    overrides = [
        "--model.name", args.model_name, "--model.flavor", args.flavor,
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
        "--training.mixed_precision_param", args.dtype, "--training.steps", str(10**9),
        "--data.dataset", "random", "--job.dump_folder", args.dump_folder,
        "--activation_checkpoint.mode", args.ac, "--model.attention_backend", args.attention_backend,
        "--optimizer.lr", "1e-4",
    ]
    if args.compile:
        overrides.append("--compile.enable")
    trainer = Trainer(load_config(overrides))
    return System("titanlm", lambda: trainer.train_step([batch]), []), trainer


def hf_system(trainer: Trainer, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> System | None:
    try:
        import transformers
    except ImportError:
        return None
    model_args = trainer.model_args
    config = transformers.LlamaConfig(
        vocab_size=model_args.vocab_size, hidden_size=model_args.dim, intermediate_size=model_args.ffn_dim,
        num_hidden_layers=model_args.n_layers, num_attention_heads=model_args.n_heads,
        num_key_value_heads=model_args.n_kv_heads, rope_theta=model_args.rope_theta,
        rms_norm_eps=model_args.norm_eps, attention_bias=model_args.attn_bias, tie_word_embeddings=False,
        attn_implementation="sdpa", max_position_embeddings=max(args.seq_len, 2048),
    )
    dtype = trainer.param_dtype
    model = transformers.LlamaForCausalLM(config).to(device=trainer.device, dtype=dtype)
    full_state = {canonical_param_name(name): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                  for name, p in trainer.model.state_dict().items()}
    model.load_state_dict(to_hf_state_dict(full_state), strict=True)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  foreach=trainer.device.type != "cuda", fused=trainer.device.type == "cuda")
    input_ids = batch["input_ids"].to(trainer.device)
    labels = batch["labels"].to(trainer.device)

    def step() -> None:
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    return System("hf", step, [])


def run_rounds(systems: list[System], rounds: int, warmup: int, steps: int) -> None:
    for _ in range(rounds):
        for system in systems:
            for _ in range(warmup):
                system.step()
            for _ in range(steps):
                start = time.perf_counter()
                system.step()
                system.times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model.name", dest="model_name", default="llama3")
    parser.add_argument("--model.flavor", dest="flavor", default="debug")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--ac", default="none", help="activation checkpointing: none or full")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention_backend", default="auto")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system per round")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="hf,torchtitan")
    parser.add_argument("--peak_tflops", type=float, default=-1.0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--dump_folder", default="./outputs/benchmark")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (args.batch, args.seq_len + 1), generator=generator)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    titanlm, trainer = titanlm_system(args, batch)
    vocab = trainer.model_args.vocab_size
    batch = {key: value % vocab for key, value in batch.items()}
    systems = [titanlm]
    notes = {}
    peers = [p for p in args.peers.split(",") if p]
    if "hf" in peers:
        hf = hf_system(trainer, args, batch)
        if hf is None:
            notes["hf"] = "transformers is not installed"
        else:
            systems.append(hf)
    if "torchtitan" in peers:
        installed = importlib.util.find_spec("torchtitan") is not None
        notes["torchtitan"] = (
            "installed, but not run by this tool yet (its trainer hard-codes CUDA)" if installed
            else "not installed (pip install torchtitan; it needs CUDA)"
        )
    run_rounds(systems, args.rounds, args.warmup, args.steps)

    tokens_per_step = args.batch * args.seq_len
    flops = training_flops(trainer.model_args, [args.seq_len] * args.batch)
    peak = device_peak_flops(trainer.device, trainer.param_dtype, args.peak_tflops)
    results = {}
    for system in systems:
        median = statistics.median(system.times)
        results[system.name] = {
            "median_step_s": median,
            "tokens_per_s": tokens_per_step / median,
            "achieved_tflops": flops / median / 1e12,
            "mfu": flops / median / peak if peak else None,
            "timed_steps": len(system.times),
        }
    report = {
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": f"{args.model_name}/{args.flavor}",
        "params": trainer.num_params,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dtype": str(trainer.param_dtype),
        "compile": args.compile,
        "ac": args.ac,
        "peak_memory_gib": peak_memory_gib(trainer.device),
        "results": results,
        "notes": notes,
    }
    print(f"{'system':<10} {'step s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}  vs titanlm")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = results["titanlm"]["tokens_per_s"] / r["tokens_per_s"]
        print(f"{name:<10} {r['median_step_s']:>9.4f} {r['tokens_per_s']:>10.1f} {r['achieved_tflops']:>8.3f} "
              f"{mfu:>6}  titanlm/{name} = {ratio:.3f}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    trainer.close()


if __name__ == "__main__":
    main()
