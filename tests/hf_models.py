"""Tiny Hugging Face Llama models for parity tests (transformers is a dev dependency)."""

from __future__ import annotations

import pytest
import torch

from titanlm.models import ModelArgs


def perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Init leaves norms at 1 and biases at 0, which would hide a dropped norm or bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5)


def hf_llama(args: ModelArgs, seed: int):
    """A random `LlamaForCausalLM` with titanlm's hyper-parameters, eager attention, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rope_theta=args.rope_theta, rms_norm_eps=args.norm_eps,
        attention_bias=args.attn_bias, tie_word_embeddings=False, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    perturb_norms_and_biases(model)
    return model
