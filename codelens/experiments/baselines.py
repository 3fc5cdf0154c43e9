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
    steer_hooks,
    train_sae,
)

DEFAULT_SETTINGS: dict[str, Any] = {
    "sae_ks": ["matched", 32],
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
                "train_cpu_seconds": stats.cpu_seconds,
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
    settings = {**DEFAULT_SETTINGS, **(getattr(exp, "baselines", None) or {})}
    sites = list(model.codebooks)
    held = cache_activations(base, heldout, sites, batch_size=32)
    methods = fit_baselines(base, model, train_tokens, None, held, settings, exp.seed)

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
        row: dict[str, Any] = {"method": method.name}
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
    sae_rows = [r for r in rows if r["method"].startswith("SAE")]
    best = max(sae_rows, key=lambda r: (r.get("regex_precision") or 0, r["steering_success"]))
    return {"settings": settings, "best_sae": best["method"], "rows": rows, "details": details}


# ---------------------------------------------------------------------------- the table

COLUMNS = (
    ("state_precision", "state precision %", 100),
    ("regex_precision", "regex precision %", 100),
    ("steering_success", "topics steered %", 100),
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
                text = f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
                cells.append("0.000" if text == "-0.000" else text)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines
