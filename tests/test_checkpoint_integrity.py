"""Checkpoints that cannot be trusted, a full disk, and two jobs on one folder: each stops with one line
and leaves every complete checkpoint intact.

The oracle for "the previous checkpoint works" is the uninterrupted run: resuming from it must
reproduce that run's records bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoint_faults import full_disk, full_disk_for_safetensors, overwrite_bytes
from trainer_runs import REPO, read_metrics, run_in_process, worker_env

from titanlm.checkpoint import CheckpointError, manifest
from titanlm.checkpoint.folder_lock import LOCK_FILE, FolderLock
from titanlm.models.spec import RECORD_FILE

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "2", "--debug.deterministic"]


@pytest.fixture(autouse=True)
def nondeterministic_afterwards():
    yield
    torch.use_deterministic_algorithms(False)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 5-step run's folder with step-2, step-4 and step-5, and its records: copied by each test that alters it."""
    dump = tmp_path_factory.mktemp("saved")
    records = run_in_process(dump, CKPT)
    torch.use_deterministic_algorithms(False)
    return dump, records


def copy_of(saved_run: tuple[Path, list[dict]], tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(saved_run[0], tmp_path / "run")
    return tmp_path / "run"


def test_every_published_checkpoint_has_a_manifest_of_all_its_files(saved) -> None:
    step = saved[0] / "checkpoint" / "step-4"
    found = manifest.read_manifest(str(step))
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(found["files"]) == [name for name in on_disk if name != manifest.MANIFEST]
    assert {".metadata", "titanlm_model.json"} <= set(found["files"])
    assert found["step"] == 4 and found["consecutive_skips"] == 0
    assert manifest.damage(str(step), checksums=True) is None
    assert LOCK_FILE not in names(saved[0])  # the lock is gone with the run


@pytest.mark.parametrize(
    "harm, said",
    [
        ("overwrite", r"__0_0\.distcp does not match the checksum"),
        ("truncate", r"__0_0\.distcp has [\d,]+ bytes, [\d,]+ when saved"),
        ("delete", r"__0_0\.distcp is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_stops_the_resume_naming_the_file_and_the_previous_one(
    saved, tmp_path, harm, said
) -> None:
    run = copy_of(saved, tmp_path)
    shard = run / "checkpoint" / "step-5" / "__0_0.distcp"
    if harm == "overwrite":
        overwrite_bytes(shard)
    elif harm == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    before = names(run / "checkpoint")
    with pytest.raises(
        CheckpointError,
        match=rf"step-5 is damaged: {said}.*mv .*step-5 .*step-5\.damaged.* "
        r"resume from step-4, the previous complete checkpoint",
    ) as error:
        run_in_process(run, [*CKPT, "--training.steps", "7"])
    assert "\n" not in str(error.value)
    assert names(run / "checkpoint") == before and LOCK_FILE not in names(run)

    (run / "checkpoint" / "step-5").rename(run / "checkpoint" / "step-5.damaged")  # what the message says
    resumed = run_in_process(run, [*CKPT])
    straight = saved[1]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in straight[4:]
    ]


@pytest.mark.parametrize(
    "gap, said",
    [
        pytest.param("empty table", r"titanlm_manifest\.json is unreadable \(its table of files is empty", id="empty"),
        pytest.param("shard not listed", r"__0_0\.distcp is not listed in titanlm_manifest\.json", id="unlisted"),
        pytest.param("stray file", r"notes\.txt is not listed in titanlm_manifest\.json", id="stray"),
        pytest.param(
            "manifest deleted", r"titanlm_manifest\.json is missing, though titanlm_model\.json shows", id="deleted"
        ),
    ],
)
def test_a_manifest_that_does_not_cover_every_file_of_the_checkpoint_is_damage(saved, tmp_path, gap, said) -> None:
    run = copy_of(saved, tmp_path)
    step = run / "checkpoint" / "step-5"
    overwrite_bytes(step / "__0_0.distcp")  # what a manifest with a gap would let through
    found = json.loads((step / manifest.MANIFEST).read_text())
    if gap == "empty table":
        (step / manifest.MANIFEST).write_text(json.dumps({**found, "files": {}}))
    elif gap == "shard not listed":
        del found["files"]["__0_0.distcp"]
        (step / manifest.MANIFEST).write_text(json.dumps(found))
    elif gap == "stray file":
        found["files"]["__0_0.distcp"]["crc32"] = manifest.crc32_of(str(step / "__0_0.distcp"))
        (step / manifest.MANIFEST).write_text(json.dumps(found))
        (step / "notes.txt").write_text("copied in later")
    else:
        (step / manifest.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"step-5 is damaged: {said}.*resume from step-4") as error:
        run_in_process(run, [*CKPT, "--training.steps", "7"])
    assert "\n" not in str(error.value)


def test_verify_off_still_checks_sizes_but_not_checksums(saved, tmp_path) -> None:
    run = copy_of(saved, tmp_path)
    step = run / "checkpoint" / "step-5"
    overwrite_bytes(step / "__0_0.distcp")
    assert manifest.damage(str(step), checksums=False) is None
    assert "checksum" in manifest.damage(str(step), checksums=True)
    (step / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has 5 bytes"):
        run_in_process(run, [*CKPT, "--training.steps", "7", "--checkpoint.verify", "false"])


def test_a_checkpoint_without_manifest_that_dcp_cannot_read_is_one_line(saved, tmp_path) -> None:
    run = copy_of(saved, tmp_path)
    step = run / "checkpoint" / "step-5"
    (step / manifest.MANIFEST).unlink()  # as saved by a titanlm before manifests: its model record is version 1
    record = json.loads((step / RECORD_FILE).read_text())
    (step / RECORD_FILE).write_text(json.dumps({**record, "version": 1}))
    (step / "__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"step-5 could not be read \(.*\); it is damaged or incomplete") as error:
        run_in_process(run, [*CKPT, "--training.steps", "7"])
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_removes_its_partial_save_and_keeps_the_last_checkpoint(
    saved, tmp_path
) -> None:
    dump = tmp_path / "run"
    with full_disk(during="step-4.tmp-"), pytest.raises(CheckpointError) as error:
        run_in_process(dump, CKPT)
    line = str(error.value)
    assert "\n" not in line
    assert line.startswith(f"checkpoint.folder {dump / 'checkpoint'} is full (")
    assert "free): saving step-4 failed and its partial files were removed; step-2 (" in line
    assert "is the last complete checkpoint, untouched" in line
    assert names(dump / "checkpoint") == ["step-2"]  # no step-4.tmp-* left behind
    assert manifest.damage(str(dump / "checkpoint" / "step-2"), checksums=True) is None

    resumed = run_in_process(dump, CKPT)  # the disk has room again
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in saved[1][2:]]


@pytest.mark.slow
def test_a_full_disk_during_the_final_hf_export_is_one_line_and_keeps_every_checkpoint(tmp_path) -> None:
    dump = tmp_path / "run"
    folder = dump / "checkpoint"
    with full_disk_for_safetensors(), pytest.raises(CheckpointError) as error:
        run_in_process(dump, [*CKPT, "--checkpoint.last_save_in_hf"])
    line = str(error.value)
    assert "\n" not in line
    assert line.startswith(f"checkpoint.folder {folder} is full (")
    assert "free): exporting step-5 failed and its partial files were removed; step-5 (" in line
    assert line.endswith(
        f"then export it with python -m titanlm.tools.convert dcp_to_hf {folder / 'step-5'} {folder / 'step-5-hf'}"
    )
    assert names(folder) == ["step-2", "step-4", "step-5"]  # no step-5-hf.tmp-* left behind
    assert manifest.damage(str(folder / "step-5"), checksums=True) is None


@pytest.fixture
def small_disk(tmp_path, saved):
    """A tmpfs that holds one and a half of the tiny run's checkpoints, where this machine lets a test
    mount one (root on Linux); elsewhere the test is skipped, and the injected-ENOSPC tests stand in."""
    one_checkpoint = sum(p.stat().st_size for p in (saved[0] / "checkpoint" / "step-2").rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size_kib = one_checkpoint * 3 // 2 // 1024
    result = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], capture_output=True, text=True
        )
        if os.geteuid() == 0
        else None
    )
    if result is None or result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() if result else 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_recognised_though_torch_reports_no_os_error(tmp_path, small_disk) -> None:
    folder = small_disk / "checkpoint"
    with pytest.raises(CheckpointError) as error:
        run_in_process(tmp_path / "run", [*CKPT, "--checkpoint.folder", str(folder)])
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"checkpoint.folder {folder} is full (")
    assert "saving step-4 failed and its partial files were removed; step-2 (" in str(error.value)
    assert names(folder) == ["step-2"]
    assert manifest.damage(str(folder / "step-2"), checksums=True) is None


