"""Context parallelism (and pipeline stages on packed documents) train exactly like one process.

Unit tests pin the head+tail chunking and the attention mask against brute force. The torchrun
scenarios (one launch per world size, gloo, fp32) compare loss and grad norm per step with one
process that sees the same global batch of 8 rows, on random tokens (plain causal attention) and
on packed bin data (document masks, labels cut at document ends).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from binmeta_files import write_internevo
from cp_shares import packed_documents, reference_varlen_kernel, share_attention, whole_row_reference
from trainer_runs import assert_records_close, read_metrics, run_in_process, run_torchrun

from titanlm.models.attention import FlexBackend, SDPABackend, VarlenBackend, document_causal_mask
from titanlm.parallel.context_parallel import (
    cp_token_indices,
    shard_batch_for_cp,
)
from titanlm.plan import schedule_available

CP2 = ["--parallelism.context_parallel_degree", "2"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
DP1_ON_2 = ["--training.local_batch_size", "8"]  # cp 2 on 2 ranks (or cp 2 x tp 2 on 4): dp 1
DP2 = ["--training.local_batch_size", "4"]


def test_each_rank_keeps_a_head_chunk_and_its_mirror_tail_chunk() -> None:
    assert cp_token_indices(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_token_indices(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (1, 2, 4):
        shares = torch.cat([cp_token_indices(32, rank, cp) for rank in range(cp)])
        assert sorted(shares.tolist()) == list(range(32))


def test_shard_keeps_every_token_with_its_global_position_and_one_document_per_row() -> None:
    row = torch.arange(16)
    batch = {"input_ids": torch.stack([row * 10, row * 10 + 1]), "labels": torch.stack([row, row])}
    shard = shard_batch_for_cp(batch, cp_rank=1, cp_size=2)
    kept = list(range(4, 12))
    assert shard["position_ids"].tolist() == [kept, kept]
    assert shard["document_ids"].tolist() == [[0] * 8, [0] * 8]  # the kernels' inputs come from these
    assert shard["input_ids"].tolist() == [[10 * t for t in kept], [10 * t + 1 for t in kept]]
    assert shard["labels"].tolist() == [kept, kept]


def test_shard_cuts_packed_positions_and_document_ids_alike() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    batch = {"input_ids": torch.arange(8)[None], "position_ids": positions, "document_ids": documents}
    shard = shard_batch_for_cp(batch, cp_rank=0, cp_size=2)  # chunks 0 and 3: tokens 0, 1, 6, 7
    assert shard["position_ids"].tolist() == [[0, 1, 1, 2]]
    assert shard["document_ids"].tolist() == [[0, 0, 2, 2]]


@pytest.mark.parametrize("with_documents", [False, True])
def test_mask_is_the_single_process_mask_restricted_to_local_queries(with_documents) -> None:
    seq, cp = 24, 3
    documents = torch.randint(0, 3, (2, seq), generator=torch.Generator().manual_seed(0)).sort(dim=1).values
    keys = torch.cat([cp_token_indices(seq, rank, cp) for rank in range(cp)])  # gathered, rank-major
    full = SDPABackend().prepare(documents if with_documents else torch.zeros_like(documents))
    for rank in range(cp):
        queries = cp_token_indices(seq, rank, cp)
        docs = (documents[:, queries], documents[:, keys]) if with_documents else ()
        mask = document_causal_mask(queries, keys, *docs)
        brute = [[[bool(full[b, 0, q, k]) for k in keys] for q in queries] for b in range(2)]
        assert mask.expand(2, 1, -1, -1)[:, 0].tolist() == brute


CP_BACKENDS = {"flex": FlexBackend, "varlen": lambda: VarlenBackend(reference_varlen_kernel), "sdpa": SDPABackend}
ROW_KINDS = ("causal", "random_documents", "packed_documents")


def cp_case(kind: str, rows: int, seq: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Document ids (None for plain causal rows) and q, k, v [rows, heads, seq, dim] of one case."""
    generator = torch.Generator().manual_seed(seq)
    documents = {
        "causal": None,
        # Runs of random lengths, single tokens included, as the loader numbers them: ids rise along a row.
        "random_documents": torch.randint(0, seq // 3, (rows, seq), generator=generator).sort(dim=1).values,
        "packed_documents": packed_documents(rows, seq, mean_length=seq // 5, generator=generator),
    }[kind]
    q = torch.randn(rows, 4, seq, 8, generator=generator)
    k, v = (torch.randn(rows, 2, seq, 8, generator=generator) for _ in range(2))  # grouped-query
    return documents, [q, k, v]


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("name", sorted(CP_BACKENDS))
def test_each_rank_share_equals_the_whole_row_attention_of_its_queries(name, cp, kind) -> None:
    documents, qkv = cp_case(kind, rows=2, seq=64)
    expected = whole_row_reference(qkv, documents)
    for rank in range(cp):
        with torch.no_grad():
            got = share_attention(CP_BACKENDS[name](), qkv, documents, rank, cp)
        torch.testing.assert_close(got, expected[:, :, cp_token_indices(64, rank, cp)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_varlen_pieces_give_the_gradients_of_the_whole_row(kind) -> None:
    """Backward through the pieces' key selection: the ranks' shares together give q, k and v the
    gradients of whole-row attention (each rank's keys are the whole row, so k and v sum over ranks)."""
    cp = 2
    documents, qkv = cp_case(kind, rows=2, seq=48)
    weights = torch.randn(2, 4, 48, 8, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in qkv]
    (whole_row_reference(leaves, documents) * weights).sum().backward()
    expected = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in qkv]
    for rank in range(cp):
        out = share_attention(VarlenBackend(reference_varlen_kernel), leaves, documents, rank, cp)
        (out * weights[:, :, cp_token_indices(48, rank, cp)]).sum().backward()
    for got, want in zip((t.grad for t in leaves), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_varlen_pieces_cut_chunks_at_document_boundaries_and_see_their_document_prefix() -> None:
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3]])  # 16 tokens, cp 2: chunks of 4
    queries = cp_token_indices(16, 1, 2)  # tokens 4..11: document 1's 4..8, then document 2's 9..11
    keys = torch.cat([cp_token_indices(16, r, 2) for r in range(2)])
    pieces = VarlenBackend(reference_varlen_kernel).prepare_shard(
        queries, keys, documents[:, queries], documents[:, keys]
    )
    assert pieces.cu_seqlens_q.tolist() == [0, 5, 8]
    assert pieces.cu_seqlens_k.tolist() == [0, 6, 9]  # document 1 from token 3; document 2 from token 9
    assert (pieces.max_seqlen_q, pieces.max_seqlen_k) == (5, 6)
    rows, positions = pieces.key_rows
    assert keys[positions].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11] and rows.tolist() == [0] * 9


