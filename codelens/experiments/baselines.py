"""Baselines against codes in the experiments: SAEs, PCA, ICA and neurons on the same tasks.

Every baseline is fitted on the model *without* codebooks (the frozen base model), at the
codebook sites (each layer's ``attn.hook_z``, heads concatenated, and ``hook_mlp_out``),
then measured by the same code as the codes:

- state / regex precision: all features of all sites are "neurons" for
  `codelens.analysis.best_neurons_for_labels`, at the recall of the codebook model's
  best code for the state or pattern;
- swaps: at the token completing state s, the features of a sequence in state t replace
  those of s (`codelens.baselines.swap_hooks`), in the same variants as the code swaps;
- loss cost: next-token loss with every site replaced by its reconstruction, minus the
  base model's (for codes: the codebook model's loss minus the base model's).

SAE rows: k matched to the codes' L0 at each site (groups x k), and the other ``sae_ks``;
"best" is the one of highest state precision. PCA and ICA use a full basis (d
components), so they cost no loss: they test whether a rotation of the activations finds
the states, not compression.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from codelens.analysis import best_neurons_for_labels
from codelens.baselines import (
    LinearFeatures,
    SAEConfig,
    cache_activations,
    ica_features,
    iter_activations,
    lm_loss,
    neurons,
    pca_features,
    sae_metrics,
    splice_hooks,
    swap_hooks,
    train_sae,
)

DEFAULT_SETTINGS: dict[str, Any] = {
    "sae_ks": ["matched", 32],
    "expansion": 4,  # SAE latents per input dimension
    "steps": 800,
    "batch_size": 512,
    "lr": 1e-3,
    "train_sequences": 2048,
    "ica_tokens": 10_000,
}


@dataclass
class Baseline:
    """One method's features at every codebook site, and what fitting them cost."""

    name: str
    features: list[LinearFeatures]
    seconds: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def at(self, sites: list[str]) -> list[LinearFeatures]:
        return [f for f in self.features if f.site in sites]


def codebook_sites(model: Any) -> list[str]:
    return list(model.codebooks)


def matched_k(codebook_model: Any, site: str) -> int:
    """Codes per token at a site: groups x k (the SAE k of the same L0)."""
    cb = codebook_model.codebook(site)
    return cb.n_groups * cb.k


def fit_baselines(
    base: Any,
    codebook_model: Any,
    train_tokens: Tensor,
    train_mask: Tensor | None,
    heldout: dict[str, Tensor],
    settings: dict[str, Any],
    seed: int,
) -> list[Baseline]:
    """SAEs (one per k of ``settings['sae_ks']``), PCA and ICA at the codebook sites of
    ``codebook_model``, fitted on ``base``'s activations of ``train_tokens``.

    ``heldout`` holds activations per site for the reconstruction metrics. Each method's
    seconds include the activation caching they all share.
    """
    settings = {**DEFAULT_SETTINGS, **settings}
    sites = codebook_sites(codebook_model)
    started = time.perf_counter()
    acts = cache_activations(base, train_tokens, sites, token_mask=train_mask, batch_size=64)
    caching = time.perf_counter() - started
    out = []
    for k in settings["sae_ks"]:
        started = time.perf_counter()
        features, metrics = [], {}
        for site in sites:
            k_site = matched_k(codebook_model, site) if k == "matched" else int(k)
            d = acts[site].shape[1]
            config = SAEConfig(
                n_latents=settings["expansion"] * d,
                k=k_site,
                steps=settings["steps"],
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                seed=seed,
            )
            sae, stats = train_sae(acts[site], site, config)
            features.append(sae)
            metrics[site] = {
                **sae_metrics(sae, heldout[site]),
                "train_seconds": stats.seconds,
                "train_dead_fraction": stats.dead_fraction,
            }
        label = "matched L0" if k == "matched" else f"k={k}"
        name = f"SAE {label} ({sum(_k(f) for f in features)} latents/token)"
        out.append(Baseline(name, features, caching + time.perf_counter() - started, metrics))
    for method, fit in (("PCA", pca_features), ("ICA", ica_features)):
        started = time.perf_counter()
        kwargs = {"max_tokens": settings["ica_tokens"]} if method == "ICA" else {}
        features = [fit(acts[s], s, seed=seed, **kwargs) for s in sites]
        metrics = {f.site: sae_metrics(f, heldout[f.site]) for f in features}
        out.append(
            Baseline(
                f"{method} (full basis)",
                features,
                caching + time.perf_counter() - started,
                metrics,
            )
        )
    return out


