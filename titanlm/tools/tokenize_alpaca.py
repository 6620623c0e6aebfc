"""Tokenize Alpaca instruction data for SFT (InternEvo's `tools/alpaca_tokenizer.py`).

    python -m titanlm.tools.tokenize_alpaca alpaca_data.json OUT_DIR tokenizer.model --split_ratio 0.1

Writes OUT_DIR/train/en/dataset.bin(.meta) and OUT_DIR/valid/en/dataset.bin(.meta) with int64 metas.
Prompt tokens are stored negated (input only, no loss), response tokens positive; the templates
are in `titanlm.data.chat_templates`. Unlike InternEvo, which samples the validation set with
replacement (so fewer than split_ratio of the records end up there, some twice), the split here
is a seeded permutation: exactly round(n * split_ratio) distinct records go to valid, the rest to
train, each split in input order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from titanlm.data.binmeta import BinWriter
from titanlm.data.chat_templates import TEMPLATES, encode_alpaca
from titanlm.data.tokenizer import build_tokenizer


def split_indices(n: int, split_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) record indices, sorted, disjoint, covering 0..n-1; valid has round(n * ratio)."""
    if not 0.0 <= split_ratio <= 1.0:
        raise ValueError(f"--split_ratio {split_ratio} is not in [0, 1]")
    order = np.random.default_rng(seed).permutation(n)
    num_valid = round(n * split_ratio)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


def tokenize_alpaca(
    input_json: str,
    output_dir: str,
    tokenizer_path: str,
    split_ratio: float = 0.1,
    template: str = "internlm",
    max_length: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write both splits; returns per split its documents, tokens and masked (negative) tokens."""
    with open(input_json, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(
            f"{input_json} holds a {type(records).__name__}; expected a JSON array of Alpaca records"
        )
    tokenizer = build_tokenizer(tokenizer_path)
    samples = [encode_alpaca(tokenizer, r, i, template, max_length) for i, r in enumerate(records)]
    train, valid = split_indices(len(samples), split_ratio, seed)
    paths = {split: os.path.join(output_dir, split, "en", "dataset.bin") for split in ("train", "valid")}
    summary = {}
    # One `with` for both: an error in either leaves neither split behind.
    with (
        BinWriter(paths["train"], "int64", overwrite) as w_train,
        BinWriter(paths["valid"], "int64", overwrite) as w_valid,
    ):
        for split, writer, indices in (("train", w_train, train), ("valid", w_valid, valid)):
            for i in indices:
                writer.write(samples[i])
            masked = sum(sum(t < 0 for t in samples[i]) for i in indices)
            summary[split] = {"documents": len(indices), "tokens": writer.num_tokens, "masked_tokens": masked}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize_alpaca",
        description="Tokenize Alpaca records into masked SFT data: "
        "OUTPUT_DIR/{train,valid}/en/dataset.bin(.meta).",
    )
    parser.add_argument("input_json", help='JSON array of {"instruction", "input", "output"} records')
    parser.add_argument("output_dir", help="folder that receives train/ and valid/")
    parser.add_argument("tokenizer", help="SentencePiece .model, tiktoken ranks (Llama 3) or tokenizer.json")
    parser.add_argument("--split_ratio", type=float, default=0.1, help="share of records for valid")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="internlm", help="chat template")
    parser.add_argument("--max_length", type=int, default=2048, help="cut each sample to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    try:
        summary = tokenize_alpaca(
            args.input_json,
            args.output_dir,
            args.tokenizer,
            args.split_ratio,
            args.template,
            args.max_length,
            args.seed,
            args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, s in summary.items():
        share = s["masked_tokens"] / max(s["tokens"], 1)
        print(
            f"{split}: {s['documents']:,} samples, {s['tokens']:,} tokens ({share:.1%} masked prompt tokens)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
