"""The plot tool: one panel per key and one line per run, runs told apart within a file, and
--compare's verdict on whether two runs trained identically."""

from __future__ import annotations

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


def test_smoothing_adds_a_mean_beside_each_faint_raw_curve(runs) -> None:
    fig = plot.figure([plot.load(str(runs["seed1"]))], ["loss"], smooth=3)
    raw, mean = fig.axes[0].get_lines()
    assert raw.get_alpha() < 1 and mean.get_alpha() is None
    values = list(raw.get_ydata())
    assert list(mean.get_ydata())[1] == pytest.approx(sum(values[:3]) / 3)


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
    assert newest.note.startswith("run 2 of 2") and oldest.label == f"{tmp_path.name}@1"
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
