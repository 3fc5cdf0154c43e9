"""The TokFSM experiment: are codes the FSM's states, and are they causal?

Pipeline (every model goes through `HookedCodebookTransformer`, `run_with_cache`
and `run_with_hooks`):

1. train a baseline GPT-NeoX from scratch on TokFSM rollouts;
2. fine-tune it with attention + MLP codebooks (k=1, and larger k), k-means
   initialised, dead codes replaced;
3. Table 1 for every model: loss, next-token accuracy, valid-transition accuracy
   of sampled generations (temperature 1), first-transition accuracy;
4. state codes: every code as a classifier of "the FSM is in state s" at the
   token that completes a state, against the best single neuron at the same recall;
5. interventions: at the token completing state s, replace the codes by those of
   another sequence in state t at the same position, and measure whether the
   next-token distribution moves to t's successors.

The report (markdown, JSON, plotly HTML) goes to the run directory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from codelens.analysis import best_neurons_for_labels, code_firing, codes_for_classes
from codelens.baselines import (
    LinearFeatures,
    encode_all,
    identity_features,
    iter_activations,
    splice_loss_cost,
    swap_feature_hooks,
)
from codelens.data.fsm import (
    FSMConfig,
    TokFSM,
    first_transition_accuracy,
    next_token_metrics,
    transition_accuracy,
)
from codelens.environment import check_cached_generation, stack
from codelens.experiments.report import write_report
from codelens.experiments.stages import train_stage
from codelens.interventions import paste_codes_hooks
from codelens.model import HookedCodebookTransformer
from codelens.vocab import (
    cached_batches,
    codes_hook,
    collect_codes,
    every_layer,
    is_attn_site,
    is_mlp_site,
    layer_of,
)

NEURON_HOOKS = {"MLP hidden units": "mlp.hook_post", "residual stream dims": "hook_resid_post"}


@dataclass
class FSMExperiment:
    """Everything the TokFSM experiment needs; see `QUICK` and `FULL`."""

    run_dir: str
    fsm: dict[str, Any]
    model: dict[str, Any]
    baseline: dict[str, Any]
    codebook_models: dict[str, dict[str, Any]]
    eval_sequences: int = 512
    generations: int = 512
    generated_states: int = 16
    transitions: int = 500
    seed: int = 0
    threads: int | None = 1  # small models: one thread avoids OpenMP oversubscription stalls
    baselines: dict[str, Any] | None = dataclasses.field(default_factory=dict)  # None: skip

    def with_run_dir(self, run_dir: str) -> FSMExperiment:
        return dataclasses.replace(self, run_dir=run_dir)


def _gpt2(d_model: int, layers: int, heads: int, d_mlp: int, n_ctx: int) -> dict[str, Any]:
    """The paper's shape in the GPT-2 family, whose learned absolute positions tell a
    state's first digit from its second at once (GPT-NeoX's rotary-only positions make
    that parity hard to learn: see the closing notes for the comparison)."""
    return {
        "model_type": "gpt2",
        "n_embd": d_model,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": d_mlp,
        "n_positions": n_ctx,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


# Codebooks come in by layer-wise k-means on the trained model's own activations, then
# only the codebooks train (the base model stays as it was): fine-tuning every weight at
# the baseline's learning rate let activations drift away from their codes and cost most
# of the transition accuracy (see the closing notes for the comparison). An MLP output is
# as wide as all heads together and gets 4x the codes of a head: with C=1000 everywhere,
# most of the k=1 model's loss gap came from the layer-0 MLP codebook (see the README).
def _codebook_stage(n_codes: int, k: int, steps: int, dead_code_window: int) -> dict[str, Any]:
    return {
        "codebook": {"n_codes": n_codes, "k": k, "mlp_n_codes": 4 * n_codes},
        "train": "codebooks",
        "steps": steps,
        "lr": 1e-3,
        "warmup_steps": 10,
        "batch_size": 64,
        "dead_code_window": dead_code_window,
    }


FULL = FSMExperiment(
    run_dir="runs/tokfsm",
    fsm={"n_states": 100, "n_successors": 10, "seq_len": 33, "seed": 42},
    model=_gpt2(128, 4, 4, 512, 128),
    baseline={"steps": 1500, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50, "weight_decay": 0.1},
    codebook_models={
        "attn+mlp k=1 C=1000/4000": _codebook_stage(1000, 1, 400, 100_000),
        "attn+mlp k=4 C=1000/4000": _codebook_stage(1000, 4, 400, 100_000),
    },
)

QUICK = FSMExperiment(
    run_dir="runs/tokfsm-quick",
    fsm={"n_states": 20, "n_successors": 4, "seq_len": 25, "seed": 42},
    model=_gpt2(64, 2, 4, 256, 64),
    baseline={"steps": 500, "batch_size": 64, "lr": 5e-3, "warmup_steps": 30, "weight_decay": 0.1},
    codebook_models={
        "attn+mlp k=1 C=200/800": _codebook_stage(200, 1, 200, 50_000),
    },
    eval_sequences=256,
    generations=256,
    transitions=500,
    baselines={"steps": 300, "sweep_ks": [4, 16], "sweep_steps": 300, "train_sequences": 1024},
)


# ---------------------------------------------------------------------------- training


def _train_stage(exp: FSMExperiment, name: str, settings: dict[str, Any], base: str | None):
    return train_stage(
        Path(exp.run_dir) / _slug(name),
        {"fsm": exp.fsm},
        settings,
        base=base,
        model_config=exp.model,
        seed=exp.seed,
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


# ---------------------------------------------------------------------------- Table 1


@torch.no_grad()
def evaluate_fsm_model(
    model: HookedCodebookTransformer, fsm: TokFSM, exp: FSMExperiment
) -> dict[str, float]:
    """Next-token loss/accuracy on fresh rollouts and transition accuracy of sampled text."""
    model.eval()
    gen = torch.Generator().manual_seed(exp.seed + 7)
    tokens, _ = fsm.sample(exp.eval_sequences, generator=gen)
    metrics = next_token_metrics(_batched_logits(model, tokens), tokens)
    prompts = fsm.prompts(exp.generations, 1, generator=gen)
    check_cached_generation(model, prompts[:8])
    # Stay within the trained length: positions past it were never trained.
    n_states = min(exp.generated_states, fsm.states_per_seq - 1)
    torch.manual_seed(exp.seed + 11)
    out = model.generate(
        prompts,
        max_new_tokens=n_states * fsm.n_digits,
        do_sample=True,
        temperature=1.0,
        stop_at_eos=False,
        verbose=False,
    )
    metrics["transition_accuracy"] = transition_accuracy(fsm, out, n_prompt_states=1)
    metrics["first_transition_accuracy"] = first_transition_accuracy(fsm, prompts, out)
    return metrics


def _batched_logits(model, tokens: Tensor, batch_size: int = 128) -> Tensor:
    return torch.cat([model(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])


# ---------------------------------------------------------------------------- state codes


@torch.no_grad()
def state_code_analysis(
    model: HookedCodebookTransformer, fsm: TokFSM, exp: FSMExperiment
) -> dict[str, Any]:
    """Codes vs neurons as classifiers of the FSM state, at tokens that complete a state."""
    gen = torch.Generator().manual_seed(exp.seed + 13)
    tokens, states = fsm.sample(exp.eval_sequences, generator=gen)
    state, digit = fsm.token_states(tokens, states)
    at_state_end = (digit == fsm.n_digits - 1).reshape(-1)
    classes = state.reshape(-1)[at_state_end]
    sites = list(model.codebooks)
    neuron_names = {
        label: every_layer(model.cfg.n_layers, hook) for label, hook in NEURON_HOOKS.items()
    }
    wanted = [codes_hook(s) for s in sites] + [n for g in neuron_names.values() for n in g]
    codes: dict[str, list[Tensor]] = {s: [] for s in sites}
    acts: dict[str, list[Tensor]] = {label: [] for label in neuron_names}
    for _, cache in cached_batches(model, tokens, wanted, batch_size=128):
        for site in sites:
            codes[site].append(cache[codes_hook(site)])
        for label, group in neuron_names.items():
            flat = [cache[n].reshape(cache[n].shape[0] * cache[n].shape[1], -1) for n in group]
            acts[label].append(torch.cat(flat, dim=1))
    n_codes = {s: model.codebook(s).n_codes for s in sites}
    firing = code_firing({s: torch.cat(c) for s, c in codes.items()}, n_codes)
    firing = firing.select(at_state_end)
    found = codes_for_classes(firing, classes, fsm.n_states, min_count=5)
    has_code = found.best_code >= 0
    best_precision = torch.where(
        has_code, found.best_precision, torch.zeros_like(found.best_precision)
    )
    result: dict[str, Any] = {
        "state_tokens": int(at_state_end.sum()),
        "states_with_code": int(has_code.sum()),
        "mean_best_code_precision": float(best_precision.mean()),
        "mean_best_code_recall": float(found.best_recall[has_code].mean())
        if has_code.any()
        else 0.0,
        "share_states_code_precision_ge_95": float((best_precision >= 0.95).float().mean()),
        "per_state": [],
        "neurons": {},
    }
    labels = torch.stack([classes == c for c in range(fsm.n_states)], dim=1)[:, has_code]
    recalls = found.best_recall[has_code]
    for label, parts in acts.items():
        neurons = torch.cat(parts)[at_state_end].float()
        matches = best_neurons_for_labels(neurons, labels, recalls)
        result["neurons"][label] = {
            "n_neurons": neurons.shape[1],
            "mean_best_neuron_precision": float(matches.precision.mean()),
        }
        if label == "MLP hidden units":
            neuron_precision = matches.precision
    for row, precision in zip(found.table(), neuron_precision.tolist(), strict=True):
        result["per_state"].append(
            {"state": row.pop("class"), **row, "neuron_precision": precision}
        )
    return result


# ---------------------------------------------------------------------------- interventions


def _successor_digit_dist(fsm: TokFSM) -> Float[Tensor, "n_states 10"]:
    """Distribution of the first digit of the next state, for every state."""
    first = fsm.encode(fsm.transitions)[..., 0 :: fsm.n_digits]  # [S, n_succ] first digits
    dist = torch.zeros(fsm.n_states, 10)
    dist.scatter_add_(1, first, torch.ones_like(first, dtype=torch.float))
    return dist / dist.sum(-1, keepdim=True)


def _jsd(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits (so within [0, 1]), row-wise."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.clamp(min=1e-12) / b.clamp(min=1e-12)).log2()).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _intervention_variants(model: HookedCodebookTransformer) -> dict[str, list[str]]:
    sites = list(model.codebooks)
    mlp = [s for s in sites if is_mlp_site(s)]
    attn = [s for s in sites if is_attn_site(s)]
    variants = {"MLP, all layers": mlp, "attention, all layers": attn, "all sites": sites}
    for site in mlp:
        variants[f"MLP, layer {layer_of(site)} only"] = [site]
    return {k: v for k, v in variants.items() if v}


@dataclass
class SwapTrials:
    """State pairs to swap: at position p, row ``rows[i]`` (in state s) takes the codes or
    features of row ``refs[i]`` (in state t, with other successors) at the same position."""

    tokens: Tensor
    state: Tensor
    by_position: dict[int, tuple[Tensor, Tensor]]
    successors: Tensor  # [n_states, 10]: first-digit distribution of each state's successors

    def score(self, logits: Tensor, rows: Tensor, refs: Tensor, p: int) -> tuple[float, float]:
        """Summed successes (closer to t's successors than s's) and JSD to t, over pairs."""
        probs = logits[:, -1, :10].float().softmax(-1)
        q_s, q_t = self.successors[self.state[rows, p]], self.successors[self.state[refs, p]]
        to_t, to_s = _jsd(probs, q_t), _jsd(probs, q_s)
        return float((to_t < to_s).float().sum()), float(to_t.sum())


def swap_trials(fsm: TokFSM, exp: FSMExperiment) -> SwapTrials:
    """Draw ``exp.transitions`` state pairs with different successors (seeded by exp.seed)."""
    gen = torch.Generator().manual_seed(exp.seed + 17)
    tokens, states = fsm.sample(max(4 * fsm.n_states, exp.eval_sequences), generator=gen)
    state, digit = fsm.token_states(tokens, states)
    succ = _successor_digit_dist(fsm)
    ends = [p for p in range(fsm.n_digits, tokens.shape[1] - 1) if digit[0, p] == fsm.n_digits - 1]
    trials: dict[int, list[tuple[int, int]]] = {}
    found = 0
    for _ in range(100 * exp.transitions):  # draw until exp.transitions usable pairs
        if found == exp.transitions:
            break
        p = ends[int(torch.randint(len(ends), (1,), generator=gen))]
        row, ref = torch.randint(len(tokens), (2,), generator=gen).tolist()
        s, t = int(state[row, p]), int(state[ref, p])
        if s == t or torch.equal(succ[s], succ[t]):
            continue  # nothing to tell apart
        trials.setdefault(p, []).append((row, ref))
        found += 1
    if found < exp.transitions:
        raise ValueError(
            f"found only {found} state pairs with different successors; this FSM has too "
            "few states to tell apart"
        )
    by_position = {
        p: (torch.tensor([r for r, _ in pairs]), torch.tensor([r for _, r in pairs]))
        for p, pairs in trials.items()
    }
    return SwapTrials(tokens, state, by_position, succ)


def swap_rows(totals: dict[str, dict[str, float]], n: int) -> list[dict[str, Any]]:
    return [
        {
            "intervention": name,
            "trials": n,
            "success_rate": v["success"] / n,
            "jsd_to_target": v["jsd_target"] / n,
        }
        for name, v in totals.items()
    ]


@torch.no_grad()
def swap_state_codes(
    model: HookedCodebookTransformer, fsm: TokFSM, exp: FSMExperiment
) -> list[dict[str, Any]]:
    """Replace state s's codes by state t's at the token completing s; did the model follow t?"""
    trials = swap_trials(fsm, exp)
    variants = _intervention_variants(model)
    totals = {name: {"success": 0.0, "jsd_target": 0.0} for name in ["clean", *variants]}
    n = 0
    for p, (rows, refs) in trials.by_position.items():
        prompt, reference = trials.tokens[rows, : p + 1], trials.tokens[refs, : p + 1]
        ref_codes = collect_codes(model, reference, batch_size=len(reference))
        outcomes = {"clean": model(prompt)}
        for name, sites in variants.items():
            hooks = paste_codes_hooks({s: ref_codes[s] for s in sites}, position=-1)
            outcomes[name] = model.run_with_hooks(prompt, fwd_hooks=hooks)
        for name, logits in outcomes.items():
            success, jsd = trials.score(logits, rows, refs, p)
            totals[name]["success"] += success
            totals[name]["jsd_target"] += jsd
        n += len(rows)
    return swap_rows(totals, n)


@torch.no_grad()
def feature_swaps(
    model: Any, trials: SwapTrials, variants: dict[str, list[LinearFeatures]]
) -> list[dict[str, Any]]:
    """The state swaps of `swap_trials` with features instead of codes (the same trials)."""
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
            hooks = [h for f in feats for h in swap_feature_hooks(f, ref[f.site])]
            with model.hooks(fwd_hooks=hooks):
                logits = model(prompt)
            success, jsd = trials.score(logits, rows, refs, p)
            totals[name]["success"] += success
            totals[name]["jsd_target"] += jsd
        n += len(rows)
    return swap_rows(totals, n)


# ---------------------------------------------------------------------------- baselines


@dataclass
class BaselineData:
    """What the baselines are fitted on and scored with in the TokFSM experiment."""

    settings: dict[str, Any]
    train_tokens: Tensor  # rollouts to fit on
    train_mask: Tensor  # their tokens that belong to a state
    tokens: Tensor  # the state analysis' rollouts
    at_end: Tensor  # their tokens completing a state
    labels: Tensor  # [tokens at_end, states with a code]: token completes the state
    recalls: Tensor  # each state's best code's recall
    heldout: dict[str, Tensor]  # base activations of ``tokens`` per codebook site

    def state_precision(self, base: Any, features: list[LinearFeatures]) -> float:
        """Mean state precision of ``features`` at the codes' recall (the sweep's score)."""
        from codelens.experiments import baselines as bl

        values = encode_all(base, features, self.tokens, self.at_end)
        return float(bl.precision_at_recalls(values, self.labels, self.recalls)["mean_precision"])


def baseline_data(
    base: HookedCodebookTransformer,
    coded: HookedCodebookTransformer,
    fsm: TokFSM,
    exp: FSMExperiment,
    report: dict[str, Any],
    name: str,
) -> BaselineData:
    """Training rollouts, the state analysis' rollouts and labels, and the recall of
    ``name``'s best code per state (from ``report``), for `baseline_comparison`."""
    from codelens.experiments import baselines as bl

    settings = bl.check_settings(exp.baselines or {})
    per_state = report["models"][name]["state_codes"]["per_state"]
    states = torch.tensor([r["state"] for r in per_state])
    gen = torch.Generator().manual_seed(exp.seed + 23)
    train_tokens, train_states = fsm.sample(settings["train_sequences"], generator=gen)
    gen = torch.Generator().manual_seed(exp.seed + 13)  # the state analysis' tokens
    tokens, seq_states = fsm.sample(exp.eval_sequences, generator=gen)
    state, digit = fsm.token_states(tokens, seq_states)
    at_end = digit == fsm.n_digits - 1
    sites = list(coded.codebooks)
    return BaselineData(
        settings,
        train_tokens,
        fsm.token_states(train_tokens, train_states)[1] >= 0,
        tokens,
        at_end,
        state[at_end][:, None] == states[None, :],
        torch.tensor([r["recall"] for r in per_state], dtype=torch.float64),
        bl.cache_activations(base, tokens, sites, token_mask=digit >= 0, batch_size=64),
    )


