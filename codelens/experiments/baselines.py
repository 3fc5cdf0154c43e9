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

SAE rows: k matched to the codes' L0 at each site (groups x k), and the SAE at its best
L0: an L0 sweep (`codelens.baselines.sweep`) trains TopK SAEs for each k of
``sweep_ks`` at every site with ``sweep_steps`` Adam steps, scores each k by the task's
precision (the caller's ``score``) and keeps the best; if ``sweep_steps`` is below
``steps`` the best k is trained again with ``steps``. Only these two SAE rows get the
full treatment (swaps or steering, loss cost). PCA and ICA use a full basis (d
components), so they cost no loss: they test whether a rotation of the activations finds
the states, not compression.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
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
    site_width,
    splice_hooks,
    steer_hooks,
    store_activations,
)
from codelens.baselines.sweep import L0Sweep, sweep_l0, train_and_measure

DEFAULT_SETTINGS: dict[str, Any] = {
    "sweep_ks": [4, 8, 16, 32, 64, 128],  # the L0 sweep's grid of TopK k (per site)
    "sweep_steps": 300,  # Adam steps per sweep point (the best k is retrained with steps)
    "ce_sequences": 64,  # held-out sequences for each sweep point's CE loss score
    "expansion": 4,  # SAE latents per input dimension
    "steps": 800,
    "batch_size": 512,
    "lr": 1e-3,
    "train_sequences": 2048,  # TokFSM rollouts to fit on
    "train_blocks": 512,  # stories: blocks of training text to fit on
    "ica_tokens": 10_000,
    "strengths": [2.0, 4.0],  # steering: clamp values, in multiples of the feature's mean
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

    def row(self) -> dict[str, Any]:
        """The table row's start: the name, and an SAE's latents per token (all sites)."""
        ks = [getattr(getattr(f, "config", None), "k", None) for f in self.features]
        if self.features and all(isinstance(k, int) for k in ks):
            return {"method": self.name, "latents_per_token": sum(ks)}
        return {"method": self.name}


def codebook_sites(model: Any) -> list[str]:
    return list(model.codebooks)


def matched_k(codebook_model: Any, site: str) -> int:
    """Codes per token at a site: groups x k (the SAE k of the same L0)."""
    cb = codebook_model.codebook(site)
    return cb.n_groups * cb.k


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The defaults updated by ``settings``; a clear error for an unknown key."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown baseline settings {unknown} (sae_ks became sweep_ks: the L0 sweep's "
            f"grid); known: {sorted(DEFAULT_SETTINGS)}"
        )
    return {**DEFAULT_SETTINGS, **settings}


def sae_config(settings: dict[str, Any], d: int, k: int, seed: int, steps: int) -> SAEConfig:
    return SAEConfig(
        n_latents=settings["expansion"] * d,
        k=k,
        steps=steps,
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        seed=seed,
    )


def train_saes(
    acts: dict[str, Tensor],
    heldout: dict[str, Tensor],
    k_of: Callable[[str], int],
    settings: dict[str, Any],
    seed: int,
    device: Any = None,
) -> tuple[list[LinearFeatures], dict[str, dict[str, float]]]:
    """One SAE per site with ``k_of(site)`` latents per token, ``settings['steps']`` steps,
    trained on ``device``."""
    features, metrics = [], {}
    for site, x in acts.items():
        config = sae_config(settings, x.shape[1], k_of(site), seed, settings["steps"])
        sae, metrics[site] = train_and_measure(x, site, config, heldout[site], device=device)
        features.append(sae)
    return features, metrics


