"""Divergence is never silent: skipped steps warn, too many in a row stop the run unsaved, all-zero
gradients warn, and settings that make training diverge or do nothing are refused naming their key."""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import pytest
from trainer_runs import TINY_ARGS, read_metrics, run_in_process

from titanlm.checkpoint import layout
from titanlm.checkpoint.train_state import TrainState, capture_rng
from titanlm.config import ConfigError, load_config
from titanlm.train import Trainer, TrainingDiverged, build_trainer

SKIPPED = "update skipped"
ZERO_GRADS = "every gradient is zero"
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "1"]


def trainer_for(dump_folder: Path, extra: list[str]) -> Trainer:
    return build_trainer(load_config([*TINY_ARGS, "--job.dump_folder", str(dump_folder), *extra]))


def train_with_inf_loss_at(trainer: Trainer, bad_steps: set[int]) -> list[dict]:
    """Train to the end with an infinite loss (so an inf/NaN grad norm) at `bad_steps`."""
    clean_loss_fn = trainer.model_step.loss_fn

    def loss_fn(logits, labels):
        return clean_loss_fn(logits, labels) * (math.inf if trainer.step + 1 in bad_steps else 1.0)

    trainer.model_step.loss_fn = loss_fn
    try:
        return trainer.train()
    finally:
        trainer.close()


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_lr_1e6_stops_after_max_consecutive_skips_and_the_stopping_step_is_not_saved(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="titanlm")
    with pytest.raises(TrainingDiverged, match=r"training.max_consecutive_skips = 3") as stopped:
        run_in_process(
            tmp_path, ["--optimizer.lr", "1e6", "--training.steps", "8", "--training.max_consecutive_skips", "3", *CKPT]
        )
    last = stopped.value.step
    assert stopped.value.skips == 3
    skipped = warnings_with(caplog, SKIPPED)
    assert [line.split(":")[0] for line in skipped] == [f"step {s}" for s in range(last - 2, last + 1)]
    assert all("grad norm is nan" in line or "grad norm is inf" in line for line in skipped)
    assert all(f"({n} in a row; training.max_consecutive_skips = 3" in line for n, line in enumerate(skipped, 1))
    # Steps skipped before the limit are saved as usual; the stopping step is not.
    assert layout.complete_steps(str(tmp_path / "checkpoint")) == list(range(1, last))
    assert read_metrics(tmp_path, every_step=True)[-1]["step"] == last


def test_max_consecutive_skips_0_never_stops(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="titanlm")
    records = run_in_process(
        tmp_path, ["--optimizer.lr", "1e6", "--training.steps", "8", "--training.max_consecutive_skips", "0"]
    )
    assert [r["step"] for r in records] == list(range(1, 9))
    skips = records[-1]["inf_nan_skip_batches"]
    assert skips >= 3
    skipped = warnings_with(caplog, SKIPPED)
    assert len(skipped) == skips and all("the run never stops" in line for line in skipped)


@pytest.mark.parametrize(("bad_steps", "stops_at"), [({2, 4}, None), ({2, 3}, 3), ({1, 3, 4}, 4)])
def test_a_finite_step_resets_the_count(tmp_path, bad_steps, stops_at) -> None:
    trainer = trainer_for(tmp_path, ["--training.max_consecutive_skips", "2"])
    if stops_at is None:
        records = train_with_inf_loss_at(trainer, bad_steps)
        assert records[-1]["inf_nan_skip_batches"] == len(bad_steps)
        assert trainer.update.consecutive_skips == 0
    else:
        with pytest.raises(TrainingDiverged) as stopped:
            train_with_inf_loss_at(trainer, bad_steps)
        assert (stopped.value.step, stopped.value.skips) == (stops_at, 2)


@pytest.mark.slow
def test_the_count_survives_a_resume(tmp_path) -> None:
    first = trainer_for(tmp_path, ["--training.steps", "4", "--training.max_consecutive_skips", "3", *CKPT])
    train_with_inf_loss_at(first, {3, 4})  # saves step-4 two skips into a run of them
    resumed = trainer_for(tmp_path, ["--training.steps", "8", "--training.max_consecutive_skips", "3", *CKPT])
    assert (resumed.step, resumed.update.consecutive_skips) == (4, 2)
    with pytest.raises(TrainingDiverged) as stopped:
        train_with_inf_loss_at(resumed, {5})
    assert (stopped.value.step, stopped.value.skips) == (5, 3)
    assert layout.complete_steps(str(tmp_path / "checkpoint")) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_checkpoint_saved_before_the_count_existed_still_loads(tmp_path, monkeypatch) -> None:
    def state_dict_without_the_count(self: TrainState) -> dict:
        return {
            "step": self.step,
            "num_consumed_tokens": self.num_consumed_tokens,
            "inf_nan_skip_batches": self.inf_nan_skip_batches,
            "loss_scaler": pickle.dumps(self.loss_scaler),
            "rng": pickle.dumps(capture_rng()),
        }

    with monkeypatch.context() as old_format:
        old_format.setattr(TrainState, "state_dict", state_dict_without_the_count)
        train_with_inf_loss_at(trainer_for(tmp_path, ["--training.steps", "2", *CKPT]), {2})
    resumed = trainer_for(tmp_path, ["--training.steps", "3", *CKPT])
    assert (resumed.step, resumed.update.skipped, resumed.update.consecutive_skips) == (2, 1, 0)
    assert [r["step"] for r in train_with_inf_loss_at(resumed, set())] == [3]


