"""The shipped configs load, and their parallel layouts fit the world sizes they are written for."""

from __future__ import annotations

import re

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from trainer_runs import REPO

from titanlm.config import load_config
from titanlm.config.job_config import Parallelism
from titanlm.dry_run import main as dry_run_main
from titanlm.models import get_model_args
from titanlm.parallel import ParallelDims, ParallelismError

# config -> the world size its header comment names
WORLDS = {
    "debug_model.toml": 1,
    "llama3_8b.toml": 32,
    "internlm2_20b.toml": 32,
    "internlm2_7b.toml": 8,
    "internlm_7b_sft.toml": 8,
    "llama3_8b_sft.toml": 8,
}
DEGREES = (
    "tensor_parallel_degree",
    "pipeline_parallel_degree",
    "context_parallel_degree",
    "data_parallel_replicate_degree",
    "data_parallel_shard_degree",
)
# `global_batch_size = G   # micro_num A x micro_bsz B x dp C`, InternEvo's batch arithmetic spelled out
BATCH_COMMENT = re.compile(r"^global_batch_size = (\d+)\s+# micro_num (\d+) x micro_bsz (\d+) x dp (\d+)$", re.M)


def test_every_shipped_config_is_listed_here() -> None:
    assert {p.name for p in (REPO / "train_configs").glob("*.toml")} == set(WORLDS)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_config_loads_and_its_layout_fits_its_world(name: str) -> None:
    path = REPO / "train_configs" / name
    cfg = load_config(["--job.config_file", str(path)])
    get_model_args(cfg.model.name, cfg.model.flavor)
    # The degrees as the TOML writes them (defaults where it is silent), multiplied out by hand.
    written = tomllib.loads(path.read_text()).get("parallelism", {})
    tp, pp, cp, replicate, shard = (written.get(key, getattr(Parallelism(), key)) for key in DEGREES)
    world = WORLDS[name]
    if shard == -1:
        assert world % (tp * pp * cp * replicate) == 0, f"{name}: tp x pp x cp x replicate does not divide {world}"
        shard = world // (tp * pp * cp * replicate)
    assert tp * pp * cp * replicate * shard == world, f"{name}: its degrees multiply to another world size"

    dims = ParallelDims.from_config(cfg.parallelism, world)
    assert (dims.tp, dims.pp, dims.cp, dims.dp_replicate, dims.dp_shard) == (tp, pp, cp, replicate, shard)
    local = cfg.training.local_batch_size
    global_batch = cfg.training.global_batch_size if cfg.training.global_batch_size > 0 else local * dims.dp
    assert global_batch % (local * dims.dp) == 0, f"{name}: a step is not a whole number of micro-batches"
    if name != "debug_model.toml":
        assert cfg.checkpoint.enable  # long runs must be resumable


@pytest.mark.parametrize("name", ["internlm_7b_sft.toml", "llama3_8b_sft.toml"])
def test_sft_batch_comment_adds_up_to_the_values(name: str) -> None:
    text = (REPO / "train_configs" / name).read_text()
    cfg = load_config(["--job.config_file", str(REPO / "train_configs" / name)])
    [(global_batch, micro_num, micro_bsz, dp)] = [tuple(map(int, m)) for m in BATCH_COMMENT.findall(text)]
    assert global_batch == micro_num * micro_bsz * dp == cfg.training.global_batch_size
    assert micro_bsz == cfg.training.local_batch_size
    assert dp == ParallelDims.from_config(cfg.parallelism, WORLDS[name]).dp


def test_easyllm_32_gpu_layout_on_8_gpus_is_refused_with_the_numbers() -> None:
    cfg = load_config(["--job.config_file", str(REPO / "train_configs" / "llama3_8b.toml")])
    with pytest.raises(ParallelismError, match=r"world size 8 is not divisible by .* = 32"):
        ParallelDims.from_config(cfg.parallelism, 8)


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m titanlm.plan ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        dry_run_main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_dry_run_of_every_shipped_config_at_its_world_size_passes(name: str, capsys) -> None:
    code, out, err = dry_run(
        capsys,
        "--job.config_file",
        str(REPO / "train_configs" / name),
        "--world_size",
        str(WORLDS[name]),
        "--device",
        "cuda",
        "--memory",
        "formula",
    )
    assert (code, err) == (0, "")
    assert out.startswith(f"plan for {WORLDS[name]} x cuda")
    assert f"  rank {WORLDS[name] - 1:>4}:" in out or WORLDS[name] > 64  # every rank placed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--world_size", "31"],
            "error: world size 31 is not divisible by data_parallel_replicate_degree x "
            "tensor_parallel_degree x pipeline_parallel_degree x context_parallel_degree = 32",
        ),
        (
            ["--world_size", "128", "--parallelism.tensor_parallel_degree", "16"],
            "error: parallelism.tensor_parallel_degree 16 does not divide the model's n_kv_heads (8)",
        ),
        (
            ["--world_size", "512", "--parallelism.pipeline_parallel_degree", "64"],
            "error: 64 pipeline stages but the model has only 32 layers",
        ),
        (
            ["--world_size", "32", "--training.seq_len", "32766"],
            "error: training.seq_len 32766 is not divisible by 2 x parallelism.context_parallel_degree = 4",
        ),
    ],
    ids=["31_ranks", "tp_16_vs_8_kv_heads", "pp_64_vs_32_layers", "cp_vs_seq_len"],
)
def test_dry_run_of_a_broken_easyllm_layout_fails_with_the_trainers_line(flags, message, capsys) -> None:
    code, out, err = dry_run(
        capsys,
        "--job.config_file",
        str(REPO / "train_configs" / "llama3_8b.toml"),
        "--device",
        "cuda",
        "--memory",
        "none",
        *flags,
    )
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert out == ""
