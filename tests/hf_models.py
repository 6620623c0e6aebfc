"""Tiny Hugging Face Llama models for parity tests (transformers is a dev dependency)."""

from __future__ import annotations

import pytest
import torch

from titanlm.models import ModelArgs
from titanlm.models.hf_adapter import hf_config


def perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Init leaves norms at 1 and biases at 0, which would hide a dropped norm or bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5)


def hf_llama(args: ModelArgs, seed: int, bos_id: int | None = None, eos_id: int | None = None):
    """A random `LlamaForCausalLM` with titanlm's hyper-parameters (RoPE scaling and tying included),
    eager attention, in eval mode. Its config is built the way a Hub config.json spells it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    spelled = hf_config(args, "llama", torch.float32, bos_id, eos_id)
    spelled.pop("torch_dtype")
    config = transformers.LlamaConfig(**spelled, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    perturb_norms_and_biases(model)
    return model
