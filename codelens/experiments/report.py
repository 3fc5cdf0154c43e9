"""Write an experiment report: JSON (everything), markdown (the tables), plotly HTML (figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codelens.environment import describe
from codelens.files import atomic_write_text
from codelens.viz import Page, intervention_results, precision_recall, training_curves


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The TokFSM report as markdown tables."""
    exp = report["experiment"]
    lines = [
        "# TokFSM report",
        "",
        f"FSM: {exp['fsm']}; model: {exp['model']}; seed {exp['seed']}.",
        "",
        f"Stack: {describe(report['environment'])}.",
        "",
        "## Table 1",
        "",
        "| model | loss | next-token acc % | transition acc % | first-transition acc % |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        t = entry["table1"]
        lines.append(
            f"| {name} | {t['loss']:.4f} | {_pct(t['accuracy'])} | "
            f"{_pct(t['transition_accuracy'])} | {_pct(t['first_transition_accuracy'])} |"
        )
    for name, entry in report["models"].items():
        if "state_codes" not in entry:
            continue
        sc = entry["state_codes"]
        lines += [
            "",
            f"## State codes: {name}",
            "",
            f"Tokens completing a state: {sc['state_tokens']}. States with a code: "
            f"{sc['states_with_code']}.",
            "",
            "| classifier of the FSM state | mean precision % (at the best code's recall) |",
            "|---|---|",
            f"| best code per state | {_pct(sc['mean_best_code_precision'])} |",
        ]
        for label, n in sc["neurons"].items():
            lines.append(
                f"| best single neuron ({label}, {n['n_neurons']}) | "
                f"{_pct(n['mean_best_neuron_precision'])} |"
            )
        lines += [
            "",
            f"Share of states owning a code with precision >= 95%: "
            f"{_pct(sc['share_states_code_precision_ge_95'])}%; "
            f"mean recall of the best codes: {_pct(sc['mean_best_code_recall'])}%.",
            "",
            f"## Interventions: {name}",
            "",
            "Replace the codes at the token completing state s by those of a sequence in "
            "state t at the same position. Success: the next-token distribution is closer "
            "(Jensen-Shannon, bits) to t's successors' first digits than to s's.",
            "",
            "| intervention | trials | success % | JSD to target (bits) |",
            "|---|---|---|---|",
        ]
        for row in entry["interventions"]:
            lines.append(
                f"| {row['intervention']} | {row['trials']} | {_pct(row['success_rate'])} | "
                f"{row['jsd_to_target']:.3f} |"
            )
    if "baselines" in report:
        lines += ["", *baselines_markdown(report["baselines"])]
    lines += timings_markdown(report)
    return "\n".join(lines) + "\n"


def timings_markdown(report: dict[str, Any]) -> list[str]:
    """A pipeline report's timings, and the training stages it reused (`train_stage`)."""
    lines = ["", "## Timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["timings"].items()]
    if report.get("reused_stages"):
        reused = ", ".join(report["reused_stages"])
        lines += ["", f"Not trained again (finished earlier from the same inputs): {reused}."]
    return lines


def baselines_markdown(section: dict[str, Any]) -> list[str]:
    """The codes-against-baselines table of a TokFSM report."""
    from codelens.experiments.baselines import sweep_lines, table_markdown

    return [
        "## Codes against baselines",
        "",
        f"Precision: mean over the {section['states']} states with a code of the best "
        f"feature's precision at the recall of {section['recall_of']}'s best code for the "
        "state (the first codebook model; later codebook models at their own codes' recall). "
        "Baselines are fitted on the model without codebooks at the codebook sites; swap "
        "success: all sites swapped; loss cost: loss with every site replaced by its "
        "reconstruction minus the base model's; compute: fitting, with activation caching. "
        f"SAE best L0: {section['best_sae']} (the L0 sweep below).",
        "",
        *table_markdown(section["rows"]),
        *sweep_lines(section),
    ]


def write_report(report: dict[str, Any], run_dir: Path, curves: list[Path] = ()) -> None:
    """``report.json``, ``report.md`` and ``report.html`` in ``run_dir``."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(run_dir / "report.md", markdown(report))
    page = Page("codelens report")
    for name, entry in report["models"].items():
        if "state_codes" in entry:
            codes = [
                {"label": f"state {r['state']}", "precision": r["precision"], "recall": r["recall"]}
                for r in entry["state_codes"]["per_state"]
            ]
            neurons = [
                {
                    "label": f"state {r['state']}",
                    "precision": r["neuron_precision"],
                    "recall": r["recall"],
                }
                for r in entry["state_codes"]["per_state"]
            ]
            page.add(precision_recall(codes, neurons), heading=f"{name}: state codes vs neurons")
            rows = [
                {
                    "kind": r["intervention"],
                    "success rate": r["success_rate"],
                    "JSD to target": r["jsd_to_target"],
                }
                for r in entry["interventions"]
            ]
            units = {"success rate": "share of prompts", "JSD to target": "bits"}
            page.add(intervention_results(rows, units=units), heading=f"{name}: code swaps")
    for path in sorted(run_dir.glob("*/metrics.jsonl")):
        page.add(training_curves(path), heading=f"training: {path.parent.name}")
    page.save(run_dir / "report.html")
