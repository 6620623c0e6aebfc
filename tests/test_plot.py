"""The plot tool: one panel per key and one line per run, runs told apart within a file, and
--compare's verdict on whether two runs trained identically."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from trainer_runs import read_metrics, run_in_process

from titanlm.data.binmeta import BinWriter
from titanlm.tools import plot


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two 5-step runs that differ only in the seed, logging steps 1, 2, 4, 5 and validating at 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    with BinWriter(str(root / "data" / "en" / "data.bin")) as writer:
        for d in range(20):
            writer.write([1 + (d * 7 + t) % 100 for t in range(60)])
    data = [
        "--data.dataset",
        "bin",
        "--data.train_folder",
        str(root / "data"),
        "--data.valid_folder",
        str(root / "data"),
        "--data.valid_every",
        "2",
        "--metrics.log_freq",
        "2",
    ]
    for seed in ("1", "2"):
        run_in_process(root / f"seed{seed}", ["--debug.seed", seed, *data])
    return {"seed1": root / "seed1", "seed2": root / "seed2"}


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def lines_per_panel(fig) -> dict[str, list[str]]:
    return {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_visible()}


def test_plot_writes_a_png_with_a_panel_per_key_and_a_line_per_run(runs, tmp_path, capsys) -> None:
    out = tmp_path / "curves.png"
    assert (
        plot.main(
            [str(runs["seed1"]), str(runs["seed2"] / "metrics.jsonl"), "-o", str(out), "--keys", "loss,lr,grad_norm"]
        )
        == 0
    )
    assert png_size(out) == (2 * 640, 2 * 420)  # 2 x 2 panels of 6.4 x 4.2 inches at 100 dpi
    curves = [plot.load(str(runs[name])) for name in ("seed1", "seed2")]
    fig = plot.figure(curves, ["loss", "lr", "grad_norm"])
    assert lines_per_panel(fig) == {key: ["seed1", "seed2"] for key in ("loss", "lr", "grad_norm")}
    (loss_line, _) = fig.axes[0].get_lines()
    every_step = [r for r in read_metrics(runs["seed1"], every_step=True) if "loss" in r]
    assert list(loss_line.get_ydata()) == [r["loss"] for r in every_step] and len(every_step) == 5
    assert "wrote" in capsys.readouterr().out


def test_by_default_loss_and_validation_loss_get_a_panel_each(runs, tmp_path) -> None:
    out = tmp_path / "curves.png"
    assert plot.main([str(runs["seed1"]), str(runs["seed2"]), "-o", str(out)]) == 0
    assert png_size(out) == (2 * 640, 420)
    curves = [plot.load(str(runs[name])) for name in ("seed1", "seed2")]
    fig = plot.figure(curves, list(plot.DEFAULT_KEYS))
    assert lines_per_panel(fig) == {"loss": ["seed1", "seed2"], "valid_loss": ["seed1", "seed2"]}
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [2, 4]


def test_smoothing_adds_a_smoothed_curve_beside_each_faint_raw_curve(runs) -> None:
    fig = plot.figure([plot.load(str(runs["seed1"]))], ["loss"], smooth=3)
    raw, smooth = fig.axes[0].get_lines()
    assert raw.get_alpha() < 1 and smooth.get_alpha() is None
    assert list(smooth.get_ydata()) == plot.smoothed(list(raw.get_ydata()), 3)


def write_runs(path: Path, runs: dict[str, list[float]]) -> Path:
    """A metrics.jsonl holding one fresh run per id, with these losses and a falling lr."""
    lines = []
    for run_id, losses in runs.items():
        lines.append({"event": "start", "run": run_id, "resumed_from_step": 0, "time": "t"})
        lines += [{"step": s, "loss": v, "lr": 1.0 / s} for s, v in enumerate(losses, start=1)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_smoothing_is_tensorboards_debiased_average_and_starts_at_the_raw_value() -> None:
    values, n = [7.6, 3.0, 6.0, 2.0, 2.5, 1.0], 4
    weight = (n - 1) / (n + 1)
    # oracle: at each point, the mean of the values so far weighted by weight ** age
    expected = [
        sum(weight ** (i - j) * values[j] for j in range(i + 1)) / sum(weight ** (i - j) for j in range(i + 1))
        for i in range(len(values))
    ]
    assert plot.smoothed(values, n) == pytest.approx(expected)
    assert plot.smoothed(values, n)[0] == 7.6


def test_schedules_are_drawn_raw_when_the_loss_is_smoothed(tmp_path) -> None:
    run = plot.load(str(write_runs(tmp_path / "a", {"r1": [5.0, 4.0, 3.5, 3.0, 2.0]})))
    fig = plot.figure([run], ["loss", "lr"], smooth=3)
    assert lines_per_panel(fig) == {"loss": ["_child0", "a (smoothed over ~3)"], "lr": ["a"]}
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5]


def test_log_y_draws_every_panel_on_a_log_scale(tmp_path) -> None:
    folder = write_runs(tmp_path / "a", {"r1": [5.0, 4.0, 3.5]})
    assert plot.main([str(folder), "-o", str(tmp_path / "c.png"), "--keys", "loss,lr", "--log_y"]) == 0
    fig = plot.figure([plot.load(str(folder))], ["loss", "lr"], log_y=True)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]


def test_the_legend_names_the_run_drawn_when_the_folder_holds_several(tmp_path, capsys) -> None:
    folder = write_runs(tmp_path / "a", {"20261208-010000-aaaaaa": [3.0, 2.0], "20261208-020000-bbbbbb": [4.0, 1.0]})
    single = write_runs(tmp_path / "b", {"20261208-030000-cccccc": [3.0, 2.0]})
    curves = [plot.load(str(folder)), plot.load(f"{folder}@1"), plot.load(str(single))]
    assert [c.label for c in curves] == ["a (run 20261208-020000-bbbbbb)", "a@1 (run 20261208-010000-aaaaaa)", "b"]
    assert lines_per_panel(plot.figure(curves, ["loss"])) == {"loss": [c.label for c in curves]}


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--smooth", "-3"], "error: --smooth -3 must be 0 or more (0 and 1 draw the raw curves only)"),
        (["--compare", "--tolerance", "nan"], "error: --tolerance nan must be a number, 0 or more"),
        (["--compare", "--tolerance", "-1"], "error: --tolerance -1.0 must be a number, 0 or more"),
        (["-o", "{tmp}"], "error: -o {tmp} is a folder; name the PNG to write, e.g. {tmp}/curves.png"),
        (
            ["-o", "{tmp}/a/metrics.jsonl/c.png"],
            "error: {tmp}/a/metrics.jsonl is a file, where an output folder must go; move it away or choose another -o",
        ),
    ],
)
def test_a_bad_option_is_one_line(tmp_path, capsys, args, error) -> None:
    folder = write_runs(tmp_path / "a", {"r1": [5.0, 4.0]})
    runs = [str(folder), str(folder)] if "--compare" in args else [str(folder)]
    assert plot.main([*runs, *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    assert capsys.readouterr().err == error.replace("{tmp}", str(tmp_path)) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing written


def test_an_output_without_a_suffix_is_written_under_that_very_name(tmp_path, capsys) -> None:
    folder = write_runs(tmp_path / "a", {"r1": [5.0, 4.0]})
    assert plot.main([str(folder), "-o", str(tmp_path / "curves")]) == 0
    assert png_size(tmp_path / "curves") == (640, 420) and not (tmp_path / "curves.png").exists()
    assert f"wrote {tmp_path / 'curves'}:" in capsys.readouterr().out


def test_a_bad_line_in_metrics_jsonl_is_one_warning_and_the_rest_is_plotted(tmp_path, caplog) -> None:
    folder = write_runs(tmp_path / "a", {"r1": [5.0, 4.0]})
    with (folder / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": "3", "loss": 3.0}\n\xff\n{"step": 3, "loss": 3.0}\n')
    assert plot.main([str(folder), "-o", str(tmp_path / "c.png")]) == 0
    metrics = folder / "metrics.jsonl"
    assert caplog.messages == [
        f"{metrics} line 4 has \"step\" '3', not an integer; skipped it",
        f"{metrics} line 5 is not UTF-8 text (invalid start byte); skipped it",
    ]
    assert [r["step"] for r in plot.load(str(folder)).run.records] == [1, 2, 3]


def test_the_token_axis_counts_every_step_including_those_not_logged(runs) -> None:
    xs, _ = plot.series(plot.load(str(runs["seed1"])).run, "loss", x="tokens")
    assert xs == [step * 4 * 32 for step in range(1, 6)]


def test_a_key_no_run_has_is_one_note_and_no_panel(runs, tmp_path, capsys) -> None:
    assert plot.main([str(runs["seed1"]), "-o", str(tmp_path / "c.png"), "--keys", "loss,mfu,nonsense"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("note: no run has values for 'mfu', so it gets no panel; keys there:")
    assert plot.main([str(runs["seed1"]), "-o", str(tmp_path / "d.png"), "--keys", "nonsense"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: nothing to plot"


def test_compare_passes_a_run_against_itself(runs, capsys) -> None:
    assert plot.main([str(runs["seed1"]), str(runs["seed1"] / "metrics.jsonl"), "--compare"]) == 0
    assert "equal at every common step" in capsys.readouterr().out


def test_compare_fails_two_seeds_and_names_the_first_differing_step(runs, capsys) -> None:
    assert plot.main([str(runs["seed1"]), str(runs["seed2"]), "--compare"]) == 1
    out = capsys.readouterr().out
    assert "loss: seed1 vs seed2, 5 common steps (1-5)" in out and "first differing step: 1 (" in out
    assert "max abs diff" in out and "differs by more than --tolerance 0" in out
    assert plot.main([str(runs["seed1"]), str(runs["seed2"]), "--compare", "--tolerance", "100"]) == 0


def test_compare_needs_exactly_two_runs(runs, capsys) -> None:
    assert plot.main([str(runs["seed1"]), "--compare"]) == 2
    assert capsys.readouterr().err == "error: --compare takes exactly two runs, got 1\n"


def test_without_matplotlib_plot_says_what_to_install_and_compare_still_works(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.main([str(runs["seed1"]), "-o", str(tmp_path / "c.png")]) == 2
    assert "pip install 'titanlm[plot]'" in capsys.readouterr().err
    assert plot.main([str(runs["seed1"]), str(runs["seed1"]), "--compare"]) == 0


def test_two_fresh_runs_in_one_folder_are_told_apart_and_the_newest_is_shown(tmp_path, capsys) -> None:
    first = run_in_process(tmp_path, ["--debug.seed", "1", "--training.steps", "3"])
    second = run_in_process(tmp_path, ["--debug.seed", "2", "--training.steps", "3"])
    newest, oldest = plot.load(str(tmp_path)), plot.load(f"{tmp_path}@1")
    assert [r["loss"] for r in newest.run.records] == [r["loss"] for r in second]
    assert [r["loss"] for r in oldest.run.records] == [r["loss"] for r in first]
    assert newest.note.startswith("run 2 of 2") and oldest.label == f"{tmp_path.name}@1 (run {oldest.run.id})"
    assert plot.main([f"{tmp_path}@1", f"{tmp_path}@-1", "--compare"]) == 1
    assert plot.main([f"{tmp_path}@{newest.run.id}", str(tmp_path), "--compare"]) == 0
    assert plot.main([f"{tmp_path}@3", "--compare", str(tmp_path)]) == 2
    assert "has no run '3': it holds runs 1-2" in capsys.readouterr().err


def test_a_missing_run_is_one_line(tmp_path, capsys) -> None:
    assert plot.main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nowhere'}: no such metrics.jsonl file or dump folder holding one\n"


def test_help_explains_runs_within_a_file(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        plot.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "The newest run is used; RUN@N picks the N-th run" in out
