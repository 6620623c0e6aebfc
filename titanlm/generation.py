"""Sampling from a Transformer: several prompts in one left-padded batch, decoded with a KV cache.

Left padding lines the prompts up at their ends, so one decoding step serves every row. Positions
count from each row's first real token and the cache's mask hides the padding, so a padded prompt
decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from titanlm.errors import ConfigError
from titanlm.models.flavors import ModelArgs
from titanlm.models.hf_adapter import StateDict
from titanlm.models.transformer import KVCache, Transformer, rope_inv_freq


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # sample among the k likeliest tokens; 0 = all
    top_p: float = 1.0  # sample among the likeliest tokens whose probabilities add up to top_p; 1 = all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be 0 (greedy) or positive")
        if self.top_k < 0:
            raise ConfigError(f"--top_k {self.top_k} must be 0 (off) or positive")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p {self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # ends with the stop token when one ended it
    # The model's log-probability of each id, from its raw logits (before temperature and filtering).
    logprobs: list[float]
    stopped: bool  # True: ended by a stop token; False: by max_new_tokens


def inference_model(args: ModelArgs, state: StateDict, device: torch.device, dtype: torch.dtype) -> Transformer:
    """An eval-mode Transformer holding the titanlm state dict `state` on `device` in `dtype`.

    Built on the meta device and handed the tensors, so no time or memory goes to a random init."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({key: t.to(device, dtype) for key, t in state.items()}, strict=True, assign=True)
    model.tie_embeddings_()  # assign gave the tied output its own Parameter object
    model.inv_freq = rope_inv_freq(args).to(device)  # a buffer outside the state dict; float32 whatever `dtype`
    return model.eval()


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of float32 logits [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token once the likelier ones already reach top_p; the likeliest always stays.
        ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= sampling.top_p, float("-inf"))
        logits = logits.scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    stop_ids: Collection[int],
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> list[Completion]:
    """Continue each prompt (token ids) until a token of `stop_ids` or `sampling.max_new_tokens`.

    Ids from `vocab_size` on (a tokenizer smaller than the model's embedding, as the debug flavors'
    2048 ids with a 512-piece tokenizer) are never chosen: the tokenizer could not decode them."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pads = width - lengths
    tokens = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    columns = torch.arange(width + sampling.max_new_tokens, device=device)
    cache = KVCache(model.args, columns >= pads[:, None], model.tok_embeddings.weight.dtype)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(sampling.seed)

    logits = model(tokens, (columns[:width] - pads[:, None]).clamp(min=0), cache=cache)[:, -1].float()
    chosen, logprobs = [], []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(sampling.max_new_tokens):
        token = sample(_decodable(logits, vocab_size), sampling, generator)
        chosen.append(token)
        logprobs.append(logits.log_softmax(dim=-1).gather(-1, token[:, None])[:, 0])
        done |= torch.isin(token, stops)
        if step + 1 == sampling.max_new_tokens or bool(done.all()):
            break
        logits = model(token[:, None], (lengths + step)[:, None], cache=cache)[:, -1].float()
    rows = zip(torch.stack(chosen, dim=1).tolist(), torch.stack(logprobs, dim=1).tolist())
    return [_until_stop(ids, row_logprobs, set(stop_ids)) for ids, row_logprobs in rows]


def _decodable(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """`logits` with the ids from `vocab_size` on at -inf; unchanged when `vocab_size` is None or covers them all."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    masked = logits.clone()
    masked[:, vocab_size:] = float("-inf")
    return masked


def _until_stop(ids: list[int], logprobs: list[float], stop_ids: set[int]) -> Completion:
    """A row's tokens up to its first stop token; finished rows kept decoding with the batch."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return Completion(ids[: i + 1], logprobs[: i + 1], stopped=True)
    return Completion(ids, logprobs, stopped=False)
