"""The training loop in one process: learning, accumulation, NaN skipping, fp16 scaling, metrics, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO, TINY_ARGS, assert_records_close, read_metrics, run_in_process

from titanlm.config import load_config
from titanlm.config.job_config import GradScaler, LRScheduler
from titanlm.loss_scaler import DynamicLossScaler, build_loss_scaler
from titanlm.metrics import METRIC_KEYS
from titanlm.optim import lr_factor
from titanlm.parallel import ParallelDims, ParallelismError
from titanlm.train import build_trainer


@pytest.mark.slow
def test_demo_run_loss_falls(tmp_path, demo_cache) -> None:
    records = run_in_process(
        tmp_path,
        [
            "--data.dataset",
            "demo",
            "--data.cache_folder",
            str(demo_cache),
            "--training.steps",
            "40",
            "--training.seq_len",
            "64",
            "--training.local_batch_size",
            "8",
            "--optimizer.lr",
            "3e-3",
        ],
    )
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 6.5  # ~ln(vocab) at initialization
    assert last < first - 2.0, [r["loss"] for r in records]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_micro_batch(tmp_path) -> None:
    accumulated = run_in_process(
        tmp_path / "a", ["--training.local_batch_size", "1", "--training.global_batch_size", "4"]
    )
    large = run_in_process(tmp_path / "b", ["--training.local_batch_size", "4"])
    assert_records_close(accumulated, large)


def test_chunked_loss_trains_like_the_full_logits(tmp_path) -> None:
    full = run_in_process(tmp_path / "full", [])
    chunked = run_in_process(tmp_path / "chunked", ["--training.loss_chunk_tokens", "24"])  # 128 tokens: 6 chunks
    assert_records_close(chunked, full)


def test_nan_gradient_step_is_skipped_and_counted(tmp_path) -> None:
    cfg = load_config([*TINY_ARGS, "--job.dump_folder", str(tmp_path)])
    trainer = build_trainer(cfg)
    batches = iter(trainer.dataloader)
    trainer.train_step(trainer.next_micro_batches(batches))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    clean_loss_fn = trainer.model_step.loss_fn
    trainer.model_step.loss_fn = lambda logits, labels: clean_loss_fn(logits, labels) * float("nan")
    record = trainer.train_step(trainer.next_micro_batches(batches))
    assert math.isnan(record["grad_norm"]) and record["inf_nan_skip_batches"] == 1
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"{name} changed during a skipped step"
    trainer.model_step.loss_fn = clean_loss_fn
    record = trainer.train_step(trainer.next_micro_batches(batches))
    assert math.isfinite(record["loss"]) and record["inf_nan_skip_batches"] == 1
    trainer.close()


@pytest.mark.slow
def test_float16_loss_scale_backs_off_on_overflow_and_training_continues(tmp_path) -> None:
    cfg = load_config(
        [
            *TINY_ARGS,
            "--job.dump_folder",
            str(tmp_path),
            "--training.mixed_precision_param",
            "float16",
            "--grad_scaler.hysteresis",
            "1",
            "--grad_scaler.initial_scale",
            "1024",
        ]
    )
    trainer = build_trainer(cfg)
    batches = iter(trainer.dataloader)
    assert trainer.train_step(trainer.next_micro_batches(batches))["loss_scale"] == 1024
    clean_loss_fn = trainer.model_step.loss_fn
    trainer.model_step.loss_fn = lambda logits, labels: clean_loss_fn(logits, labels) * float("inf")
    record = trainer.train_step(trainer.next_micro_batches(batches))
    assert record["loss_scale"] == 512 and record["inf_nan_skip_batches"] == 1
    trainer.model_step.loss_fn = clean_loss_fn
    record = trainer.train_step(trainer.next_micro_batches(batches))
    assert math.isfinite(record["grad_norm"]) and record["inf_nan_skip_batches"] == 1
    trainer.close()


@pytest.mark.slow
def test_one_process_low_precision_keeps_fp32_weights_and_computes_under_autocast(tmp_path) -> None:
    fp32 = run_in_process(tmp_path / "fp32", ["--training.steps", "3"])
    cfg = load_config(
        [
            *TINY_ARGS,
            "--job.dump_folder",
            str(tmp_path / "bf16"),
            "--training.steps",
            "3",
            "--training.mixed_precision_param",
            "bfloat16",
        ]
    )
    trainer = build_trainer(cfg)
    try:
        assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in trainer.model.parameters())
        tokens = torch.zeros(1, 8, dtype=torch.long, device=trainer.device)
        with trainer.model_step.context():
            assert trainer.model(tokens).dtype == torch.bfloat16
        assert trainer.model(tokens).dtype == torch.float32
        bf16 = trainer.train()
    finally:
        trainer.close()
    for got, want in zip(bf16, fp32, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
        assert got["loss"] != want["loss"], "bf16 compute really ran"


def test_metrics_jsonl_has_the_documented_keys_every_log_step(tmp_path) -> None:
    run_in_process(tmp_path, ["--metrics.log_freq", "2", "--metrics.enable_tensorboard"])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    for record in records:
        assert set(METRIC_KEYS) <= record.keys()
        assert record["num_consumed_tokens"] == record["step"] * 4 * 32
        assert record["tgs"] > 0 and record["tflops"] > 0 and record["mfu"] is None  # CPU: no known peak
    assert any((tmp_path / "tb").iterdir())


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    cfg = LRScheduler(warmup_steps=4, decay_type="cosine", min_lr_factor=0.1)
    factors = [lr_factor(step, cfg, total_steps=20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1)
    linear = LRScheduler(warmup_ratio=0.1, decay_type="linear", min_lr_factor=0.0)
    assert lr_factor(1, linear, total_steps=20) == 1.0 and lr_factor(19, linear, total_steps=20) == pytest.approx(0.0)


def test_dynamic_loss_scaler_follows_internevo_rules() -> None:
    scaler = DynamicLossScaler(GradScaler(initial_scale=8, min_scale=2, max_scale=16, growth_interval=2, hysteresis=2))
    scaler.update(overflow=True)
    assert scaler.scale == 8  # the first overflow is absorbed by hysteresis
    scaler.update(overflow=True)
    assert scaler.scale == 4
    scaler.update(overflow=True)
    scaler.update(overflow=True)
    assert scaler.scale == 2  # floored at min_scale
    for _ in range(6):
        scaler.update(overflow=False)
    assert scaler.scale == 16  # grew every 2 clean steps, capped at max_scale
    restored = DynamicLossScaler(GradScaler())
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_loss_scaling_off_is_a_scale_of_1_that_unscales_nothing_never_backs_off_and_saves_none() -> None:
    scaler = build_loss_scaler(GradScaler(initial_scale=8), enabled=False)
    grads = [torch.full((3,), 2.0)]
    scaler.unscale_(grads)
    scaler.update(overflow=True)
    assert (scaler.scale, scaler.can_back_off, scaler.state_dict()) == (1.0, False, None)
    assert torch.equal(grads[0], torch.full((3,), 2.0))


def test_a_checkpoint_of_the_other_precision_leaves_the_loss_scale_as_it_starts() -> None:
    float16_state = build_loss_scaler(GradScaler(initial_scale=1024), enabled=True).state_dict()
    off = build_loss_scaler(GradScaler(), enabled=False)
    off.load_state_dict(float16_state)  # a float16 checkpoint resumed at another precision
    assert off.scale == 1.0
    scaling = build_loss_scaler(GradScaler(initial_scale=8), enabled=True)
    scaling.load_state_dict(None)  # what a checkpoint of a run that did not scale its loss holds
    assert scaling.state_dict() == DynamicLossScaler(GradScaler(initial_scale=8)).state_dict()


def test_parallel_degrees_that_do_not_fit_the_world_are_rejected() -> None:
    cfg = load_config(["--parallelism.data_parallel_shard_degree", "3"])
    with pytest.raises(ParallelismError, match=r"multiply to 3 .* but the world size is 2"):
        ParallelDims.from_config(cfg.parallelism, world_size=2)
    cfg = load_config(["--parallelism.tensor_parallel_degree", "4"])
    with pytest.raises(ParallelismError, match="world size 6 is not divisible"):
        ParallelDims.from_config(cfg.parallelism, world_size=6)
    dims = ParallelDims.from_config(load_config(["--parallelism.data_parallel_replicate_degree", "2"]).parallelism, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)


def test_global_batch_must_be_a_multiple_of_local_batch_times_dp(tmp_path) -> None:
    with pytest.raises(ValueError, match="training.global_batch_size 6 is not a multiple"):
        run_in_process(tmp_path, ["--training.global_batch_size", "6"])


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line_and_exit_code_2(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "titanlm.train",
            *TINY_ARGS,
            "--job.dump_folder",
            str(tmp_path),
            "--parallelism.tensor_parallel_degree",
            "2",
            "--parallelism.data_parallel_shard_degree",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: [parallelism] degrees multiply to 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_compiled_blocks_and_loss_match_eager(tmp_path) -> None:
    eager = run_in_process(tmp_path / "eager", ["--training.steps", "2"])
    compiled = run_in_process(tmp_path / "compiled", ["--training.steps", "2", "--compile.enable"])
    assert_records_close(compiled, eager, rtol=1e-5)


def test_float8_training_tracks_full_precision_and_keeps_the_output_layer(tmp_path) -> None:
    pytest.importorskip("torchao.float8")
    full = run_in_process(tmp_path / "fp32", ["--training.steps", "3"])
    cfg = load_config(
        [*TINY_ARGS, "--job.dump_folder", str(tmp_path / "fp8"), "--training.steps", "3", "--float8.enable"]
    )
    trainer = build_trainer(cfg)
    linear_types = {
        name: type(module).__name__
        for name, module in trainer.model.named_modules()
        if name.endswith(("wq", "w2", "output"))
    }
    assert linear_types["layers.0.attention.wq"] == "Float8Linear"
    assert linear_types["output"] == "Linear"
    fp8 = trainer.train()
    trainer.close()
    # Stated tolerance: e4m3 rounding moves the loss by well under 1% on this model.
    for a, b in zip(fp8, full):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-2), (a["loss"], b["loss"])
        assert a["loss"] != b["loss"]  # float8 really ran


@pytest.mark.parametrize(
    "ac",
    [["full"], ["full", "--activation_checkpoint.layer_fraction", "0.5"], ["selective"]],
    ids=["full", "half_of_the_layers", "selective_op"],
)
def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, ac) -> None:
    plain = run_in_process(tmp_path / "plain", ["--training.steps", "3"])
    recomputed = run_in_process(tmp_path / "ac", ["--training.steps", "3", "--activation_checkpoint.mode", *ac])
    assert_records_close(recomputed, plain)


def test_ac_layer_fraction_wraps_the_leading_blocks() -> None:
    from titanlm.models import Transformer, get_model_args
    from titanlm.parallel.activation_checkpoint import apply_ac

    with torch.device("meta"):
        model = Transformer(get_model_args("llama3", "debug"))
    apply_ac(model, "full", recomputed_layers=2)  # layer_fraction 0.5 of 4 layers
    wrapped = [type(block).__name__ == "CheckpointWrapper" for block in model.layers.values()]
    assert wrapped == [True, True, False, False]


def test_ac_modes_recompute_what_they_promise_in_backward() -> None:
    """full re-runs the matmuls in backward; selective keeps them and re-runs only elementwise ops."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from titanlm.models import Transformer, get_model_args
    from titanlm.parallel.activation_checkpoint import apply_ac

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def backward_ops(mode: str) -> Counter:
        model = Transformer(get_model_args("llama3", "debug"))
        model.init_weights(seed=0)
        apply_ac(model, mode, recomputed_layers=model.args.n_layers)
        loss = model(torch.randint(0, 2048, (2, 64))).sum()
        with CountOps() as counter:
            loss.backward()
        return counter.counts

    none, selective, full = backward_ops("none"), backward_ops("selective"), backward_ops("full")
    assert full["mm"] > selective["mm"] == none["mm"]  # only full recomputes the matmuls
    assert selective["mul"] > none["mul"]  # selective recomputes the elementwise ops


def test_only_logged_steps_wait_for_the_device_and_count_documents(tmp_path, monkeypatch) -> None:
    import titanlm.metrics

    trainer = build_trainer(load_config([*TINY_ARGS, "--job.dump_folder", str(tmp_path)]))
    try:
        batches = iter(trainer.dataloader)
        timed = trainer.train_step(trainer.next_micro_batches(batches))
        assert {"tgs", "tflops", "mfu", "memory_gib", "fwd_bwd_time"} <= set(timed)

        def no_counting(batch):
            raise AssertionError("an untimed step counted its documents")

        monkeypatch.setattr(titanlm.metrics, "document_lengths", no_counting)
        untimed = trainer.train_step(trainer.next_micro_batches(batches), timed=False)
        assert not {"tgs", "tflops", "mfu", "memory_gib", "fwd_bwd_time"} & set(untimed)
        assert {"step", "loss", "lr", "grad_norm", "step_time"} <= set(untimed)  # what metrics.keep_step reads
    finally:
        trainer.close()