def test_an_async_save_on_a_full_disk_stops_the_run_at_the_next_step_boundary(tmp_path) -> None:
    from trainer_runs import TINY_ARGS

    from titanlm.config import load_config
    from titanlm.train import build_trainer

    dump = tmp_path / "run"
    cfg = load_config(
        [
            *TINY_ARGS,
            *CKPT,
            "--training.steps",
            "20",
            "--checkpoint.async_mode",
            "async",
            "--job.dump_folder",
            str(dump),
        ]
    )
    trainer = build_trainer(cfg)
    try:
        with full_disk(during="step-4.tmp-"), pytest.raises(CheckpointError, match=r"is full .* saving step-4 failed"):
            trainer.train()
        assert 4 < trainer.step <= 6  # seen at the first boundary after the background write failed
    finally:
        trainer.close()
    assert names(dump / "checkpoint") == ["step-2"]


@pytest.mark.slow
def test_the_newest_checkpoint_before_skipped_steps_survives_keep_latest_k(tmp_path, monkeypatch) -> None:
    import titanlm.update

    norm = titanlm.update.global_grad_norm
    calls = {"n": 0}

    def inf_from_step_3(*args, **kwargs):
        calls["n"] += 1
        value = norm(*args, **kwargs)
        return value * float("inf") if calls["n"] >= 3 else value

    monkeypatch.setattr(titanlm.update, "global_grad_norm", inf_from_step_3)
    run_in_process(
        tmp_path,
        [
            "--checkpoint.enable",
            "--checkpoint.interval",
            "1",
            "--checkpoint.keep_latest_k",
            "1",
            "--training.max_consecutive_skips",
            "0",
        ],
    )
    assert names(tmp_path / "checkpoint") == ["step-2", "step-5"]  # step-3, 4 held diverged weights
    assert manifest.read_manifest(str(tmp_path / "checkpoint" / "step-5"))["consecutive_skips"] == 3


