"""torchtitan's own trainer as a benchmark peer: same model shape, one GPU, its own logged throughput.

    python benchmarks/torchtitan_peer.py --preset 8B --n_layers 8 --seq_len 8192 --batch 1 \
        --steps 20 --warmup 5 --compile --ac selective --float8 --work_folder /tmp/tt_peer

`run_torchtitan(...)` writes everything torchtitan needs into a work folder and launches its normal
training entry point (`torchtitan.train.main(Trainer)`) under `torchrun --standalone --nproc_per_node 1`:

- data/peer_text.jsonl: generated documents with a "text" field, loaded through torchtitan's
  `c4_test` dataset entry (`datasets.load_dataset(<folder>, split="train")`) with
  `training.dataset_path` pointing at the folder; torchtitan tokenizes and packs it on the fly;
- tokenizer/tokenizer.json (+ tokenizer_config.json): a small byte-level BPE trained here with the
  `tokenizers` library (ids always < vocab_size), given as `model.hf_assets_path`;
- job.toml: model llama3 with a flavor named `titanlm_peer`, log_freq 1, bf16 params, compile,
  activation checkpointing, float8 (torchao tensorwise recipe, output layer kept in bf16 as titanlm
  does), checkpointing and validation off, metrics on stdout without colour;
- shape.json: the model shape. The launched process (`--runner`, the function `_runner` below) adds
  the flavor to torchtitan's llama3 flavor table, checks that torchtitan builds an FFN of exactly
  `ffn_dim`, then calls torchtitan's trainer with `--job.config_file job.toml`.

The figures are torchtitan's own per-step log (`step: N loss: ... memory: X GiB(..%) tps: T
tflops: F mfu: M%`): tokens/s is the median over the steps after `warmup`; its tps counts
local_batch_size x seq_len tokens per step per GPU, and its MFU uses the bf16 peak of the device
(for float8 runs too). Memory is the largest max-reserved figure it logs over all steps.

Written for torchtitan 0.2.x (TOML job configs, `torchtitan.models.llama3.llama3_args` flavor
table, converter name `quantize.linear.float8`). torchtitan needs CUDA: on a machine without it
`run_torchtitan` returns {"error": ...} instead of launching.

Notes on what torchtitan itself does with this config, on one GPU:
- with a data-parallel degree of 1 it applies no FSDP: it trains fp32 parameters under bf16
  autocast ("Mixed precision training is handled by AMP"); the result reports this as
  "mixed_precision";
- torchtitan 0.2.x takes vocab_size from the flavor, not from the tokenizer (checked at run time
  and reported as "vocab_size_used");
- selective activation checkpointing is its per-op policy (`selective_ac_option = "op"`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from titanlm.config.manager import toml_value

FLAVOR = "titanlm_peer"
FLOAT8_CONVERTER = "quantize.linear.float8"  # torchtitan 0.2.x name of the float8 Linear converter
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 40

# Presets for the CLI: the Llama3 shapes the benchmark uses.
PRESETS = {
    "debug": dict(
        dim=256, n_layers=2, n_heads=16, n_kv_heads=16, ffn_dim=768, vocab_size=2048, rope_theta=500000.0, norm_eps=1e-5
    ),
    "8B": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        norm_eps=1e-5,
    ),
}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+.*?"
    r"memory:\s*(?P<mem>[\d.]+)\s*GiB.*?"
    r"tps:\s*(?P<tps>[\d,]+)"
    r"(?:\s+tflops:\s*(?P<tflops>[\d.,]+))?"
    r"(?:\s+mfu:\s*(?P<mfu>[\d.]+)%)?"
)
_PARAMS = re.compile(r"size:\s*([\d,]+)\s+total parameters")
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(?:Error|Exception):\s*\S")


# ----------------------------------------------------------------------------- work folder


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "qu"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def write_dataset(folder: Path, n_docs: int, seed: int = 0) -> Path:
    """A folder with one jsonl file of generated documents ({"text": ...} per line)."""
    rng = random.Random(seed)
    lexicon = _words(rng, 3000)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]  # Zipf-like, as real text
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "peer_text.jsonl"
    with path.open("w") as f:
        for _ in range(n_docs):
            sentences = []
            for _ in range(rng.randint(4, 20)):
                words = rng.choices(lexicon, weights, k=rng.randint(5, 18))
                sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def write_tokenizer(folder: Path, corpus: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on the corpus; save tokenizer.json + tokenizer_config.json.

    Returns the tokenizer's vocabulary size (<= vocab_size, so every id is a valid embedding row).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = min(vocab_size, 4096)
    if target < 256 + 2:
        raise ValueError(f"vocab_size {vocab_size} is below the 258 ids a byte-level tokenizer needs")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with corpus.open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    size = tokenizer.get_vocab_size()
    if size > vocab_size or max(tokenizer.get_vocab().values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids beyond vocab_size {vocab_size}")
    return size


def job_config(
    *, work: Path, seq_len: int, batch: int, total_steps: int, warmup: int, compile: bool, ac: str, float8: bool
) -> dict[str, dict[str, Any]]:
    """torchtitan 0.2.x job config sections (TOML tables) for the peer run."""
    if ac not in ("none", "full", "selective"):
        raise ValueError(f"ac must be none, full or selective, not {ac!r}")
    config: dict[str, dict[str, Any]] = {
        "job": {"dump_folder": str(work / "outputs"), "description": "titanlm benchmark peer"},
        "profiling": {"enable_profiling": False, "enable_memory_snapshot": False},
        "metrics": {"log_freq": 1, "enable_tensorboard": False, "enable_wandb": False, "disable_color_printing": True},
        "model": {
            "name": "llama3",
            "flavor": FLAVOR,
            "hf_assets_path": str(work / "tokenizer"),
            "converters": [FLOAT8_CONVERTER] if float8 else [],
        },
        "optimizer": {"name": "AdamW", "lr": 3e-4, "eps": 1e-8, "weight_decay": 0.1},
        "lr_scheduler": {"warmup_steps": max(1, min(warmup, total_steps))},
        "training": {
            "dataset": "c4_test",
            "dataset_path": str(work / "data"),
            "local_batch_size": batch,
            "global_batch_size": -1,
            "seq_len": seq_len,
            "steps": total_steps,
            "max_norm": 1.0,
            "mixed_precision_param": "bfloat16",
            "mixed_precision_reduce": "float32",
        },
        "parallelism": {
            "data_parallel_replicate_degree": 1,
            "data_parallel_shard_degree": -1,
            "tensor_parallel_degree": 1,
            "pipeline_parallel_degree": 1,
            "context_parallel_degree": 1,
        },
        "checkpoint": {"enable": False},
        "activation_checkpoint": {"mode": ac, "selective_ac_option": "op"},
        "compile": {"enable": compile, "components": ["model", "loss"]},
        "validation": {"enable": False},
    }
    if float8:
        config["quantize.linear.float8"] = {"recipe_name": "tensorwise", "filter_fqns": ["output"]}
    return config


def write_toml(path: Path, config: dict[str, dict[str, Any]]) -> None:
    """The job config as TOML tables; a dotted section name is a nested table, as torchtitan reads it."""
    lines: list[str] = []
    for section, values in config.items():
        lines += [f"[{section}]", *(f"{name} = {toml_value(v)}" for name, v in values.items()), ""]
    path.write_text("\n".join(lines))


def ffn_args(dim: int, ffn_dim: int) -> tuple[float | None, int]:
    """(ffn_dim_multiplier, multiple_of) for which torchtitan's llama3 FFN is exactly ffn_dim.

    torchtitan sizes it as: h = int(2 * 4 * dim / 3); h = int(multiplier * h) if a multiplier is
    set; then h rounded up to a multiple of multiple_of. The usual Llama3 pairs are tried first
    (8B: 1.3 and 1024 give 14336); otherwise multiple_of = ffn_dim with h in (0, ffn_dim].
    """

    def size(multiplier: float | None, multiple_of: int) -> int:
        h = int(2 * (4 * dim) / 3)
        if multiplier is not None:
            h = int(multiplier * h)
        return multiple_of * ((h + multiple_of - 1) // multiple_of)

    for multiplier, multiple_of in ((None, 256), (1.3, 1024), (1.3, 4096), (1.2, 4096), (1.3, 256)):
        if size(multiplier, multiple_of) == ffn_dim:
            return multiplier, multiple_of
    base = int(2 * (4 * dim) / 3)
    multiplier = None if 0 < base <= ffn_dim else ffn_dim / base
    assert size(multiplier, ffn_dim) == ffn_dim
    return multiplier, ffn_dim


# ----------------------------------------------------------------------------- launched process


def _runner(argv: list[str]) -> None:
    """In the torchrun worker: register the flavor, then run torchtitan's own train entry point.

    argv: [shape.json, *torchtitan arguments].
    """
    shape_path, tt_args = Path(argv[0]), argv[1:]
    shape = json.loads(shape_path.read_text())
    # torchtitan's ConfigManager.parse_args takes sys.argv[1:] as bound when it is imported.
    sys.argv = [sys.argv[0], *tt_args]

    import torch
    from torchtitan.models import llama3
    from torchtitan.models.llama3.model.model import FeedForward
    from torchtitan.protocols.train_spec import get_train_spec
    from torchtitan.train import Trainer
    from torchtitan.train import main as torchtitan_main

    multiplier, multiple_of = ffn_args(shape["dim"], shape["ffn_dim"])
    info_path = shape_path.with_name("runner_info.json")

    class PeerModelArgs(llama3.TransformerModelArgs):
        def update_from_config(self, job_config, **kwargs) -> None:
            super().update_from_config(job_config, **kwargs)
            # what the trainer builds the model with, after torchtitan's own adjustments
            info = json.loads(info_path.read_text())
            info.update(vocab_size_used=self.vocab_size, max_seq_len=self.max_seq_len)
            info_path.write_text(json.dumps(info, indent=1))

    args = PeerModelArgs(
        dim=shape["dim"],
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        n_kv_heads=shape["n_kv_heads"],
        vocab_size=shape["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=shape["norm_eps"],
        rope_theta=shape["rope_theta"],
    )
    with torch.device("meta"):
        ffn = FeedForward(
            dim=args.dim,
            hidden_dim=4 * args.dim,
            multiple_of=args.multiple_of,
            ffn_dim_multiplier=args.ffn_dim_multiplier,
        )
    if ffn.w1.out_features != shape["ffn_dim"]:
        raise RuntimeError(f"torchtitan would build an FFN of {ffn.w1.out_features}, not {shape['ffn_dim']}")
    llama3.llama3_args[FLAVOR] = args
    if get_train_spec("llama3").model_args.get(FLAVOR) is not args:
        raise RuntimeError("could not register the flavor in torchtitan's llama3 flavor table")
    info_path.write_text(
        json.dumps(
            {
                "flavor": FLAVOR,
                "ffn_dim_used": ffn.w1.out_features,
                "multiple_of": multiple_of,
                "ffn_dim_multiplier": multiplier,
                "vocab_size": args.vocab_size,
            },
            indent=1,
        )
    )
    print(
        f"[titanlm-peer] registered llama3 flavor {FLAVOR}: dim {args.dim}, layers {args.n_layers}, "
        f"heads {args.n_heads}/{args.n_kv_heads}, ffn {ffn.w1.out_features}, vocab {args.vocab_size}",
        flush=True,
    )
    torchtitan_main(Trainer)


# ----------------------------------------------------------------------------- parent side


def parse_log(text: str) -> dict[str, Any]:
    """Per-step figures and a few facts from torchtitan's stdout."""
    steps: dict[int, dict[str, float]] = {}
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        match = _STEP.search(line)
        if match is None:
            continue
        entry = {
            "loss": float(match["loss"]) if re.fullmatch(r"[-\d.einfa]+", match["loss"]) else math.nan,
            "memory_gib": float(match["mem"]),
            "tps": float(match["tps"].replace(",", "")),
        }
        if match["tflops"]:
            entry["tflops"] = float(match["tflops"].replace(",", ""))
        if match["mfu"]:
            entry["mfu"] = float(match["mfu"]) / 100
        steps[int(match["step"])] = entry
    params = _PARAMS.findall(text)
    mixed = None
    if "handled by AMP" in text:
        mixed = "bf16 autocast (AMP), fp32 parameters"
    elif "handled by fully_shard" in text:
        mixed = "FSDP bf16 parameters, fp32 reduce"
    return {"steps": steps, "n_params": int(params[-1].replace(",", "")) if params else None, "mixed_precision": mixed}