def test_flex_share_mask_skips_exactly_the_blocks_no_local_query_may_see() -> None:
    """Rank 0 of cp 2 on a 1024-token row: its head chunk (tokens 0..255) sees only chunk 0, its tail
    chunk (768..1023) everything before it. Of the [4 query x 8 key] blocks of 128, flex computes the 18
    that hold an allowed pair and skips the other 14."""
    seq, cp = 1024, 2
    queries = cp_token_indices(seq, 0, cp)
    keys = torch.cat([cp_token_indices(seq, r, cp) for r in range(cp)])
    one_document = torch.zeros(1, seq, dtype=torch.long)
    visited = FlexBackend().prepare_shard(queries, keys, one_document[:, queries], one_document).to_dense()[0, 0]
    allowed = document_causal_mask(queries, keys)[0, 0]
    any_allowed = allowed.view(4, 128, 8, 128).any(dim=3).any(dim=1)
    assert visited.bool().tolist() == any_allowed.tolist()
    assert visited.sum() == 3 + 15  # head: a causal 2 x 2 triangle; tail: 3 full chunks + its own triangle


@pytest.fixture(scope="module")
def bin_args(tmp_path_factory) -> list[str]:
    """A tiny InternEvo folder of short documents, so rows of 32 tokens pack several of them and
    document boundaries fall inside and across the cp chunks."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2048, size=int(n)).tolist() for n in rng.integers(3, 20, size=60)]
    root = tmp_path_factory.mktemp("bin")
    write_internevo(root / "en" / "data.bin", docs)
    # The same folder validates at step 5: validation parity under CP and PP comes with the training runs.
    return [
        "--data.dataset",
        "bin",
        "--data.train_folder",
        str(root),
        "--model.attention_backend",
        "sdpa",
        "--data.valid_folder",
        str(root),
        "--data.valid_every",
        "5",
    ]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, bin_args):
    """Single-process records with the whole global batch of 8 rows, per data source."""
    sources = {"random": [], "bin": bin_args}
    records = {}
    for name, args in sources.items():
        folder = tmp_path_factory.mktemp(f"single_{name}")
        run_in_process(folder, [*args, *DP1_ON_2])
        records[name] = read_metrics(folder)  # training and validation lines
    assert len(validation_lines(records["bin"])) == 1
    return records


def validation_lines(records: list[dict]) -> list[dict]:
    return [r for r in records if "valid_loss" in r]


def assert_matches_single_process(records: list[dict], expected: list[dict]) -> None:
    """Per-step loss and grad norm, and the validation loss, as in one process."""
    assert_records_close([r for r in records if "loss" in r], [r for r in expected if "loss" in r])
    valid, valid_expected = validation_lines(records), validation_lines(expected)
    assert [r["step"] for r in valid] == [r["step"] for r in valid_expected]
    for got, want in zip(valid, valid_expected):
        assert got["valid_loss"] == pytest.approx(want["valid_loss"], rel=1e-5)


# name -> (data source of the oracle, layout arguments)
PP2 = [
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--training.local_batch_size",
    "2",
    "--training.global_batch_size",
    "8",
]  # dp 1: 4 micro-batches of 2 rows
TWO_RANK_LAYOUTS = {
    "cp2": ("random", [*CP2, *DP1_ON_2]),
    "cp2_documents": ("bin", [*CP2, *DP1_ON_2]),
    "pp2_documents": ("bin", PP2),  # positions and document ids reach the later stage
    **(
        {"pp2_zbv_documents": ("bin", [*PP2, "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"])}
        if schedule_available("ZBVZeroBubble")
        else {}
    ),
}
FOUR_RANK_LAYOUTS = {
    "cp2_fsdp2": ("random", [*CP2, *DP2]),
    "cp2_hsdp2x1": ("random", [*CP2, *DP2, "--parallelism.data_parallel_replicate_degree", "2"]),
    "cp2_tp2": ("random", [*CP2, *TP2, *DP1_ON_2]),
    "cp4_documents": ("bin", ["--parallelism.context_parallel_degree", "4", *DP1_ON_2]),
    "pp2_cp2_documents": ("bin", [*CP2, *PP2]),  # EasyLLM's 32-GPU recipe combines pp and cp (with tp)
    "pp2_interleaved_tp2_documents": (
        "bin",
        [*PP2, *TP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"],
    ),  # four stages on two pp ranks
}


def launch(nproc: int, layouts: dict[str, tuple[str, list[str]]], folder, bin_args: list[str]) -> dict:
    scenarios = {name: [*(bin_args if source == "bin" else []), *extra] for name, (source, extra) in layouts.items()}
    return run_torchrun(nproc, scenarios, folder, timeout=240)


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory, bin_args) -> dict[str, list[dict]]:
    return launch(2, TWO_RANK_LAYOUTS, tmp_path_factory.mktemp("two"), bin_args)


@pytest.fixture(scope="module")
def four_rank_records(tmp_path_factory, bin_args) -> dict[str, list[dict]]:
    return launch(4, FOUR_RANK_LAYOUTS, tmp_path_factory.mktemp("four"), bin_args)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", sorted(TWO_RANK_LAYOUTS))
def test_two_rank_cp_layout_matches_single_process(layout, two_rank_records, oracle) -> None:
    assert_matches_single_process(two_rank_records[layout], oracle[TWO_RANK_LAYOUTS[layout][0]])


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", sorted(FOUR_RANK_LAYOUTS))
def test_four_rank_cp_layout_matches_single_process(layout, four_rank_records, oracle) -> None:
    assert_matches_single_process(four_rank_records[layout], oracle[FOUR_RANK_LAYOUTS[layout][0]])
