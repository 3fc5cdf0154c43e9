"""Baselines against codes in the experiments: SAEs, PCA, ICA and neurons on the same tasks.

Every baseline is fitted on the model *without* codebooks (the frozen base model), at the
codebook sites (each layer's ``attn.hook_z``, heads concatenated, and ``hook_mlp_out``),
then measured by the same code as the codes:

- state / regex precision: all features of all sites are "neurons" for
  `codelens.analysis.best_neurons_for_labels`, at the recall of the codebook model's
  best code for the state or pattern;
- swaps: at the token completing state s, the features of a sequence in state t replace
  those of s (`codelens.baselines.swap_feature_hooks`), in the same variants as the code swaps;
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.analysis import (
    PROBE_KS,
    best_neurons_for_labels,
    document_code_rates,
    pooled_features,
    probing_table,
)
from codelens.baselines import (
    LinearFeatures,
    SAEConfig,
    SparseAutoencoder,
    cache_activations,
    encode_all,
    encode_batch_size,
    ica_features,
    identity_features,
    pca_features,
    sae_metrics,
    site_width,
    splice_loss_cost,
    steer_feature_hooks,
    store_activations,
)
from codelens.baselines.encoding import MEMORY_BUDGET_MB
from codelens.baselines.sweep import L0Sweep, sweep_l0, train_and_measure
from codelens.vocab import every_layer, resid_pre

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
    "direction_scales": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0],  # mean-difference steering: multiples
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


def check_encoding_budget(model: Any, settings: dict[str, Any], tokens: Tensor) -> None:
    """Raise now, before the search and steering, if the SAE features of every codebook
    site of ``model`` at every token of ``tokens`` would not fit `encode_all`'s memory
    budget."""
    width = sum(site_width(model, site) for site in codebook_sites(model))
    n_tokens, seq_len = tokens.shape
    encode_batch_size(
        n_tokens * seq_len, seq_len, settings["expansion"] * width, width, MEMORY_BUDGET_MB
    )


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


def precision_at_recalls(
    values: Tensor, labels: Tensor, recalls: Tensor
) -> dict[str, float | list[float]]:
    """Best feature's precision at each label's recall (the code's), and their mean."""
    matches = best_neurons_for_labels(values, labels, recalls)
    return {
        "mean_precision": float(matches.precision.mean()),
        "precision": matches.precision.tolist(),
    }


# ---------------------------------------------------------------------------- stories


def steered(row: dict[str, Any], corpus: str = "stories") -> bool:
    """The steering report's success test (issue 24's targets), perplexity <= 2x in both:
    on the stories >= 80% on topic from <= 15%; on another corpus, whose unsteered shares
    vary by topic, >= 70% on topic and at least 10 points above the unsteered share."""
    if "after" not in row or row["perplexity_ratio"] > 2:
        return False
    if corpus == "stories":
        return row["after"] >= 0.8 and row["before"] <= 0.15
    return row["after"] >= 0.7 and row["after"] - row["before"] >= 0.1


def success_rule(corpus: str) -> str:
    """`steered` in words."""
    if corpus == "stories":
        return ">=80% on topic from <=15%, perplexity <=2x"
    return ">=70% on topic and >=10 points over unsteered, perplexity <=2x"


def _split(features: list[LinearFeatures], index: int) -> tuple[LinearFeatures, int]:
    """The site's features and local index of a column of `encode_all`'s output."""
    for f in features:
        if index < f.n_features:
            return f, index
        index -= f.n_features
    raise ValueError(f"feature column {index} out of range")


def sweep_and_evaluate(
    base: Any,
    classifier: Any,
    exp: Any,
    plain: dict[str, Any],
    prompts: tuple[tuple[str, ...], tuple[str, ...]],
    topic: str,
    options: list[dict[str, Any]],
    hooks: Callable[[dict[str, Any]], list],
) -> dict[str, Any]:
    """A baseline's steering of ``topic`` on the base model: ``options`` swept on the sweep
    prompts under the fluency guard, the best confirmed (as codes are), the pick evaluated
    on the eval prompts (``prompts``: eval, sweep). Row fields: ``before``, ``sweep``, and
    with a pick its settings, ``after``, ``perplexity_ratio`` and an ``example``."""
    from codelens import steering as st

    eval_prompts, sweep_prompts = prompts

    def trial(option: dict[str, Any], seed: int = exp.seed + 200) -> Any:
        return st.steering_trial(
            base, base, classifier, topic, hooks(option), sweep_prompts,
            samples=exp.sweep_samples, new_tokens=exp.new_tokens, seed=seed,
        )  # fmt: skip

    sweep, best = st.sweep_steering(
        options,
        trial,
        perplexity_before=plain["sweep_perplexity"],
        max_perplexity_ratio=exp.sweep_perplexity_ratio,
        confirm=(lambda o: trial(o, exp.seed + 300)) if exp.finalists else None,
        finalists=max(exp.finalists, 1),
    )
    row: dict[str, Any] = {"before": plain["before"][topic], "sweep": sweep}
    if best is not None:
        final = st.steering_trial(
            base, base, classifier, topic, hooks(best), eval_prompts,
            samples=exp.samples, new_tokens=exp.new_tokens, seed=exp.seed + 100,
        )  # fmt: skip
        row |= {k: v for k, v in best.items() if k not in st.MEASURED}
        row |= {
            "after": final.on_topic,
            "perplexity_ratio": final.perplexity / plain["perplexity"],
            "example": final.texts[0],
        }
    return row


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
    matches = best_neurons_for_labels(topic_values, topic_labels, recalls)
    rows = []
    for t, topic in enumerate(exp.topics):
        column, sign = int(matches.neuron[t]), int(matches.sign[t])
        site_features, local = _split(features, column)
        x = sign * topic_values[:, column]
        on = topic_labels[:, t] & (x >= float(matches.threshold[t]))
        value = sign * float(x[on].mean())

        def clamped(option: dict[str, Any], features=site_features, local=local, value=value):
            return steer_feature_hooks(base, features, clamp={local: option["strength"] * value})

        row = {
            "topic": topic,
            "site": site_features.site,
            "feature": local,
            "precision": float(matches.precision[t]),
            "value": value,
        }
        options = [{"strength": strength} for strength in settings_strengths(exp)]
        row |= sweep_and_evaluate(base, classifier, exp, plain, prompts, topic, options, clamped)
        rows.append(row)
    return rows


@torch.no_grad()
def steer_with_direction(
    base: Any,
    tokens: Tensor,
    topic_of_row: Tensor,
    classifier: Any,
    exp: Any,
    plain: dict[str, Any],
    prompts: tuple[tuple[str, ...], tuple[str, ...]],
    *,
    topics: Sequence[str],
) -> list[dict[str, Any]]:
    """Per steered topic, activation addition: the mean-difference direction (the topic's
    search rows minus the others', tokens from ``exp.topic_skip`` on) added to the base
    model's residual stream before its middle layer at every position, at the multiple
    the sweep picks under the fluency guard (the same sweep and eval prompts and seeds as
    codes and features). ``topic_of_row``: each row's index in ``topics`` (every topic of
    the corpus)."""
    from codelens import steering as st

    hook = resid_pre(base.cfg.n_layers // 2)
    scales = check_settings(getattr(exp, "baselines", None) or {})["direction_scales"]
    rows = []
    for topic in exp.topics:
        is_topic = topic_of_row == topics.index(topic)
        direction = st.mean_difference_direction(
            base, hook, tokens[is_topic], tokens[~is_topic], start=exp.topic_skip
        )

        def added(option: dict[str, Any], direction: Tensor = direction):
            return st.add_direction_hooks(base, hook, direction, option["scale"])

        row = {"topic": topic, "hook": hook, "direction_norm": float(direction.norm())}
        options = [{"scale": float(scale)} for scale in scales]
        row |= sweep_and_evaluate(base, classifier, exp, plain, prompts, topic, options, added)
        rows.append(row)
    return rows


def settings_strengths(exp: Any) -> list[float]:
    return list({**DEFAULT_SETTINGS, **(getattr(exp, "baselines", None) or {})}["strengths"])


@dataclass
class StoryLabels:
    """What features are scored against in the steering experiment: each regex pattern
    that has a code (``regex``: its labels at the ``mask`` tokens, ``regex_recalls``: its
    code's recall; None if no pattern has a code), and each steered topic
    (``topic_labels`` at the ``topic_mask`` tokens, ``topic_recalls``: its best code's)."""

    mask: Tensor
    found: list[dict[str, Any]]
    regex: Tensor | None
    regex_recalls: Tensor
    topic_mask: Tensor
    topic_labels: Tensor
    topic_recalls: Tensor

    def score(self, base: Any, features: list[LinearFeatures], tokens: Tensor) -> float:
        """Regex precision; topic precision where no pattern has a code (the SAE sweep's)."""
        if self.regex is not None:
            values = encode_all(base, features, tokens, self.mask)
            precision = precision_at_recalls(values, self.regex, self.regex_recalls)
        else:
            values = encode_all(base, features, tokens, self.topic_mask)
            precision = precision_at_recalls(values, self.topic_labels, self.topic_recalls)
        return float(precision["mean_precision"])


def story_labels(
    exp: Any,
    report: dict[str, Any],
    tokens: Tensor,
    strings: list[list[str]],
    topic_of_row: Tensor,
    topics: Sequence[str],
) -> StoryLabels:
    """The `StoryLabels` of the search rows (BOS first), from the codes' report;
    ``topic_of_row`` indexes ``topics`` (every topic of the corpus)."""
    from codelens.analysis import regex_labels
    from codelens.data.stories import PATTERNS

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
    topic_mask = torch.zeros_like(mask)
    topic_mask[:, exp.topic_skip :] = True
    row_topic = topic_of_row[:, None].expand_as(tokens)[topic_mask]
    steered_ids = torch.tensor([topics.index(t) for t in exp.topics])
    topic_recalls = [
        r["candidates"][0]["recall"] if r.get("candidates") else exp.min_topic_recall
        for r in report["steering"]["topics"]
    ]
    return StoryLabels(
        mask,
        found,
        regex,
        torch.tensor([r["recall"] for r in found], dtype=torch.float64),
        topic_mask,
        row_topic[:, None] == steered_ids[None, :],
        torch.tensor(topic_recalls, dtype=torch.float64),
    )


def unsteered(
    base: Any, classifier: Any, exp: Any, prompts: tuple[tuple[str, ...], tuple[str, ...]]
) -> dict[str, Any]:
    """The base model's perplexity on the eval and sweep prompts, and its on-topic shares."""
    from codelens import steering as st

    eval_prompts, sweep_prompts = prompts
    plain_gen = st.generate_texts(
        base, eval_prompts, exp.unsteered_samples, exp.new_tokens, exp.seed + 100
    )
    plain_texts = st.continuation_texts(base.tokenizer, plain_gen)
    sweep_gen = st.generate_texts(
        base, sweep_prompts, exp.sweep_samples, exp.new_tokens, exp.seed + 200
    )
    return {
        "perplexity": st.perplexity(base, plain_gen),
        "sweep_perplexity": st.perplexity(base, sweep_gen),
        "before": {t: st.on_topic_share(classifier, plain_texts, t) for t in exp.topics},
    }


def codes_row(report: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, Any]:
    """The codes' row of the comparison, from the steering report."""
    losses, code_rows = report["heldout_loss"], report["steering"]["topics"]
    corpus = report.get("experiment", {}).get("corpus", "stories")
    return {
        "method": "codes",
        "regex_precision": sum(r["precision"] for r in found) / len(found) if found else None,
        "steering_success": sum(steered(r, corpus) for r in code_rows) / len(code_rows),
        "loss_cost": losses["codebooks"] - losses["baseline"],
        "seconds": report["timings"].get("codebook training s"),
    }


def base_neuron_baselines(base: Any) -> list[Baseline]:
    """The base model's MLP hidden units and residual stream dims, as (free) baselines."""
    return [
        Baseline(
            f"{label} (base model)",
            identity_features(base, every_layer(base.cfg.n_layers, hook)),
            0.0,
        )
        for label, hook in (
            ("MLP hidden units", "mlp.hook_post"),
            ("residual stream dims", "hook_resid_post"),
        )
    ]


def compare_method(
    base: Any,
    method: Baseline,
    labels: StoryLabels,
    tokens: Tensor,
    heldout: Tensor,
    classifier: Any,
    exp: Any,
    plain: dict[str, Any],
    prompts: tuple[tuple[str, ...], tuple[str, ...]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One method's row (regex precision, steering success, loss cost) and its details."""
    row = method.row()
    detail: dict[str, Any] = {"metrics": method.metrics}
    if labels.regex is not None:
        values = encode_all(base, method.features, tokens, labels.mask)
        precision = precision_at_recalls(values, labels.regex, labels.regex_recalls)
        row["regex_precision"] = precision["mean_precision"]
        detail["regex"] = precision
        del values
    values = encode_all(base, method.features, tokens, labels.topic_mask)
    topics = steer_with_features(
        base,
        method.features,
        values,
        labels.topic_labels,
        labels.topic_recalls,
        classifier,
        exp,
        plain,
        prompts,
    )
    row["steering_success"] = sum(
        steered(r, getattr(exp, "corpus", "stories")) for r in topics
    ) / len(topics)
    detail["steering"] = topics
    if method.seconds:
        cost = splice_loss_cost(base, method.features, heldout)
        row |= {"loss_cost": cost["loss_cost"], "seconds": method.seconds}
        detail["loss"] = cost
    return row, detail


MEAN_DIFFERENCE = "mean-difference direction (base model)"


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
    topics: Sequence[str],
) -> dict[str, Any]:
    """Codes against SAEs, PCA, ICA, the base model's neurons and a mean-difference
    direction in the steering experiment: regex precision at each pattern's code's recall,
    topic steering with one clamped feature (or the added direction), loss cost, and
    k-sparse probing of the search rows' topics (`probing_section`).
    ``tokens``/``strings``: the search rows (BOS first); ``topic_of_row``: each row's
    index in ``topics`` (every corpus topic); ``train_tokens``: blocks of training text to
    fit on; ``heldout``: blocks for reconstruction metrics and loss; ``prompts``: (eval
    prompts, sweep prompts) of the code steering, which every baseline steers on too."""
    settings = check_settings(getattr(exp, "baselines", None) or {})
    held = cache_activations(base, heldout, list(model.codebooks), batch_size=32)
    labels = story_labels(exp, report, tokens, strings, topic_of_row, topics)
    methods, sweep = fit_baselines(
        base,
        model,
        train_tokens,
        None,
        held,
        settings,
        exp.seed,
        score=lambda features: labels.score(base, features, tokens),
        ce_tokens=heldout,
    )
    plain = unsteered(base, classifier, exp, prompts)
    rows: list[dict[str, Any]] = [codes_row(report, labels.found)]
    details: dict[str, Any] = {"base_model_unsteered": plain}
    for method in [*methods, *base_neuron_baselines(base)]:
        row, details[method.name] = compare_method(
            base, method, labels, tokens, heldout, classifier, exp, plain, prompts
        )
        rows.append(row)
    direction = steer_with_direction(
        base, tokens, topic_of_row, classifier, exp, plain, prompts, topics=topics
    )
    rows.append(
        {
            "method": MEAN_DIFFERENCE,
            "steering_success": sum(
                steered(r, getattr(exp, "corpus", "stories")) for r in direction
            )
            / len(direction),
        }
    )
    details[MEAN_DIFFERENCE] = {"steering": direction}
    names = [topics[i] for i in topic_of_row.tolist()]
    probing = probing_section(
        base, model, methods, tokens, labels.mask, names, exp.topics, seed=exp.seed
    )
    return {
        "settings": settings,
        "best_sae": best_sae(sweep, settings),
        "sweep_score": "regex precision" if labels.regex is not None else "topic precision",
        "sae_sweep": sweep.as_dict(),
        "rows": rows,
        "details": details,
        "probing": probing,
    }


# ---------------------------------------------------------------------------- probing


@torch.no_grad()
def probing_section(
    base: Any,
    model: Any,
    methods: list[Baseline],
    tokens: Int[Tensor, "docs pos"],
    mask: Bool[Tensor, "docs pos"],
    labels: list[str],
    topics: list[str] | tuple[str, ...],
    ks: tuple[int, ...] = PROBE_KS,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """k-sparse probing (`codelens.analysis.probing`) of each document's topic, each of
    ``topics`` against the rest, on per-document features mean-pooled over the ``mask``
    tokens: the codebook model's code firing rates, the latents of each SAE method of
    ``methods`` (matched and best L0; fitted on ``base``), and ``base``'s MLP neurons
    (every layer) and raw activations at the codebook sites. ``labels``: each
    document's (row's) topic."""
    sets = {"codes (codebook model)": document_code_rates(model, tokens, mask)[0]}
    for method in methods:
        if method.features and all(isinstance(f, SparseAutoencoder) for f in method.features):
            sets[method.name] = pooled_features(base, tokens, mask, method.features)
    neurons_at = every_layer(base.cfg.n_layers, "mlp.hook_post")
    for name, sites in (
        ("MLP neurons (base model)", neurons_at),
        ("raw activations (base model, codebook sites)", codebook_sites(model)),
    ):
        sets[name] = pooled_features(base, tokens, mask, identity_features(base, sites))
    return {
        "ks": list(ks),
        "topics": list(topics),
        "documents": len(labels),
        "features": {name: x.shape[1] for name, x in sets.items()},
        "rows": probing_table(sets, labels, topics, ks, seed=seed),
    }


def probing_markdown(probing: dict[str, Any]) -> list[str]:
    """Markdown lines of a `probing_section`: one row per method, one column per k."""
    ks = probing["ks"]
    lines = [
        "### k-sparse probing of topics",
        "",
        f"Each of {len(probing['topics'])} topics against the rest over "
        f"{probing['documents']} documents, features mean-pooled over each document's "
        "tokens (codes: firing rates). Per topic: a balanced train/test split (80/20, the "
        "majority class subsampled, chance 50%), the k features of largest class-mean gap "
        "on the train split, a logistic regression on them; mean test accuracy % over "
        "topics (n/a: fewer features than k).",
        "",
        "| method | features | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for method, width in probing["features"].items():
        by_k = {r["k"]: r["accuracy"] for r in probing["rows"] if r["method"] == method}
        cells = ["n/a" if by_k[k] is None else f"{100 * by_k[k]:.1f}" for k in ks]
        lines.append(f"| {method} | {width} | " + " | ".join(cells) + " |")
    return lines


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
