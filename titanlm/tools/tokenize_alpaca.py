"""Tokenize Alpaca instruction data for SFT (InternEvo's `tools/alpaca_tokenizer.py`).

    python -m titanlm.tools.tokenize_alpaca alpaca_data.json OUT_DIR tokenizer.model --split_ratio 0.1

Writes OUT_DIR/train/en/dataset.bin(.meta) and OUT_DIR/valid/en/dataset.bin(.meta) with int64 metas.
Prompt tokens are stored negated (input only, no loss), response tokens positive; the templates
are in `titanlm.data.chat_templates`. Unlike InternEvo, which samples the validation set with
replacement (so fewer than split_ratio of the records end up there, some twice), the split here
is a seeded permutation: exactly round(n * split_ratio) distinct records go to valid, the rest to
train, each split in input order. No split is ever written empty: --split_ratio 0 writes train
only, 1 valid only, and a ratio that would leave either split with no record is refused.

Both splits are written in a temporary folder beside OUT_DIR and moved into place together at the
end, so an error leaves nothing behind. OUT_DIR never pairs splits of two runs: with --overwrite, the
files of a split this run does not write are removed, and without it they are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

from titanlm.data.binmeta import BinWriter
from titanlm.data.chat_templates import TEMPLATES, encode_alpaca
from titanlm.data.tokenizer import Tokenizer
from titanlm.errors import ConfigError, DataError, MissingFileError, TitanlmError
from titanlm.files import read_json_file
from titanlm.progress import progress
from titanlm.tools.common import (
    SPLITS,
    check_outputs,
    load_tokenizer,
    not_written,
    run_cli,
    split_indices,
    staged_splits,
    written_splits,
)


def tokenize_alpaca(
    input_json: str,
    output_dir: str,
    tokenizer_path: str,
    split_ratio: float = 0.1,
    template: str = "internlm",
    max_length: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Write the splits that get records (see `split_indices`); returns per split written its
    documents, tokens and masked (negative) tokens, and the warnings about the records."""
    if max_length < 1:
        raise ConfigError(f"--max_length {max_length} must be at least 1")
    if not os.path.isfile(input_json):
        raise MissingFileError(f"input {input_json} does not exist")
    tokenizer = load_tokenizer(tokenizer_path, "the TOKENIZER argument")
    records = read_json_file(input_json, fix="fix the array")
    if not isinstance(records, list):
        raise DataError(f"{input_json} holds a {type(records).__name__}; expected a JSON array of Alpaca records")
    if not records:
        raise DataError(f"{input_json} holds no records")
    splits = written_splits(split_ratio)
    check_outputs(output_dir, splits, overwrite)
    with progress(records, desc="tokenize_alpaca", unit="record") as bar:  # closed, so an error starts a line
        samples = [_encoded(tokenizer, r, i, template, max_length, input_json) for i, r in enumerate(bar)]
    indices = dict(zip(SPLITS, split_indices(len(samples), split_ratio, seed)))
    warnings = _warnings(records, samples, max_length)
    summary = {}
    with staged_splits(output_dir, splits) as staged, ExitStack() as stack:
        for split in splits:
            writer = stack.enter_context(BinWriter(staged[split], "int64"))
            for i in indices[split]:
                writer.write(samples[i])
            masked = sum(sum(t < 0 for t in samples[i]) for i in indices[split])
            summary[split] = {"documents": len(indices[split]), "tokens": writer.num_tokens, "masked_tokens": masked}
    return summary, warnings


def _warnings(records: list[dict], samples: list[list[int]], max_length: int) -> list[str]:
    """What the summary warns about: samples that train on nothing or next to nothing."""
    warnings = []
    if empty := sum(not r["output"].strip() for r in records):
        warnings.append(
            f'warning: {empty:,} records have an empty "output": only the template\'s end of the answer is trained'
        )
    if cut := sum(all(t < 0 for t in sample) for sample in samples):
        warnings.append(
            f"warning: {cut:,} samples are cut inside their prompt by --max_length {max_length}, so no response "
            "token is left and they train nothing; raise --max_length"
        )
    return warnings


def _encoded(tok: Tokenizer, record: dict, index: int, template: str, max_length: int, input_json: str) -> list[int]:
    """`encode_alpaca`, with a text the tokenizer library refuses (e.g. a UnicodeEncodeError for a lone
    surrogate) named by its file and record."""
    try:
        return encode_alpaca(tok, record, index, template, max_length)
    except TitanlmError:
        raise
    except ValueError as e:
        raise DataError(
            f"{input_json} record {index}: cannot tokenize it ({type(e).__name__}: {e}); fix or remove it"
        ) from None


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.tokenize_alpaca",
        description="Tokenize Alpaca records into masked SFT data: OUTPUT_DIR/{train,valid}/en/dataset.bin(.meta).",
    )
    parser.add_argument("input_json", help='JSON array of {"instruction", "input", "output"} records')
    parser.add_argument("output_dir", help="folder that receives train/ and valid/")
    parser.add_argument(
        "tokenizer", metavar="TOKENIZER", help="SentencePiece .model, tiktoken ranks (Llama 3) or tokenizer.json"
    )
    parser.add_argument(
        "--split_ratio",
        type=float,
        default=0.1,
        help="share of records for valid: 0 = write train only, 1 = valid only; a split is never written empty",
    )
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="internlm", help="chat template")
    parser.add_argument("--max_length", type=int, default=2048, help="cut each sample to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    summary, warnings = tokenize_alpaca(
        args.input_json,
        args.output_dir,
        args.tokenizer,
        args.split_ratio,
        args.template,
        args.max_length,
        args.seed,
        args.overwrite,
    )
    for split in SPLITS:
        if split not in summary:
            print(not_written(split))
            continue
        s = summary[split]
        share = s["masked_tokens"] / max(s["tokens"], 1)
        print(f"{split}: {s['documents']:,} samples, {s['tokens']:,} tokens ({share:.1%} masked prompt tokens)")
    for warning in warnings:
        print(warning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
