"""Attention time of one context-parallel rank's share against the whole row, on a CUDA GPU.

    python benchmarks/cp_attention_time.py [--seq 32768] [--cp 2] [--rounds 5] [--iters 10]

One row of `--seq` tokens packed with documents of 1-4K tokens, Llama3-8B's attention shape (32 query
heads, 8 KV heads, head dim 128, bf16). Each measurement is forward + backward of the attention
kernel alone (no all-gather), timed with CUDA events over `--iters` calls after 3 warm-up calls, in
`--rounds` rounds: the figures are the median and range of the per-call times.

- "whole row": the row's documents through the varlen kernel (flash attention's own packing), the
  reference of the ratios, and through flex (so a flex share's ratio can be read against flex's own);
- "rank r share, flex / varlen": rank r's queries (a head and a tail chunk) against all keys in the
  rank-major order the all-gather leaves them in, as `AllGatherKVAttention` runs them.

The target: a share takes at most 0.55x the whole row's time at cp 2 (ideally 0.5: each rank does
half the causal work).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from titanlm.models.attention import FlexBackend, VarlenBackend
from titanlm.parallel.context_parallel import cp_token_indices


def packed_row(seq: int, generator: torch.Generator) -> torch.Tensor:
    """Document ids [1, seq]: documents of 1,024-4,095 tokens, the last one cut by the row's end."""
    lengths = torch.randint(1024, 4096, (seq // 1024,), generator=generator)
    ends = lengths.cumsum(0)
    return torch.bucketize(torch.arange(seq), ends[ends < seq], right=True)[None]


def time_call(call, rounds: int, iters: int) -> list[float]:
    """Milliseconds per call, one figure per round."""
    for _ in range(3):
        call()
    per_round = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        torch.cuda.synchronize()
        per_round.append(start.elapsed_time(end) / iters)
    return per_round


def forward_backward(backend, q, k, v, prepared):
    def call():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        backend(*leaves, prepared).sum().backward()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    documents = packed_row(args.seq, generator).cuda()
    q = torch.randn(1, 32, args.seq, 128, generator=generator).cuda().bfloat16()
    k, v = (torch.randn(1, 8, args.seq, 128, generator=generator).cuda().bfloat16() for _ in range(2))
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, seq {args.seq}, cp {args.cp}, "
        f"{int(documents.max()) + 1} documents; forward + backward per call, ms: median (min-max) "
        f"over {args.rounds} rounds of {args.iters}"
    )

    def report(name: str, per_round: list[float], whole: float | None) -> float:
        median = statistics.median(per_round)
        ratio = f"  {median / whole:.3f}x the whole row" if whole else ""
        print(f"{name:32s} {median:8.2f} ({min(per_round):.2f}-{max(per_round):.2f}){ratio}")
        return median

    varlen, flex = VarlenBackend(), FlexBackend()
    whole = report(
        "whole row, varlen",
        time_call(forward_backward(varlen, q, k, v, varlen.prepare(documents)), args.rounds, args.iters),
        None,
    )
    report(
        "whole row, flex",
        time_call(forward_backward(flex, q, k, v, flex.prepare(documents)), args.rounds, args.iters),
        whole,
    )
    keys = torch.cat([cp_token_indices(args.seq, r, args.cp, q.device) for r in range(args.cp)])
    k_all, v_all = k[:, :, keys], v[:, :, keys]
    for rank in range(args.cp):
        queries = cp_token_indices(args.seq, rank, args.cp, q.device)
        for backend in (flex, varlen):
            prepared = backend.prepare_shard(queries, keys, documents[:, queries], documents[:, keys])
            call = forward_backward(backend, q[:, :, queries], k_all, v_all, prepared)
            report(f"rank {rank} share, {backend.name}", time_call(call, args.rounds, args.iters), whole)


if __name__ == "__main__":
    main()
