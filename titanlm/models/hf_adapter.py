"""Hugging Face checkpoints as titanlm sees them: one state-dict adapter per HF layout, and config.json.

An HF checkpoint's layout is named by its config's `model_type`:
- `llama`: HF `LlamaForCausalLM`. titanlm and HF Llama share the rotate-half RoPE layout, so
  converting is a pure renaming. Every family can be exported this way, which is what lets stock
  transformers load InternLM and InternLM2 weights without their remote code.
- `internlm` (v1): the same parameter names as Llama plus q/k/v/o biases; only config.json differs.
- `internlm2`: titanlm's own module names under `model.`, with q, k and v packed into one `wqkv`
  per layer (see `pack_wqkv`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from typing import Any

import torch

from titanlm.errors import ModelError
from titanlm.models.flavors import ModelArgs, RopeScaling, get_model_args

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class ConversionError(ModelError):
    """Weights, config or flags that cannot be converted; the message names the culprit and the fix."""


# The titanlm family whose public releases use each HF model_type.
FAMILY_OF_MODEL_TYPE = {"llama": "llama3", "internlm": "internlm", "internlm2": "internlm2"}
NATIVE_MODEL_TYPE = {family: model_type for model_type, family in FAMILY_OF_MODEL_TYPE.items()}

# ---------------------------------------------------------------------------------------------
# Llama layout (also InternLM v1)

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


def to_hf_state_dict(state_dict: StateDict) -> StateDict:
    """titanlm names -> HF Llama (and InternLM v1) names."""
    return {to_hf_name(k): v for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: StateDict) -> StateDict:
    """HF Llama (and InternLM v1) names -> titanlm names; old checkpoints' RoPE buffers are dropped."""
    return {from_hf_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


# ---------------------------------------------------------------------------------------------
# InternLM2 layout

_WQKV_RE = re.compile(r"layers\.(\d+)\.attention\.w[qkv]\.(weight|bias)$")
_PACKED_RE = re.compile(r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def pack_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """InternLM2's `wqkv`: for each kv head, its g query heads, then its k head, then its v head.

    Works for weights [rows, dim] and biases [rows] alike, since only the rows are regrouped.
    """
    rest = wk.shape[1:]
    head_dim = wk.shape[0] // n_kv_heads
    q = wq.reshape(n_kv_heads, -1, head_dim, *rest)
    k = wk.reshape(n_kv_heads, 1, head_dim, *rest)
    v = wv.reshape(n_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def unpack_wqkv(wqkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_wqkv`: split each kv group [g, 1, 1] into Llama's q, k and v rows."""
    group = n_heads // n_kv_heads
    rest = wqkv.shape[1:]
    blocks = wqkv.reshape(n_kv_heads, group + 2, -1, *rest)
    # clone: a slice may still view the packed storage, and safetensors refuses tensors sharing one.
    q = blocks[:, :group].reshape(-1, *rest).clone()
    k = blocks[:, group].reshape(-1, *rest).clone()
    v = blocks[:, group + 1].reshape(-1, *rest).clone()
    return q, k, v


def to_internlm2_state_dict(state_dict: StateDict, args: ModelArgs) -> StateDict:
    """titanlm names -> HF InternLM2 names: `model.` prefix (not on `output`), q/k/v packed."""
    out: StateDict = {}
    for name, tensor in state_dict.items():
        if match := _WQKV_RE.fullmatch(name):
            if ".wq." in name:
                layer, kind = match.groups()
                prefix = f"layers.{layer}.attention"
                out[f"model.{prefix}.wqkv.{kind}"] = pack_wqkv(
                    tensor,
                    state_dict[f"{prefix}.wk.{kind}"],
                    state_dict[f"{prefix}.wv.{kind}"],
                    args.n_kv_heads,
                )
        else:
            out[name if name == "output.weight" else f"model.{name}"] = tensor
    return out


def from_internlm2_state_dict(state_dict: StateDict, args: ModelArgs) -> StateDict:
    """HF InternLM2 names -> titanlm names, unpacking each `wqkv`."""
    out: StateDict = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older exports saved
            continue
        if match := _PACKED_RE.fullmatch(name):
            layer, kind = match.groups()
            q, k, v = unpack_wqkv(tensor, args.n_heads, args.n_kv_heads)
            for proj, value in zip(("wq", "wk", "wv"), (q, k, v)):
                out[f"layers.{layer}.attention.{proj}.{kind}"] = value
        elif name == "output.weight":
            out[name] = tensor
        elif name.startswith("model."):
            out[name.removeprefix("model.")] = tensor
        else:
            raise KeyError(f"Hugging Face InternLM2 parameter '{name}' has no titanlm counterpart")
    return out


# ---------------------------------------------------------------------------------------------
# One entry point per direction, dispatching on the HF model_type


def to_hf(state_dict: StateDict, args: ModelArgs, model_type: str) -> StateDict:
    """titanlm state dict -> the parameter names (and packing) of HF `model_type`."""
    _check_model_type(model_type)
    if model_type == "internlm2":
        return to_internlm2_state_dict(state_dict, args)
    return to_hf_state_dict(state_dict)


def from_hf(state_dict: StateDict, args: ModelArgs, model_type: str) -> StateDict:
    """HF state dict of `model_type` -> titanlm state dict."""
    _check_model_type(model_type)
    if model_type == "internlm2":
        return from_internlm2_state_dict(state_dict, args)
    return from_hf_state_dict(state_dict)


def _check_model_type(model_type: str) -> None:
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ConversionError(
            f"HF model_type '{model_type}' is not supported; titanlm reads and writes {', '.join(FAMILY_OF_MODEL_TYPE)}"
        )


# ---------------------------------------------------------------------------------------------
# config.json

_REMOTE_CODE = {
    "internlm": ("InternLMForCausalLM", "configuration_internlm.InternLMConfig", "modeling_internlm"),
    "internlm2": ("InternLM2ForCausalLM", "configuration_internlm2.InternLM2Config", "modeling_internlm2"),
}


def hf_config(
    args: ModelArgs, model_type: str, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None
) -> dict[str, Any]:
    """config.json for HF `model_type`, with the field names that model's config class reads.

    `llama` loads in stock transformers; `internlm`/`internlm2` need the release's remote-code
    files (configuration_*.py, modeling_*.py) copied next to it, as `auto_map` points there.
    RoPE scaling uses the Hub's spelling (`rope_theta` beside `rope_scaling`), which every
    transformers release reads. `bos_id`/`eos_id` come from the tokenizer; without them
    transformers would assume Llama 2's 1 and 2.
    """
    _check_model_type(model_type)
    config: dict[str, Any] = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config |= {key: value for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id)) if value is not None}
    if model_type == "llama":
        return config | {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "head_dim": args.head_dim,
            "rope_theta": args.rope_theta,
            "rope_scaling": _hub_rope_scaling(args.rope_scaling),
            "attention_bias": args.attn_bias,
            "mlp_bias": False,
        }
    if args.rope_scaling and args.rope_scaling.kind != "dynamic":
        raise ConversionError(
            f"{model_type}'s remote code has no '{args.rope_scaling.kind}' RoPE scaling; export with --layout llama"
        )
    architecture, config_class, modeling = _REMOTE_CODE[model_type]
    config |= {
        "architectures": [architecture],
        "model_type": model_type,
        "auto_map": {
            "AutoConfig": config_class,
            "AutoModel": f"{modeling}.{architecture}",
            "AutoModelForCausalLM": f"{modeling}.{architecture}",
        },
        "bias": args.attn_bias,
    }
    if model_type == "internlm2":
        scaling = {"type": "dynamic", "factor": args.rope_scaling.factor} if args.rope_scaling else None
        return config | {"rope_theta": args.rope_theta, "rope_scaling": scaling}
    if args.n_kv_heads != args.n_heads:
        raise ConversionError(
            "InternLM (v1) remote code has no grouped-query attention, but the model has "
            f"n_kv_heads={args.n_kv_heads} < n_heads={args.n_heads}; export with --layout llama"
        )
    del config["num_key_value_heads"]
    # "origin" is InternLM's plain RoPE; its "dynamic" rescales beyond the trained length.
    rotary = {"base": args.rope_theta, "type": "dynamic" if args.rope_scaling else "origin"}
    if args.rope_scaling:
        rotary["scaling_factor"] = args.rope_scaling.factor
    return config | {"rotary": rotary}


def _hub_rope_scaling(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling.kind == "dynamic":
        return {"rope_type": "dynamic", "factor": scaling.factor}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
    }


def args_from_hf_config(config: dict[str, Any], source: str) -> ModelArgs:
    """The ModelArgs an HF config.json describes (model_type llama, internlm or internlm2).

    Architectural options the Transformer cannot express (other activations, MLP biases, other
    RoPE types, sliding windows, a head_dim other than dim / heads) are refused, naming the key,
    rather than silently dropped, since the model would compute something else.
    """
    model_type = config.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ConversionError(
            f"{source}: model_type '{model_type}' is not supported; titanlm reads "
            f"{', '.join(FAMILY_OF_MODEL_TYPE)} (Llama 3.x, InternLM, InternLM2/2.5)"
        )

    def need(key: str) -> Any:
        if key not in config:
            raise ConversionError(f"{source}: required field '{key}' is missing")
        return config[key]

    n_heads = need("num_attention_heads")
    dim = need("hidden_size")
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "head_dim": (config.get("head_dim") or dim // n_heads, dim // n_heads),
        "sliding_window": (config.get("sliding_window") if config.get("use_sliding_window", True) else None, None),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ConversionError(
                f"{source}: {key}={value!r} is not supported by titanlm's Transformer (it needs {supported!r})"
            )
    if model_type == "llama":
        attn_bias = config.get("attention_bias", False)
    else:  # InternLM's remote configs default to bias=True
        attn_bias = config.get("bias", True)
    return ModelArgs(
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        ffn_dim=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        rope_theta=float(_rope_theta(config)),
        norm_eps=config.get("rms_norm_eps", 1e-6),  # the default of all three HF config classes
        attn_bias=bool(attn_bias),
        rope_scaling=_rope_scaling(config, source),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),  # LlamaConfig's default
    )


def _rope_theta(config: dict[str, Any]) -> float:
    """RoPE base under its three spellings: rope_theta, transformers 5's rope_parameters and
    InternLM's rotary; 10000 when absent, the default of all three config classes."""
    if "rope_theta" in config:
        return config["rope_theta"]
    if isinstance(config.get("rope_parameters"), dict) and "rope_theta" in config["rope_parameters"]:
        return config["rope_parameters"]["rope_theta"]
    if isinstance(config.get("rotary"), dict) and "base" in config["rotary"]:
        return config["rotary"]["base"]
    return 10000.0


def _rope_scaling(config: dict[str, Any], source: str) -> RopeScaling | None:
    """The scaling under the Hub's `rope_scaling`, transformers 5's `rope_parameters` or InternLM's
    `rotary`; plain RoPE gives None."""
    for key in ("rope_scaling", "rope_parameters", "rotary"):
        scaling = config.get(key)
        if not isinstance(scaling, dict):
            continue
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind in (None, "default", "origin"):
            return None
        factor = scaling.get("factor", scaling.get("scaling_factor", 1.0))
        if kind == "dynamic":
            return RopeScaling("dynamic", factor=float(factor))
        if kind == "llama3":
            try:
                return RopeScaling(
                    "llama3",
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_seq_len=int(scaling["original_max_position_embeddings"]),
                )
            except KeyError as missing:
                raise ConversionError(f"{source}: {key} of type llama3 lacks {missing}") from None
        raise ConversionError(
            f"{source}: {key} type '{kind}' is not supported by titanlm's RoPE (it has plain RoPE, Llama 3.1's "
            "'llama3' scaling and InternLM2's 'dynamic')"
        )
    return None


# Fields that change no weight and barely change numerics: reported, never a reason to refuse.
# InternLM v1's HF configs say rms_norm_eps 1e-6 while InternEvo trains it with 1e-5 (layer_norm_epsilon in 7B_sft.py).
NUMERICS_ONLY = ("norm_eps",)
# Fields that change nothing within the trained length: max_seq_len, and "dynamic" RoPE scaling
# (InternLM2.5's), which only acts beyond it. Neither is a reason to refuse a flavor.
LENGTH_ONLY = ("max_seq_len",)


def same_within_length(a: RopeScaling | None, b: RopeScaling | None) -> bool:
    """Whether two RoPE scalings give the same frequencies up to the trained length."""

    def effective(scaling: RopeScaling | None) -> RopeScaling | None:
        return None if scaling is None or scaling.kind == "dynamic" else scaling

    return effective(a) == effective(b)


def flavor_differences(args: ModelArgs, expected: ModelArgs) -> list[str]:
    """The ModelArgs fields in which a flavor would compute something other than `args`."""
    return [
        f"{f.name}: weights {getattr(args, f.name)}, flavor {getattr(expected, f.name)}"
        for f in fields(ModelArgs)
        if f.name not in NUMERICS_ONLY + LENGTH_ONLY
        and getattr(args, f.name) != getattr(expected, f.name)
        and not (f.name == "rope_scaling" and same_within_length(args.rope_scaling, expected.rope_scaling))
    ]


class ModelMismatchError(ConversionError):
    """A model named by settings or flags is not the model that weights, a config.json or a record hold."""


def model_mismatch(named: str, source: str, differences: list[str], fix: str) -> ModelMismatchError:
    """The one "disagrees with the weights" error: `named` (how the user named the model) against
    `source` (what holds the other one), every difference, and the fix."""
    return ModelMismatchError(f"{named} disagrees with {source} ({'; '.join(differences)}); {fix}")


def check_model_matches(named: str, expected: ModelArgs, source: str, found: ModelArgs, fix: str) -> None:
    """Refuse the architecture `named` names (`expected`) when it computes otherwise than `found`."""
    differences = flavor_differences(found, expected)
    if differences:
        raise model_mismatch(named, source, differences, fix)


def check_flavor(args: ModelArgs, name: str, flavor: str, source: str) -> None:
    """Refuse a flavor that does not match the weights, listing every field that differs."""
    expected = flavor_args(name, flavor)
    for field in NUMERICS_ONLY:
        if getattr(args, field) != getattr(expected, field):
            logger.warning(
                "%s: %s is %s in its config and %s in --model.flavor %s; training uses the flavor's",
                source,
                field,
                getattr(args, field),
                getattr(expected, field),
                flavor,
            )
    named = f"--model.name {name} --model.flavor {flavor}"
    check_model_matches(named, expected, f"the weights in {source}", args, "pass the flavor the weights were made with")


def flavor_args(name: str, flavor: str) -> ModelArgs:
    """`get_model_args` with its error (which lists the valid choices) as a ConversionError."""
    try:
        return get_model_args(name, flavor)
    except ValueError as err:
        raise ConversionError(str(err)) from None
