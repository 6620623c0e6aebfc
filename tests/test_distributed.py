"""Multi-process parity: every data-parallel layout trains exactly like one process (gloo, fp32)."""

from __future__ import annotations

import os
import subprocess

import pytest

from test_train import assert_records_close
from trainer_runs import REPO, read_metrics, run_in_process, run_torchrun

pytestmark = pytest.mark.multiprocess

# Global batch 8 everywhere: one process with 8 samples per step is the oracle.
SINGLE = ["--training.local_batch_size", "8"]
TWO_RANK_LAYOUTS = {
    "fsdp2": ["--training.local_batch_size", "4"],
    "hsdp2x1": ["--training.local_batch_size", "4", "--parallelism.data_parallel_replicate_degree", "2"],
    "fsdp2_zero2": ["--training.local_batch_size", "4", "--parallelism.fsdp_reshard_after_forward", "never"],
    "fsdp2_accum2": ["--training.local_batch_size", "2", "--training.global_batch_size", "8"],
    "fsdp2_full_ac": ["--training.local_batch_size", "4", "--activation_checkpoint.mode", "full"],
}
FOUR_RANK_LAYOUTS = {
    "fsdp4": ["--training.local_batch_size", "2"],
    "hsdp2x2": ["--training.local_batch_size", "2", "--parallelism.data_parallel_replicate_degree", "2"],
}


@pytest.fixture(scope="module")
def single_process_records(tmp_path_factory) -> list[dict]:
    return run_in_process(tmp_path_factory.mktemp("single"), SINGLE)


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory) -> dict[str, list[dict]]:
    return run_torchrun(2, TWO_RANK_LAYOUTS, tmp_path_factory.mktemp("two"))


@pytest.mark.parametrize("layout", sorted(TWO_RANK_LAYOUTS))
def test_two_rank_layout_matches_single_process(layout, two_rank_records, single_process_records) -> None:
    assert_records_close(two_rank_records[layout], single_process_records)


@pytest.mark.parametrize("layout", sorted(FOUR_RANK_LAYOUTS))
def test_four_rank_layout_matches_single_process(layout, tmp_path_factory, single_process_records) -> None:
    records = run_torchrun(4, {layout: FOUR_RANK_LAYOUTS[layout]}, tmp_path_factory.mktemp(layout))
    assert_records_close(records[layout], single_process_records)


def test_run_train_sh_with_two_processes_writes_metrics(tmp_path, demo_cache) -> None:
    env = {**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "scripts/run_train.sh", "--training.steps", "3", "--training.seq_len", "32",
         "--job.dump_folder", str(tmp_path), "--data.cache_folder", str(demo_cache), "--metrics.log_freq", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "step=3" in result.stdout  # rank 0's log line reaches the console
