"""Document-masked attention: a packed row computes exactly what each document computes alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titanlm.models import ModelArgs, Transformer
from titanlm.models.attention import (
    BACKENDS,
    FlexBackend,
    SDPABackend,
    VarlenBackend,
    build_attention_backend,
    cu_seqlens_from_document_ids,
)

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, rope_theta=10000.0)
DOC_LENGTHS = [5, 9, 1, 7]  # one row of 22 tokens


def packed_row(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(0, ARGS.vocab_size, (n,), generator=generator) for n in lengths]
    tokens = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return tokens, positions, document_ids, documents


def model_with(backend) -> Transformer:
    model = Transformer(ARGS, backend)
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("backend", [SDPABackend(), FlexBackend()], ids=["sdpa", "flex"])
def test_packed_row_logits_and_loss_equal_each_document_alone(backend) -> None:
    model = model_with(backend)
    tokens, positions, document_ids, documents = packed_row(DOC_LENGTHS)
    with torch.no_grad():
        packed = model(tokens, positions, document_ids)[0]
        alone = torch.cat([model(doc[None])[0] for doc in documents])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    labels = torch.cat([torch.cat([doc[1:], torch.tensor([-100])]) for doc in documents])
    torch.testing.assert_close(F.cross_entropy(packed, labels), F.cross_entropy(alone, labels), rtol=1e-6, atol=0)


def test_without_boundaries_documents_do_see_each_other() -> None:
    model = model_with(SDPABackend())
    tokens, positions, document_ids, documents = packed_row(DOC_LENGTHS)
    with torch.no_grad():
        unmasked = model(tokens, positions)[0]
        alone = torch.cat([model(doc[None])[0] for doc in documents])
    assert (unmasked[5:] - alone[5:]).abs().max() > 1e-3  # the oracle test above can fail


def test_gradients_of_one_document_ignore_the_others() -> None:
    model = model_with(SDPABackend())
    tokens, positions, document_ids, _ = packed_row(DOC_LENGTHS)
    embeddings = model.tok_embeddings(tokens).detach().requires_grad_(True)
    model.tok_embeddings.forward = lambda _: embeddings  # differentiate w.r.t. the inputs
    model(tokens, positions, document_ids)[0, 5:14].sum().backward()  # the second document only
    per_token = embeddings.grad[0].abs().sum(-1)
    assert torch.all(per_token[:5] == 0) and torch.all(per_token[14:] == 0)
    assert torch.all(per_token[5:14] > 0)


def test_sdpa_and_flex_agree_on_a_batch_with_different_boundaries_per_row() -> None:
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    sdpa, flex = SDPABackend(), FlexBackend()
    torch.testing.assert_close(
        flex(q, k, v, flex.prepare(document_ids)), sdpa(q, k, v, sdpa.prepare(document_ids)), rtol=0, atol=1e-5
    )


def test_cu_seqlens_split_documents_and_rows() -> None:
    batch = cu_seqlens_from_document_ids(torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [3, 4, 4, 4, 4]]))
    assert batch.cu_seqlens_q.tolist() == [0, 2, 5, 10, 11, 15] and batch.max_seqlen_q == 5
    assert batch.cu_seqlens_k.tolist() == batch.cu_seqlens_q.tolist() and batch.key_rows is None  # keys as queries


def test_every_configurable_backend_name_builds_its_backend() -> None:
    from dataclasses import fields

    from titanlm.config.job_config import Model

    choices = next(f for f in fields(Model) if f.name == "attention_backend").metadata["choices"]
    assert set(choices) == {"auto", *BACKENDS}  # the plan resolves auto; the config loader refuses others
    assert isinstance(build_attention_backend("sdpa"), SDPABackend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen kernels (flash-attn, torch varlen_attn) need CUDA")
def test_varlen_equals_sdpa_reference_on_cuda() -> None:
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2, device="cuda")
    q = torch.randn(2, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    varlen, sdpa = VarlenBackend(), SDPABackend()
    torch.testing.assert_close(
        varlen(q, k, v, varlen.prepare(document_ids)), sdpa(q, k, v, sdpa.prepare(document_ids)), rtol=2e-2, atol=2e-2
    )


def test_varlen_without_cuda_says_what_to_use_instead() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="needs CUDA"):
        VarlenBackend()
