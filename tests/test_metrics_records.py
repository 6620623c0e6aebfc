"""What a run leaves in its dump folder: every step in metrics.jsonl (the logged ones in full), eta,
run records that keep fresh runs apart and resumes together, train.log, config.toml, and W&B.

The oracle for the records of steps that are not logged is the same run logging every step.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from trainer_runs import TINY_ARGS, read_metrics, run_in_process

from titanlm.config import load_config
from titanlm.data.binmeta import BinWriter
from titanlm.metrics import METRIC_KEYS, STEP_KEYS, MetricsLogger, epoch_tokens, plan_line, read_runs
from titanlm.plan import resolve
from titanlm.train import main

EVERY_OTHER = ["--metrics.log_freq", "2"]  # 5 steps: logged at 1, 2, 4 and 5


@pytest.fixture(scope="module")
def every_step(tmp_path_factory) -> list[dict]:
    """The oracle: a run that logs all of its 5 steps."""
    return run_in_process(tmp_path_factory.mktemp("every_step"), [])


def test_every_step_is_recorded_and_only_logged_steps_in_full(tmp_path, every_step) -> None:
    returned = run_in_process(tmp_path, EVERY_OTHER)
    records = read_metrics(tmp_path, every_step=True)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    full = [r for r in records if r["step"] != 3]
    assert all(set(METRIC_KEYS) <= r.keys() for r in full)
    assert records[2].keys() == set(STEP_KEYS)  # step 3 was not logged: its small record
    assert full == returned  # what train() returns is what the file holds for the logged steps
    for got, want in zip(records, every_step, strict=True):
        assert [got[k] for k in STEP_KEYS] == [want[k] for k in STEP_KEYS], got["step"]


def test_eta_is_the_mean_step_time_so_far_times_the_steps_left(every_step) -> None:
    seconds = [r["step_time"] + r["data_time"] for r in every_step]
    for done, record in enumerate(every_step, start=1):
        assert record["eta"] == pytest.approx(sum(seconds[:done]) / done * (5 - done))
    assert every_step[0]["eta"] > 0 and every_step[-1]["eta"] == 0.0


def test_eta_follows_the_last_20_steps_only() -> None:
    plan = resolve(load_config(["--training.steps", "40"]), 1, "cpu")
    metrics = MetricsLogger(plan.output, plan.loop.steps, is_main=False)  # writes nothing
    records = [
        {
            "step": step,
            "loss": 1.0,
            "lr": 0.1,
            "grad_norm": 1.0,
            "step_time": 9.5 if step <= 10 else 0.5,
            "data_time": 0.5,
        }
        for step in range(1, 30)
    ]
    for record in records[:-1]:
        metrics.keep_step(record)
    assert metrics.log_step(records[-1])["eta"] == pytest.approx((10.0 + 19 * 1.0) / 20 * 11)  # steps 10-29


def write_bin_folder(root: Path, documents: int, length: int) -> Path:
    with BinWriter(str(root / "en" / "data.bin")) as writer:
        for d in range(documents):
            writer.write([1 + (d * length + t) % 200 for t in range(length)])
    return root


def test_train_log_and_config_toml_are_written_and_the_config_loads_back(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="titanlm")  # what main's logging setup does on rank 0
    data = write_bin_folder(tmp_path / "data", documents=10, length=100)
    extra = [*EVERY_OTHER, "--data.dataset", "bin", "--data.train_folder", str(data)]
    run_in_process(tmp_path / "run", extra)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "run: steps 1-5 of 5, 5 x 4 x 32 = 640 tokens, 0.64 epochs of the data's 1,000 tokens" in log
    assert "step=1,loss=" in log and "step=5,loss=" in log and "step=3,loss=" not in log
    saved = tmp_path / "run" / "config.toml"
    expected = load_config([*TINY_ARGS, "--job.dump_folder", str(tmp_path / "run"), *extra])
    expected.job.config_file = str(saved)  # the one key that says where the config came from
    assert load_config(["--job.config_file", str(saved)]) == expected


def test_the_start_line_says_epochs_for_data_of_known_size_only(tmp_path) -> None:
    from titanlm.data import BinMetaFolder, PackedDataset

    folder = BinMetaFolder(str(write_bin_folder(tmp_path, documents=3, length=50)))
    dataset = PackedDataset(folder, seq_len=32, seed=0, dp_rank=0, dp_world_size=1)
    assert epoch_tokens(dataset) == 150
    assert plan_line(0, 10, 4, 32, 150) == (
        "run: steps 1-10 of 10, 10 x 4 x 32 = 1,280 tokens, 8.53 epochs of the data's 150 tokens"
    )
    assert plan_line(6, 10, 4, 32, None) == "run: steps 7-10 of 10, 4 x 4 x 32 = 512 tokens, epochs n/a"


def test_a_fresh_run_in_a_used_folder_starts_a_new_run_record(tmp_path) -> None:
    first = run_in_process(tmp_path, ["--debug.seed", "1"])
    second = run_in_process(tmp_path, ["--debug.seed", "2"])
    runs = read_runs(str(tmp_path / "metrics.jsonl"))
    assert len(runs) == 2 and runs[0].id != runs[1].id
    assert [r["loss"] for r in runs[0].records] == [r["loss"] for r in first]
    assert read_metrics(tmp_path) == second


def test_a_resumed_run_continues_its_run_record(tmp_path, every_step) -> None:
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "100", "--checkpoint.stop_file", str(tmp_path / "STOP")]
    (tmp_path / "STOP").write_text("3\n")
    run_in_process(tmp_path, [*EVERY_OTHER, *ckpt])  # saves at step 3 and stops there (not a logged step)
    (tmp_path / "STOP").unlink()
    run_in_process(tmp_path, [*EVERY_OTHER, *ckpt])
    (run,) = read_runs(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in run.records] == [1, 2, 3, 4, 5]  # step 3 was kept and written at the stop
    starts = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"event"' in line]
    assert [(s["run"], s["resumed_from_step"]) for s in starts] == [(run.id, 0), (run.id, 3)]
    assert [r["loss"] for r in run.records] == pytest.approx([r["loss"] for r in every_step], rel=1e-6)


def test_a_resume_drops_the_records_written_after_its_checkpoint(tmp_path) -> None:
    """A run that crashed at step 4 after saving step 2 redoes steps 3 and 4: their new records count."""
    lines = [
        {"event": "start", "run": "a", "resumed_from_step": 0, "time": "t0"},
        *({"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)),
        {"event": "start", "run": "a", "resumed_from_step": 2, "time": "t1"},
        *({"step": s, "loss": 20.0 - s} for s in (3, 4, 5)),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "lo')  # killed mid-line
    (run,) = read_runs(str(path))
    assert [(r["step"], r["loss"]) for r in run.records] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        (b"[1, 2]", "is not a JSON object"),
        (b"\xff\xfe not utf-8", "is not UTF-8 text"),
        (b'{"step": "3", "loss": 1.0}', "has \"step\" '3', not an integer"),
        (b'{"event": "start", "resumed_from_step": 0}', 'is a start record without its "run" id'),
        (b'{"step": 3, "lo', "is not valid JSON"),
    ],
)
def test_a_bad_line_in_metrics_jsonl_is_skipped_with_one_warning_naming_it(tmp_path, caplog, bad_line, problem):
    """One line appended by hand or by another tool must not block every resume and plot of the folder."""
    start = b'{"event": "start", "run": "a", "resumed_from_step": 0, "time": "t0"}\n'
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(start + b'{"step": 1, "loss": 2.0}\n' + bad_line + b'\n{"step": 2, "loss": 1.0}\n')
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        (run,) = read_runs(str(path))
    assert run.id == "a" and [r["step"] for r in run.records] == [1, 2]
    (warning,) = caplog.messages
    assert warning.startswith(f"{path} line 3 {problem}") and warning.endswith("skipped it")


def test_enable_wandb_without_wandb_fails_at_start_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_ARGS, "--job.dump_folder", str(tmp_path), "--metrics.enable_wandb"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "metrics.enable_wandb needs the wandb package: pip install 'titanlm[wandb]'" in err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the run started


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B transaction log (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_logs_every_step(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'titanlm[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "home"))
    run_in_process(tmp_path / "run", [*EVERY_OTHER, "--metrics.enable_wandb", "--job.description", "tiny"])
    (run,) = read_runs(str(tmp_path / "run" / "metrics.jsonl"))
    (log,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb")
    history = {row["_step"]: row for row in wandb_history(log) if "loss" in row}
    assert sorted(history) == [1, 2, 3, 4, 5]
    assert [history[r["step"]]["loss"] for r in run.records] == [r["loss"] for r in run.records]
    assert "tgs" in history[2] and "tgs" not in history[3]  # the same records as metrics.jsonl


def test_the_step_line_shows_the_eta_as_a_clock_and_leaves_out_unknown_figures() -> None:
    from titanlm.metrics import format_line

    line = format_line({"step": 10, "loss": 3.557871, "mfu": None, "lr": 0.003, "eta": 3725.4})
    assert line == "step=10,loss=3.55787,lr=0.003,eta=1:02:05"
    assert format_line({"step": 1, "eta": 4.6}) == "step=1,eta=0:00:05"


def test_a_resume_after_a_line_cut_short_keeps_its_start_record_on_a_line_of_its_own(tmp_path) -> None:
    """A run killed in the middle of writing a record leaves no newline; the next run's start record must not
    be glued onto that fragment, or the resume would lose the steps it redoes."""
    plan = resolve(load_config(["--job.dump_folder", str(tmp_path), "--data.dataset", "random"]), 1, "cpu")
    (tmp_path / "metrics.jsonl").write_text('{"event": "start", "run": "r1", "resumed_from_step": 0}\n{"step": 1, "lo')
    metrics = MetricsLogger(plan.output, plan.loop.steps, is_main=True)
    try:
        metrics.start(resumed_from_step=0)
    finally:
        metrics.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 1, "lo' and json.loads(lines[2])["event"] == "start"
