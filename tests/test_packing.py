"""Tests of packing, mixing and the bin/meta loaders: titanlm.data.packing, .mixing and .loader.

Every document token has a globally unique value (1, 2, 3, ... in document order), so a packed
row tells exactly which document and position each token came from: the oracle for labels,
positions, document ids and "each token once per epoch".
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from loaders import loader_for, valid_loader_for
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.config import ConfigError, load_config
from titanlm.config.job_config import JobConfig
from titanlm.data import (
    IGNORE_INDEX,
    PackedDataset,
    pack,
    parse_dataset_weights,
)
from titanlm.data.binmeta import BinWriter
from titanlm.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


SEQ = 16
VOCAB = 1 << 20


class MemoryDocuments:
    """In-memory documents with the interface packing reads (BinMetaFolder's)."""

    def __init__(self, docs: list[np.ndarray], type_ids: list[int], types: list[str]):
        self.docs, self.types = docs, types
        self._type_ids = np.asarray(type_ids, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(d) for d in self.docs], dtype=np.int64)

    def type_ids(self) -> np.ndarray:
        return self._type_ids

    def read(self, index: int) -> np.ndarray:
        return self.docs[index]


def make_docs(n: int, seed: int = 0, max_len: int = 3 * SEQ, first_value: int = 1) -> list[np.ndarray]:
    """Documents of 1..max_len tokens with unique values; every third starts with a prompt
    (negative ids) and every fifth alternates prompt and response tokens."""
    rng = np.random.default_rng(seed)
    docs, value = [], first_value
    for d in range(n):
        length = int(rng.integers(1, max_len + 1))
        tokens = np.arange(value, value + length, dtype=np.int64)
        value += length
        if d % 3 == 0:
            tokens[: length // 2] *= -1
        if d % 5 == 0:
            tokens[::2] = -np.abs(tokens[::2])
        docs.append(tokens)
    return docs


class Oracle:
    """Where each unique token value came from: document, position and sign."""

    def __init__(self, docs: list[np.ndarray]):
        values = np.concatenate(docs)
        size = int(np.abs(values).max()) + 1
        self.doc = np.full(size, -1)
        self.pos = np.full(size, -1)
        self.sign = np.zeros(size, dtype=np.int64)
        for d, tokens in enumerate(docs):
            self.doc[np.abs(tokens)] = d
            self.pos[np.abs(tokens)] = np.arange(len(tokens))
            self.sign[np.abs(tokens)] = np.sign(tokens)
        self.all_values = np.sort(np.abs(values))

    def check_row(self, sample: dict[str, torch.Tensor], into_one: bool = False) -> None:
        """Every convention of the packed sample contract, position by position."""
        x, y = sample["input_ids"].numpy(), sample["labels"].numpy()
        pos, ids, types = (sample[k].numpy() for k in ("position_ids", "document_ids", "type_ids"))
        assert all(sample[k].dtype == torch.int64 and sample[k].shape == (SEQ,) for k in sample)
        used = int(np.count_nonzero(x))
        assert (x[:used] > 0).all() and (x[used:] == 0).all(), "padding only at the end"
        doc, p = self.doc[x[:used]], self.pos[x[:used]]
        # A segment continues where the next token is the next one of the same document.
        continues = (doc[1:] == doc[:-1]) & (p[1:] == p[:-1] + 1)
        expected = np.full(SEQ, IGNORE_INDEX)
        ok = continues & (self.sign[x[1:used]] > 0)  # only response targets are predicted
        expected[: used - 1][ok] = x[1:used][ok]
        np.testing.assert_array_equal(y, expected)
        if into_one:
            np.testing.assert_array_equal(pos, np.arange(SEQ))
            assert (ids == 0).all()
            return
        np.testing.assert_array_equal(pos[:used], p % SEQ)  # a chunk of a long document restarts too
        np.testing.assert_array_equal(ids[:used], np.concatenate(([0], np.cumsum(~continues)))[:used])
        np.testing.assert_array_equal(pos[used:], np.arange(SEQ - used))
        assert (ids[used:] == (ids[used - 1] + 1 if used else 0)).all()
        assert (types[used:] == -1).all()


def memory_dataset(
    docs, types=None, type_names=("a",), seed=0, rank=0, world=1, block=1, into_one=False, weights=None
) -> PackedDataset:
    documents = MemoryDocuments(docs, types if types is not None else [0] * len(docs), list(type_names))
    return PackedDataset(
        documents, SEQ, seed, rank, world, worker_block=block, pack_sample_into_one=into_one, weights=weights
    )


def epoch_rows(ds: PackedDataset, epoch: int) -> list[dict[str, torch.Tensor]]:
    start = sum(ds.epoch_plan(e).num_rows for e in range(epoch))
    return [ds.sample(start + r) for r in range(ds.epoch_plan(epoch).num_rows)]


# ---- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("into_one", [False, True])
def test_every_row_follows_the_sample_contract(into_one):
    docs = make_docs(120)
    oracle, ds = Oracle(docs), memory_dataset(docs, into_one=into_one)
    for epoch in (0, 1):
        for row in epoch_rows(ds, epoch):
            oracle.check_row(row, into_one)


def test_each_token_exactly_once_per_epoch_and_reshuffled():
    docs = make_docs(150)
    oracle, ds = Oracle(docs), memory_dataset(docs)
    epochs = []
    for epoch in (0, 1, 2):
        inputs = torch.stack([r["input_ids"] for r in epoch_rows(ds, epoch)]).numpy()
        np.testing.assert_array_equal(np.sort(inputs[inputs > 0]), oracle.all_values)
        epochs.append(inputs)
    assert not np.array_equal(epochs[0][: len(epochs[1])], epochs[1][: len(epochs[0])])


def test_rows_are_filled_greedily():
    """Next fit: a row is closed only when the next chunk does not fit its free space."""
    docs = make_docs(150)
    rows = epoch_rows(memory_dataset(docs), 0)
    for row, following in zip(rows, rows[1:]):
        free = int((row["type_ids"] == -1).sum())
        first_chunk = int((following["document_ids"] == 0).sum())
        assert first_chunk > free


def test_long_document_is_cut_into_seq_len_chunks():
    long = np.arange(1, 2 * SEQ + 6)  # 2.3 rows
    plan = pack(np.arange(1), np.array([len(long)]), SEQ)
    assert plan.length.tolist() == [SEQ, SEQ, 5] and plan.start.tolist() == [0, SEQ, 2 * SEQ]
    assert plan.num_rows == 3
    rows = [memory_dataset([long]).sample(i) for i in range(3)]
    assert [r["position_ids"][:5].tolist() for r in rows] == [[0, 1, 2, 3, 4]] * 3
    assert all(r["labels"][SEQ - 1] == IGNORE_INDEX for r in rows[:2])  # no label across chunks
    assert rows[2]["labels"][:4].tolist() == list(range(2 * SEQ + 2, 2 * SEQ + 6))


def test_prompt_tokens_are_inputs_but_never_targets():
    doc = np.array([-5, -6, 7, 8, -9, 10])
    row = memory_dataset([doc]).sample(0)
    assert row["input_ids"][:6].tolist() == [5, 6, 7, 8, 9, 10]
    assert row["labels"][:6].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX]


