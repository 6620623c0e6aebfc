"""Per-epoch document orders: a plain shuffle, or a mix whose token shares per type follow weights.

The order of an epoch is a pure function of the lengths, the types and a seeded generator, so a
packed row can be rebuilt from its index alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from titanlm.errors import ConfigError


def parse_dataset_weights(items: Sequence[str], types: Sequence[str]) -> np.ndarray | None:
    """`data.dataset_weights` (["en:0.7", "code:0.3"]) as a weight per type, summing to 1.

    Empty means natural proportions (None). A type left out gets weight 0: it is not trained on.
    """
    if not items:
        return None
    weights = np.zeros(len(types))
    for item in items:
        name, sep, value = item.strip().partition(":")
        if not sep:
            raise ConfigError(f"data.dataset_weights item {item.strip()!r} is not TYPE:WEIGHT, e.g. 'en:0.7'")
        if name not in types:
            raise ConfigError(
                f"data.dataset_weights names type {name!r}, but the folder's types are {', '.join(types)}"
            )
        try:
            weight = float(value)
        except ValueError:
            raise ConfigError(f"data.dataset_weights weight {value!r} of {name!r} is not a number") from None
        if not weight >= 0 or weight == np.inf:
            raise ConfigError(f"data.dataset_weights weight of {name!r} must be finite and >= 0, got {value}")
        weights[types.index(name)] = weight
    if weights.sum() <= 0:
        raise ConfigError(f"data.dataset_weights {','.join(items)!r} gives no type a positive weight")
    return weights / weights.sum()


def shuffled_order(num_documents: int, rng: np.random.Generator) -> np.ndarray:
    """Natural proportions: every document once, in random order."""
    return rng.permutation(num_documents)


def weighted_order(
    lengths: np.ndarray, type_ids: np.ndarray, weights: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Documents ordered so that each type's share of the tokens follows `weights` (in expectation).

    Each slot draws a type with probability proportional to weight / mean document length of the
    type, so tokens (not documents) follow the weights; a type then hands out its documents in its
    own shuffled order, starting over when it runs out (upsampling). The epoch has as many slots as
    make, in expectation, the token count of the weighted types: one pass's worth of tokens.
    """
    num_types = len(weights)
    tokens = np.bincount(type_ids, weights=lengths, minlength=num_types)
    counts = np.bincount(type_ids, minlength=num_types)
    active = np.flatnonzero(weights > 0)  # each holds documents: the caller checks
    per_slot = np.zeros(num_types)
    per_slot[active] = weights[active] / (tokens[active] / counts[active])
    num_slots = max(1, round(float(tokens[active].sum() * per_slot.sum())))
    slot_types = rng.choice(num_types, size=num_slots, p=per_slot / per_slot.sum())
    order = np.empty(num_slots, dtype=np.int64)
    for t in active:
        slots = np.flatnonzero(slot_types == t)
        own = rng.permutation(np.flatnonzero(type_ids == t))
        order[slots] = own[np.arange(len(slots)) % len(own)]
    return order
