"""Every feature of a feature dictionary at every kept token of many sequences.

`encode_all` streams sequences through the model in batches (`encode_batch_size`) and
writes each site's features side by side into one preallocated tensor, so what it holds
stays within a memory budget; `identity_features` makes every dimension of a site a
feature (encoded, they are the raw activations; swapped, plain activation patching).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.baselines.activations import iter_activations, site_width
from codelens.baselines.features import LinearFeatures, neurons

MEMORY_BUDGET_MB = 1024.0
"""`encode_all`'s default bound on what it holds."""


def identity_features(model: Any, sites: list[str]) -> list[LinearFeatures]:
    """Every dimension of each site as a feature (for swaps: plain activation patching)."""
    return [neurons(s, site_width(model, s)) for s in sites]


def encode_batch_size(
    n_kept: int,
    seq_len: int,
    n_features: int,
    width: int,
    memory_budget_mb: float,
    itemsize: int = 4,
    max_batch: int = 64,
) -> int:
    """Sequences per batch for `encode_all`: the result (``n_kept`` x ``n_features`` of
    ``itemsize`` bytes) plus one batch's float32 site activations (``width`` summed over
    sites) and features must fit ``memory_budget_mb``. Raises if not even one sequence
    fits."""
    budget = memory_budget_mb * 2**20
    result = n_kept * n_features * itemsize
    per_sequence = 4 * seq_len * (n_features + width)
    if result + per_sequence > budget:
        raise ValueError(
            f"encoding {n_kept} tokens x {n_features} features needs "
            f"{(result + per_sequence) / 2**20:.1f} MB with one sequence per batch, over "
            f"memory_budget_mb={memory_budget_mb}: use fewer tokens or features, or a "
            "smaller dtype"
        )
    return int(min(max_batch, (budget - result) // per_sequence))


@torch.no_grad()
def encode_all(
    model: Any,
    features: list[LinearFeatures],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    *,
    memory_budget_mb: float = MEMORY_BUDGET_MB,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "n F"]:
    """``[kept tokens, total features]``: every site's features side by side, in ``dtype``.

    Written into one preallocated tensor while sequences stream through the model in
    batches (`encode_batch_size`), so what this holds (the result and one batch's
    activations and features) stays within ``memory_budget_mb``, as `cache_activations`
    bounds caching; raises before running the model if it cannot.
    """
    if not features:
        raise ValueError("no features given")
    tokens, mask = torch.as_tensor(tokens), torch.as_tensor(mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"tokens must be [batch, pos] with a bool mask of the same shape, got "
            f"{tuple(tokens.shape)} and {mask.dtype} {tuple(mask.shape)}"
        )
    n_features = sum(f.n_features for f in features)
    sites = list(dict.fromkeys(f.site for f in features))
    width = sum(next(f.d_in for f in features if f.site == s) for s in sites)
    batch_size = encode_batch_size(
        int(mask.sum()),
        tokens.shape[1],
        n_features,
        width,
        memory_budget_mb,
        torch.empty((), dtype=dtype).element_size(),
    )
    out = torch.empty(int(mask.sum()), n_features, dtype=dtype)
    row = 0
    for block in iter_activations(model, tokens, sites, token_mask=mask, batch_size=batch_size):
        rows = next(iter(block.values())).shape[0]
        column = 0
        for f in features:
            out[row : row + rows, column : column + f.n_features] = f.encode(block[f.site])
            column += f.n_features
        row += rows
    return out