def test_packing_is_deterministic_per_seed():
    docs = make_docs(60)

    def first(seed: int) -> torch.Tensor:
        ds = memory_dataset(docs, seed=seed)
        return torch.stack([ds.sample(i)["input_ids"] for i in range(10)])

    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))


def test_pack_plans_a_million_documents_quickly():
    lengths = np.random.default_rng(0).integers(1, 3000, size=1_000_000)
    start = time.perf_counter()
    plan = pack(np.random.default_rng(1).permutation(len(lengths)), lengths, 4096)
    assert time.perf_counter() - start < 3
    assert plan.length.sum() == lengths.sum() and (np.diff(plan.row_start) > 0).all()
    used = np.add.reduceat(plan.length, plan.row_start[:-1])
    assert used.max() <= 4096


# ---- mixing --------------------------------------------------------------------------------


def mixed_corpus() -> tuple[list[np.ndarray], list[int]]:
    """Three types with different sizes and document lengths: natural shares far from the weights."""
    docs, types, value = [], [], 1
    for t, (n, max_len) in enumerate([(3000, 10), (300, 60), (600, 30)]):
        part = make_docs(n, seed=t, max_len=max_len, first_value=value)
        value = int(np.abs(part[-1]).max()) + 1
        docs += part
        types += [t] * n
    return docs, types


