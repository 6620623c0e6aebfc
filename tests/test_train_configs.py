"""The shipped configs load, and their parallel layouts fit the world sizes they are written for."""

from __future__ import annotations

import pytest

from titanlm.config import load_config
from titanlm.models import get_model_args
from titanlm.parallel import ParallelDims, ParallelismError
from trainer_runs import REPO

# config -> the world size its header comment names
WORLDS = {
    "debug_model.toml": 1,
    "llama3_8b.toml": 32,
    "internlm2_20b.toml": 32,
    "internlm2_7b.toml": 8,
    "internlm_7b_sft.toml": 8,
    "llama3_8b_sft.toml": 8,
}


def test_every_shipped_config_is_listed_here() -> None:
    assert {p.name for p in (REPO / "train_configs").glob("*.toml")} == set(WORLDS)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_config_loads_and_its_layout_fits_its_world(name: str) -> None:
    cfg = load_config(["--job.config_file", str(REPO / "train_configs" / name)])
    get_model_args(cfg.model.name, cfg.model.flavor)
    dims = ParallelDims.from_config(cfg.parallelism, WORLDS[name])
    assert dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp * dims.pp == WORLDS[name]
    if name != "debug_model.toml":
        assert cfg.checkpoint.enable  # long runs must be resumable


def test_seed_000_layout_on_too_few_gpus_is_refused_with_the_numbers() -> None:
    cfg = load_config(["--job.config_file", str(REPO / "train_configs" / "llama3_8b.toml")])
    with pytest.raises(ParallelismError, match=r"world size 8 is not divisible by .* = 32"):
        ParallelDims.from_config(cfg.parallelism, 8)