@contextmanager
def held_by_another_job(folder: Path) -> Iterator[int]:
    """A live process holding the lock of `folder`, as a running job does; yields its pid."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from titanlm.checkpoint.folder_lock import FolderLock; "
            f"FolderLock({str(folder)!r}, 'job.dump_folder').acquire(); print('held', flush=True); time.sleep(300)",
        ],
        cwd=REPO,
        env=worker_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_a_second_job_on_the_folder_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path, caplog
) -> None:
    with held_by_another_job(tmp_path) as pid:
        with pytest.raises(
            CheckpointError,
            match=rf"job.dump_folder {tmp_path} is in use by another titanlm job \(host .+, pid {pid}, started .+\)",
        ):
            run_in_process(tmp_path, CKPT)
        assert names(tmp_path) == [LOCK_FILE]  # the refused job wrote nothing: no checkpoint/, no metrics
    with caplog.at_level(logging.INFO, logger="titanlm"):
        run_in_process(tmp_path, [*CKPT, "--training.steps", "2"])
    assert "from a job that ended (host" in caplog.text and f"pid {pid}" in caplog.text
    assert LOCK_FILE not in names(tmp_path)


@pytest.fixture(scope="module")
def live_job(saved, tmp_path_factory) -> Iterator[tuple[Path, int]]:
    """Job A: a copy of the saved run in <tmp>/a, whose folder a live process holds; yields (a, its pid)."""
    import shutil

    a = tmp_path_factory.mktemp("jobs") / "a"
    shutil.copytree(saved[0], a)
    with held_by_another_job(a) as pid:
        yield a, pid


@pytest.mark.slow
@pytest.mark.parametrize(
    "folders",
    [
        "checkpoint folder by absolute path",
        "checkpoint folder by relative path",
        "checkpoint folder through a symlink",
        "dump folder inside",
        "dump folder above",
    ],
)
def test_a_job_is_refused_any_folder_that_overlaps_a_live_job_s_and_touches_nothing_there(
    live_job, tmp_path, folders
) -> None:
    a, pid = live_job
    b = tmp_path / "b"
    flags = {
        "checkpoint folder by absolute path": ["--checkpoint.folder", str(a / "checkpoint")],
        "checkpoint folder by relative path": ["--checkpoint.folder", os.path.relpath(a / "checkpoint", b)],
        "checkpoint folder through a symlink": ["--checkpoint.folder", str(tmp_path / "link")],
        "dump folder inside": [],
        "dump folder above": [],
    }[folders]
    (tmp_path / "link").symlink_to(a / "checkpoint")
    dump = {"dump folder inside": a / "b", "dump folder above": a.parent}.get(folders, b)
    relation = {"dump folder inside": "lies inside", "dump folder above": "holds"}.get(folders, "lies inside")
    before = {p.relative_to(a).as_posix(): p.stat().st_mtime_ns for p in a.rglob("*")}
    with pytest.raises(
        CheckpointError, match=rf"{relation} {a}, a folder of another titanlm job \(host .+, pid {pid}, started .+\)"
    ):
        run_in_process(dump, [*CKPT, "--checkpoint.keep_latest_k", "1", "--training.steps", "7", *flags])
    assert {p.relative_to(a).as_posix(): p.stat().st_mtime_ns for p in a.rglob("*")} == before
    assert not b.exists()  # the refused job wrote nothing of its own either


@pytest.mark.slow
def test_the_lock_is_exclusive_between_processes_and_released_with_the_process(tmp_path) -> None:
    FolderLock(str(tmp_path), "job.dump_folder").acquire()  # this process holds it
    probe = (
        "import sys; from titanlm.checkpoint.folder_lock import FolderLock; "
        f"FolderLock({str(tmp_path)!r}, 'job.dump_folder').acquire()"
    )
    refused = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr


def test_a_failed_start_leaves_no_checkpoint_folder_and_no_lock(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="initial_load_path"):
        run_in_process(tmp_path, [*CKPT, "--checkpoint.initial_load_path", str(tmp_path / "missing")])
    assert "checkpoint" not in names(tmp_path) and LOCK_FILE not in names(tmp_path)


def contents(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["missing", "a file", "a checkpoint folder", "damaged"])
def test_a_refused_start_creates_no_folder_and_changes_nothing_in_an_existing_one(saved, tmp_path, source) -> None:
    import shutil

    run = copy_of(saved, tmp_path)
    (tmp_path / "a-file").write_text("")
    shutil.copytree(run / "checkpoint" / "step-5", tmp_path / "damaged")
    overwrite_bytes(tmp_path / "damaged" / "__0_0.distcp")
    path = {
        "missing": tmp_path / "missing",
        "a file": tmp_path / "a-file",
        "a checkpoint folder": run / "checkpoint",
        "damaged": tmp_path / "damaged",
    }[source]
    new = [*CKPT, "--checkpoint.folder", str(tmp_path / "new-checkpoints" / "c")]
    with pytest.raises(CheckpointError, match="initial_load_path"):
        run_in_process(tmp_path / "new" / "run", [*new, "--checkpoint.initial_load_path", str(path)])
    assert not (tmp_path / "new").exists() and not (tmp_path / "new-checkpoints").exists()

    before = contents(run)  # a run's folder: its train.log, config.toml and metrics stay as they are
    with pytest.raises(CheckpointError, match="initial_load_path"):
        run_in_process(run, ["--checkpoint.initial_load_path", str(path)])
    assert contents(run) == before


def test_an_unusable_dump_folder_with_checkpoints_off_is_one_line(tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        CheckpointError,
        match=r"job.dump_folder .*a-file/run is not writable \(.*\); fix its "
        r"permissions or set job.dump_folder",
    ):
        run_in_process(tmp_path / "a-file" / "run", [])


@pytest.mark.multiprocess
def test_two_ranks_agree_on_a_damaged_shard_and_on_one_rank_s_full_disk(tmp_path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).with_name("checkpoint_faults.py")),
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for ranks_view in seen:
        assert ranks_view["first"] == "ok" and ranks_view["resumed"] == "ok"
        assert "step-2 is damaged: __1_0.distcp does not match the checksum" in ranks_view["damaged"]
        assert "resume from step-1" in ranks_view["damaged"]
        assert "is full" in ranks_view["full"] and "saving step-2 failed" in ranks_view["full"]
    assert seen[0] == seen[1]
    starts = [
        json.loads(line)
        for line in (tmp_path / "damaged" / "metrics.jsonl").read_text().splitlines()
        if '"event": "start"' in line
    ]
    assert [start["resumed_from_step"] for start in starts] == [0, 1]  # the damaged step-2 was never loaded
    assert [r["step"] for r in read_metrics(tmp_path / "damaged")] == [1, 2, 3]
    assert names(tmp_path / "full" / "checkpoint") == ["step-1"]


@pytest.mark.slow
def test_export_and_generate_refuse_a_damaged_checkpoint_in_one_line(saved, tmp_path) -> None:
    run = copy_of(saved, tmp_path)
    step = run / "checkpoint" / "step-5"
    overwrite_bytes(step / "__0_0.distcp")
    for tool, args in (
        ("convert", ["dcp_to_hf", str(step), str(tmp_path / "hf")]),
        ("generate", ["--checkpoint", str(step), "--prompt", "hi", "--max_new_tokens", "2"]),
    ):
        result = subprocess.run(
            [sys.executable, "-m", f"titanlm.tools.{tool}", *args],
            cwd=REPO,
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (tool, result.stderr[-2000:])
        assert result.stderr.strip().count("\n") == 0, (tool, result.stderr)
        assert "step-5 is damaged: __0_0.distcp does not match the checksum" in result.stderr, (tool, result.stderr)
    assert not (tmp_path / "hf").exists()


def test_a_manifest_that_is_not_one_counts_as_damage(saved, tmp_path) -> None:
    run = copy_of(saved, tmp_path)
    (run / "checkpoint" / "step-5" / manifest.MANIFEST).write_text('{"files": {"__0_0.distcp": {"bytes": 3}}}')
    with pytest.raises(CheckpointError, match=r"step-5 is damaged: titanlm_manifest.json is unreadable"):
        run_in_process(run, [*CKPT, "--training.steps", "7"])