def test_mixing_follows_the_token_weights():
    docs, types = mixed_corpus()
    names = ["code", "en", "zh"]
    weights = parse_dataset_weights(["en:0.5", " code:0.3", "zh:0.2"], names)
    np.testing.assert_allclose(weights, [0.3, 0.5, 0.2])
    ds = memory_dataset(docs, types, names, weights=weights)
    rows = ds.epoch_plan(0).num_rows
    for start, stop in [(0, rows), (rows, 3 * rows)]:  # each epoch, and across an epoch boundary
        shares = ds.type_token_shares(start, stop)
        assert list(shares) == names
        np.testing.assert_allclose(list(shares.values()), weights, atol=0.02)
    # An epoch holds about one pass's worth of tokens.
    assert abs(rows * SEQ / sum(len(d) for d in docs) - 1) < 0.3
    # The shares agree with the per-token type ids of the samples themselves.
    type_ids = torch.cat([ds.sample(i)["type_ids"] for i in range(50)])
    counted = torch.bincount(type_ids[type_ids >= 0], minlength=3).double()
    np.testing.assert_allclose(list(ds.type_token_shares(0, 50).values()), counted / counted.sum())


def test_natural_proportions_and_left_out_types():
    docs, types = mixed_corpus()
    names = ["code", "en", "zh"]
    natural = np.bincount(types, weights=[len(d) for d in docs])
    ds = memory_dataset(docs, types, names)
    shares = ds.type_token_shares(0, ds.epoch_plan(0).num_rows)
    np.testing.assert_allclose(list(shares.values()), natural / natural.sum())
    only_en = memory_dataset(docs, types, names, weights=parse_dataset_weights(["en:1"], names))
    assert only_en.type_token_shares(0, 40) == {"code": 0.0, "en": 1.0, "zh": 0.0}


@pytest.mark.parametrize(
    "items,message",
    [
        (["en=0.5"], "item 'en=0.5' is not TYPE:WEIGHT"),
        (["fr:0.5"], "types are code, en"),
        (["en:x"], "not a number"),
        (["en:-1"], ">= 0"),
        (["en:0", "code:0"], "no type a positive weight"),
    ],
)
def test_dataset_weights_errors(items, message):
    with pytest.raises(ConfigError, match=f"data.dataset_weights .*{message}"):
        parse_dataset_weights(items, ["code", "en"])
    assert parse_dataset_weights([], ["code", "en"]) is None


def test_dataset_weights_from_a_toml_list_or_a_comma_string_weigh_alike(tmp_path):
    listed = tmp_path / "list.toml"
    listed.write_text('[data]\ndataset_weights = ["en:0.7", "code:0.3"]\n')
    comma = tmp_path / "comma.toml"
    comma.write_text('[data]\ndataset_weights = "en:0.7, code:0.3"\n')
    configs = [
        load_config(["--job.config_file", str(listed)]),
        load_config(["--job.config_file", str(comma)]),
        load_config(["--data.dataset_weights", "en:0.7,code:0.3"]),
    ]
    for cfg in configs:
        np.testing.assert_allclose(parse_dataset_weights(cfg.data.dataset_weights, ["code", "en"]), [0.3, 0.7])
    malformed = load_config(["--data.dataset_weights", "en:0.7,code=0.3"]).data.dataset_weights
    with pytest.raises(ConfigError, match="data.dataset_weights item 'code=0.3' is not TYPE:WEIGHT"):
        parse_dataset_weights(malformed, ["code", "en"])


# ---- bin folders and the loaders -----------------------------------------------------------


