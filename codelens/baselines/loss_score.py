"""How much language-model loss a feature dictionary keeps when it replaces its site.

SAELens' CE loss score: ``(CE_zero - CE_spliced) / (CE_zero - CE_orig)``, where the site
is replaced by its reconstruction (spliced) or by zeros. 1: the reconstruction loses
nothing; 0: as bad as erasing the site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.baselines.features import LinearFeatures, splice_hooks, zero_hooks


@torch.no_grad()
def lm_loss(
    model: Any, tokens: Int[Tensor, "batch pos"], hooks: list | None = None, batch_size: int = 32
) -> float:
    """Mean next-token loss over ``tokens`` with ``hooks`` on (removed afterwards, also on
    error)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, pos >= 2], got {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    total = 0.0
    with model.hooks(fwd_hooks=hooks or []):
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            total += float(model(batch, return_type="loss")) * batch.shape[0]
    return total / tokens.shape[0]


def ce_loss_score(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    features: Sequence[LinearFeatures] | LinearFeatures,
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """``ce_orig``, ``ce_spliced``, ``ce_zero`` and ``ce_loss_score`` with every site of
    ``features`` spliced (or zeroed) at once."""
    items = [features] if isinstance(features, LinearFeatures) else list(features)
    if not items:
        raise ValueError("no features given")
    missing = [f.site for f in items if f.site not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook points {missing}")
    orig = lm_loss(model, tokens, None, batch_size)
    spliced = lm_loss(model, tokens, splice_hooks(items), batch_size)
    zero = lm_loss(model, tokens, zero_hooks(items), batch_size)
    gap = zero - orig
    return {
        "ce_orig": orig,
        "ce_spliced": spliced,
        "ce_zero": zero,
        "ce_loss_score": (zero - spliced) / gap if gap != 0 else float("nan"),
    }


@contextlib.contextmanager
def spliced(model: Any, features: Sequence[LinearFeatures] | LinearFeatures) -> Iterator[Any]:
    """Run the body with each site replaced by its features' reconstruction; the hooks
    come off on exit, also when the body raises."""
    with model.hooks(fwd_hooks=splice_hooks(features)):
        yield model


def splice_loss_cost(
    model: Any, features: list[LinearFeatures], tokens: Tensor
) -> dict[str, float]:
    """Loss with every site replaced by its reconstruction, and the base loss."""
    clean = lm_loss(model, tokens)
    loss = lm_loss(model, tokens, splice_hooks(features))
    return {"loss": loss, "base_loss": clean, "loss_cost": loss - clean}