def _error_line(lines: list[str]) -> str | None:
    found = None
    for line in lines:
        clean = _ANSI.sub("", line).strip()
        if _ERROR_LINE.match(clean) and "ChildFailedError" not in clean:
            found = clean
    return found


def _tail(lines: list[str], n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(_ANSI.sub("", line) for line in lines[-n:])


def _child_pids(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc); torchrun starts its worker in a session of its own."""
    children = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.parent.name))
    return children


def _stop(proc: subprocess.Popen) -> None:
    """End the torchrun agent started by run_torchtitan and the worker it started."""
    workers = _child_pids(proc.pid)
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 20)):
        for group in (proc.pid, *workers):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=grace)
            if not any(Path(f"/proc/{w}").exists() for w in workers):
                return
        except subprocess.TimeoutExpired:
            pass


def torchtitan_version() -> str | None:
    try:
        return importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_torchtitan(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    ffn_dim: int,
    vocab_size: int,
    rope_theta: float,
    norm_eps: float,
    seq_len: int,
    batch: int,
    steps: int,
    warmup: int,
    compile: bool,
    ac: str,
    float8: bool,
    work_folder: str,
    timeout_s: int = 900,
    alloc_conf: str | None = "expandable_segments:True",
    echo: bool = False,
) -> dict:
    """Train the shape with torchtitan's own trainer on one GPU; its median tokens/s after warm-up.

    Returns {"tokens_per_s", "mfu" (fraction, None if not logged), "peak_memory_gib" (largest
    max-reserved it logs), "tps_timed" (its tokens/s of each step after warm-up), "command",
    "torchtitan_version", "log_tail", ...} or, when it cannot run (not installed, no CUDA, crashed,
    timed out), {"error": one line, "log_tail": ...}.
    alloc_conf: PYTORCH_ALLOC_CONF for the run, as torchtitan's run_train.sh sets it (None: inherit).
    echo: also copy torchtitan's output to stderr as it runs.
    """
    result: dict[str, Any] = {"torchtitan_version": torchtitan_version(), "log_tail": ""}
    if importlib.util.find_spec("torchtitan") is None:
        return {**result, "error": "torchtitan is not installed (pip install torchtitan==0.2.2)"}
    try:
        import torch

        if not torch.cuda.is_available():
            return {**result, "error": "torchtitan needs CUDA and none is available"}
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # leave the GPU to the child as far as this process can
    except Exception as exc:  # a broken torch install is reported, not raised
        return {**result, "error": f"torch unusable: {exc}"}

    work = Path(work_folder).resolve()
    total_steps = warmup + steps
    try:
        work.mkdir(parents=True, exist_ok=True)
        if steps < 1 or warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")
        # enough text for every step without re-looping, within a few MB
        n_docs = min(20000, max(500, total_steps * batch * seq_len // 150))
        corpus = write_dataset(work / "data", n_docs)
        tokenizer_vocab = write_tokenizer(work / "tokenizer", corpus, vocab_size)
        shape = dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=ffn_dim,
            vocab_size=vocab_size,
            rope_theta=float(rope_theta),
            norm_eps=float(norm_eps),
        )
        (work / "shape.json").write_text(json.dumps(shape, indent=1))
        (work / "runner_info.json").unlink(missing_ok=True)
        toml_path = work / "job.toml"
        write_toml(
            toml_path,
            job_config(
                work=work,
                seq_len=seq_len,
                batch=batch,
                total_steps=total_steps,
                warmup=warmup,
                compile=compile,
                ac=ac,
                float8=float8,
            ),
        )
    except Exception as exc:
        return {**result, "error": f"could not prepare the work folder: {type(exc).__name__}: {exc}"}

    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "benchmarks.torchtitan_peer",
        "--runner",
        str(work / "shape.json"),
        "--job.config_file",
        str(toml_path),
    ]
    env = dict(os.environ)
    extra_env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),
    }
    if alloc_conf:
        extra_env["PYTORCH_ALLOC_CONF"] = alloc_conf
    env.update(extra_env)
    command = " ".join(
        [
            f"cd {shlex.quote(str(REPO_ROOT))} &&",
            *(f"{k}={shlex.quote(v)}" for k, v in extra_env.items()),
            *map(shlex.quote, argv),
        ]
    )
    result.update(command=command, work_folder=str(work), tokenizer_vocab=tokenizer_vocab, total_steps=total_steps)

    log_path = work / "torchtitan.log"
    lines: list[str] = []
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=str(REPO_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return {**result, "error": f"could not launch torchrun: {exc}"}

    def pump() -> None:
        with log_path.open("w") as log:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                lines.append(line.rstrip("\n"))
                if echo:
                    sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    reader.join(timeout=10)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["returncode"] = proc.returncode
    result["log_file"] = str(log_path)
    result["log_tail"] = _tail(lines)

    text = "\n".join(lines)
    parsed = parse_log(text)
    info_path = work / "runner_info.json"
    if info_path.exists():
        try:
            result.update(json.loads(info_path.read_text()))
        except json.JSONDecodeError:
            pass
    result["n_params"] = parsed["n_params"]
    result["mixed_precision"] = parsed["mixed_precision"]
    per_step = parsed["steps"]
    result["steps_logged"] = len(per_step)

    if timed_out:
        return {
            **result,
            "error": f"torchtitan timed out after {timeout_s}s ({len(per_step)} of {total_steps} steps logged)",
        }
    if proc.returncode != 0:
        cause = _error_line(lines) or "see log_tail"
        return {**result, "error": f"torchtitan exited with code {proc.returncode}: {cause}"}
    timed = [per_step[s] for s in sorted(per_step) if s > warmup]
    if not timed:
        return {**result, "error": f"torchtitan logged no step after warm-up ({len(per_step)} steps logged)"}
    mfus = [s["mfu"] for s in timed if "mfu" in s]
    result.update(
        tokens_per_s=statistics.median(s["tps"] for s in timed),
        mfu=statistics.median(mfus) if mfus else None,
        tflops=statistics.median(s["tflops"] for s in timed) if all("tflops" in s for s in timed) else None,
        peak_memory_gib=max(s["memory_gib"] for s in per_step.values()),
        steps_timed=len(timed),
        tps_per_step=[per_step[s]["tps"] for s in sorted(per_step)],
        tps_timed=[s["tps"] for s in timed],
        final_loss=per_step[max(per_step)]["loss"],
    )
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--runner"]:
        _runner(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="debug",
        help="model shape to start from; the flags below override it",
    )
    for name, kind in (
        ("dim", int),
        ("n_layers", int),
        ("n_heads", int),
        ("n_kv_heads", int),
        ("ffn_dim", int),
        ("vocab_size", int),
        ("rope_theta", float),
        ("norm_eps", float),
    ):
        parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ac", choices=("none", "full", "selective"), default="none")
    parser.add_argument("--float8", action="store_true")
    parser.add_argument("--work_folder", default="outputs/torchtitan_peer")
    parser.add_argument("--timeout_s", type=int, default=900)
    parser.add_argument("--quiet", action="store_true", help="do not echo torchtitan's output")
    args = parser.parse_args(argv)
    shape = dict(PRESETS[args.preset])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    result = run_torchtitan(
        **shape,
        seq_len=args.seq_len,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        compile=args.compile,
        ac=args.ac,
        float8=args.float8,
        work_folder=args.work_folder,
        timeout_s=args.timeout_s,
        echo=not args.quiet,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
    if "error" in result:
        print(result["log_tail"], file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