def write_folder(root: str, docs: list[np.ndarray], types: list[int], names: list[str]) -> None:
    """Type t's documents, in order, split over two files (nested, with int32 and int64 metas)."""
    for t, name in enumerate(names):
        mine = [d for d, ty in zip(docs, types) if ty == t]
        half = len(mine) // 2
        files = [(f"{name}/a.bin", mine[:half], "int32"), (f"{name}/x/b.bin", mine[half:], "int64")]
        for path, part, dtype in files:
            with BinWriter(os.path.join(root, path), meta_dtype=dtype) as writer:
                for tokens in part:
                    writer.write(tokens.tolist())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[np.ndarray]]:
    root = str(tmp_path_factory.mktemp("bin"))
    docs = make_docs(200)
    types = [d % 2 for d in range(len(docs))]
    write_folder(root, docs, types, ["code", "en"])
    return root, docs


def bin_cfg(folder: str, batch: int = 2, workers: int = 0, **data) -> JobConfig:
    cfg = JobConfig()
    cfg.data.dataset, cfg.data.train_folder, cfg.data.num_workers = "bin", folder, workers
    cfg.training.seq_len, cfg.training.local_batch_size = SEQ, batch
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def take(loader: StatefulDataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_bin_loader_batches(corpus):
    root, docs = corpus
    loader, tokenizer = loader_for(bin_cfg(root, batch=4), 0, 1, VOCAB)
    assert tokenizer is None and loader.dataset.types == ["code", "en"]
    oracle = Oracle(docs)
    for batch in take(loader, 5):
        assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids", "type_ids"}
        assert all(v.shape == (4, SEQ) and v.dtype == torch.int64 for v in batch.values())
        for i in range(4):
            row = {k: v[i] for k, v in batch.items()}
            oracle.check_row(row)
            used = row["type_ids"] >= 0
            expected = [d % 2 for d in oracle.doc[row["input_ids"][used].numpy()]]
            assert row["type_ids"][used].tolist() == expected  # the type of each token's document


def test_bin_loader_min_length_and_weights(corpus):
    root, docs = corpus
    loader, _ = loader_for(bin_cfg(root, batch=8, min_length=20, dataset_weights=["en:1"]), 0, 1, VOCAB)
    tokens = torch.cat([b["input_ids"] for b in take(loader, 5)])
    oracle = Oracle(docs)
    kept = {d for d in oracle.doc[tokens[tokens > 0].numpy()]}
    assert kept and all(len(docs[d]) >= 20 and d % 2 == 1 for d in kept)


def test_bin_loader_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="needs data.train_folder"):
        loader_for(bin_cfg(""), 0, 1, VOCAB)
    with pytest.raises(ValueError, match="no .bin files"):
        loader_for(bin_cfg(str(tmp_path)), 0, 1, VOCAB)
    with pytest.raises(ValueError, match="data.dataset_weights names type 'fr'"):
        loader_for(bin_cfg(corpus[0], dataset_weights=["fr:1"]), 0, 1, VOCAB)
    with pytest.raises(ValueError, match="vocab_size 10"):
        next(iter(loader_for(bin_cfg(corpus[0]), 0, 1, 10)[0]))
    with pytest.raises(ValueError, match="data.min_length"):
        loader_for(bin_cfg(corpus[0], min_length=10**6), 0, 1, VOCAB)


def test_bin_batches_do_not_depend_on_workers(corpus):
    reference = take(loader_for(bin_cfg(corpus[0]), 0, 1, VOCAB)[0], 6)
    with_workers = take(loader_for(bin_cfg(corpus[0], workers=2), 0, 1, VOCAB)[0], 6)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, with_workers) for k in a)


GLOBAL_BATCH = 4


