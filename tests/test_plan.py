"""`resolve(cfg, world_size, device)`: each decision of a run, and each rule that refuses a
combination of settings, checked without a process group or a tensor."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from titanlm import plan as plan_module
from titanlm.config import load_config
from titanlm.errors import CheckpointError, ConfigError, ParallelismError, TitanlmError, UnsupportedError
from titanlm.plan import resolve, stage_layer_counts, stages_of_rank, varlen_kernel_installed

DEBUG = ["--model.flavor", "debug", "--data.dataset", "random"]  # 4 layers, 8 heads, 4 kv heads


def plan_of(*flags: str, world: int = 1, device: str = "cpu"):
    return resolve(load_config([*DEBUG, *flags]), world, device)


def refused(error: type[TitanlmError], match: str, *flags: str, world: int = 1, device: str = "cpu") -> None:
    with pytest.raises(error, match=match):
        plan_of(*flags, world=world, device=device)


# --- batch arithmetic -------------------------------------------------------------------------------


def test_accumulation_steps_are_global_over_local_times_dp() -> None:
    plan = plan_of("--training.local_batch_size", "2", "--training.global_batch_size", "16", world=4)
    assert (plan.dims.dp, plan.batch.accumulation_steps, plan.batch.tokens_per_step) == (4, 2, 16 * 128)
    assert plan_of("--training.local_batch_size", "3", world=2).batch.global_batch_size == 6  # -1 = local x dp


def test_a_global_batch_that_is_not_a_multiple_of_local_times_dp_is_refused() -> None:
    refused(
        ConfigError,
        r"global_batch_size 10 is not a multiple of training.local_batch_size 2 x data-parallel "
        r"degree 4 = 8",
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "10",
        world=4,
    )


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--training.global_batch_size", "0"], "training.global_batch_size must be >= 1, or -1"),
        (["--training.max_norm", "nan"], "training.max_norm must be a finite number"),
        (["--training.max_consecutive_skips", "-1"], "training.max_consecutive_skips must be >= 0"),
        (["--data.valid_every", "-1"], "data.valid_every must be >= 0"),
        (["--data.min_length", "-1"], r"data.min_length must be >= 0 \(0 = keep every document\)"),
        (["--optimizer.lr", "inf"], "optimizer.lr must be a finite number >= 0"),
        (["--debug.seed", "-1"], r"debug.seed must be in \[0, 2\*\*32\)"),
        (["--data.num_workers", "-1"], "data.num_workers must be >= 0"),
        (["--optimizer.beta2", "1.0"], r"optimizer.beta2 must be in \[0, 1\)"),
        (["--optimizer.eps", "0"], "optimizer.eps must be a finite number > 0"),
    ],
)
def test_value_ranges_are_refused_naming_the_key(flags: list[str], match: str) -> None:
    refused(ConfigError, match, *flags)


# --- mesh and layouts --------------------------------------------------------------------------------


def test_a_32_rank_layout_on_31_ranks_is_refused_with_the_numbers() -> None:
    flags = ["--parallelism.tensor_parallel_degree", "4", "--parallelism.pipeline_parallel_degree", "4"]
    refused(ParallelismError, r"world size 31 is not divisible by .* = 16", *flags, world=31)
    assert (
        plan_of(*flags, "--training.global_batch_size", "8", "--training.local_batch_size", "1", world=32).dims.dp_shard
        == 2
    )


def test_tensor_parallel_degree_must_divide_heads_and_kv_heads() -> None:
    refused(
        ParallelismError,
        "tensor_parallel_degree 3 does not divide the model's n_heads",
        "--parallelism.tensor_parallel_degree",
        "3",
        "--parallelism.data_parallel_shard_degree",
        "1",
        world=3,
    )
    refused(
        ParallelismError,
        r"tensor_parallel_degree 8 does not divide the model's n_kv_heads \(4\)",
        "--parallelism.tensor_parallel_degree",
        "8",
        world=8,
    )
    plan = plan_of("--parallelism.tensor_parallel_degree", "2", world=2)
    assert (plan.tp.degree, plan.tp.sequence_parallel, plan.tp.loss_parallel) == (2, True, True)
    assert not plan_of().tp.loss_parallel  # nothing to shard on one rank


def test_context_parallel_needs_a_seq_len_it_can_cut() -> None:
    cp2 = ["--parallelism.context_parallel_degree", "2"]
    refused(
        ParallelismError,
        r"training.seq_len 30 .* 2 x parallelism.context_parallel_degree = 4",
        *cp2,
        "--training.seq_len",
        "30",
        world=2,
    )
    plan_of(*cp2, "--training.seq_len", "32", world=2)
    tp4 = ["--parallelism.tensor_parallel_degree", "4"]
    refused(
        ParallelismError,
        "parallelism.tensor_parallel_degree 4.*sequence_parallel = false",
        *cp2,
        *tp4,
        "--training.seq_len",
        "12",
        world=8,
    )  # 6 tokens per cp rank
    plan_of(*cp2, *tp4, "--training.seq_len", "12", "--parallelism.sequence_parallel", "false", world=8)
    plan_of(
        *cp2, "--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "32", world=4
    )  # 16 per cp, 8 per tp


def test_pipeline_stage_split_and_rank_assignment() -> None:
    assert stage_layer_counts(10, 4, []) == (2, 3, 3, 2)  # the extra layers go to the middle stages
    assert stage_layer_counts(8, 2, [3, 5]) == (3, 5)
    with pytest.raises(ParallelismError, match=r"pipeline_parallel_stage_layers \[3, 4\] must list 2"):
        stage_layer_counts(8, 2, [3, 4])
    assert stages_of_rank(1, 4, 2, v_style=False) == [1, 5]
    assert stages_of_rank(1, 4, 2, v_style=True) == [1, 6]


def test_pipeline_plan_gives_each_rank_its_stages_and_layers() -> None:
    pp2 = [
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--training.global_batch_size",
        "16",
        "--training.local_batch_size",
        "4",
    ]
    plan = plan_of(*pp2, world=2)
    assert (plan.pipeline.layers_per_stage, plan.pipeline.stage_owners) == ((2, 2), (0, 1))
    assert plan.fsdp.reshard_after_forward == "never"  # "default" under PP keeps parameters gathered
    looped = plan_of(*pp2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B", world=2)
    assert (looped.pipeline.num_stages, looped.pipeline.stages_of(1)) == (4, (1, 3))
    assert looped.pipeline.first_layer(3) == 3


def test_more_pipeline_stages_than_layers_is_refused() -> None:
    refused(
        ParallelismError,
        "8 pipeline stages but the model has only 4 layers",
        "--parallelism.pipeline_parallel_degree",
        "8",
        "--training.global_batch_size",
        "64",
        "--training.local_batch_size",
        "8",
        world=8,
    )


def test_a_pipeline_needs_as_many_micro_batches_as_stages() -> None:
    refused(
        ParallelismError,
        r"the step has 1; raise training.global_batch_size to at least .* = 8",
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--training.local_batch_size",
        "4",
        world=2,
    )


def test_zero_bubble_schedules_need_parameters_kept_until_the_weight_pass() -> None:
    pp2 = [
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--training.global_batch_size",
        "16",
        "--training.local_batch_size",
        "4",
    ]
    zero_bubble = [*pp2, "--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble"]
    refused(
        ParallelismError,
        "'InterleavedZeroBubble' computes weight gradients after FSDP2",
        *zero_bubble,
        "--parallelism.fsdp_reshard_after_forward",
        "always",
        world=2,
    )
    plan_of(*zero_bubble, world=2)
    plan = plan_of(
        *pp2,
        "--parallelism.pipeline_parallel_schedule",
        "Interleaved1F1B",
        "--parallelism.fsdp_reshard_after_forward",
        "always",
        world=2,
    )
    assert plan.fsdp.reshard_after_forward == "always"


def test_a_looped_schedule_needs_two_virtual_stages() -> None:
    refused(
        ParallelismError,
        "runs several stages per rank; set parallelism.pipeline_parallel_virtual_stages >= 2",
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--training.global_batch_size",
        "16",
        "--training.local_batch_size",
        "4",
        "--parallelism.pipeline_parallel_schedule",
        "Interleaved1F1B",
        "--parallelism.pipeline_parallel_virtual_stages",
        "1",
        world=2,
    )


@pytest.mark.parametrize(
    "layout",
    [
        ("--parallelism.tensor_parallel_degree", "2"),
        ("--parallelism.tensor_parallel_degree", "2", "--parallelism.sequence_parallel", "false"),
        ("--parallelism.tensor_parallel_degree", "2", "--parallelism.disable_loss_parallel"),
        ("--parallelism.pipeline_parallel_degree", "2", "--training.global_batch_size", "16"),
    ],
)
def test_loss_chunking_is_planned_with_tensor_and_pipeline_parallelism(layout: tuple[str, ...]) -> None:
    assert plan_of("--training.loss_chunk_tokens", "1024", *layout, world=2).loss.chunk_tokens == 1024


# --- precision, FSDP, float8 ---------------------------------------------------------------------------


def test_fsdp_wraps_several_ranks_or_an_offloaded_job_and_autocast_the_others() -> None:
    one = plan_of("--training.mixed_precision_param", "bfloat16")
    assert not one.fsdp.enabled and one.precision.autocast_dtype == torch.bfloat16
    two = plan_of("--training.mixed_precision_param", "bfloat16", world=2)
    assert two.fsdp.enabled and two.precision.autocast_dtype is None  # FSDP's mixed precision instead
    assert plan_of("--parallelism.fsdp_cpu_offload").fsdp.enabled
    assert plan_of().precision.param_dtype == torch.float32  # auto on CPU
    assert plan_of(device="cuda").precision.param_dtype == torch.bfloat16  # auto on a GPU
    assert plan_of("--training.mixed_precision_param", "float16").precision.loss_scaling


def test_float8_all_gather_is_off_without_fsdp() -> None:
    pytest.importorskip("torchao.float8")
    all_gather = ["--float8.enable", "--float8.enable_fsdp_float8_all_gather"]
    assert not plan_of(*all_gather).float8.enable_fsdp_float8_all_gather  # one process: nothing to gather
    assert plan_of(*all_gather, world=2).float8.enable_fsdp_float8_all_gather
    assert plan_of("--float8.enable").float8.enable  # tensorwise runs on CPU too
    assert plan_of("--parallelism.fsdp_cpu_offload", "--float8.enable", world=2).float8.enable  # no all-gather


def test_float8_rowwise_with_all_gather_is_refused_on_any_world_with_one_message() -> None:
    all_gather = ["--float8.enable", "--float8.enable_fsdp_float8_all_gather"]
    messages = set()
    for world in (1, 2):
        with pytest.raises(ConfigError) as info:
            plan_of(*all_gather, "--float8.recipe_name", "rowwise", world=world)
        messages.add(str(info.value))
    assert len(messages) == 1 and "float8.recipe_name = 'tensorwise'" in messages.pop()


def test_offload_with_float8_all_gather_is_refused_in_one_line() -> None:
    refused(
        ParallelismError,
        "fsdp_cpu_offload does not combine with float8.enable_fsdp_float8",
        "--parallelism.fsdp_cpu_offload",
        "--float8.enable",
        "--float8.enable_fsdp_float8_all_gather",
        world=2,
    )


def test_rowwise_float8_on_a_cpu_without_row_scales_is_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(plan_module, "cpu_takes_row_scales", lambda: False)  # as torch 2.11's CPU matmul
    refused(
        UnsupportedError,
        "float8.recipe_name 'rowwise' needs a GPU or torch >= 2.13 on CPU",
        "--float8.enable",
        "--float8.recipe_name",
        "rowwise",
    )
    if importlib.util.find_spec("torchao") is not None:
        assert (
            plan_of("--float8.enable", "--float8.recipe_name", "rowwise", device="cuda").float8.recipe_name == "rowwise"
        )


# --- attention, data, checkpoint --------------------------------------------------------------------


def test_attention_auto_is_sdpa_on_cpu_and_a_fast_kernel_on_cuda_with_or_without_context_parallelism() -> None:
    assert plan_of().attention_backend == "sdpa"
    cp2 = ("--parallelism.context_parallel_degree", "2", "--training.seq_len", "64")
    assert plan_of(*cp2, world=2).attention_backend == "sdpa"
    fast = "varlen" if varlen_kernel_installed() else "flex"
    assert plan_of(device="cuda").attention_backend == fast
    assert plan_of(*cp2, world=2, device="cuda").attention_backend == fast
    for name in ("flex", "varlen", "sdpa"):  # no backend is refused under cp
        assert plan_of("--model.attention_backend", name, *cp2, world=2, device="cuda").attention_backend == name
    refused(UnsupportedError, "model.attention_backend = 'varlen' needs CUDA", "--model.attention_backend", "varlen")
    refused(
        UnsupportedError,
        "model.attention_backend = 'flex' trains on CUDA only",
        "--model.attention_backend",
        "flex",
        *cp2,
        world=2,
    )


def test_dataset_kind_and_the_data_paths_it_would_ignore() -> None:
    assert resolve(load_config(["--model.flavor", "debug"]), 1, "cpu").data.kind == "demo"  # auto, no folder
    assert plan_of("--data.dataset", "auto", "--data.train_folder", "some/folder").data.kind == "bin"
    refused(
        ConfigError,
        "data.train_folder = 'x' is set but data.dataset = 'demo' would not read it",
        "--data.dataset",
        "demo",
        "--data.train_folder",
        "x",
    )
    refused(ConfigError, "data.dataset = 'bin' needs data.train_folder", "--data.dataset", "bin")
    refused(ConfigError, "data.dataset_weights mixes the type folders", "--data.dataset_weights", "en:1")


def test_what_a_checkpoint_load_takes() -> None:
    assert plan_of().checkpoint.load_parts == ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
    weights = plan_of("--checkpoint.initial_load_path", "some/step-10", "--checkpoint.load_content", "model")
    assert weights.checkpoint.load_parts == ("model",)
    refused(
        CheckpointError,
        "unknown part.*weights",
        "--checkpoint.initial_load_path",
        "x",
        "--checkpoint.load_content",
        "weights",
    )
    refused(
        CheckpointError,
        "selects what to take from checkpoint.initial_load_path, which is empty",
        "--checkpoint.load_content",
        "model",
    )
    refused(
        CheckpointError,
        "checkpoint.last_save_in_hf exports the final checkpoint, but checkpoint.enable is off",
        "--checkpoint.last_save_in_hf",
    )


def test_pinned_memory_async_saves_fall_back_to_a_thread_on_cpu_with_a_note() -> None:
    plan = plan_of("--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem")
    assert plan.checkpoint.async_mode == "async"
    assert any("async_with_pinned_mem needs a GPU" in note for note in plan.notes)
    assert plan_of("--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem", device="cuda").notes == ()
    assert plan_of("--checkpoint.async_mode", "async_with_pinned_mem").notes == ()  # nothing saved, nothing to say


def test_the_optimizer_kernel_is_fused_where_the_parameters_are_on_a_gpu() -> None:
    assert plan_of(device="cuda").optimizer_implementation == "fused"
    assert plan_of().optimizer_implementation == "foreach"
    assert plan_of("--parallelism.fsdp_cpu_offload", device="cuda").optimizer_implementation == "foreach"
    assert plan_of("--optimizer.implementation", "for-loop", device="cuda").optimizer_implementation == "for-loop"


def test_the_loss_scaler_is_checked_only_where_it_scales() -> None:
    bad = ["--grad_scaler.backoff_factor", "1.5"]
    assert not plan_of(*bad).precision.loss_scaling  # float32: the scaler's settings are unused
    refused(
        ConfigError,
        r"grad_scaler.backoff_factor must be in \(0, 1\)",
        *bad,
        "--training.mixed_precision_param",
        "float16",
    )


def test_a_world_of_no_processes_is_refused() -> None:
    refused(ParallelismError, "the world size must be >= 1 process, got 0", world=0)


def test_full_activation_checkpointing_recomputes_the_leading_fraction() -> None:
    assert (
        plan_of(
            "--activation_checkpoint.mode", "full", "--activation_checkpoint.layer_fraction", "0.5"
        ).recomputed_layers
        == 2
    )
    assert plan_of("--activation_checkpoint.mode", "selective").recomputed_layers == 4
    assert plan_of().recomputed_layers == 0


# --- the dry run ---------------------------------------------------------------------------------------


def test_dry_run_flags_ranks_that_do_not_fit_and_says_what_to_change(capsys) -> None:
    from titanlm.dry_run import main

    with pytest.raises(SystemExit) as stop:
        main(["--model.flavor", "debug", "--world_size", "2", "--memory", "formula", "--gpu_memory_gib", "0.05"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2
    assert (
        "every rank (0-1):" in out
        and "DOES NOT FIT in 0.05 GiB: activations dominate: set activation_checkpoint" in out
    )
    assert err == "error: the plan does not fit in 0.05 GiB per GPU (--gpu_memory_gib); see above\n"


def test_dry_run_says_first_when_the_training_state_alone_does_not_fit(capsys) -> None:
    """Llama3-8B's fp32 weights, gradients and AdamW moments are 119.7 GiB: no recomputation helps there,
    and the advice names what can (sharding over more GPUs, CPU offload), with either estimator's figures."""
    from titanlm.dry_run import main

    with pytest.raises(SystemExit) as stop:
        main(["--model.flavor", "8B", "--world_size", "1", "--memory", "formula", "--gpu_memory_gib", "80"])
    out = capsys.readouterr().out
    assert stop.value.code == 2
    assert "DOES NOT FIT in 80 GiB: the weights, gradients and AdamW state alone take 119.7 GiB" in out
    assert "FSDP over 3 GPUs" in out and "fsdp_cpu_offload = true" in out
    assert "activation_checkpoint" not in out.split("DOES NOT FIT")[1]
    assert "precision   weights float32, compute autocast to bfloat16" in out
    assert "other: the rest at that" in out  # every column is explained