def best_l0_sae(
    model: Any,
    acts: dict[str, Float[Tensor, "N d"]],
    heldout: dict[str, Float[Tensor, "M d"]],
    settings: dict[str, Any],
    seed: int,
    *,
    score: Callable[[list[LinearFeatures]], float],
    ce_tokens: Int[Tensor, "batch pos"],
) -> tuple[Baseline, L0Sweep]:
    """The L0 sweep over ``settings['sweep_ks']`` on ``acts`` (``sweep_steps`` steps per
    point), and the SAE at its best k with ``steps`` steps (the sweep's own when the two
    are equal). The baseline's seconds cover the sweep and the retraining."""
    settings = check_settings(settings)
    started = time.perf_counter()
    sweep = sweep_l0(
        acts,
        settings["sweep_ks"],
        lambda s, k: sae_config(settings, acts[s].shape[1], k, seed, settings["sweep_steps"]),
        score,
        heldout=heldout,
        model=model,
        ce_tokens=ce_tokens[: settings["ce_sequences"]],
    )
    if settings["sweep_steps"] == settings["steps"]:
        features: list[LinearFeatures] = list(sweep.best)
        metrics = next(p for p in sweep.points if p.k == sweep.best_k).per_site
    else:
        features, metrics = train_saes(
            acts, heldout, lambda s: sweep.best_k, settings, seed, _device(model)
        )
    best = Baseline("SAE best L0 (sweep)", features, time.perf_counter() - started, metrics)
    return best, sweep


def fit_baselines(
    base: Any,
    codebook_model: Any,
    train_tokens: Int[Tensor, "batch pos"],
    train_mask: Bool[Tensor, "batch pos"] | None,
    heldout: dict[str, Float[Tensor, "N d"]],
    settings: dict[str, Any],
    seed: int,
    *,
    score: Callable[[list[LinearFeatures]], float],
    ce_tokens: Int[Tensor, "batch pos"],
) -> tuple[list[Baseline], L0Sweep]:
    """SAEs at the codes' L0 and at the best L0 of a sweep, PCA and ICA at the codebook
    sites of ``codebook_model``, fitted on ``base``'s activations of ``train_tokens``.

    ``heldout`` holds activations per site for the reconstruction metrics; ``score``
    rates one sweep point's SAEs (higher better); ``ce_tokens``: where each point's CE
    loss score is measured. Each method's seconds include the activation caching they
    all share; the best-L0 SAE's include the whole sweep.
    """
    settings = check_settings(settings)
    sites = codebook_sites(codebook_model)
    with tempfile.TemporaryDirectory(prefix="codelens-activations-") as store_dir:
        started = time.perf_counter()
        store = store_activations(
            base, train_tokens, sites, store_dir, token_mask=train_mask, batch_size=64
        )
        acts = {site: store[site] for site in sites}  # memory maps: pages read as needed
        caching = time.perf_counter() - started
        return _fit_all(
            base, codebook_model, acts, caching, heldout, settings, seed, score, ce_tokens
        )


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _fit_all(
    base: Any,
    codebook_model: Any,
    acts: dict[str, Any],
    caching: float,
    heldout: dict[str, Float[Tensor, "N d"]],
    settings: dict[str, Any],
    seed: int,
    score: Callable[[list[LinearFeatures]], float],
    ce_tokens: Int[Tensor, "batch pos"],
) -> tuple[list[Baseline], L0Sweep]:
    """`fit_baselines` on activations already stored; SAEs and ICA on the model's device."""
    sites = list(acts)
    started = time.perf_counter()
    features, metrics = train_saes(
        acts, heldout, lambda s: matched_k(codebook_model, s), settings, seed, _device(base)
    )
    out = [Baseline("SAE matched L0", features, caching + time.perf_counter() - started, metrics)]

    best, sweep = best_l0_sae(base, acts, heldout, settings, seed, score=score, ce_tokens=ce_tokens)
    best.seconds += caching
    out.append(best)

    for method, fit in (("PCA", pca_features), ("ICA", ica_features)):
        started = time.perf_counter()
        kwargs = {}
        if method == "ICA":
            kwargs = {"max_tokens": settings["ica_tokens"], "device": _device(base)}
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
    return out, sweep


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
    memory_budget_mb: float = 1024.0,
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
    return [neurons(s, site_width(model, s)) for s in sites]


