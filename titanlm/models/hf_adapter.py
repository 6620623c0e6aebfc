"""Hugging Face names for titanlm parameters, Llama layout.

titanlm and HF Llama share the rotate-half RoPE layout, so converting is a pure renaming; HF
InternLM (v1) uses the same names plus biases. The packed InternLM2 layout and the conversion
tool build on this table.
"""

from __future__ import annotations

import re

import torch

_LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf_name(name: str) -> str:
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    match = _LAYER_RE.fullmatch(name)
    if not match or match.group(2) not in _LAYER_KEYS:
        raise KeyError(f"no Hugging Face name for titanlm parameter '{name}'")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_KEYS[module]}.{kind}"


def from_hf_name(name: str) -> str:
    inverse_top = {hf: ours for ours, hf in _TOP_KEYS.items()}
    if name in inverse_top:
        return inverse_top[name]
    match = _HF_LAYER_RE.fullmatch(name)
    inverse_layer = {hf: ours for ours, hf in _LAYER_KEYS.items()}
    if not match or match.group(2) not in inverse_layer:
        raise KeyError(f"Hugging Face parameter '{name}' has no titanlm counterpart")
    layer, module, kind = match.groups()
    return f"layers.{layer}.{inverse_layer[module]}.{kind}"


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {from_hf_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
