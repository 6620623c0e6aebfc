"""SFT end to end: an Alpaca file -> tokenize_alpaca -> training on packed documents with validation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from trainer_runs import TINY_ARGS, read_metrics

from titanlm.config import load_config
from titanlm.data.demo import ensure_demo_assets
from titanlm.loss import IGNORE_INDEX, token_cross_entropy
from titanlm.tools.tokenize_alpaca import main as tokenize_alpaca
from titanlm.train import build_trainer


def alpaca_records(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        records.append(
            {"instruction": "add the numbers", "input": f"{a} plus {b}", "output": f"{a} plus {b} is {a + b}."}
        )
    return records


def make_sft_data(tmp_path, demo_cache):
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(alpaca_records(200)))
    tokenizer = ensure_demo_assets(str(demo_cache)).tokenizer_path
    assert tokenize_alpaca([str(source), str(tmp_path / "sft"), tokenizer, "--split_ratio", "0.1"]) == 0
    return tmp_path / "sft", tokenizer


def sft_args(data, tokenizer, dump) -> list[str]:
    return [
        *TINY_ARGS,
        "--data.dataset",
        "bin",
        "--data.train_folder",
        str(data / "train"),
        "--data.valid_folder",
        str(data / "valid"),
        "--data.valid_every",
        "5",
        "--training.seq_len",
        "64",
        "--model.tokenizer_path",
        tokenizer,
        "--job.dump_folder",
        str(dump),
        "--training.steps",
        "10",
        "--optimizer.lr",
        "3e-3",
        "--model.attention_backend",
        "sdpa",
    ]


def test_masked_prompt_positions_carry_no_gradient(tmp_path, demo_cache) -> None:
    data, tokenizer = make_sft_data(tmp_path, demo_cache)
    trainer = build_trainer(load_config(sft_args(data, tokenizer, tmp_path / "run")))
    batch = trainer.model_step.prepare(next(iter(trainer.dataloader)))
    masked = batch["labels"] == IGNORE_INDEX
    assert 0.2 < masked.float().mean() < 0.9  # prompts (and padding) are masked, responses are not
    logits = trainer.model(batch["input_ids"], batch["position_ids"], batch["document_ids"]).detach().requires_grad_()
    token_cross_entropy(logits, batch["labels"]).backward()
    per_position = logits.grad.abs().sum(-1)
    assert torch.all(per_position[masked] == 0)
    assert torch.all(per_position[~masked] > 0)
    trainer.close()


@pytest.mark.slow
def test_sft_from_alpaca_trains_and_validates_per_type(tmp_path, demo_cache) -> None:
    data, tokenizer = make_sft_data(tmp_path, demo_cache)
    trainer = build_trainer(load_config(sft_args(data, tokenizer, tmp_path / "run")))
    trainer.train()
    trainer.close()
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [r["step"] for r in valid] == [5, 10]
    assert valid[1]["valid_loss"] < valid[0]["valid_loss"]
    assert math.isclose(valid[1]["valid_loss/en"], valid[1]["valid_loss"])  # one type: "en"
    assert math.isclose(valid[1]["valid_ppl"], math.exp(valid[1]["valid_loss"]), rel_tol=1e-6)
    assert train[-1]["token_share/en"] == 1.0


def test_validation_is_the_token_weighted_loss_per_type(tmp_path) -> None:
    """Two types of different sizes: each figure equals cross-entropy computed directly."""
    from contextlib import nullcontext

    import numpy as np
    import torch.nn.functional as F
    from binmeta_files import write_internevo
    from loaders import valid_loader_for

    from titanlm.distributed import init_distributed
    from titanlm.models import Transformer, get_model_args
    from titanlm.validation import validation_metrics

    rng = np.random.default_rng(0)
    for kind, count in (("en", 7), ("code", 3)):
        write_internevo(
            tmp_path / "valid" / kind / "data.bin",
            [rng.integers(1, 2048, size=int(n)).tolist() for n in rng.integers(5, 40, size=count)],
        )
    cfg = load_config([*TINY_ARGS, "--data.valid_folder", str(tmp_path / "valid"), "--training.seq_len", "64"])
    loader = valid_loader_for(cfg, 0, 1, vocab_size=2048)
    model = Transformer(get_model_args("llama3", "debug"))
    model.init_weights(seed=0)
    init_distributed()  # a one-rank group when no test made one yet

    def logits_of(batch):
        return model(batch["input_ids"], batch["position_ids"], batch["document_ids"])

    metrics = validation_metrics(
        logits_of,
        loader,
        lambda batch: batch,
        nullcontext,
        loader.dataset.types,
        [torch.distributed.group.WORLD, None],
        torch.device("cpu"),
    )
    sums, counts = {}, {}
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
            losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            labelled = batch["labels"].flatten() != IGNORE_INDEX
            for index, name in enumerate(loader.dataset.types):
                chosen = labelled & (batch["type_ids"].flatten() == index)
                sums[name] = sums.get(name, 0.0) + losses[chosen].sum().item()
                counts[name] = counts.get(name, 0) + int(chosen.sum())
    for name in ("en", "code"):
        assert math.isclose(metrics[f"valid_loss/{name}"], sums[name] / counts[name], rel_tol=1e-6)
    overall = sum(sums.values()) / sum(counts.values())
    assert math.isclose(metrics["valid_loss"], overall, rel_tol=1e-6)
    assert metrics["valid_loss/en"] != metrics["valid_loss/code"]