def dp_loaders(root: str, world: int, workers: int) -> list[StatefulDataLoader]:
    cfg = bin_cfg(root, batch=GLOBAL_BATCH // world, workers=workers)
    return [loader_for(cfg, rank, world, VOCAB)[0] for rank in range(world)]


def global_steps(loaders: list[StatefulDataLoader], steps: int) -> list[set[tuple[int, ...]]]:
    """Per global step, the set of rows (as token tuples) all ranks received."""
    per_rank = [take(loader, steps) for loader in loaders]
    return [
        {tuple(row.tolist()) for batches in per_rank for row in batches[step]["input_ids"]} for step in range(steps)
    ]


def dataset_states(state: dict) -> list:
    """The dataset states inside a StatefulDataLoader state (one per worker, or the main one)."""
    found = []
    for key, value in state.items():
        if key == "dataset_state":
            found.append(value)
        elif isinstance(value, dict):
            found += dataset_states(value)
    return found


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # worker processes start slowly
@pytest.mark.parametrize("old,new", [(2, 2), (1, 2), (2, 4), (4, 2)])
def test_resume_at_another_dp_degree_continues_the_global_stream(corpus, old, new, workers):
    root, before, after = corpus[0], 5, 4
    saving = dp_loaders(root, old, workers)
    steps = global_steps(saving, before)
    states = [loader.state_dict() for loader in saving]
    # The datasets' states are global (the loaders' differ only in a random worker seed base).
    assert all(dataset_states(s) == dataset_states(states[0]) for s in states), "rank 0's state is enough"
    reference = global_steps(dp_loaders(root, new, workers), before + after)
    assert steps == reference[:before]  # global batches do not depend on the DP degree
    resumed = dp_loaders(root, new, workers)
    for loader in resumed:
        loader.load_state_dict(states[0])
    assert global_steps(resumed, after) == reference[before:]


def test_resume_refuses_a_position_the_new_degree_cannot_split(corpus):
    cfg = bin_cfg(corpus[0], batch=1)
    one = loader_for(cfg, 0, 1, VOCAB)[0]
    take(one, 1)
    state = one.state_dict()  # 1 sample consumed
    four = loader_for(cfg, 0, 4, VOCAB)[0]
    with pytest.raises(ValueError, match="consumed 1 samples, not a multiple of 4"):
        four.load_state_dict(state)
        next(iter(four))


@pytest.mark.slow  # a dataloader worker process
def test_an_error_a_dataloader_worker_meets_is_the_one_line_the_main_process_would_raise(corpus):
    """torch re-raises a worker's exception with the worker's traceback in its message; the loader keeps
    the error's type and its own line."""
    messages = []
    for workers in (0, 1):
        cfg = bin_cfg(corpus[0], batch=1, workers=workers)
        one = loader_for(cfg, 0, 1, VOCAB)[0]
        take(one, 1)
        four = loader_for(cfg, 0, 4, VOCAB)[0]
        four.load_state_dict(one.state_dict())  # 1 sample consumed: not a multiple of 4
        with pytest.raises(CheckpointError) as info:
            next(iter(four))
        messages.append(str(info.value))
    assert messages[1] == messages[0] and "consumed 1 samples, not a multiple of 4" in messages[0]


def test_valid_loader_covers_every_document_once(corpus, tmp_path):
    root, docs = corpus
    valid = str(tmp_path / "valid")
    write_folder(valid, docs[:37], [0] * 37, ["en"])
    oracle = Oracle(docs[:37])
    for world in (1, 2, 3):
        cfg = bin_cfg(root, batch=2, valid_folder=valid)
        loaders = [valid_loader_for(cfg, rank, world, VOCAB) for rank in range(world)]
        batches = [list(loader) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # the same number of batches on every rank
        rows = [row for rank in batches for batch in rank for row in batch["input_ids"]]
        tokens = torch.stack(rows).numpy()
        np.testing.assert_array_equal(np.sort(tokens[tokens > 0]), oracle.all_values)
        for rank in batches:
            for batch in rank:
                assert batch["input_ids"].shape == (2, SEQ)
                for i in range(2):
                    oracle.check_row({k: v[i] for k, v in batch.items()})
        assert loaders[0].dataset.types == ["en"]
    # In stored order: the first row starts with the first document.
    first = next(iter(valid_loader_for(bin_cfg(root, valid_folder=valid), 0, 1, VOCAB)))
    assert first["input_ids"][0, 0] == abs(docs[0][0])
    assert valid_loader_for(bin_cfg(root), 0, 1, VOCAB) is None
