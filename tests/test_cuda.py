"""What only a CUDA GPU can show: the fast attention kernels, bf16 training, compile and real float8.

Skipped with a reason on machines without CUDA (CI); run them on a GPU with `python -m pytest -m cuda`.
Each compares against a reference computed in the same test: SDPA with an explicit mask for the
attention kernels, eager for compile, bf16 for float8.
"""

from __future__ import annotations

import pytest
import torch
from cp_shares import packed_documents, share_attention
from trainer_runs import run_in_process

from titanlm.models import ModelArgs, Transformer
from titanlm.models.attention import FlexBackend, SDPABackend, VarlenBackend, build_attention_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m cuda on one)"),
]

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, vocab_size=512, rope_theta=10000.0)
BF16_ARGS = [
    "--training.mixed_precision_param",
    "bfloat16",
    "--training.seq_len",
    "256",
    "--training.local_batch_size",
    "4",
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def packed_batch(lengths_per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    seq = sum(lengths_per_row[0])
    tokens = torch.randint(0, ARGS.vocab_size, (len(lengths_per_row), seq), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    documents = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths_per_row])
    return tokens.cuda(), positions.cuda(), documents.cuda()


def logits_and_grads(backend, tokens, positions, documents) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = Transformer(ARGS, backend)
    model.init_weights(seed=0)
    model = model.cuda().to(torch.bfloat16)
    logits = model(tokens, positions, documents)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_fast_attention_kernels_match_the_masked_sdpa_reference_forward_and_backward(backend: str) -> None:
    batch = packed_batch([[100, 37, 1, 118], [256]])  # documents of odd lengths, and a row of one
    expected_logits, expected_grads = logits_and_grads(SDPABackend(), *batch)
    kernel = FlexBackend() if backend == "flex" else VarlenBackend()
    logits, grads = logits_and_grads(kernel, *batch)
    assert relative_error(logits, expected_logits) < 1e-2
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 3e-2, name


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_context_parallel_share_of_a_32k_packed_row_matches_masked_sdpa(backend: str, cp: int) -> None:
    """Each rank's share of one 32K row packed with documents of up to 4K tokens: its queries against
    the gathered keys, forward and backward, as the masked SDPA reference computes it (the all-gathers
    emulated in one process: the real ones are tested on CPU under torchrun)."""
    seq, generator = 32768, torch.Generator().manual_seed(0)
    documents = packed_documents(1, seq, mean_length=2048, generator=generator).cuda()
    q = torch.randn(1, 4, seq, 128, generator=generator).cuda().bfloat16()
    k, v = (torch.randn(1, 2, seq, 128, generator=generator).cuda().bfloat16() for _ in range(2))
    kernel = FlexBackend() if backend == "flex" else VarlenBackend()
    for rank in range(cp):
        results = []
        for attention in (kernel, SDPABackend()):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = share_attention(attention, leaves, documents, rank, cp)
            out.float().square().mean().backward()
            results.append([out.detach(), *(t.grad for t in leaves)])
        for got, expected in zip(*results):
            assert relative_error(got, expected) < 2e-2, (backend, cp, rank)


def test_auto_backend_on_cuda_is_a_document_aware_kernel() -> None:
    from titanlm.config import load_config
    from titanlm.plan import resolve

    backend = resolve(load_config(["--model.flavor", "debug"]), 1, "cuda").attention_backend
    assert isinstance(build_attention_backend(backend), (VarlenBackend, FlexBackend))


@pytest.mark.slow
def test_bf16_training_learns_and_reports_mfu_and_memory(tmp_path) -> None:
    records = run_in_process(
        tmp_path, [*BF16_ARGS, "--data.dataset", "demo", "--training.steps", "30", "--lr_scheduler.warmup_steps", "5"]
    )
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in records), "H100/H200 peaks are in the table"
    assert records[-1]["memory_gib"] > 0


@pytest.mark.slow
def test_compiled_training_matches_eager_on_cuda(tmp_path) -> None:
    steps = ["--training.steps", "3", "--data.dataset", "demo"]
    eager = run_in_process(tmp_path / "eager", [*BF16_ARGS, *steps])
    compiled = run_in_process(tmp_path / "compiled", [*BF16_ARGS, *steps, "--compile.enable"])
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2)


@pytest.mark.slow
def test_float8_training_on_hopper_tracks_bf16(tmp_path) -> None:
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    steps = ["--training.steps", "20", "--data.dataset", "demo", "--lr_scheduler.warmup_steps", "5"]
    bf16 = run_in_process(tmp_path / "bf16", [*BF16_ARGS, *steps])
    float8 = run_in_process(tmp_path / "float8", [*BF16_ARGS, *steps, "--float8.enable"])
    for a, b in zip(bf16, float8, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, float8)), "float8 really ran"
