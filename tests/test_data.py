"""Tests of titanlm.data: demo assets, tokenizer, sharded resumable datasets and the loader."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from loaders import loader_for, valid_loader_for
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.config import load_config
from titanlm.config.job_config import JobConfig
from titanlm.data import (
    IGNORE_INDEX,
    RandomTokenDataset,
    TextTokenDataset,
    build_tokenizer,
    ensure_demo_assets,
    generate_corpus,
)
from titanlm.data import demo as demo_module
from titanlm.data.binmeta import BinWriter

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


SEQ = 8


@pytest.fixture(scope="module")
def demo_cache(demo_cache: Path) -> str:
    """The session's demo cache, built, as the string a config's data.cache_folder holds."""
    ensure_demo_assets(str(demo_cache))
    return str(demo_cache)


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b)
    )


def _docs() -> list[np.ndarray]:
    """Documents of distinct lengths and globally unique token values, so order is checkable."""
    starts = np.cumsum([0] + [5 + d for d in range(20)])
    return [np.arange(starts[d], starts[d + 1]) for d in range(20)]


def _random(rank: int = 0, world: int = 1, seed: int = 0, block: int = 1) -> RandomTokenDataset:
    return RandomTokenDataset(1000, SEQ, seed, rank, world, worker_block=block)


def _text(rank: int = 0, world: int = 1, seed: int = 0, block: int = 1) -> TextTokenDataset:
    return TextTokenDataset(_docs(), SEQ, seed, rank, world, worker_block=block)


MAKERS = {"random": _random, "text": _text}


# ---- demo assets and tokenizer -------------------------------------------------------------


def test_demo_assets_built_once_then_reused(tmp_path):
    start = time.perf_counter()
    assets = ensure_demo_assets(str(tmp_path))
    cold = time.perf_counter() - start
    mtime = os.path.getmtime(assets.tokenizer_path)
    start = time.perf_counter()
    again = ensure_demo_assets(str(tmp_path))
    warm = time.perf_counter() - start
    assert again == assets
    assert os.path.dirname(assets.corpus_path) == os.path.join(str(tmp_path), "demo-v1")
    assert os.path.getmtime(again.tokenizer_path) == mtime  # not rebuilt
    assert warm < 0.05 and cold < 10, (cold, warm)
    with open(assets.corpus_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines == generate_corpus()
    assert 1_000_000 < os.path.getsize(assets.corpus_path) < 3_000_000


def _build_in(cache: str, barrier, results) -> None:
    barrier.wait(timeout=30)
    results.put(ensure_demo_assets(cache))


@pytest.mark.parametrize("lock_works", [True, False])
def test_demo_assets_concurrent_creation(tmp_path, monkeypatch, lock_works):
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    real_build = demo_module._build

    def logged_build(folder: str):
        with open(log, "a") as f:
            f.write(folder + "\n")
        return real_build(folder)

    monkeypatch.setattr(demo_module, "_build", logged_build)
    if not lock_works:  # e.g. a filesystem without flock: the atomic rename must still be safe
        monkeypatch.setattr(demo_module.fcntl, "flock", lambda fd, op: None)
    ctx = mp.get_context("fork")  # children inherit the patches
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in, args=(str(cache), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got[0] == got[1]
    assert len(log.read_text().splitlines()) == (1 if lock_works else 2)
    assert sorted(os.listdir(cache)) == ["demo-v1", "demo-v1.lock"]  # no temporary folder left
    assert build_tokenizer(got[0].tokenizer_path).vocab_size == demo_module.VOCAB_SIZE
    with open(got[0].corpus_path, encoding="utf-8") as f:
        assert sum(1 for _ in f) == demo_module.NUM_DOCUMENTS


def test_demo_assets_failed_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    def broken(folder: str):
        open(os.path.join(folder, "corpus.txt"), "w").close()  # half-built
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(demo_module, "_build", broken)
    with pytest.raises(RuntimeError):
        ensure_demo_assets(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["demo-v1.lock"]
    monkeypatch.undo()
    assets = ensure_demo_assets(str(tmp_path))
    assert os.path.getsize(assets.corpus_path) > 0


def test_demo_corpus_is_deterministic_and_correct():
    corpus = generate_corpus(500)
    assert corpus == generate_corpus(500) and corpus != generate_corpus(500, seed=1)
    facts = recalls = 0
    for line in corpus:
        for a, op, b, result in re.findall(r"(\d+) (plus|minus|times) (\d+) is (\d+)\.", line):
            facts += 1
            a, b = int(a), int(b)
            assert {"plus": a + b, "minus": a - b, "times": a * b}[op] == int(result)
        if asked := re.search(r"so the code of (\w+ \d+) is (\w+)\.$", line):
            recalls += 1
            assert f"the code of {asked[1]} is {asked[2]}." in line[: asked.start()]
    assert facts > 100 and recalls > 50


def test_demo_tokenizer_round_trips_corpus(demo_cache):
    assets = ensure_demo_assets(demo_cache)
    tok = build_tokenizer(assets.tokenizer_path)
    assert tok.vocab_size <= 2048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad piece: pad falls back to eos
    with open(assets.corpus_path, encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(50)]
    for line in lines:
        ids = tok.encode(line)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert 0 not in ids  # no <unk>
        assert tok.decode(ids) == line
    assert tok.encode(lines[0], bos=False, eos=False) == tok.encode(lines[0])[1:-1]
    assert tok.decode(tok.encode("naïve ünicode ✓")) == "naïve ünicode ✓"  # byte fallback


def test_build_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*model.tokenizer_path"):
        build_tokenizer(missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a protobuf at all\n" * 10)
    with pytest.raises(ValueError, match="junk.model.*model.tokenizer_path"):
        build_tokenizer(str(junk))


# ---- datasets ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MAKERS)
def test_labels_are_inputs_shifted(kind):
    for s in _take(iter(MAKERS[kind]()), 5):
        assert s["input_ids"].shape == s["labels"].shape == (SEQ,)
        assert s["input_ids"].dtype == s["labels"].dtype == torch.int64
        assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
        s["labels"][0] = IGNORE_INDEX  # masking labels must not edit the inputs
        assert s["input_ids"][1] != IGNORE_INDEX


def test_text_epoch_is_a_shuffled_concatenation():
    ds = _text()
    n = ds.windows_per_epoch
    assert n == (sum(len(d) for d in _docs()) - 1) // SEQ
    samples = _take(iter(ds), 2 * n)
    for a, b in zip(samples, samples[1:]):
        if b is not samples[n]:  # within an epoch windows chain: each token is a label once
            assert a["labels"][-1] == b["input_ids"][0]

    def epoch_stream(part):
        return torch.cat([part[0]["input_ids"][:1]] + [s["labels"] for s in part]).numpy()

    first, second = epoch_stream(samples[:n]), epoch_stream(samples[n:])
    assert not np.array_equal(first, second)  # reshuffled per epoch
    for stream in (first, second):
        assert len(stream) == n * SEQ + 1
        assert _is_whole_documents_once(stream, _docs())


def _is_whole_documents_once(stream: np.ndarray, docs: list[np.ndarray]) -> bool:
    """Whether `stream` is a concatenation of whole `docs`, each at most once (the last cut short)."""
    by_start = {int(d[0]): d for d in docs}
    seen, pos = set(), 0
    while pos < len(stream):
        doc = by_start.get(int(stream[pos]))
        if doc is None or int(doc[0]) in seen:
            return False
        seen.add(int(doc[0]))
        chunk = stream[pos : pos + len(doc)]
        if not np.array_equal(chunk, doc[: len(chunk)]):
            return False
        pos += len(doc)
    return True


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("world", [2, 3])
def test_rank_sharding_matches_single_process(kind, world):
    make = MAKERS[kind]
    per_rank = 2 * _text().windows_per_epoch // world + 1  # crosses an epoch boundary
    single = _take(iter(make()), per_rank * world)
    for rank in range(world):
        mine = _take(iter(make(rank, world)), per_rank)
        assert _same(mine, single[rank::world])


@pytest.mark.parametrize("kind", MAKERS)
def test_determinism_and_seed(kind):
    make = MAKERS[kind]
    assert _same(_take(iter(make(seed=3)), 6), _take(iter(make(seed=3)), 6))
    assert not _same(_take(iter(make(seed=3)), 6), _take(iter(make(seed=4)), 6))


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
@pytest.mark.parametrize("consumed", [0, 3, 40])  # 40 crosses the text epoch (36)
def test_dataset_resume_is_exact(kind, rank, world, consumed):
    make = MAKERS[kind]
    reference = _take(iter(make(rank, world)), consumed + 6)[consumed:]
    ds = make(rank, world)
    it = iter(ds)
    _take(it, consumed)
    state = ds.state_dict()
    _take(it, 2)  # moving on must not change the saved state
    fresh = make(rank, world)
    fresh.load_state_dict(state)
    assert _same(_take(iter(fresh), 6), reference)


def test_state_counts_global_samples_and_is_the_same_on_every_rank():
    ranks = [_random(r, 2) for r in range(2)]
    for ds in ranks:
        _take(iter(ds), 3)
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"consumed_samples": 6, "dp_world_size": 2}


def test_state_resumes_at_another_dp_degree_with_the_next_global_samples():
    saved = _random(0, 2)
    _take(iter(saved), 3)  # dp 2: global samples 0..5 consumed
    single = _take(iter(_random(0, 1)), 12)
    for rank in range(3):
        resumed = _random(rank, 3)
        resumed.load_state_dict(saved.state_dict())
        assert _same(_take(iter(resumed), 2), [single[6 + rank], single[9 + rank]])
    with pytest.raises(ValueError, match="keep training.global_batch_size"):
        _random(0, 4).load_state_dict(saved.state_dict())  # 6 samples do not split over 4 ranks


def _loader(kind: str, workers: int, batch: int = 2) -> StatefulDataLoader:
    return StatefulDataLoader(MAKERS[kind](block=batch), batch_size=batch, num_workers=workers)


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stateful_dataloader_resume(kind, workers):
    reference = _take(iter(_loader(kind, 0)), 9)
    loader = _loader(kind, workers)
    it = iter(loader)
    assert _same(_take(it, 4), reference[:4])  # batches do not depend on the worker count
    state = loader.state_dict()
    fresh = _loader(kind, workers)
    fresh.load_state_dict(state)
    assert _same(_take(iter(fresh), 5), reference[4:])


# ---- loader --------------------------------------------------------------------------------


def _cfg(cache: str, dataset: str = "demo", **model) -> JobConfig:
    cfg = JobConfig()
    cfg.data.dataset, cfg.data.cache_folder = dataset, cache
    cfg.training.seq_len, cfg.training.local_batch_size = 16, 4
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_demo_loader_batches(demo_cache):
    loader, tok = loader_for(_cfg(demo_cache), 0, 1, vocab_size=2048)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == torch.int64
    assert int(batch["input_ids"].max()) < tok.vocab_size
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 64  # demo windows label every token
    assert tok.bos_id in batch["input_ids"] and tok.eos_id in batch["input_ids"]
    assert all(w in tok.decode(batch["input_ids"].flatten().tolist()) for w in ("the", "."))


def test_loader_batches_do_not_depend_on_workers(demo_cache):
    cfg = _cfg(demo_cache)
    reference = _take(iter(loader_for(cfg, 0, 1, 2048)[0]), 5)
    cfg.data.num_workers = 2
    assert _same(_take(iter(loader_for(cfg, 0, 1, 2048)[0]), 5), reference)


def test_loader_global_batch_is_independent_of_dp(demo_cache):
    cfg = _cfg(demo_cache)
    cfg.training.local_batch_size = 4
    single = next(iter(loader_for(cfg, 0, 1, 2048)[0]))["input_ids"]
    cfg.training.local_batch_size = 2
    parts = [next(iter(loader_for(cfg, r, 2, 2048)[0]))["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(parts)[[0, 2, 1, 3]], single)


def test_random_loader_needs_no_tokenizer_and_auto_without_a_folder_is_the_demo(tmp_path, demo_cache):
    loader, tok = loader_for(_cfg(str(tmp_path), "random"), 0, 1, vocab_size=50)
    batch = next(iter(loader))
    assert tok is None and int(batch["input_ids"].max()) < 50
    assert not os.listdir(tmp_path)  # random data needs no demo assets
    loader, tok = loader_for(_cfg(demo_cache, "auto"), 0, 1, vocab_size=2048)
    assert tok is not None and tok.vocab_size == 512  # the demo corpus, with its own tokenizer


def test_loader_errors(demo_cache, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.*512 tokens.*vocab_size is 100"):
        loader_for(_cfg(demo_cache), 0, 1, vocab_size=100)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*model.tokenizer_path"):
        loader_for(_cfg(demo_cache, tokenizer_path=missing), 0, 1, vocab_size=2048)
    with pytest.raises(ValueError, match="needs data.train_folder"):
        loader_for(_cfg(demo_cache, "bin"), 0, 1, vocab_size=2048)
    cfg = _cfg(demo_cache, "auto")
    cfg.data.train_folder = str(tmp_path)  # auto + a folder means bin; this one holds no data
    with pytest.raises(ValueError, match="no .bin files"):
        loader_for(cfg, 0, 1, vocab_size=2048)
    with pytest.raises(ValueError, match="data.dataset must be one of"):
        load_config(["--data.dataset", "wiki"])


def _bin_cfg(tmp_path, lengths: list[int]) -> JobConfig:
    """A bin run whose train and valid folders hold one document per length."""
    cfg = _cfg(str(tmp_path), "bin")
    for split in ("train", "valid"):
        with BinWriter(str(tmp_path / split / "en" / "d.bin")) as writer:
            for n in lengths:
                writer.write(list(range(1, n + 1)))
    cfg.data.train_folder, cfg.data.valid_folder = str(tmp_path / "train"), str(tmp_path / "valid")
    return cfg


def test_valid_folder_errors_name_data_valid_folder(tmp_path):
    cfg = _bin_cfg(tmp_path, [20, 30])
    assert len(valid_loader_for(cfg, 0, 1, 64)) == 1
    cfg.data.valid_folder = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"nope does not exist or is not a folder; check data\.valid_folder$"):
        valid_loader_for(cfg, 0, 1, 64)
    cfg.data.valid_folder, cfg.data.min_length = str(tmp_path / "valid"), 31  # drops both documents
    with pytest.raises(
        ValueError,
        match=r"data\.valid_folder = .*valid' holds no documents of at least "
        r"data\.min_length = 31 tokens",
    ):
        valid_loader_for(cfg, 0, 1, 64)


def _bin_folder(root: Path, docs: list[list[int]]) -> str:
    with BinWriter(str(root / "en" / "d.bin")) as writer:
        for tokens in docs:
            writer.write(tokens)
    return str(root)


NO_LABEL = {
    "every token a prompt token": [[-t for t in range(1 + 40 * d, 41 + 40 * d)] for d in range(20)],
    "one-token documents": [[7 + d] for d in range(300)],
}


@pytest.mark.parametrize("docs", NO_LABEL.values(), ids=NO_LABEL.keys())
def test_bin_data_with_no_token_to_predict_is_refused_at_start(tmp_path, docs):
    """Such data would train at loss 0.0 without a word."""
    cfg = _cfg(str(tmp_path), "bin")
    cfg.data.train_folder = _bin_folder(tmp_path / "train", docs)
    with pytest.raises(ValueError, match=r"^data\.train_folder = .*train' holds no token to predict .*loss 0"):
        loader_for(cfg, 0, 1, 2048)


@pytest.mark.parametrize("docs", NO_LABEL.values(), ids=NO_LABEL.keys())
def test_a_valid_folder_with_no_token_to_score_is_refused_naming_data_valid_folder(tmp_path, docs):
    """Validation would report nothing."""
    cfg = _bin_cfg(tmp_path, [20, 30])
    cfg.data.valid_folder = _bin_folder(tmp_path / "unscored", docs)
    with pytest.raises(ValueError, match=r"^data\.valid_folder = .*unscored' holds no token to predict"):
        valid_loader_for(cfg, 0, 1, 2048)


def test_negative_min_length_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^data\.min_length must be >= 0 \(0 = keep every document\), got -1"):
        load_config(["--data.min_length", "-1"])