def _k(features: LinearFeatures) -> int:
    return features.config.k  # type: ignore[attr-defined]


@torch.no_grad()
def encode_all(model: Any, features: list[LinearFeatures], tokens: Tensor, mask: Tensor) -> Tensor:
    """``[kept tokens, total features]``: every site's features side by side."""
    sites = [f.site for f in features]
    parts = []
    for block in iter_activations(model, tokens, sites, token_mask=mask, batch_size=64):
        parts.append(torch.cat([f.encode(block[f.site]) for f in features], dim=1))
    return torch.cat(parts)


def precision_at_recalls(
    values: Tensor, labels: Tensor, recalls: Tensor
) -> dict[str, float | list[float]]:
    """Best feature's precision at each label's recall (the code's), and their mean."""
    matches = best_neurons_for_labels(values, labels, recalls)
    return {
        "mean_precision": float(matches.precision.mean()),
        "precision": matches.precision.tolist(),
    }


def splice_loss_cost(
    model: Any, features: list[LinearFeatures], tokens: Tensor
) -> dict[str, float]:
    """Loss with every site replaced by its reconstruction, and the base loss."""
    clean = lm_loss(model, tokens)
    spliced = lm_loss(model, tokens, splice_hooks(features))
    return {"loss": spliced, "base_loss": clean, "loss_cost": spliced - clean}


def identity_features(model: Any, sites: list[str]) -> list[LinearFeatures]:
    """Every dimension of each site as a feature (for swaps: plain activation patching)."""
    from codelens.baselines import site_width

    return [neurons(s, site_width(model, s)) for s in sites]


@torch.no_grad()
def feature_swaps(
    model: Any, trials: Any, variants: dict[str, list[LinearFeatures]]
) -> list[dict[str, Any]]:
    """The TokFSM state swaps with features instead of codes (`tokfsm.SwapTrials`)."""
    from codelens.experiments.tokfsm import swap_rows

    sites = sorted({f.site for feats in variants.values() for f in feats})
    totals = {name: {"success": 0.0, "jsd_target": 0.0} for name in variants}
    n = 0
    for p, (rows, refs) in trials.by_position.items():
        prompt, reference = trials.tokens[rows, : p + 1], trials.tokens[refs, : p + 1]
        last = torch.zeros_like(reference, dtype=torch.bool)
        last[:, -1] = True
        (ref,) = iter_activations(
            model, reference, sites, token_mask=last, batch_size=len(reference)
        )
        for name, feats in variants.items():
            hooks = [h for f in feats for h in swap_hooks(f, ref[f.site])]
            with model.hooks(fwd_hooks=hooks):
                logits = model(prompt)
            success, jsd = trials.score(logits, rows, refs, p)
            totals[name]["success"] += success
            totals[name]["jsd_target"] += jsd
        n += len(rows)
    return swap_rows(totals, n)


# ---------------------------------------------------------------------------- the table

COLUMNS = (
    ("state_precision", "state precision %", 100),
    ("regex_precision", "regex precision %", 100),
    ("steering_success", "topics steered", 1),
    ("swap_success", "swap success %", 100),
    ("loss_cost", "loss cost (nats)", 1),
    ("seconds", "compute (s)", 1),
)


def table_markdown(rows: list[dict[str, Any]], columns: tuple = COLUMNS) -> list[str]:
    """Markdown lines of the method x measure table; a missing cell is "n/a"."""
    used = [c for c in columns if any(c[0] in r for r in rows)]
    lines = [
        "| method | " + " | ".join(c[1] for c in used) + " |",
        "|---|" + "---|" * len(used),
    ]
    for r in rows:
        cells = []
        for key, _, scale in used:
            value = r.get(key)
            if value is None:
                cells.append("n/a")
            elif isinstance(value, str):
                cells.append(value)
            elif scale == 100:
                cells.append(f"{100 * value:.1f}")
            else:
                cells.append(f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines
