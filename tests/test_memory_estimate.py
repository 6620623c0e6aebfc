"""Peak-memory estimates (titanlm.memory_estimate): the fake-tensor trace against the same step on real
tensors, the closed form against the trace, and the closed form wherever the trace cannot run.

The trace's reference is `trace_memory(..., fake=False)`: this process, in a fake process group of the
job's world size, runs the same step on real CPU tensors. Every tensor is really allocated; the
collectives move nothing, which changes no rank's allocations (a rank holds the same buffers whatever
its peers send). Two processes under torchrun would allocate the same tensors at several times the
cost, and only one of them could be tracked.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from titanlm.config import load_config
from titanlm.memory_estimate import (
    GIB,
    MemoryEstimate,
    estimate_memory,
    formula_memory,
    shutdown_process_group,
    trace_memory,
)
from titanlm.models import Transformer, count_params
from titanlm.models.flavors import get_model_args
from titanlm.plan import resolve

DEBUG = str(Path(__file__).parents[1] / "train_configs" / "debug_model.toml")
FSDP2 = ()
TP2 = ("--parallelism.tensor_parallel_degree", "2")
SMALL = ("--model.n_layers", "2", "--training.local_batch_size", "2")  # faster, for the properties
# What the closed form is held to against the trace; measured from -9% to +4% on 28 debug-model layouts
# (the worst: full recomputation, 4 layers), within 0.2% on 5 Llama3-8B cuts.
FORMULA_TOLERANCE = 0.10


@pytest.fixture(autouse=True)
def no_process_group() -> None:
    """The trace makes its own fake group of the job's size, which needs a process without one; tests
    that ran a trainer in this process before leave their one-rank group (the next trainer makes anew)."""
    shutdown_process_group()


def config(flags: tuple[str, ...]):
    return load_config(["--job.config_file", DEBUG, *flags])


@cache
def traced(flags: tuple[str, ...], device: str = "cpu", rank: int = 0, fake: bool = True) -> MemoryEstimate:
    return trace_memory(resolve(config(flags), 2, device), rank, fake=fake)


def parts(estimate: MemoryEstimate) -> dict[str, float]:
    fields = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "other_gib", "peak_gib")
    return {field: getattr(estimate, field) for field in fields}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [FSDP2, TP2], ids=["fsdp2", "tp2"])
def test_the_estimate_is_within_10_percent_of_the_same_step_on_real_tensors(flags) -> None:
    estimate = estimate_memory(resolve(config(flags), 2, "cpu"))
    real = traced(flags, fake=False)
    assert estimate.method == "traced" and "fake CPU tensors" in estimate.note
    assert estimate.peak_gib == pytest.approx(real.peak_gib, rel=0.10)
    # Measured: equal to the byte. A tracker counting DTensor's shape propagation in the fake mode
    # would be 4% high here (and 2x at Llama3-8B scale), inside 10%, hence the tighter bound.
    for field, value in parts(estimate).items():
        assert value == pytest.approx(parts(real)[field], rel=1e-3, abs=1e-6), field


@pytest.mark.slow
def test_the_estimate_for_cuda_dtypes_matches_real_tensors_in_those_dtypes() -> None:
    flags = (*TP2, *SMALL)  # bfloat16 matmuls are slow on CPUs
    estimate, real = traced(flags, "cuda"), traced(flags, "cuda", fake=False)
    for field, value in parts(estimate).items():
        assert value == pytest.approx(parts(real)[field], rel=1e-3, abs=1e-6), field


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(*FSDP2, *SMALL), (*TP2, *SMALL)], ids=["fsdp2", "tp2"])
def test_both_ranks_of_an_even_split_get_the_same_estimate(flags) -> None:
    assert parts(traced(flags, "cuda", rank=1)) == parts(traced(flags, "cuda", rank=0))


@pytest.mark.slow
def test_the_traced_state_is_each_ranks_half_of_the_fp32_parameters_and_two_adam_states() -> None:
    with torch.device("meta"):
        n = count_params(Transformer(get_model_args("llama3", "debug")))
    for flags in (FSDP2, TP2):
        estimate = traced(flags)
        assert estimate.params_gib == pytest.approx(4 * n / 2 / GIB, rel=0.005)
        assert estimate.grads_gib == pytest.approx(estimate.params_gib)
        assert estimate.optimizer_gib == pytest.approx(2 * estimate.params_gib, rel=1e-3)  # + step counts


@pytest.mark.slow
def test_a_cuda_target_computes_in_bfloat16_and_keeps_fp32_shards() -> None:
    cpu, cuda = traced((*FSDP2, *SMALL)), traced((*FSDP2, *SMALL), "cuda")
    assert cuda.params_gib == pytest.approx(cpu.params_gib)
    # Half the bytes for most activations; the fp32 log-probabilities stay.
    assert cuda.activations_gib < 0.75 * cpu.activations_gib
    assert "cuda's dtypes (bfloat16 parameters)" in cuda.note


@pytest.mark.slow
def test_gradient_accumulation_keeps_the_earlier_micro_batches_gradients_through_the_step() -> None:
    one, two = traced(SMALL), traced((*SMALL, "--training.global_batch_size", "8"))
    assert two.peak_gib - one.peak_gib == pytest.approx(one.grads_gib, rel=0.01)


LAYOUTS = {
    "fsdp2": (FSDP2, "cpu"),
    "tp2": (TP2, "cpu"),
    "fsdp2-cuda": ((*FSDP2, *SMALL), "cuda"),
    "tp2-cuda": ((*TP2, *SMALL), "cuda"),
    "cp2": (("--parallelism.context_parallel_degree", "2", *SMALL), "cpu"),
    "full-recompute": (("--activation_checkpoint.mode", "full", *SMALL), "cpu"),
    "selective-tp2-cuda": ((*TP2, "--activation_checkpoint.mode", "selective", *SMALL), "cuda"),
    "chunked-loss": (("--training.loss_chunk_tokens", "64", *SMALL), "cpu"),
}


@pytest.mark.slow
@pytest.mark.parametrize("flags, device", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_formula_is_within_its_tolerance_of_the_trace(flags, device) -> None:
    trace, formula = traced(flags, device), formula_memory(resolve(config(flags), 2, device))
    assert formula.method == "formula"
    assert formula.peak_gib == pytest.approx(trace.peak_gib, rel=FORMULA_TOLERANCE)
    for field in ("params_gib", "grads_gib", "optimizer_gib"):
        assert getattr(formula, field) == pytest.approx(getattr(trace, field), rel=0.005), field


CP2_ROWS = (
    "--parallelism.context_parallel_degree",
    "2",
    "--training.seq_len",
    "1024",
    "--training.local_batch_size",
    "1",
    "--model.n_layers",
    "2",
)


@pytest.mark.slow
def test_under_context_parallelism_flex_and_varlen_are_traced_without_sdpas_dense_mask() -> None:
    # sdpa takes a cp rank's rows as a boolean [rows, 1, S/cp, S] mask, built once per forward, and keeps an
    # additive bfloat16 copy of it in every block; flex's and varlen's kernels keep neither.
    flash = traced(CP2_ROWS, "cuda")
    sdpa = traced((*CP2_ROWS, "--model.attention_backend", "sdpa"), "cuda")
    assert resolve(config(CP2_ROWS), 2, "cuda").attention_backend in ("flex", "varlen")
    assert "attention as sdpa without a mask" in flash.note
    mask_elements, blocks = 1024 // 2 * 1024, 2
    assert (sdpa.activations_gib - flash.activations_gib) * GIB == pytest.approx(mask_elements * 2 * blocks)
    # The closed form counts no mask for flex and varlen either.
    assert formula_memory(resolve(config(CP2_ROWS), 2, "cuda")).peak_gib == pytest.approx(flash.peak_gib, rel=0.01)


def test_pipeline_parallelism_is_estimated_by_the_formula_which_says_so() -> None:
    cfg = config(("--parallelism.pipeline_parallel_degree", "2", "--training.global_batch_size", "16"))
    first, last = estimate_memory(resolve(cfg, 2, "cuda"), rank=0), estimate_memory(resolve(cfg, 2, "cuda"), rank=1)
    assert not dist.is_initialized()
    for estimate in (first, last):
        assert estimate.method == "formula" and "pipeline parallelism" in estimate.note
    # 1F1B: the first stage keeps both micro-batches' activations, the last one and the logits'.
    assert first.activations_gib > 0 and last.activations_gib > 0
    assert first != last


def test_an_estimate_leaves_no_process_group_and_the_shutdown_is_safe_without_one() -> None:
    shutdown_process_group()
    assert estimate_memory(resolve(config(SMALL), 2, "cpu")).method == "traced"
    assert not dist.is_initialized()
    shutdown_process_group()


def test_a_process_that_already_has_a_process_group_gets_the_formula() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        estimate = estimate_memory(resolve(config(FSDP2), 2, "cpu"))
        assert estimate.method == "formula" and "already has a process group" in estimate.note
        assert dist.is_initialized()  # the caller's group is left alone
    finally:
        shutdown_process_group()
