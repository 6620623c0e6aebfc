"""One decoder-only Transformer for Llama3, InternLM (v1) and InternLM2.

Pre-norm blocks of RMSNorm -> attention (RoPE, grouped-query, optional q/k/v/o bias) and
RMSNorm -> SwiGLU MLP; input and output embeddings untied, or tied as one Parameter (Llama 3.2
1B/3B). The families differ only in the numbers of `ModelArgs`. Rotary embeddings use the "rotate
half" layout of Hugging Face's Llama, so HF weights load without permuting q/k rows.

The model is built on the meta device and materialized afterwards with `init_weights`, which
gives the same values whatever the parallel layout (see its docstring).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from titanlm.loss import chunked_cross_entropy
from titanlm.models.attention import AttentionBackend, SDPABackend
from titanlm.models.flavors import ModelArgs

INIT_STD = 0.02


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA; it accumulates in float32 whatever the compute dtype.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2] in float32, with the model's scaling applied once."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    return args.rope_scaling.scaled_inv_freq(inv_freq) if args.rope_scaling else inv_freq


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [batch, 1, seq, head_dim] for integer positions [batch, seq]."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.attn_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.attn_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.attn_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=args.attn_bias)
        self.attend = backend

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: LayerKV | None = None
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.extend(k, v)
        out = self.attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is HF's gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, backend)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: LayerKV | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attention: AttentionBackend | None = None) -> None:
        super().__init__()
        self.args = args
        self.attention_backend = attention or SDPABackend()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by layer index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(args, self.attention_backend) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_embeddings_()
        if args.tie_embeddings:
            # State dicts hold a tied matrix once, as tok_embeddings.weight (checkpoints, exports, HF).
            self._register_state_dict_hook(_drop_tied_output)
            self.register_load_state_dict_pre_hook(_fill_tied_output)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Set by sequence parallelism: hidden-state inputs (later pipeline stages) and the final norm's
        # output then hold only 1/hidden_seq_shards of the sequence, while rope tables and labels cover
        # all of it.
        self.hidden_seq_shards = 1
        # Set from the plan (training.loss_chunk_tokens): the loss's logits are computed this many
        # tokens at a time and recomputed in backward; 0 = all at once. An attribute, not a forward
        # argument: pipeline stages get the schedule's keyword arguments, and torch 2.11's zero-bubble
        # schedules take each of them for a tensor in backward (an int fails there).
        self.loss_chunk_tokens = 0

    def tie_embeddings_(self) -> None:
        """With tied embeddings, make the output projection's weight the embedding's Parameter.

        Called again by whatever replaces either Parameter (tensor parallelism distributes each
        module's weight on its own), so the model never holds two copies."""
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] for token ids [batch, seq]; with `labels`, the summed token
        cross-entropy instead, `self.loss_chunk_tokens` tokens of logits at a time. The loss is
        computed here, not by the caller, so that FSDP has the output weight gathered for it and a
        last pipeline stage can return it.

        Packed batches pass `position_ids` restarting at 0 per document and `document_ids`
        (equal id = same document); attention then stays inside each document. A pipeline stage
        without the embedding takes hidden states [batch, seq, dim] instead of token ids, and
        one without the output returns hidden states.

        With a `cache` (generation), the tokens continue the ones it holds and are added to it;
        only the last position's logits [batch, 1, vocab] are computed, as that is all a decoding
        step needs.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if position_ids is None:
            # One row, broadcast over the batch: rope tables B times smaller than per-row positions.
            seq = tokens.shape[1] * (1 if self.tok_embeddings is not None else self.hidden_seq_shards)
            position_ids = torch.arange(seq, device=tokens.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, h.dtype)
        if cache is None:
            mask = self.attention_backend.prepare(document_ids)
            for layer in self.layers.values():
                h = layer(h, cos, sin, mask)
        else:
            mask = cache.mask(h.shape[1])
            for layer, layer_cache in zip(self.layers.values(), cache.layers, strict=True):
                h = layer(h, cos, sin, mask, cache=layer_cache)
            h = h[:, -1:]
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is None:
            return self.output(h)
        return chunked_cross_entropy(h, self.output, labels, self.loss_chunk_tokens, self.hidden_seq_shards)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter with values that depend only on (seed, parameter name).

        Each parameter's full tensor is drawn from its own generator and each rank keeps its
        shard, so FSDP, TP or PP layouts start from exactly the weights of a single process.
        (DTensor's own RNG only offers that on CUDA.) Residual projections get GPT-2's depth
        scaling of the standard deviation.
        """
        self.inv_freq.copy_(rope_inv_freq(self.args).to(self.inv_freq.device))
        residual_std = INIT_STD / (2 * self.args.n_layers) ** 0.5
        for name, param in self.named_parameters():
            name = canonical_param_name(name)
            if name.endswith("norm.weight"):
                _fill_(param, name, seed, lambda t, g: t.fill_(1.0))
            elif name.endswith(".bias"):
                _fill_(param, name, seed, lambda t, g: t.zero_())
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else INIT_STD
                _fill_(param, name, seed, lambda t, g, s=std: t.normal_(0.0, s, generator=g))


class LayerKV:
    """One layer's cached keys and values, [batch, kv_heads, max_len, head_dim] each."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions stored

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; all of them so far."""
        start, self.length = self.length, self.length + k.shape[2]
        self.keys[:, :, start : self.length] = k
        self.values[:, :, start : self.length] = v
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class KVCache:
    """Keys and values of every layer for generation, so each new token is fed through once.

    `key_valid` [batch, max_len] is False at left padding, which no other position may attend.
    Decoding passes `mask` to the sdpa backend, which takes an explicit boolean mask as it is.
    """

    def __init__(self, args: ModelArgs, key_valid: torch.Tensor, dtype: torch.dtype) -> None:
        batch, max_len = key_valid.shape
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.key_valid = key_valid
        self.layers = [LayerKV(shape, dtype, key_valid.device) for _ in range(args.n_layers)]

    def mask(self, seq: int) -> torch.Tensor:
        """SDPA mask [batch, 1, seq, length + seq] of the next `seq` positions: causal, skipping
        padding. Each position always sees itself, so that padding rows do not turn into NaN."""
        start = self.layers[0].length
        keys = torch.arange(start + seq, device=self.key_valid.device)
        queries = keys[start:, None]
        allowed = (keys <= queries) & self.key_valid[:, None, : start + seq]
        return (allowed | (keys == queries))[:, None]


TIED_ALIAS = "output.weight"  # of "tok_embeddings.weight" when the embeddings are tied


def _drop_tied_output(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + TIED_ALIAS, None)


def _fill_tied_output(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix + "tok_embeddings.weight" in state_dict:
        state_dict[prefix + TIED_ALIAS] = state_dict[prefix + "tok_embeddings.weight"]


def canonical_param_name(name: str) -> str:
    """The parameter name without the wrappers added by activation checkpointing or compile."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _fill_(param: torch.Tensor, name: str, seed: int, fill) -> None:
    device = param.device
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    full = fill(torch.empty(param.shape, dtype=torch.float32, device=device), generator)
    if isinstance(param, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
        param.to_local().copy_(full[index])
    else:
        param.copy_(full)


def count_params(model: nn.Module) -> int:
    """Distinct parameters: a tied embedding counts once."""
    return sum(p.numel() for p in model.parameters())


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on `device` (values still to be filled by `init_weights`).

    Tensors are swapped in place rather than replaced, so a Parameter shared by two modules
    (tied embeddings) stays one Parameter, also under FSDP2."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def param_count(args: ModelArgs) -> int:
    """Parameters of the whole model `args` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return count_params(Transformer(args))