@pytest.mark.parametrize(
    ("flags", "warns"),
    [  # float16 matmuls are slow on a CPU
        pytest.param(
            [
                "--training.mixed_precision_param",
                "float16",
                "--grad_scaler.initial_scale",
                "1e-30",
                "--grad_scaler.min_scale",
                "1e-30",
            ],
            True,
            marks=pytest.mark.slow,
        ),
        ([], False),
        pytest.param(
            ["--training.mixed_precision_param", "float16", "--grad_scaler.initial_scale", "1024"],
            False,
            marks=pytest.mark.slow,
        ),
    ],
    ids=["float16_underflow", "float32", "float16"],
)
def test_all_zero_gradients_warn_once_and_normal_runs_do_not(tmp_path, caplog, flags, warns) -> None:
    caplog.set_level(logging.WARNING, logger="titanlm")
    records = run_in_process(tmp_path, ["--training.steps", "3", *flags])
    assert [r["grad_norm"] == 0.0 for r in records] == [warns] * 3
    zero = warnings_with(caplog, ZERO_GRADS)
    assert len(zero) == (1 if warns else 0)
    if warns:
        assert "underflowed" in zero[0] and "grad_scaler.initial_scale" in zero[0]


FLOAT16 = ["--training.mixed_precision_param", "float16"]


def refused(flags: list[str], key: str):
    return pytest.param(flags, key, id=f"{key}={flags[-1]}")


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        refused(["--optimizer.lr", "inf"], "optimizer.lr"),
        refused(["--optimizer.lr", "nan"], "optimizer.lr"),
        refused(["--optimizer.lr", "-1e-3"], "optimizer.lr"),
        refused(["--optimizer.beta1", "1.0"], "optimizer.beta1"),
        refused(["--optimizer.beta1", "-0.1"], "optimizer.beta1"),
        refused(["--optimizer.beta2", "1.0"], "optimizer.beta2"),
        refused(["--optimizer.eps", "0"], "optimizer.eps"),
        refused(["--optimizer.eps", "inf"], "optimizer.eps"),
        refused(["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay"),
        refused(["--optimizer.weight_decay", "nan"], "optimizer.weight_decay"),
        refused(["--training.global_batch_size", "0"], "training.global_batch_size"),
        refused(["--training.global_batch_size", "-5"], "training.global_batch_size"),
        refused(["--training.local_batch_size", "0"], "training.local_batch_size"),
        refused(["--training.steps", "0"], "training.steps"),
        refused(["--training.seq_len", "0"], "training.seq_len"),
        refused(["--training.max_norm", "nan"], "training.max_norm"),
        refused(["--training.max_consecutive_skips", "-1"], "training.max_consecutive_skips"),
        refused(["--data.valid_every", "-1"], "data.valid_every"),
        refused(["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps"),
        refused(["--lr_scheduler.warmup_ratio", "1.0"], "lr_scheduler.warmup_ratio"),
        refused(["--lr_scheduler.min_lr_factor", "1.5"], "lr_scheduler.min_lr_factor"),
        refused([*FLOAT16, "--grad_scaler.initial_scale", "0"], "grad_scaler.initial_scale"),
        refused([*FLOAT16, "--grad_scaler.initial_scale", "0.5"], "grad_scaler.initial_scale"),  # below min_scale 1
        refused([*FLOAT16, "--grad_scaler.min_scale", "-1"], "grad_scaler.min_scale"),
        refused([*FLOAT16, "--grad_scaler.max_scale", "inf"], "grad_scaler.max_scale"),
        refused([*FLOAT16, "--grad_scaler.growth_interval", "0"], "grad_scaler.growth_interval"),
        refused([*FLOAT16, "--grad_scaler.growth_factor", "1.0"], "grad_scaler.growth_factor"),
        refused([*FLOAT16, "--grad_scaler.backoff_factor", "1.0"], "grad_scaler.backoff_factor"),
        refused([*FLOAT16, "--grad_scaler.backoff_factor", "0"], "grad_scaler.backoff_factor"),
        refused([*FLOAT16, "--grad_scaler.hysteresis", "0"], "grad_scaler.hysteresis"),
    ],
)
def test_an_out_of_range_setting_is_refused_naming_its_key(tmp_path, flags, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}\b"):
        trainer_for(tmp_path, flags)


@pytest.mark.slow
def test_the_command_line_exits_3_with_one_line_when_training_diverges(tmp_path) -> None:
    import subprocess
    import sys

    from trainer_runs import REPO, worker_env

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "titanlm.train",
            *TINY_ARGS,
            "--job.dump_folder",
            str(tmp_path),
            "--optimizer.lr",
            "1e6",
            "--training.steps",
            "8",
            "--training.max_consecutive_skips",
            "3",
        ],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: training diverged: the grad norm was inf/NaN on 3 steps in a row")
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_float16_overflows_while_the_loss_scale_backs_off_are_not_divergence(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="titanlm")
    records = run_in_process(
        tmp_path,
        [
            *FLOAT16,
            "--grad_scaler.initial_scale",
            "1e30",
            "--grad_scaler.max_scale",
            "1e30",
            "--grad_scaler.backoff_factor",
            "0.001",
            "--grad_scaler.hysteresis",
            "1",
            "--training.steps",
            "10",
            "--training.max_consecutive_skips",
            "2",
        ],
    )
    assert records[-1]["step"] == 10
    skipped = records[-1]["inf_nan_skip_batches"]
    assert skipped > 2  # more overflows in a row than the limit, yet the run went on
    assert len(warnings_with(caplog, "the float16 loss scale backs off")) == skipped
