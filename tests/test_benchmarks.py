"""The benchmark and profiling scripts of benchmarks/: what they report, on CPU with tiny shapes.

Speed itself is never asserted (see docs/benchmarks.md); these check that the figures are there and the
spread warning fires when it should.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO

from benchmarks import benchmark, long_context_memory
from titanlm.memory_estimate import shutdown_process_group


def test_round_spread_is_min_median_max_of_the_round_medians():
    spread = benchmark.round_spread([[1.0, 0.9, 1.2], [1.1], [1.3, 1.3]])  # round medians 1.0, 1.1, 1.3
    assert spread["rounds"] == 3
    assert (spread["min_s"], spread["median_s"], spread["max_s"]) == (1.0, 1.1, 1.3)
    assert spread["spread"] == pytest.approx(0.3 / 1.1)


def test_one_round_has_no_spread_and_no_warning():
    spread = benchmark.round_spread([[1.0, 2.0, 3.0]])
    assert spread["spread"] is None and spread["min_s"] == spread["max_s"] == 2.0
    assert benchmark.spread_warning("hf", spread) == ""


@pytest.mark.parametrize("slowest,warns", [(1.02, False), (1.09, False), (1.11, True), (1.5, True)])
def test_spread_warning_fires_above_ten_percent_of_the_median(slowest, warns):
    spread = benchmark.round_spread([[1.0], [1.0], [slowest]])  # (max - min) / median = slowest - 1
    warning = benchmark.spread_warning("titanlm", spread)
    assert bool(warning) == warns
    if warns:
        assert warning.startswith(f"WARNING: titanlm's rounds differ by {slowest - 1:.1%} of their median")


@pytest.mark.slow
@pytest.mark.parametrize("order", [[], ["--sequential"]], ids=["interleaved", "sequential"])
def test_benchmark_times_titanlm_and_the_hf_loop_on_one_shape(tmp_path, capsys, order):
    pytest.importorskip("transformers")
    report_path = tmp_path / "bench.json"
    benchmark.main(
        [
            "--seq_len",
            "32",
            "--batch",
            "2",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--n_layers",
            "2",
            "--json",
            str(report_path),
            "--dump_folder",
            str(tmp_path / "out"),
            *order,
        ]
    )
    report = json.loads(report_path.read_text())
    assert report["model"] == "llama3/debug cut to 2 layers"
    assert set(report["results"]) == {"titanlm", "hf"}
    for result in report["results"].values():
        assert result["timed_steps"] == 4 and result["tokens_per_s"] > 0
        spread = result["round_spread"]
        assert spread["rounds"] == 2 and spread["min_s"] <= spread["median_s"] <= spread["max_s"]
        assert spread["spread"] == pytest.approx((spread["max_s"] - spread["min_s"]) / spread["median_s"])
        # Sequential runs measure each system's peak memory on its own (here the process's peak RSS).
        assert (result["peak_memory_gib"] is not None) == bool(order)
    assert "needs CUDA" in report["notes"]["torchtitan"]
    assert report["warnings"] == [
        line for name, r in report["results"].items() if (line := benchmark.spread_warning(name, r["round_spread"]))
    ]
    out = capsys.readouterr().out
    assert "titanlm/hf = " in out and "step s over rounds" in out and "(2 rounds, spread " in out


@pytest.mark.slow
def test_profile_step_splits_a_step_into_kinds_of_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/profile_step.py",
            "--training.seq_len",
            "32",
            "--training.local_batch_size",
            "2",
            "--training.mixed_precision_param",
            "float32",
            "--job.dump_folder",
            str(tmp_path),
            "--steps",
            "1",
            "--top",
            "5",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("step ") and "ms of CPU ops per step" in line for line in lines)
    kinds = {line.split()[0] for line in lines if line.startswith("  ")}
    assert "matmul" in kinds  # aten::mm is classified, not left under "other"
    header = next(i for i, line in enumerate(lines) if "ms/step" in line)
    assert len(lines) - header - 1 == 5  # --top 5 rows of ops


@pytest.mark.slow
def test_long_context_memory_prints_each_settings_figures_and_how_they_were_made(capsys):
    shutdown_process_group()  # the trace needs a process without one; the benchmark test above leaves its run's
    long_context_memory.main(
        [
            "--flavor",
            "debug",
            "--seq_len",
            "256",
            "--layers",
            "1,2",
            "--modes",
            "full",
            "--loss_chunks",
            "64",
            "--layouts",
            "cp2,1gpu-offload",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| layout |"))
    assert [cell.strip() for cell in lines[header].strip("|").split("|")] == list(long_context_memory.COLUMNS)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[header + 2 : header + 4]]
    assert [row[:3] for row in rows] == [["2 GPUs, cp 2", "full", "64"], ["1 GPU, cp 1, CPU offload", "full", "64"]]
    assert [row[11] for row in rows] == ["traced", "formula"]
    # A traced row: the two shallow traces of the per-block figure, then the whole depth's.
    assert len(rows[0][12].split(" + ")) == 3 and rows[1][12] == "-"
    assert all(float(cell) >= 0 for row in rows for cell in row[3:10])
    assert any(line.startswith("one block without recomputation at cp 2, by shape") for line in lines)
    assert lines[-1].startswith("tracing took ")


def test_cp_attention_benchmark_packs_documents_of_one_to_four_thousand_tokens():
    from benchmarks import cp_attention_time

    documents = cp_attention_time.packed_row(32768, torch.Generator().manual_seed(0))[0]
    lengths = torch.unique_consecutive(documents, return_counts=True)[1]
    assert documents.shape == (32768,) and documents.diff().ge(0).all()
    assert lengths.sum() == 32768 and len(lengths) >= 8
    assert all(1024 <= n < 4096 for n in lengths[:-1].tolist())  # the last one is cut by the row's end
