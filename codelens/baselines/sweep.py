"""An L0 sweep: TopK SAEs over a grid of k at every site, scored, the best k picked.

"SAE at its best L0" needs SAEs at several sparsities, each judged by the task's own
measure (state or regex precision in the experiments), which a caller passes as
``score``: it gets one SAE per site and returns a number, higher better. Each point also
gets the reconstruction metrics SAELens reports (`sae_metrics` on held-out activations)
and, given ``ce_tokens``, the CE loss score of each site's SAE spliced in alone.

The best k has the highest score; ties go to the smaller k (the sparser dictionary). A
NaN score never wins.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codelens.baselines.loss_score import ce_loss_score
from codelens.baselines.sae import SAEConfig, SparseAutoencoder, sae_metrics, train_sae


@dataclass
class SweepPoint:
    """One k: its score, summary metrics over sites (``seconds``: wall time of the whole
    point, training and measuring) and the per-site figures."""

    k: int
    score: float
    summary: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class L0Sweep:
    """Every k's point, the chosen k and its SAEs (one per site, in site order)."""

    points: list[SweepPoint]
    best_k: int
    best: list[SparseAutoencoder]

    def as_dict(self) -> dict[str, Any]:
        return {"best_k": self.best_k, "points": [dataclasses.asdict(p) for p in self.points]}


def check_grid(ks: Sequence[int], n_latents: int) -> list[int]:
    """The grid sorted; a clear error for an empty grid, a repeated, non-integer or
    non-positive k, or a k above the SAE's latent count."""
    ks = list(ks)
    if not ks:
        raise ValueError("the L0 sweep grid is empty: give at least one k")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"sweep k must be positive integers, got {bad}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"sweep k repeated in {ks}")
    over = [k for k in ks if k > n_latents]
    if over:
        raise ValueError(f"sweep k {over} exceed the SAE's {n_latents} latents")
    return sorted(ks)


def pick_best(scores: dict[int, float]) -> int:
    """The k of highest score; ties to the smaller k; NaN never wins."""
    if not scores:
        raise ValueError("no scores to pick from")
    finite = {k: s for k, s in scores.items() if not math.isnan(s)}
    if not finite:
        raise ValueError(f"every sweep score is NaN: {scores}")
    return min(finite, key=lambda k: (-finite[k], k))


def sweep_l0(
    acts: dict[str, Float[Tensor, "N d"]],
    ks: Sequence[int],
    config: Callable[[str, int], SAEConfig],
    score: Callable[[list[SparseAutoencoder]], float],
    *,
    heldout: dict[str, Float[Tensor, "M d"]],
    model: Any = None,
    ce_tokens: Int[Tensor, "batch pos"] | None = None,
    device: str | torch.device | None = None,
) -> L0Sweep:
    """Train one TopK SAE per site of ``acts`` for each k of ``ks``, score each k.

    ``config(site, k)``: the SAE's settings at a site (its ``k`` must be the one given);
    ``score(saes)``: the task measure of one k's SAEs; ``heldout``: activations per site
    for the reconstruction metrics; ``model`` and ``ce_tokens``: where to measure the CE
    loss score (skipped without them). SAEs train on ``device`` (default: the model's).
    Only the best k's SAEs are kept.
    """
    sites = list(acts)
    if not sites:
        raise ValueError("no sites to sweep")
    missing = [s for s in sites if s not in heldout]
    if missing:
        raise ValueError(f"no held-out activations for {missing}")
    if (model is None) != (ce_tokens is None):
        raise ValueError("give both model and ce_tokens for the CE loss score, or neither")
    if device is None and model is not None:
        device = next(model.parameters()).device
    latents = min(config(s, 1).n_latents for s in sites)
    points, scores, best_saes = [], {}, []
    for k in check_grid(ks, latents):
        started = time.perf_counter()
        saes, per_site = [], {}
        for site in sites:
            cfg = config(site, k)
            if cfg.kind != "topk" or cfg.k != k:
                raise ValueError(f"config({site!r}, {k}) must give a TopK SAE with k={k}")
            sae, figures = train_and_measure(acts[site], site, cfg, heldout[site], device=device)
            if model is not None:
                figures["ce_loss_score"] = ce_loss_score(model, ce_tokens, sae)["ce_loss_score"]
            saes.append(sae)
            per_site[site] = figures
        scores[k] = float(score(saes))
        summary = _summary(per_site) | {"seconds": time.perf_counter() - started}
        points.append(SweepPoint(k, scores[k], summary, per_site))
        if not math.isnan(scores[k]) and pick_best(scores) == k:
            best_saes = saes  # keep only the best so far
    return L0Sweep(points, pick_best(scores), best_saes)


def train_and_measure(
    x: Float[Tensor, "N d"],
    site: str,
    config: SAEConfig,
    heldout: Float[Tensor, "M d"],
    *,
    device: str | torch.device | None = None,
) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train one SAE on ``x`` (on ``device``); its held-out metrics, training time and
    dead share."""
    sae, stats = train_sae(x, site, config, device=device)
    return sae, {
        **sae_metrics(sae, heldout),
        "train_seconds": stats.seconds,
        "train_cpu_seconds": stats.cpu_seconds,
        "train_dead_fraction": stats.dead_fraction,
    }


def _summary(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """L0 summed over sites (latents per token), other metrics averaged; seconds summed."""
    rows = list(per_site.values())
    out = {"l0": sum(r["l0"] for r in rows)}
    for key in ("explained_variance", "mse", "dead_fraction", "ce_loss_score"):
        if key in rows[0]:
            out[key] = sum(r[key] for r in rows) / len(rows)
    for key in ("train_seconds", "train_cpu_seconds"):
        out[key] = sum(r[key] for r in rows)
    return out
