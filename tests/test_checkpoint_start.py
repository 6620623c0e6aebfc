"""What a run starts from (titanlm/checkpoint/start.py) and what kind of folder a path is (layout.classify),
decided without a process group: resume, else checkpoint.initial_load_path, else model.hf_path, else fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from titanlm.checkpoint import layout
from titanlm.checkpoint.layout import Kind
from titanlm.checkpoint.start import INITIAL_FIX, RESUME_FIX, Start, check_source, choose_start
from titanlm.config import load_config
from titanlm.errors import CheckpointError
from titanlm.plan import CHECKPOINT_PARTS, CheckpointPlan, resolve_checkpoint

DUMP = "/runs/a"
FOLDER = f"{DUMP}/checkpoint"


def plan_of(*flags: str) -> CheckpointPlan:
    return resolve_checkpoint(load_config(["--job.dump_folder", DUMP, *flags]), "cpu")


ON = "--checkpoint.enable"
INITIAL = ["--checkpoint.initial_load_path", "/runs/pretrained/checkpoint/step-9"]
HF = "/models/llama"


def test_the_checkpoint_folder_and_the_stop_file_are_resolved_once_against_the_dump_folder() -> None:
    plan = plan_of()
    assert (plan.folder, plan.stop_file, plan.dump_folder) == (FOLDER, f"{FOLDER}/STOP", DUMP)
    elsewhere = plan_of("--checkpoint.folder", "/scratch/ckpt", "--checkpoint.stop_file", "/tmp/STOP")
    assert (elsewhere.folder, elsewhere.stop_file) == ("/scratch/ckpt", "/tmp/STOP")


def test_the_configured_sources_are_listed_in_their_order_of_precedence() -> None:
    assert plan_of().starts == ()
    assert plan_of(ON).starts == ("resume",)
    assert plan_of(*INITIAL, "--model.hf_path", HF, ON).starts == (
        "resume",
        "checkpoint.initial_load_path",
        "model.hf_path",
    )


def test_a_run_with_checkpoints_resumes_everything_from_its_newest_complete_step() -> None:
    start = choose_start(plan_of(ON, *INITIAL), HF, [2, 4])
    assert start == Start("resume", f"{FOLDER}/step-4", CHECKPOINT_PARTS, RESUME_FIX)
    assert start.describe(seed=0) == f"resumed from {FOLDER}/step-4"


def test_load_step_picks_an_older_step_only_when_nothing_newer_would_be_overwritten() -> None:
    assert choose_start(plan_of(ON, "--checkpoint.load_step", "4"), "", [2, 4]).source == f"{FOLDER}/step-4"
    with pytest.raises(CheckpointError, match=r"load_step = 3: .* no complete step-3 \(complete checkpoints: step-2"):
        choose_start(plan_of(ON, "--checkpoint.load_step", "3"), "", [2, 4])
    with pytest.raises(CheckpointError, match=r"load_step = 2, but .* also holds newer step-4"):
        choose_start(plan_of(ON, "--checkpoint.load_step", "2"), "", [2, 4])
    with pytest.raises(CheckpointError, match=r"no complete step-2 \(complete checkpoints: none\)"):
        choose_start(plan_of(ON, "--checkpoint.load_step", "2"), "", [])


def test_without_checkpoints_to_resume_initial_load_path_gives_the_parts_load_content_names() -> None:
    plan = plan_of(ON, *INITIAL, "--checkpoint.load_content", "model,train_state")
    start = choose_start(plan, HF, [])
    assert start == Start("checkpoint.initial_load_path", INITIAL[1], ("model", "train_state"), INITIAL_FIX)
    assert start.describe(seed=0) == f"model, train_state from checkpoint.initial_load_path {INITIAL[1]}"


def test_checkpoints_off_never_resume_but_still_load_the_starting_weights() -> None:
    assert choose_start(plan_of(*INITIAL), HF, [2, 4]).origin == "checkpoint.initial_load_path"
    start = choose_start(plan_of("--model.hf_path", HF), HF, [2, 4])
    assert start == Start("model.hf_path", HF, ("model",))
    assert start.describe(seed=0) == f"model from Hugging Face folder {HF}"


def test_nothing_to_load_starts_from_the_fresh_model() -> None:
    start = choose_start(plan_of(ON), "", [])
    assert start == Start() and start.source is None
    assert start.describe(seed=7) == "freshly initialized (debug.seed 7)"


def dcp(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / layout.METADATA).write_bytes(b"")
    return folder


def test_classify_tells_each_kind_of_folder_apart(tmp_path) -> None:
    run = tmp_path / "checkpoint"
    dcp(run / "step-3")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    (tmp_path / "file").write_text("")
    assert layout.classify(str(run / "step-3")) is Kind.DCP
    assert layout.classify(str(run)) is Kind.RUN
    assert layout.classify(str(tmp_path / "hf")) is Kind.HF
    assert layout.classify(str(tmp_path / "weights")) is Kind.HF
    assert layout.classify(str(tmp_path)) is Kind.NONE
    assert layout.classify(str(tmp_path / "file")) is Kind.NONE
    assert layout.classify(str(tmp_path / "absent")) is Kind.NONE


def test_a_resume_needs_the_step_folder_to_be_a_complete_dcp_checkpoint(tmp_path) -> None:
    (tmp_path / "step-7").mkdir()  # e.g. a copy cut short
    with pytest.raises(CheckpointError, match=r"step-7 has no \.metadata file, so it is not a complete DCP checkpoint"):
        check_source(Start("resume", str(tmp_path / "step-7"), CHECKPOINT_PARTS, RESUME_FIX))
    check_source(Start("resume", str(dcp(tmp_path / "step-8")), CHECKPOINT_PARTS, RESUME_FIX))


def test_initial_load_path_must_be_one_checkpoint_or_an_hf_folder(tmp_path) -> None:
    def check(path: Path) -> Start:
        return check_source(Start("checkpoint.initial_load_path", str(path), ("model",), INITIAL_FIX))

    run = tmp_path / "run"
    dcp(run / "step-2")
    dcp(run / "step-10")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert not check(run / "step-10").hf_folder
    assert check(tmp_path / "hf").hf_folder  # read directly, as every rank learns from rank 0's check
    with pytest.raises(CheckpointError, match=r"is a checkpoint folder, not one checkpoint; .* e\.g\. .*run/step-10$"):
        check(run)
    with pytest.raises(CheckpointError, match=r"has no \.metadata file, so it is not a DCP checkpoint"):
        check(tmp_path)
    with pytest.raises(CheckpointError, match=r"absent is not a folder"):
        check(tmp_path / "absent")
