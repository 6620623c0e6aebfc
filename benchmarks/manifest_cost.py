"""What the checkpoint manifest costs: a one-process DCP save of N GiB of fp32 tensors, then the manifest
(each file re-read for its CRC-32) and the load-time check, over several trials.

    python benchmarks/manifest_cost.py --gib 1 --trials 5 [--folder /path/on/the/checkpoint/disk]

Prints each trial and the median and range of each figure. The files are read back from the page cache
right after the save, as in training.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from titanlm.checkpoint import manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    state = {f"w{i}": torch.randn(64, 1024, 1024) for i in range(4 * args.gib)}  # 256 MiB each
    rows = []
    for trial in range(args.trials):
        folder = tempfile.mkdtemp(dir=args.folder)
        try:
            started = time.perf_counter()
            dcp.save(state, checkpoint_id=folder, no_dist=True)
            save = time.perf_counter() - started
            started = time.perf_counter()
            manifest.write_manifest(folder, [manifest.rank_entries(folder, 0)], step=0)
            write = time.perf_counter() - started
            started = time.perf_counter()
            assert manifest.damage(folder, checksums=True) is None
            check = time.perf_counter() - started
        finally:
            shutil.rmtree(folder)
        rows.append((save, write, check))
        print(
            f"trial {trial}: save {save:.2f}s, manifest {write:.2f}s ({write / save:.0%} of the save), "
            f"check {check:.2f}s"
        )
    for name, values in zip(("save", "manifest", "check"), zip(*rows)):
        print(
            f"{name}: median {statistics.median(values):.2f}s (range {min(values):.2f}-{max(values):.2f}s) "
            f"for {args.gib} GiB"
        )


if __name__ == "__main__":
    main()