@torch.no_grad()
def baseline_comparison(
    base: HookedCodebookTransformer,
    coded: dict[str, HookedCodebookTransformer],
    fsm: TokFSM,
    exp: FSMExperiment,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Codes against SAEs, PCA, ICA and the base model's neurons (see
    `codelens.experiments.baselines`), at the recall of the first codebook model's
    best code per state; one row per method."""
    from codelens.experiments import baselines as bl

    first = next(iter(coded))
    data = baseline_data(base, coded[first], fsm, exp, report, first)
    tokens, at_end, labels, recalls = data.tokens, data.at_end, data.labels, data.recalls
    methods, sweep = bl.fit_baselines(
        base,
        coded[first],
        data.train_tokens,
        data.train_mask,
        data.heldout,
        data.settings,
        exp.seed,
        score=lambda features: data.state_precision(base, features),
        ce_tokens=tokens,
    )
    trials = swap_trials(fsm, exp)
    variants = _intervention_variants(coded[first])
    rows: list[dict[str, Any]] = []
    base_loss = report["models"]["no codebook"]["table1"]["loss"]
    for name in coded:
        entry = report["models"][name]
        swaps = {r["intervention"]: r["success_rate"] for r in entry["interventions"]}
        rows.append(
            {
                "method": f"codes: {name}" + ("" if name == first else " (at its own recall)"),
                "state_precision": sum(r["precision"] for r in entry["state_codes"]["per_state"])
                / max(1, len(entry["state_codes"]["per_state"])),
                "swap_success": swaps.get("all sites"),
                "loss_cost": entry["table1"]["loss"] - base_loss,
                "seconds": report["timings"].get(f"{name} training s"),
            }
        )
    details: dict[str, Any] = {}
    for method in methods:
        values = encode_all(base, method.features, tokens, at_end)
        precision = bl.precision_at_recalls(values, labels, recalls)
        swaps = feature_swaps(base, trials, {v: method.at(s) for v, s in variants.items()})
        cost = splice_loss_cost(base, method.features, tokens)
        rows.append(
            {
                **method.row(),
                "state_precision": precision["mean_precision"],
                "swap_success": next(
                    r["success_rate"] for r in swaps if r["intervention"] == "all sites"
                ),
                "loss_cost": cost["loss_cost"],
                "seconds": method.seconds,
            }
        )
        details[method.name] = {
            "metrics": method.metrics,
            "swaps": swaps,
            "loss": cost,
            **precision,
        }
    for label, hook in NEURON_HOOKS.items():
        names = every_layer(base.cfg.n_layers, hook)
        values = encode_all(base, identity_features(base, names), tokens, at_end)
        precision = bl.precision_at_recalls(values, labels, recalls)
        rows.append(
            {"method": f"{label} (base model)", "state_precision": precision["mean_precision"]}
        )
        details[label] = precision
    patch = feature_swaps(
        base, trials, {v: identity_features(base, s) for v, s in variants.items()}
    )
    rows.append(
        {
            "method": "activation patching at the sites (upper bound)",
            "swap_success": next(
                r["success_rate"] for r in patch if r["intervention"] == "all sites"
            ),
        }
    )
    details["activation patching"] = {"swaps": patch}
    return {
        "recall_of": first,
        "states": int(recalls.numel()),
        "settings": data.settings,
        "best_sae": bl.best_sae(sweep, data.settings),
        "sweep_score": "state precision",
        "sae_sweep": sweep.as_dict(),
        "rows": rows,
        "details": details,
    }


# ---------------------------------------------------------------------------- the pipeline


def run_experiment(exp: FSMExperiment) -> dict[str, Any]:
    """Train, evaluate and analyse every model; write the report; return it."""
    if exp.threads:
        torch.set_num_threads(exp.threads)
    started = time.perf_counter()
    run_dir = Path(exp.run_dir)
    fsm = TokFSM(FSMConfig(**exp.fsm))
    report: dict[str, Any] = {
        "experiment": dataclasses.asdict(exp),
        "environment": stack(),
        "models": {},
        "timings": {},
    }
    stage_start = time.perf_counter()
    baseline = _train_stage(exp, "baseline", exp.baseline, None)
    report["reused_stages"] = ["baseline"] if baseline.reused else []
    report["timings"]["baseline training s"] = time.perf_counter() - stage_start
    models = {"no codebook": baseline.model}
    for name, settings in exp.codebook_models.items():
        stage_start = time.perf_counter()
        result = _train_stage(exp, name, settings, str(baseline.run_dir / "final"))
        if result.reused:
            report["reused_stages"].append(name)
        report["timings"][f"{name} training s"] = time.perf_counter() - stage_start
        models[name] = result.model
    for name, model in models.items():
        stage_start = time.perf_counter()
        entry: dict[str, Any] = {"table1": evaluate_fsm_model(model, fsm, exp)}
        if model.codebooks:
            entry["state_codes"] = state_code_analysis(model, fsm, exp)
            entry["interventions"] = swap_state_codes(model, fsm, exp)
        report["models"][name] = entry
        report["timings"][f"{name} analysis s"] = time.perf_counter() - stage_start
    if exp.baselines is not None and len(models) > 1:
        stage_start = time.perf_counter()
        coded = {name: m for name, m in models.items() if m.codebooks}
        report["baselines"] = baseline_comparison(baseline.model, coded, fsm, exp, report)
        report["timings"]["baselines s"] = time.perf_counter() - stage_start
    report["timings"]["total s"] = time.perf_counter() - started
    write_report(report, run_dir)
    return report


def summary_line(report: dict[str, Any]) -> str:
    parts = []
    for name, entry in report["models"].items():
        parts.append(f"{name}: transition acc {100 * entry['table1']['transition_accuracy']:.1f}%")
    return "; ".join(parts)


def headline(report: dict[str, Any]) -> dict[str, float]:
    """Per model: loss, transition accuracy, state-code precision, all-site swap success."""
    out = {}
    for name, entry in report["models"].items():
        out[f"{name}: loss"] = entry["table1"]["loss"]
        out[f"{name}: transition accuracy"] = entry["table1"]["transition_accuracy"]
        if "state_codes" in entry:
            out[f"{name}: mean best code precision"] = entry["state_codes"][
                "mean_best_code_precision"
            ]
            for row in entry["interventions"]:
                if row["intervention"] == "all sites":
                    out[f"{name}: swap success, all sites"] = row["success_rate"]
    return out