# ---------------------------------------------------------------------------- stories


def steered(row: dict[str, Any]) -> bool:
    """The steering report's success test: >= 80% on topic from <= 15%, perplexity <= 2x."""
    return row.get("after", 0) >= 0.8 and row["before"] <= 0.15 and row["perplexity_ratio"] <= 2


def _split(features: list[LinearFeatures], index: int) -> tuple[LinearFeatures, int]:
    """The site's features and local index of a column of `encode_all`'s output."""
    for f in features:
        if index < f.n_features:
            return f, index
        index -= f.n_features
    raise ValueError(f"feature column {index} out of range")


@torch.no_grad()
def steer_with_features(
    base: Any,
    features: list[LinearFeatures],
    topic_values: Tensor,
    topic_labels: Tensor,
    recalls: Tensor,
    classifier: Any,
    exp: Any,
    plain: dict[str, Any],
    prompts: tuple[tuple[str, ...], tuple[str, ...]],
) -> list[dict[str, Any]]:
    """Per steered topic: the feature that best classifies "token in a story of this
    topic" at the topic code's recall, clamped at every position to ``strength`` times its
    mean value on the topic tokens where it fires; the strength is swept on the sweep
    prompts under the fluency guard, as codes are, then evaluated on the eval prompts.
    ``prompts``: (eval prompts, sweep prompts)."""
    from codelens import steering as st

    eval_prompts, sweep_prompts = prompts
    matches = best_neurons_for_labels(topic_values, topic_labels, recalls)
    rows = []
    for t, topic in enumerate(exp.topics):
        column, sign = int(matches.neuron[t]), int(matches.sign[t])
        site_features, local = _split(features, column)
        x = sign * topic_values[:, column]
        on = topic_labels[:, t] & (x >= float(matches.threshold[t]))
        value = sign * float(x[on].mean())
        sweep = []
        for strength in settings_strengths(exp):
            hooks = steer_hooks(site_features, clamp={local: strength * value})
            gen = st.generate_texts(
                base, sweep_prompts, exp.sweep_samples, exp.new_tokens, exp.seed + 200, hooks
            )
            share = st.on_topic_share(classifier, st.continuation_texts(base.tokenizer, gen), topic)
            ratio = st.perplexity(base, gen) / plain["sweep_perplexity"]
            sweep.append({"strength": strength, "on_topic": share, "perplexity_ratio": ratio})
        row: dict[str, Any] = {
            "topic": topic,
            "site": site_features.site,
            "feature": local,
            "precision": float(matches.precision[t]),
            "value": value,
            "before": plain["before"][topic],
            "sweep": sweep,
        }
        fluent = [o for o in sweep if o["perplexity_ratio"] <= exp.max_perplexity_ratio]
        if fluent:
            best = max(fluent, key=lambda o: o["on_topic"])
            hooks = steer_hooks(site_features, clamp={local: best["strength"] * value})
            gen = st.generate_texts(
                base, eval_prompts, exp.samples, exp.new_tokens, exp.seed + 100, hooks
            )
            texts = st.continuation_texts(base.tokenizer, gen)
            row |= {
                "strength": best["strength"],
                "after": st.on_topic_share(classifier, texts, topic),
                "perplexity_ratio": st.perplexity(base, gen) / plain["perplexity"],
                "example": texts[0],
            }
        rows.append(row)
    return rows


def settings_strengths(exp: Any) -> list[float]:
    return list({**DEFAULT_SETTINGS, **(getattr(exp, "baselines", None) or {})}["strengths"])


