"""Wall time per step of the whole training loop (`Trainer.train()`), to compare two checkouts.

    PYTHONPATH=<checkout> python benchmarks/loop_step_time.py --steps 40 --log_freq 10 --rounds 3

Unlike benchmark.py, which times `train_step` alone, this includes what the loop does around it:
fetching batches, logging, metrics and the checkpoint hook. It prints the milliseconds per step of
each round (a fresh Trainer each) and their median. Trainer flags after `--` are passed on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import titanlm
from titanlm.config import load_config
from titanlm.train import build_trainer

TINY = [
    "--model.flavor",
    "debug",
    "--data.dataset",
    "random",
    "--training.seq_len",
    "128",
    "--training.local_batch_size",
    "8",
    "--training.mixed_precision_param",
    "float32",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log_freq", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    options, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    print(f"titanlm from {titanlm.__file__}")
    rounds = []
    for _ in range(options.rounds):
        with tempfile.TemporaryDirectory() as folder:
            trainer = build_trainer(
                load_config(
                    [
                        *TINY,
                        *extra,
                        "--training.steps",
                        str(options.steps),
                        "--metrics.log_freq",
                        str(options.log_freq),
                        "--job.dump_folder",
                        folder,
                    ]
                )
            )
            start = time.perf_counter()
            trainer.train()
            rounds.append((time.perf_counter() - start) / options.steps * 1000)
            trainer.close()
    print(
        "ms/step per round:",
        " ".join(f"{value:.1f}" for value in rounds),
        f"| min {min(rounds):.1f} median {statistics.median(rounds):.1f} max {max(rounds):.1f}",
    )


if __name__ == "__main__":
    main()
