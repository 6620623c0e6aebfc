"""Run the trainer from tests, in this process or under torchrun, and read its metrics back.

Also the torchrun worker: `python -m torch.distributed.run ... tests/trainer_runs.py SCENARIOS.json`
runs several configurations in one launch (a launch costs 6-9 s on CPU; a scenario about 1 s).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A tiny fp32 setup: 5 steps in about a second per scenario on 2 CPU cores.
TINY_ARGS = [
    "--model.flavor",
    "debug",
    "--training.steps",
    "5",
    "--training.seq_len",
    "32",
    "--training.local_batch_size",
    "4",
    "--training.mixed_precision_param",
    "float32",
    "--optimizer.lr",
    "1e-3",
    "--lr_scheduler.warmup_steps",
    "2",
    "--metrics.log_freq",
    "1",
    "--data.dataset",
    "random",
]


def assert_records_close(actual: list[dict], expected: list[dict], rtol: float = 1e-5) -> None:
    """Two runs' per-step records cover the same steps with the same loss and grad norm, within rtol."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected):
        for key in ("loss", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=rtol), (key, got["step"], got[key], want[key])


def run_in_process(dump_folder: Path, extra: list[str]) -> list[dict]:
    """Train a single process here and return the per-step records."""
    from titanlm.config import load_config
    from titanlm.train import build_trainer

    cfg = load_config([*TINY_ARGS, "--job.dump_folder", str(dump_folder), *extra])
    trainer = build_trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def read_metrics(dump_folder: Path, every_step: bool = False) -> list[dict]:
    """The newest run's records in metrics.jsonl: the logged steps' and validation records, and with
    `every_step` also the small records of the steps between logs."""
    from titanlm.metrics import STEP_KEYS, read_runs

    runs = read_runs(str(dump_folder / "metrics.jsonl"))
    records = runs[-1].records if runs else []
    return records if every_step else [r for r in records if r.keys() != set(STEP_KEYS)]


def worker_env() -> dict[str, str]:
    """This environment for worker processes, with the repository first on the import path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_torchrun(
    nproc: int, scenarios: dict[str, list[str]], workdir: Path, timeout: int = 300
) -> dict[str, list[dict]]:
    """Launch `nproc` gloo processes that train every scenario; return each scenario's records."""
    spec = workdir / "scenarios.json"
    spec.write_text(
        json.dumps(
            {name: [*TINY_ARGS, "--job.dump_folder", str(workdir / name), *extra] for name, extra in scenarios.items()}
        )
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        str(spec),
    ]
    env = worker_env()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return {name: read_metrics(workdir / name) for name in scenarios}


def _worker(spec_path: str) -> None:
    from titanlm.config import load_config
    from titanlm.distributed import shutdown
    from titanlm.train import build_trainer

    for argv in json.loads(Path(spec_path).read_text()).values():
        trainer = build_trainer(load_config(argv))
        trainer.train()
        trainer.close()
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