@torch.no_grad()
def steering_comparison(
    base: Any,
    model: Any,
    classifier: Any,
    exp: Any,
    report: dict[str, Any],
    *,
    tokens: Tensor,
    strings: list[list[str]],
    topic_of_row: Tensor,
    train_tokens: Tensor,
    heldout: Tensor,
    prompts: tuple[tuple[str, ...], tuple[str, ...]],
) -> dict[str, Any]:
    """Codes against SAEs, PCA, ICA and the base model's neurons in the steering
    experiment: regex precision at each pattern's code's recall, topic steering with one
    clamped feature, loss cost. ``tokens``/``strings``: the search stories (BOS first);
    ``topic_of_row``: each story's corpus topic index; ``train_tokens``: blocks of training
    stories to fit on; ``heldout``: blocks for reconstruction metrics and loss;
    ``prompts``: (eval prompts, sweep prompts) of the code steering."""
    from codelens import steering as st
    from codelens.analysis import regex_labels
    from codelens.data.stories import PATTERNS, TOPICS

    eval_prompts, sweep_prompts = prompts
    settings = check_settings(getattr(exp, "baselines", None) or {})
    sites = list(model.codebooks)
    held = cache_activations(base, heldout, sites, batch_size=32)

    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    found = [r for r in report["regex"] if "code" in r]
    regex = (
        torch.stack(
            [(regex_labels(strings, PATTERNS[r["pattern"]]) & mask)[mask] for r in found], 1
        )
        if found
        else None
    )
    regex_recalls = torch.tensor([r["recall"] for r in found], dtype=torch.float64)
    topic_mask = torch.zeros_like(mask)
    topic_mask[:, exp.topic_skip :] = True
    row_topic = topic_of_row[:, None].expand_as(tokens)[topic_mask]
    steered_ids = torch.tensor([TOPICS.index(t) for t in exp.topics])
    topic_labels = row_topic[:, None] == steered_ids[None, :]
    topic_recalls = torch.tensor(
        [
            r["candidates"][0]["recall"] if r.get("candidates") else exp.min_topic_recall
            for r in report["steering"]["topics"]
        ],
        dtype=torch.float64,
    )

    def score(features: list[LinearFeatures]) -> float:
        """Regex precision; topic precision where no pattern has a code."""
        if regex is not None:
            values = encode_all(base, features, tokens, mask)
            return float(precision_at_recalls(values, regex, regex_recalls)["mean_precision"])
        values = encode_all(base, features, tokens, topic_mask)
        return float(precision_at_recalls(values, topic_labels, topic_recalls)["mean_precision"])

    methods, sweep = fit_baselines(
        base, model, train_tokens, None, held, settings, exp.seed, score=score, ce_tokens=heldout
    )
    plain_gen = st.generate_texts(base, eval_prompts, exp.samples, exp.new_tokens, exp.seed + 100)
    plain_texts = st.continuation_texts(base.tokenizer, plain_gen)
    sweep_gen = st.generate_texts(
        base, sweep_prompts, exp.sweep_samples, exp.new_tokens, exp.seed + 200
    )
    plain = {
        "perplexity": st.perplexity(base, plain_gen),
        "sweep_perplexity": st.perplexity(base, sweep_gen),
        "before": {t: st.on_topic_share(classifier, plain_texts, t) for t in exp.topics},
    }

    losses = report["heldout_loss"]
    code_rows = report["steering"]["topics"]
    rows: list[dict[str, Any]] = [
        {
            "method": "codes",
            "regex_precision": sum(r["precision"] for r in found) / len(found) if found else None,
            "steering_success": sum(steered(r) for r in code_rows) / len(code_rows),
            "loss_cost": losses["codebooks"] - losses["baseline"],
            "seconds": report["timings"].get("codebook training s"),
        }
    ]
    details: dict[str, Any] = {"base_model_unsteered": plain}
    candidates = [
        *methods,
        *(
            Baseline(
                f"{label} (base model)",
                identity_features(
                    base, [f"blocks.{layer}.{hook}" for layer in range(base.cfg.n_layers)]
                ),
                0.0,
            )
            for label, hook in (
                ("MLP hidden units", "mlp.hook_post"),
                ("residual stream dims", "hook_resid_post"),
            )
        ),
    ]
    for method in candidates:
        row = method.row()
        detail: dict[str, Any] = {"metrics": method.metrics}
        if regex is not None:
            values = encode_all(base, method.features, tokens, mask)
            precision = precision_at_recalls(values, regex, regex_recalls)
            row["regex_precision"] = precision["mean_precision"]
            detail["regex"] = precision
            del values
        values = encode_all(base, method.features, tokens, topic_mask)
        topics = steer_with_features(
            base,
            method.features,
            values,
            topic_labels,
            topic_recalls,
            classifier,
            exp,
            plain,
            prompts,
        )
        row["steering_success"] = sum(steered(r) for r in topics) / len(topics)
        detail["steering"] = topics
        if method.seconds:
            cost = splice_loss_cost(base, method.features, heldout)
            row |= {"loss_cost": cost["loss_cost"], "seconds": method.seconds}
            detail["loss"] = cost
        rows.append(row)
        details[method.name] = detail
    return {
        "settings": settings,
        "best_sae": best_sae(sweep, settings),
        "sweep_score": "regex precision" if regex is not None else "topic precision",
        "sae_sweep": sweep.as_dict(),
        "rows": rows,
        "details": details,
    }


