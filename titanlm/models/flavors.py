"""Every model size titanlm knows by name, as data: one table per family, one row per flavor.

The published sizes follow the public releases' config.json files; the `debug` rows are tiny so
that CPU runs and tests take seconds. A model outside the table is described by its Hugging Face
config.json instead (`model.hf_path`, see hf_adapter.args_from_hf_config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from titanlm.errors import ConfigError, ModelError


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling scheme of the public releases.

    - "llama3" (Llama 3.1 and later): the inverse frequencies are rescaled once, by wavelength
      (`scaled_inv_freq`); it changes the model's outputs at every length.
    - "dynamic" (InternLM2/2.5's NTK scaling): changes nothing up to `max_seq_len` and rescales
      only beyond it, which titanlm does not do; kept so that an export says what the model was.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def scaled_inv_freq(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Meta's `apply_scaling`: keep high frequencies, divide low ones by `factor`, blend between.
        Computed in the dtype of `inv_freq` (float32), as Hugging Face does, so logits agree."""
        if self.kind != "llama3":
            return inv_freq
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = self.original_max_seq_len / self.low_freq_factor
        high_wavelen = self.original_max_seq_len / self.high_freq_factor
        smooth = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of the decoder-only Transformer shared by all three families."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float = 1e-5
    attn_bias: bool = False  # InternLM v1 has biases on q, k, v and o
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False  # the output projection is the embedding matrix (Llama 3.2 1B/3B)
    # The context length the model was trained for (HF max_position_embeddings): written to exports,
    # and the point beyond which "dynamic" RoPE scaling would start to act.
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


_LLAMA3_VOCAB = 128256
_INTERNLM_VOCAB = 103168
_INTERNLM2_VOCAB = 92544


def _llama31_scaling(factor: float) -> RopeScaling:
    return RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)


_LLAMA3 = dict(vocab_size=_LLAMA3_VOCAB, rope_theta=500000.0, n_kv_heads=8)
_LLAMA31 = dict(_LLAMA3, rope_scaling=_llama31_scaling(8.0), max_seq_len=131072)
_LLAMA32 = dict(_LLAMA3, rope_scaling=_llama31_scaling(32.0), max_seq_len=131072, tie_embeddings=True)
_INTERNLM2 = dict(vocab_size=_INTERNLM2_VOCAB, rope_theta=1000000.0, n_kv_heads=8, max_seq_len=32768)

FLAVORS: dict[str, dict[str, ModelArgs]] = {
    "llama3": {
        "debug": ModelArgs(
            dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=2048, rope_theta=500000.0
        ),
        # Llama 3 (April 2024)
        "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, **_LLAMA3),
        "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672, **_LLAMA3),
        # Llama 3.1 (3.3 70B has the 3.1 70B architecture)
        "3.1-8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, **_LLAMA31),
        "3.1-70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672, **_LLAMA31),
        "3.1-405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, ffn_dim=53248, **_LLAMA31),
        # Llama 3.2 text models
        "3.2-1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, ffn_dim=8192, **_LLAMA32),
        "3.2-3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, ffn_dim=8192, **_LLAMA32),
    },
    "internlm": {
        "debug": ModelArgs(
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=8,
            ffn_dim=768,
            vocab_size=2048,
            rope_theta=10000.0,
            attn_bias=True,
            max_seq_len=2048,
        ),
        "7B": ModelArgs(
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=32,
            ffn_dim=11008,
            max_seq_len=2048,
            vocab_size=_INTERNLM_VOCAB,
            rope_theta=10000.0,
            attn_bias=True,
        ),
        "13B": ModelArgs(
            dim=5120,
            n_layers=40,
            n_heads=40,
            n_kv_heads=40,
            ffn_dim=13824,
            max_seq_len=2048,
            vocab_size=_INTERNLM_VOCAB,
            rope_theta=10000.0,
            attn_bias=True,
        ),
    },
    "internlm2": {
        "debug": ModelArgs(
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=2,
            ffn_dim=768,
            vocab_size=2048,
            rope_theta=1000000.0,
            max_seq_len=32768,
        ),
        "1.8B": ModelArgs(dim=2048, n_layers=24, n_heads=16, ffn_dim=8192, **_INTERNLM2),
        "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, **_INTERNLM2),
        "20B": ModelArgs(dim=6144, n_layers=48, n_heads=48, ffn_dim=16384, **_INTERNLM2),
    },
}


def get_model_args(name: str, flavor: str, n_layers: int = 0) -> ModelArgs:
    """Look up a flavor, failing with the valid choices when the name is unknown.

    `n_layers` > 0 keeps the flavor's width but changes its depth: a full-width model cut to fit one
    device is how throughput at real layer shapes is measured (benchmarks, smoke runs)."""
    if name not in FLAVORS:
        raise ModelError(f"model.name '{name}' is unknown; choose one of {', '.join(FLAVORS)}")
    family = FLAVORS[name]
    if flavor not in family:
        raise ModelError(
            f"model.flavor '{flavor}' does not exist for model.name '{name}'; "
            f"choose one of {', '.join(family)}, or point model.hf_path at a Hugging Face model folder"
        )
    return with_layers(family[flavor], n_layers)


def with_layers(args: ModelArgs, n_layers: int) -> ModelArgs:
    """`args` cut (or grown) to `n_layers` at the same width; 0 keeps its own depth."""
    if n_layers < 0:
        raise ConfigError(f"model.n_layers must be 0 (the model's own depth) or a positive count, not {n_layers}")
    return replace(args, n_layers=n_layers) if n_layers else args
