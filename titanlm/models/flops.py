"""FLOP accounting: the useful-work count behind MFU, and InternEvo's `tflops` formula.

Useful training FLOPs = 6 x (parameters that do matmuls, i.e. all but the embedding lookup) per
token + causal attention over the real document lengths (12 x layers x dim per query-key pair;
a document of n tokens has n(n+1)/2 such pairs). InternEvo's formula charges full-length
attention, MHA-sized k/v projections, and recomputation; it is reported for comparison only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from titanlm.models.flavors import ModelArgs


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in matmuls: everything except the embedding table and norms."""
    kv_dim = args.n_kv_heads * args.head_dim
    attention = args.dim * (2 * args.dim + 2 * kv_dim)
    if args.attn_bias:
        attention += 2 * args.dim + 2 * kv_dim
    mlp = 3 * args.dim * args.ffn_dim
    return args.n_layers * (attention + mlp) + args.dim * args.vocab_size


def training_flops(args: ModelArgs, document_lengths: Iterable[int]) -> float:
    """Useful forward+backward FLOPs for one pass over documents of the given lengths."""
    lengths = list(document_lengths)
    tokens = sum(lengths)
    causal_pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 6.0 * matmul_params(args) * tokens + 12.0 * args.n_layers * args.dim * causal_pairs


def document_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the documents packed in a batch's rows (padding excluded); whole rows without ids."""
    input_ids = batch["input_ids"]
    document_ids = batch.get("document_ids")
    if document_ids is None:
        return [input_ids.shape[1]] * input_ids.shape[0]
    type_ids = batch.get("type_ids")
    lengths: list[int] = []
    for row, ids in enumerate(document_ids):
        if type_ids is not None:
            ids = ids[type_ids[row] >= 0]  # padding carries type id -1
        lengths += torch.unique_consecutive(ids, return_counts=True)[1].tolist()
    return lengths


def internevo_tflops(
    args: ModelArgs, sequences: int, seq_len: int, step_time: float, world_size: int, recompute: bool
) -> float:
    """InternEvo's per-GPU TFLOP/s (its training log's `tflops`), kept formula-for-formula comparable."""
    f = 4 if recompute else 3
    h, s, B, L, V = args.dim, seq_len, sequences, args.n_layers, args.vocab_size
    r = (args.ffn_dim / h) * 3 / 2
    flops = f * ((8 + 4 * r) * B * s * h**2 + 4 * B * s**2 * h) * L + 6 * B * s * h * V
    return flops / (step_time * world_size * 1e12)