# ---------------------------------------------------------------------------- the table

COLUMNS = (
    ("latents_per_token", "SAE latents/token", 1),
    ("state_precision", "state precision %", 100),
    ("regex_precision", "regex precision %", 100),
    ("steering_success", "topics steered %", 100),
    ("swap_success", "swap success %", 100),
    ("loss_cost", "loss cost (nats)", 1),
    ("seconds", "compute (s)", 1),
)


def best_sae(sweep: L0Sweep, settings: dict[str, Any]) -> str:
    """The best-L0 row in words: its k and the grid it was chosen from."""
    return f"k={sweep.best_k} per site, the best of k in {list(settings['sweep_ks'])}"


def sweep_markdown(sweep: dict[str, Any], score_label: str) -> list[str]:
    """Markdown lines of the L0 sweep: one row per k, the chosen one marked."""
    lines = [
        f"| k per site | latents/token | {score_label} % | explained variance | "
        "CE loss score | dead % | training s (CPU s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sweep["points"]:
        m = p["summary"]
        ce = f"{m['ce_loss_score']:.3f}" if "ce_loss_score" in m else "n/a"
        mark = " (best)" if p["k"] == sweep["best_k"] else ""
        lines.append(
            f"| {p['k']}{mark} | {m['l0']:.1f} | {100 * p['score']:.1f} | "
            f"{m['explained_variance']:.3f} | {ce} | {100 * m['dead_fraction']:.1f} | "
            f"{m['train_seconds']:.1f} ({m['train_cpu_seconds']:.1f}) |"
        )
    return lines


def sweep_lines(section: dict[str, Any]) -> list[str]:
    """The L0 sweep table, for reports that have one."""
    if "sae_sweep" not in section:
        return []
    return [
        "",
        "### SAE L0 sweep",
        "",
        f"TopK SAEs at every codebook site for each k, {section['settings']['sweep_steps']} "
        f"steps each, scored by {section['sweep_score']} (the best k, ties to the smaller, "
        "is the best-L0 row above). Explained variance, dead share and CE loss score (each "
        "site's SAE spliced in alone) are means over sites; latents/token and training "
        "seconds sum over sites.",
        "",
        *sweep_markdown(section["sae_sweep"], section["sweep_score"]),
    ]


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
            elif isinstance(value, str | int):
                cells.append(str(value))
            elif scale == 100:
                cells.append(f"{100 * value:.1f}")
            else:
                text = f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
                cells.append("0.000" if text == "-0.000" else text)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines
