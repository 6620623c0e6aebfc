"""Every model size titanlm knows, as data: one table per family, one row per flavor.

The published sizes come from the seed documents and the public releases (see
shared/REFERENCE.md §4); the `debug` rows are tiny so that CPU runs and tests take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


_LLAMA3_VOCAB = 128256
_INTERNLM_VOCAB = 103168
_INTERNLM2_VOCAB = 92544

FLAVORS: dict[str, dict[str, ModelArgs]] = {
    "llama3": {
        "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768,
                           vocab_size=2048, rope_theta=500000.0),
        "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        vocab_size=_LLAMA3_VOCAB, rope_theta=500000.0),
        "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                         vocab_size=_LLAMA3_VOCAB, rope_theta=500000.0),
    },
    "internlm": {
        "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=768,
                           vocab_size=2048, rope_theta=10000.0, attn_bias=True),
        "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                        vocab_size=_INTERNLM_VOCAB, rope_theta=10000.0, attn_bias=True),
        "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                         vocab_size=_INTERNLM_VOCAB, rope_theta=10000.0, attn_bias=True),
    },
    "internlm2": {
        "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768,
                           vocab_size=2048, rope_theta=1000000.0),
        "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        vocab_size=_INTERNLM2_VOCAB, rope_theta=1000000.0),
        "20B": ModelArgs(dim=6144, n_layers=48, n_heads=48, n_kv_heads=8, ffn_dim=16384,
                         vocab_size=_INTERNLM2_VOCAB, rope_theta=1000000.0),
    },
}


def get_model_args(name: str, flavor: str, n_layers: int = 0) -> ModelArgs:
    """Look up a flavor, failing with the valid choices when the name is unknown.

    `n_layers` > 0 keeps the flavor's width but changes its depth: a full-width model cut to fit one
    device is how throughput at real layer shapes is measured (benchmarks, smoke runs)."""
    if name not in FLAVORS:
        raise ValueError(f"model.name '{name}' is unknown; choose one of {', '.join(FLAVORS)}")
    family = FLAVORS[name]
    if flavor not in family:
        raise ValueError(
            f"model.flavor '{flavor}' does not exist for model.name '{name}'; "
            f"choose one of {', '.join(family)}"
        )
    if n_layers < 0:
        raise ValueError(f"model.n_layers must be 0 (the flavor's own depth) or a positive count, not {n_layers}")
    return replace(family[flavor], n_layers=n_layers) if n_layers else family[flavor]
