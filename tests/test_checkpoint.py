"""Checkpointing: exact resume, complete-only visibility, retention, stop requests, partial loads, errors.

The oracle for every resume is the same run without interruption: in fp32 on CPU with deterministic
kernels a resume in the same layout must reproduce its losses and grad norms bit for bit; a resume
at another data-parallel degree only changes the order of float sums.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor
from trainer_runs import REPO, TINY_ARGS, read_metrics, run_in_process, run_torchrun, worker_env

from titanlm.checkpoint import CheckpointError, layout
from titanlm.config import load_config
from titanlm.train import Trainer, build_trainer

STEPS = ["--training.steps", "10", "--debug.deterministic"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "100"]  # saves only when a test asks for one


@pytest.fixture(autouse=True)
def nondeterministic_afterwards():
    """debug.deterministic switches torch to deterministic kernels process-wide; later tests expect the default."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """The uninterrupted 10-step run every resume is compared with."""
    records = run_in_process(tmp_path_factory.mktemp("straight"), STEPS)
    torch.use_deterministic_algorithms(False)
    return records


def stop_at(dump: Path, step: int) -> list[str]:
    """Args that make a run save and exit after `step` (InternEvo stop file holding N)."""
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "STOP").write_text(f"{step}\n")
    return ["--checkpoint.stop_file", str(dump / "STOP")]


def assert_bitwise(actual: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    keys = ("loss", "grad_norm", "lr")
    for got, want in zip(actual, expected):
        assert [got[k] for k in keys] == [want[k] for k in keys], got["step"]


def assert_close(actual: list[dict], expected: list[dict]) -> None:
    """Losses within 1e-6 and grad norms within 1e-5 (relative): what another DP layout alone changes."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected):
        for key, rtol in (("loss", 1e-6), ("grad_norm", 1e-5)):
            assert math.isclose(got[key], want[key], rel_tol=rtol), (key, got["step"], got[key], want[key])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(trainer.model)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}


def test_resume_in_a_new_trainer_reproduces_the_uninterrupted_run_bitwise(tmp_path, straight) -> None:
    first = run_in_process(tmp_path, [*STEPS, *CKPT, *stop_at(tmp_path, 5)])
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    second = run_in_process(tmp_path, [*STEPS, *CKPT])
    assert_bitwise(first + second, straight)
    assert second[-1]["num_consumed_tokens"] == straight[-1]["num_consumed_tokens"]


