"""The one Transformer: sizes of the published models, and numerics equal to Hugging Face Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hf_models import hf_llama

from titanlm.models import FLAVORS, ModelArgs, Transformer, count_params, get_model_args
from titanlm.models.flops import matmul_params, training_flops
from titanlm.models.hf_adapter import from_hf_state_dict, to_hf_state_dict

# Published sizes (billions, 2 decimals) of the released checkpoints these flavors describe.
PUBLISHED_BILLIONS = {
    ("llama3", "8B"): 8.03,
    ("llama3", "70B"): 70.55,
    ("internlm", "7B"): 7.32,
    ("internlm", "13B"): 13.75,
    ("internlm2", "7B"): 7.74,
    ("internlm2", "20B"): 19.86,
}

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=300, rope_theta=500000.0)


@pytest.mark.parametrize(("name", "flavor"), sorted(PUBLISHED_BILLIONS))
def test_flavor_parameter_count_matches_published_model(name: str, flavor: str) -> None:
    with torch.device("meta"):
        model = Transformer(get_model_args(name, flavor))
    assert round(count_params(model) / 1e9, 2) == PUBLISHED_BILLIONS[(name, flavor)]


def test_every_family_has_a_debug_flavor_small_enough_for_cpu() -> None:
    for name, flavors in FLAVORS.items():
        with torch.device("meta"):
            model = Transformer(flavors["debug"])
        assert count_params(model) < 10_000_000, name


def test_unknown_flavor_error_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="model.flavor '9B'.*choose one of debug, 8B, 70B"):
        get_model_args("llama3", "9B")
    with pytest.raises(ValueError, match="model.name 'gpt'"):
        get_model_args("gpt", "debug")


def test_n_layers_cuts_depth_and_keeps_width() -> None:
    full = get_model_args("llama3", "8B")
    cut = get_model_args("llama3", "8B", n_layers=8)
    assert (cut.n_layers, cut.dim, cut.ffn_dim, cut.vocab_size) == (8, full.dim, full.ffn_dim, full.vocab_size)
    assert full.n_layers == 32, "the flavor table itself must not change"
    with pytest.raises(ValueError, match="model.n_layers must be 0"):
        get_model_args("llama3", "8B", n_layers=-2)


@pytest.mark.parametrize("family", ["llama3", "internlm", "internlm2"])
def test_forward_shapes_and_gqa_bias_variants(family: str) -> None:
    args = get_model_args(family, "debug")
    model = Transformer(args)
    model.init_weights(seed=0)
    logits = model(torch.randint(0, args.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, args.vocab_size)
    attention = model.layers["0"].attention
    assert attention.wk.weight.shape[0] == args.n_kv_heads * args.head_dim
    assert (attention.wq.bias is not None) == (family == "internlm")


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = Transformer(TINY)
    model.init_weights(seed=1)
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % TINY.vocab_size
    with torch.no_grad():
        assert torch.equal(model(tokens)[0, :8], model(changed)[0, :8])


def test_init_weights_depends_only_on_seed_and_name() -> None:
    first, second = Transformer(TINY), Transformer(TINY)
    first.init_weights(seed=3)
    second.init_weights(seed=3)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    second.init_weights(seed=4)
    assert not torch.equal(first.output.weight, second.output.weight)
    assert torch.all(first.norm.weight == 1)


@pytest.mark.parametrize(
    "args",
    [TINY, replace(TINY, n_kv_heads=4, attn_bias=True, rope_theta=10000.0)],
    ids=["llama3-gqa", "internlm-mha-bias"],
)
def test_logits_equal_transformers_llama_with_the_same_weights(args: ModelArgs) -> None:
    hf = hf_llama(args, seed=0)
    ours = Transformer(args)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    with torch.no_grad():
        expected, actual = hf(tokens).logits, ours(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_position_ids_shift_rope_like_transformers() -> None:
    hf = hf_llama(TINY, seed=1)
    ours = Transformer(TINY)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()))
    tokens = torch.randint(0, TINY.vocab_size, (1, 10))
    positions = torch.arange(5, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens, positions), hf(tokens, position_ids=positions).logits, rtol=0, atol=1e-5
        )


def test_hf_names_round_trip() -> None:
    state = Transformer(replace(TINY, attn_bias=True)).state_dict()
    assert from_hf_state_dict(to_hf_state_dict(state)).keys() == state.keys()


def test_training_flops_count_causal_pairs_per_document() -> None:
    one_doc = training_flops(TINY, [8])
    two_docs = training_flops(TINY, [4, 4])
    per_pair = 12 * TINY.n_layers * TINY.dim
    assert one_doc - two_docs == per_pair * (36 - 2 * 10)
    assert two_docs == 6 * matmul_params(TINY) * 8 + per_pair * 20


@pytest.mark.parametrize("chunk", [7, 1000])  # uneven chunks, and one chunk holding everything
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(chunk: int) -> None:
    args = get_model_args("llama3", "debug")
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, dims=1)
    labels[0, :5] = -100  # masked prompt positions add nothing either way
    full, chunked = Transformer(args), Transformer(args)
    full.init_weights(seed=1)
    chunked.init_weights(seed=1)
    chunked.loss_chunk_tokens = chunk
    expected = torch.nn.functional.cross_entropy(full(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    loss = chunked(tokens, labels=labels)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        # Relative to the whole gradient: summing chunk by chunk reorders float32 additions.
        assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm(), name