@pytest.mark.parametrize("limit", ["0", "-5", "nan", "inf", "lots"])
def test_dry_run_refuses_a_gpu_memory_that_is_not_a_positive_number(limit: str, capsys) -> None:
    from titanlm.dry_run import main

    with pytest.raises(SystemExit) as stop:
        main(["--model.flavor", "8B", "--world_size", "1", "--gpu_memory_gib", limit])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"--gpu_memory_gib: must be a number of GiB above 0, got '{limit}'" in err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dry_run_traces_a_step_of_the_real_model_under_fsdp(tmp_path) -> None:
    import subprocess
    import sys

    from trainer_runs import REPO

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "titanlm.plan",
            "--model.flavor",
            "debug",
            "--training.seq_len",
            "256",
            "--world_size",
            "8",
            "--device",
            "cuda",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fsdp        shard over 8 rank(s), reshard after forward: default" in result.stdout
    assert "  rank    7: pp=0 dp_replicate=0 dp_shard=7 cp=0 tp=0" in result.stdout
    assert "method: traced: one step on fake CPU tensors" in result.stdout


def test_each_rank_has_its_own_place_in_the_mesh_with_tp_innermost() -> None:
    dims = plan_of(
        "--parallelism.tensor_parallel_degree",
        "4",
        "--parallelism.pipeline_parallel_degree",
        "4",
        "--parallelism.context_parallel_degree",
        "2",
        "--training.local_batch_size",
        "1",
        "--training.global_batch_size",
        "8",
        "--training.seq_len",
        "64",
        world=64,
    ).dims
    assert dims.sizes() == {"pp": 4, "dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 4}
    assert dims.coordinates(0) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    assert dims.coordinates(13) == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 1, "tp": 1}
    assert dims.coordinates(63) == {"pp": 3, "dp_replicate": 0, "dp_shard": 1, "cp": 1, "tp": 3}
    assert len({tuple(dims.coordinates(rank).values()) for rank in range(64)}) == 64
    assert [rank for rank in range(64) if dims.coordinates(rank)["pp"] == 1] == list(dims.ranks_of_pp_rank(1))