@pytest.mark.slow
def test_resume_in_a_fresh_process_reproduces_the_uninterrupted_run_bitwise(tmp_path, straight) -> None:
    run_in_process(tmp_path, [*STEPS, *CKPT, *stop_at(tmp_path, 5)])
    result = subprocess.run(
        [sys.executable, "-m", "titanlm.train", *TINY_ARGS, *STEPS, *CKPT, "--job.dump_folder", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bitwise(read_metrics(tmp_path), straight)


@pytest.mark.slow
def test_async_save_lands_complete_and_resumes_exactly(tmp_path, straight) -> None:
    run_in_process(tmp_path, [*STEPS, *CKPT, "--checkpoint.interval", "5", "--checkpoint.async_mode", "async"])
    folder = tmp_path / "checkpoint"
    assert names(folder) == ["step-10", "step-5"]  # step-5 was written in the background, then published
    (folder / "step-10").rename(tmp_path / "set-aside")  # as if the job had died before its last save
    resumed = run_in_process(tmp_path, [*STEPS, *CKPT, "--checkpoint.async_mode", "async"])
    assert_bitwise(resumed, straight[5:])


@pytest.mark.slow
def test_a_save_interrupted_before_publishing_is_ignored_and_kept(tmp_path, straight, monkeypatch) -> None:
    publish = layout.publish

    def crash_at_step_4(tmp: str, final: str) -> None:
        if final.endswith("step-4"):
            raise RuntimeError("simulated crash between writing and publishing")
        publish(tmp, final)

    monkeypatch.setattr(layout, "publish", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(tmp_path, [*STEPS, *CKPT, "--checkpoint.interval", "2"])
    monkeypatch.setattr(layout, "publish", publish)
    folder = tmp_path / "checkpoint"
    (leftover,) = [n for n in names(folder) if n.startswith("step-4.tmp-")]
    assert names(folder) == ["step-2", leftover]
    assert (folder / leftover / ".metadata").exists()  # fully written, yet never published: not loadable

    resumed = run_in_process(tmp_path, [*STEPS, *CKPT, "--checkpoint.interval", "2"])
    assert_bitwise(resumed, straight[2:])
    assert leftover in names(folder) and "step-4" in names(folder)  # never deleted automatically


@pytest.mark.parametrize("keep, kept", [(1, ["step-5"]), (2, ["step-4", "step-5"])])
def test_keep_latest_k_keeps_exactly_the_k_newest(tmp_path, keep, kept) -> None:
    run_in_process(tmp_path, [*CKPT, "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", str(keep)])
    assert names(tmp_path / "checkpoint") == kept  # saved: 2, 4 and the last step, 5


def test_stop_file_n_saves_at_step_n_and_stops(tmp_path) -> None:
    records = run_in_process(tmp_path, [*CKPT, *stop_at(tmp_path, 3)])
    assert [r["step"] for r in records] == [1, 2, 3]
    assert names(tmp_path / "checkpoint") == ["step-3"]


def test_stop_file_minus_n_saves_at_step_n_and_continues(tmp_path) -> None:
    records = run_in_process(tmp_path, [*CKPT, *stop_at(tmp_path, -3)])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert names(tmp_path / "checkpoint") == ["step-3", "step-5"]  # and the final save


def test_sigusr1_saves_after_the_current_step_and_stops(tmp_path) -> None:
    trainer = build_trainer(load_config([*TINY_ARGS, *CKPT, "--job.dump_folder", str(tmp_path)]))
    loss_fn = trainer.model_step.loss_fn

    def signal_during_step_2(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss_fn(logits, labels)

    trainer.model_step.loss_fn = signal_during_step_2
    try:
        records = trainer.train()
    finally:
        trainer.close()
    assert [r["step"] for r in records] == [1, 2]
    assert names(tmp_path / "checkpoint") == ["step-2"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers are given back on close


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 4-step run's full checkpoint, a bfloat16 weights-only export of the same weights, and the weights."""
    dump = tmp_path_factory.mktemp("pretrained")
    trainer = build_trainer(load_config([*TINY_ARGS, *CKPT, "--training.steps", "4", "--job.dump_folder", str(dump)]))
    trainer.train()
    trainer.close()
    run_in_process(
        dump / "export",
        [*CKPT, "--training.steps", "4", "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bfloat16"],
    )
    assert names(dump / "export" / "checkpoint") == ["step-4-model"]
    return dump, weights(trainer)


def start(dump: Path, *extra: str) -> Trainer:
    """A Trainer with checkpointing on, built (and so loaded) but not trained."""
    return build_trainer(load_config([*TINY_ARGS, *CKPT, "--job.dump_folder", str(dump), *extra]))


INITIAL = "--checkpoint.initial_load_path"


def test_load_content_model_starts_at_step_0_with_the_saved_weights(tmp_path, pretrained) -> None:
    dump, saved = pretrained
    trainer = start(tmp_path, INITIAL, str(dump / "checkpoint" / "step-4"), "--checkpoint.load_content", "model")
    try:
        assert trainer.step == 0 and not trainer.optimizer.state and trainer.lr_scheduler.last_epoch == 0
        assert all(torch.equal(saved[k], v) for k, v in weights(trainer).items())
        assert [r["step"] for r in trainer.train()] == [1, 2, 3, 4, 5]
    finally:
        trainer.close()


def test_initial_load_path_takes_a_bfloat16_export_and_is_unused_once_the_run_has_checkpoints(
    tmp_path, pretrained
) -> None:
    dump, saved = pretrained
    export = str(dump / "export" / "checkpoint" / "step-4-model")
    args = ["--training.steps", "2", INITIAL, export, "--checkpoint.load_content", "model"]
    trainer = start(tmp_path, *args)
    try:
        assert all(torch.equal(saved[k].bfloat16().float(), v) for k, v in weights(trainer).items())
        trainer.train()
    finally:
        trainer.close()
    restarted = start(tmp_path, *args)  # resumes from its own step-2, not from the export
    restarted.close()
    assert restarted.step == 2


def test_initial_load_path_with_all_continues_the_other_run(tmp_path, pretrained) -> None:
    dump, _ = pretrained
    trainer = start(tmp_path, INITIAL, str(dump / "checkpoint" / "step-4"))
    trainer.close()
    assert trainer.step == 4 and trainer.optimizer.state


def expect_error(dump: Path, extra: list[str], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        start(dump, *extra)


def test_a_missing_load_step_lists_the_complete_checkpoints(tmp_path, pretrained) -> None:
    folder = pretrained[0] / "checkpoint"
    before = names(folder)
    expect_error(
        tmp_path,
        ["--checkpoint.folder", str(folder), "--checkpoint.load_step", "3"],
        r"no complete step-3 \(complete checkpoints: step-4\); pick one of those",
    )
    assert names(folder) == before


def test_a_checkpoint_of_another_model_fails_listing_the_offending_keys(tmp_path, pretrained) -> None:
    source = str(pretrained[0] / "checkpoint" / "step-4")
    expect_error(
        tmp_path,
        [INITIAL, source, "--model.name", "internlm2"],  # 2 kv heads instead of 4
        r"do not fit the model: \d+ wrong shapes: model\.layers\.0\.attention\.wk\.weight \[128, 256\] "
        r"\(expected \[64, 256\]\).*model\.flavor",
    )
    expect_error(
        tmp_path,
        [INITIAL, source, "--model.name", "internlm"],  # q/k/v/o biases
        r"\d+ missing keys: [^;]*model\.layers\.0\.attention\.wq\.bias",
    )


def test_a_weights_only_export_needs_load_content_model(tmp_path, pretrained) -> None:
    export = str(pretrained[0] / "export" / "checkpoint" / "step-4-model")
    expect_error(
        tmp_path,
        [INITIAL, export],
        r"holds no optimizer, lr_scheduler, dataloader, train_state "
        r"\(it holds model\); set checkpoint\.load_content to parts it holds, e\.g\. model",
    )


def test_initial_load_path_must_name_one_dcp_checkpoint(tmp_path, pretrained) -> None:
    dump = pretrained[0]
    expect_error(tmp_path, [INITIAL, str(dump / "checkpoint")], r"a checkpoint folder, not one checkpoint.*step-4")
    expect_error(tmp_path, [INITIAL, str(dump)], r"has no \.metadata file, so it is not a DCP checkpoint")


def test_training_starts_from_a_hugging_face_folder_with_its_weights(tmp_path) -> None:
    from hf_models import hf_llama

    from titanlm.models import get_model_args
    from titanlm.models.hf_adapter import from_hf_state_dict

    hf = hf_llama(get_model_args("llama3", "debug"), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    expect_error(
        tmp_path,
        [INITIAL, str(tmp_path / "hf")],
        r"is a Hugging Face model, which holds weights only; set checkpoint\.load_content = model",
    )
    cfg = load_config(
        [
            *TINY_ARGS,
            *CKPT,
            "--job.dump_folder",
            str(tmp_path / "run"),
            INITIAL,
            str(tmp_path / "hf"),
            "--checkpoint.load_content",
            "model",
        ]
    )
    trainer = build_trainer(cfg)
    loaded = weights(trainer)
    expected = from_hf_state_dict(hf.state_dict())
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert trainer.step == 0
    trainer.close()


def test_load_content_names_known_parts_of_an_initial_load_path(tmp_path, pretrained) -> None:
    source = str(pretrained[0] / "checkpoint" / "step-4")
    expect_error(
        tmp_path,
        [INITIAL, source, "--checkpoint.load_content", "model,weights"],
        r"unknown part\(s\) weights; use all, or a comma list of model, optimizer",
    )
    expect_error(tmp_path, ["--checkpoint.load_content", "model"], r"initial_load_path, which is empty")


def test_an_unwritable_checkpoint_folder_fails_at_start(tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    expect_error(
        tmp_path,
        ["--checkpoint.folder", str(tmp_path / "a-file" / "checkpoint")],
        r"a-file/checkpoint is not writable \(.*a-file is a file, not a folder\)",
    )


def test_a_step_folder_without_metadata_fails_instead_of_being_skipped(tmp_path) -> None:
    (tmp_path / "checkpoint" / "step-7").mkdir(parents=True)  # e.g. a copy cut short
    expect_error(tmp_path, [], r"step-7 has no \.metadata file, so it is not a complete DCP checkpoint")
    assert names(tmp_path / "checkpoint") == ["step-7"]


@pytest.mark.slow
def test_load_step_refuses_to_rewind_past_newer_checkpoints(tmp_path) -> None:
    run_in_process(tmp_path, [*CKPT, "--checkpoint.interval", "2"])
    expect_error(tmp_path, ["--checkpoint.load_step", "2"], r"also holds newer step-4, step-5.*move them out")
    assert names(tmp_path / "checkpoint") == ["step-2", "step-4", "step-5"]


@pytest.mark.multiprocess
def test_a_checkpoint_resumes_at_another_data_parallel_degree(tmp_path, straight) -> None:
    """FSDP 4 ranks -> 2 and 2 ranks -> 1 process, global batch 4 throughout: DCP reshards parameters
    and optimizer state, and the data position is global, so the resumed steps follow the straight run."""

    def args(scenario: str, dp: int) -> list[str]:
        return [*STEPS, *CKPT, "--training.local_batch_size", str(4 // dp), *stop_at(tmp_path / scenario, 5)]

    run_torchrun(4, {"dp4to2": args("dp4to2", 4)}, tmp_path)
    records = run_torchrun(2, {"dp2to1": args("dp2to1", 2), "dp4to2": args("dp4to2", 2)}, tmp_path)
    run_in_process(tmp_path / "dp2to1", args("dp2to1", 1))
    assert_close(records["dp4to2"], straight)
    assert_close(read_metrics(tmp_path / "dp2to1"), straight)


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun started (its direct children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_saves_on_all_ranks_exits_0_and_the_run_resumes(tmp_path) -> None:
    run = [*CKPT, "--training.steps", "1000"]
    log = open(tmp_path / "torchrun.log", "w")
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "titanlm.train",
            *TINY_ARGS,
            *run,
            "--training.local_batch_size",
            "2",
            "--job.dump_folder",
            str(tmp_path),
        ],
        cwd=REPO,
        env=worker_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path):
            assert job.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = worker_pids(job.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGTERM)
        job.wait(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # the session this test started
        log.close()
    assert job.returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    stopped_at = read_metrics(tmp_path)[-1]["step"]
    assert stopped_at < 1000 and names(tmp_path / "checkpoint") == [f"step-{stopped_at}"]

    resumed = run_in_process(tmp_path, [*run, *stop_at(tmp_path, stopped_at + 2)])
    assert [r["step"] for r in resumed] == [stopped_at + 1, stopped_at + 2]


@pytest.mark.slow
def test_float16_loss_scale_continues_after_a_resume(tmp_path) -> None:
    fp16 = [
        "--training.mixed_precision_param",
        "float16",
        "--grad_scaler.growth_interval",
        "1",
        "--grad_scaler.initial_scale",
        "1024",
        *CKPT,
        "--checkpoint.interval",
        "3",
    ]
    first = run_in_process(tmp_path, [*fp16, "--training.steps", "3"])
    second = run_in_process(tmp_path, [*fp16, "--training.steps", "5"])
    scales = [r["loss_scale"] for r in first + second]
    assert [r["step"] for r in first + second] == [1, 2, 3, 4, 5]
    assert scales == [2048, 4096, 8192, 16384, 32768]  # doubles after every clean step, across the resume


@pytest.mark.multiprocess
def test_an_fsdp_checkpoint_resumes_under_tensor_parallelism(tmp_path, straight) -> None:
    """FSDP 2 ranks -> TP 2 ranks: DCP reshards the Shard(0) FSDP tensors into TP's column/row shards.
    Tolerance 1e-5: TP alone changes the reduction order (about 2e-6 relative on the loss)."""
    common = [*STEPS, *CKPT, *stop_at(tmp_path / "fsdp2totp2", 5)]
    run_torchrun(2, {"fsdp2totp2": [*common, "--training.local_batch_size", "2"]}, tmp_path)
    run_torchrun(
        2,
        {"fsdp2totp2": [*common, "--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]},
        tmp_path,
    )
    records = read_metrics(tmp_path / "fsdp2totp2")
    assert [r["step"] for r in records] == list(range(1, 11))
    for got, want in zip(records, straight):
        for key in ("loss", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got["step"], got[key], want[key])
