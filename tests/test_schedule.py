"""The run's schedule: a resume follows the schedule of the run it continues as, not the one that saved (a
changed training.steps, warmup or peak lr takes effect from the first resumed step, and the log says what
changed), and settings that cannot take effect as written are noted at start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from trainer_runs import run_in_process

from titanlm.config import load_config
from titanlm.plan import resolve

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "100"]


def lrs(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records}


@pytest.mark.slow
def test_a_resume_with_more_steps_follows_the_longer_schedule_from_its_first_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "4"])
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        resumed = run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "8"])
    fresh = run_in_process(tmp_path / "fresh", ["--training.steps", "8"])
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert lrs(resumed) == {step: lr for step, lr in lrs(fresh).items() if step > 4}
    assert "training.steps is 8 in this run but 4 in the checkpoint: the learning-rate schedule follows " in caplog.text
    assert "from step 5 on" in caplog.text


@pytest.mark.slow
def test_a_resume_with_a_new_peak_lr_uses_it_at_once(tmp_path: Path) -> None:
    run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "4"])
    resumed = run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "8", "--optimizer.lr", "2e-3"])
    fresh = run_in_process(tmp_path / "fresh", ["--training.steps", "8", "--optimizer.lr", "2e-3"])
    assert lrs(resumed)[5] == pytest.approx(lrs(fresh)[5], rel=1e-12)


def test_an_unchanged_resume_warns_of_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "3"])
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "3", "--checkpoint.load_step", "3"])
    assert "in the checkpoint" not in caplog.text


def test_a_resume_that_changes_the_global_batch_says_how_to_keep_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "2"])
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        run_in_process(tmp_path / "run", [*CKPT, "--training.steps", "3", "--training.local_batch_size", "2"])
    assert (
        "training.global_batch_size is 2 at world size 1, but the checkpoint trained with 4 samples per step; "
        "set training.global_batch_size = 4 to keep it"
    ) in caplog.text


def test_a_warmup_as_long_as_the_run_is_noted() -> None:
    plan = resolve(load_config(["--training.steps", "10", "--lr_scheduler.warmup_steps", "10"]), 1, "cpu")
    assert any("lr_scheduler.warmup_steps gives 10 warmup steps, but training.steps is 10" in n for n in plan.notes)
    ratio = resolve(load_config(["--training.steps", "10", "--lr_scheduler.warmup_ratio", "0.5"]), 1, "cpu")
    assert not any("warmup" in note for note in ratio.notes)


def test_validation_settings_that_cannot_take_effect_are_noted_and_the_folder_is_not_read() -> None:
    every = resolve(load_config(["--data.valid_every", "5"]), 1, "cpu")
    assert every.loop.valid_every == 0 and not every.data.valid_folder
    assert "data.valid_every = 5 has no data.valid_folder to validate on; no validation runs" in every.notes
    folder = resolve(load_config(["--data.valid_folder", "/no/such/folder"]), 1, "cpu")
    assert folder.loop.valid_every == 0 and not folder.data.valid_folder  # never read, so never refused
    assert any("data.valid_folder = '/no/such/folder' is not read: data.valid_every is 0" in n for n in folder.notes)
    both = resolve(load_config(["--data.valid_folder", "v", "--data.valid_every", "5"]), 1, "cpu")
    assert both.loop.valid_every == 5 and both.data.valid_folder == "v" and not both.notes
