"""FSDP CPU offload (`parallelism.fsdp_cpu_offload`): parameters, gradients and optimizer state in host
memory, also in a one-process job, with the numerics of the job without it.

On a CPU-only machine the device is the host, so the offload moves nothing: these tests prove the
code path (the policy is applied, FSDP wraps the one-process model) and the numerics. The 2-rank
layout is in test_distributed.py (`fsdp2_cpu_offload`).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor
from trainer_runs import TINY_ARGS, assert_records_close, run_in_process

from titanlm.config import load_config
from titanlm.models import Transformer, get_model_args
from titanlm.parallel.parallelize import materialize_parallelized
from titanlm.train import build_trainer

OFFLOAD = ["--parallelism.fsdp_cpu_offload"]


def test_one_process_with_offload_trains_like_one_without(tmp_path) -> None:
    resident = run_in_process(tmp_path / "resident", [])
    trainer = build_trainer(load_config([*TINY_ARGS, "--job.dump_folder", str(tmp_path / "offload"), *OFFLOAD]))
    try:
        fsdp_modules = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
        assert len(fsdp_modules) == len(trainer.model.layers) + 1  # every block and the root: FSDP on one rank
        assert all(isinstance(p, DTensor) for p in trainer.model.parameters())
        for module in fsdp_modules:
            policy = module._get_fsdp_state()._fsdp_param_group.offload_policy
            assert isinstance(policy, CPUOffloadPolicy) and not policy.pin_memory  # pinning needs CUDA
        offloaded = trainer.train()
        assert all(state["exp_avg"].device.type == "cpu" for state in trainer.optimizer.state.values())
    finally:
        trainer.close()
    assert_records_close(offloaded, resident)


@pytest.mark.slow
def test_a_checkpoint_moves_between_offloaded_and_resident_runs(tmp_path) -> None:
    """Saved offloaded, resumed resident, resumed offloaded again: the same run as never stopping."""
    steps, ckpt = ["--training.steps", "6"], ["--checkpoint.enable", "--checkpoint.interval", "100"]
    straight = run_in_process(tmp_path / "straight", steps)
    run = tmp_path / "run"
    run.mkdir()
    stop = ["--checkpoint.stop_file", str(run / "STOP")]
    records = []
    for stop_step, extra in ((2, OFFLOAD), (4, []), (6, OFFLOAD)):
        (run / "STOP").write_text(str(stop_step))
        records += run_in_process(run, [*steps, *ckpt, *stop, *extra])
    assert_records_close(records, straight)


def test_offload_allocates_parameters_in_host_memory_and_buffers_on_the_device() -> None:
    with torch.device("meta"):
        model = Transformer(get_model_args("llama3", "debug"))
    materialize_parallelized(model, torch.device("meta"), cpu_offload=True)  # "meta" stands in for a GPU
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"meta"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m cuda on one)")
def test_on_a_gpu_the_state_stays_in_pinned_host_memory_and_the_job_learns_in_less_gpu_memory(
    tmp_path, demo_cache
) -> None:
    args = [
        *TINY_ARGS,
        "--training.mixed_precision_param",
        "bfloat16",
        "--training.steps",
        "20",
        "--data.dataset",
        "demo",
        "--data.cache_folder",
        str(demo_cache),
    ]

    def fresh_peak() -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    fresh_peak()
    resident = run_in_process(tmp_path / "resident", args)
    fresh_peak()
    trainer = build_trainer(load_config([*args, "--job.dump_folder", str(tmp_path / "offload"), *OFFLOAD]))
    try:
        offloaded = trainer.train()
        assert all(p.to_local().is_pinned() for p in trainer.model.parameters())
        assert {b.device.type for b in trainer.model.buffers()} == {"cuda"}
        assert all(state["exp_avg"].device.type == "cpu" for state in trainer.optimizer.state.values())
    finally:
        trainer.close()
    assert offloaded[-1]["loss"] < offloaded[0]["loss"] - 1.0
    assert offloaded[-1]["memory_gib"] < resident[-1]["memory_gib"]
