"""A circuit study: every method at every level on one task, judged side by side.

Writes ``circuits/{level}-{method}.json``, ``report.json``, ``report.md`` and
``report.html`` (faithfulness curves and circuit graphs) to the output directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from codelens.circuits.evaluate import Curve, completeness, faithfulness, faithfulness_curve
from codelens.circuits.figure import circuit_figure, curves_figure
from codelens.circuits.graph import active_codes, build_graph
from codelens.circuits.methods import discover
from codelens.circuits.patching import Patcher
from codelens.circuits.result import Circuit
from codelens.experiments.circuit_tasks import Task
from codelens.files import atomic_write_text


def run_study(
    model,
    task: Task,
    out_dir: str | Path,
    *,
    levels=("components", "codes"),
    methods=("acdc", "eap", "eap-ig", "fast"),
    tau: float = 0.02,
    steps: int = 5,
    keep_above: float | None = None,
    compare_tl: bool = False,
) -> dict[str, Any]:
    """Discover and evaluate a circuit per (level, method); write and return the report.

    ``methods`` is one tuple for every level, or a dict level -> tuple (e.g. exhaustive
    ACDC on components only). ``keep_above`` is the fast path's (see `fast_path`).
    """
    out = Path(out_dir)
    report: dict[str, Any] = {
        "task": task.name,
        "pairs": int(task.clean.shape[0]),
        "tau": tau,
        "steps": steps,
        "keep_above": keep_above,
        "levels": {},
    }
    for level in levels:
        active = active_codes(model, task.clean, task.corrupted) if level == "codes" else None
        graph = build_graph(model, level, active)
        patcher = Patcher(model, graph, task.clean, corrupted=task.corrupted)
        with torch.no_grad():
            full = float(task.metric(patcher.clean_logits))
            empty = float(task.metric(patcher.run(patcher.full_mask())))
        entry: dict[str, Any] = {
            "senders": len(graph.senders),
            "edges": graph.n_edges,
            "metric_full": full,
            "metric_empty": empty,
            "methods": {},
        }
        circuits: dict[str, Circuit] = {}
        for method in methods[level] if isinstance(methods, dict) else methods:
            kwargs = {"eap-ig": {"steps": steps}, "fast": {"keep_above": keep_above}}
            circuit = discover(patcher, method, task.metric, tau, **kwargs.get(method, {}))
            circuit.save(out / "circuits" / f"{level}-{method}.json")
            circuits[method] = circuit
            curve = faithfulness_curve(patcher, circuit, task.metric)
            entry["methods"][method] = {
                "circuit_edges": len(circuit.edges),
                "circuit_nodes": len(circuit.nodes),
                "forwards": circuit.forwards,
                "backwards": circuit.backwards,
                "seconds": circuit.seconds,
                "faithfulness": faithfulness(patcher, circuit, task.metric),
                "completeness": completeness(patcher, circuit, task.metric),
                "curve": curve.to_dict(),
            }
        if "acdc" in circuits and "fast" in circuits:
            entry["fast_vs_acdc"] = {
                "jaccard": circuits["fast"].jaccard(circuits["acdc"]),
                "forwards_ratio": circuits["acdc"].forwards / max(1, circuits["fast"].forwards),
                "seconds_ratio": circuits["acdc"].seconds / max(1e-9, circuits["fast"].seconds),
            }
        if compare_tl and level == "components":
            entry["tl_node_attribution"] = tl_rank_correlation(model, task, patcher)
        report["levels"][level] = entry
    _write(report, out)
    return report


def tl_rank_correlation(model, task: Task, patcher: Patcher) -> dict[str, Any]:
    """Spearman correlation of our node attribution with TransformerLens 4.3's own.

    Ours: EAP node scores (the sum of a sender's edge scores: the linear estimate of
    ``m(node ablated) - m(clean)``). TL's ``attribution_patch`` (node granularity,
    denoising sign, its activations read at ``hook_z`` / ``hook_mlp_out``, which at a
    codebook site are the values before quantisation), summed over positions.
    """
    from scipy.stats import spearmanr
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    from codelens.circuits.methods import attribution_scores

    started = time.perf_counter()
    model.eval()  # TL refuses modules in training mode (codebooks attached after eval())
    ours_edges = attribution_scores(patcher, task.metric, steps=1)
    ours = dict(zip(patcher.graph.senders, ours_edges.sum(0).tolist(), strict=True))
    theirs: dict[str, float] = {}
    metric = task.metric
    for i in range(task.clean.shape[0]):
        correct, wrong = int(metric.correct[i]), int(metric.wrong[i])

        def one(logits, correct=correct, wrong=wrong):
            return logits[0, -1, correct] - logits[0, -1, wrong]

        result = attribution_patch(
            model,
            task.clean[i : i + 1],
            task.corrupted[i : i + 1],
            one,
            EdgeAttributionConfig(granularity="node"),
        )
        for node, score in result.node_scores.items():
            if node.kind == "embed":
                name = "embed"
            elif node.kind == "attn_head_out":
                name = f"a{node.layer}.h{node.head}"
            elif node.kind == "mlp_out":
                name = f"m{node.layer}"
            else:
                continue
            theirs[name] = theirs.get(name, 0.0) + score / task.clean.shape[0]
    names = [n for n in patcher.graph.senders if n in theirs]
    a = [-ours[n] for n in names]  # ours estimates the noising effect: flip to denoising
    b = [theirs[n] for n in names]
    signed = spearmanr(a, b).statistic
    magnitude = spearmanr([abs(x) for x in a], [abs(x) for x in b]).statistic
    return {
        "nodes": len(names),
        "spearman_signed": float(signed),
        "spearman_magnitude": float(magnitude),
        "ours": {n: ours[n] for n in names},
        "transformer_lens": {n: theirs[n] for n in names},
        "seconds": time.perf_counter() - started,
    }


def figures(report: dict[str, Any], out: str | Path) -> list[tuple[str, Any]]:
    """(heading, plotly figure): the faithfulness curves side by side, then each circuit
    (read back from ``out/circuits``)."""
    curves = {
        f"{level} {method}": Curve(**row["curve"])
        for level, e in report["levels"].items()
        for method, row in e["methods"].items()
    }
    found = [("faithfulness curves", curves_figure(curves))]
    for level, e in report["levels"].items():
        for method in e["methods"]:
            circuit = Circuit.load(Path(out) / "circuits" / f"{level}-{method}.json")
            found.append((f"{level}, {method}", circuit_figure(circuit)))
    return found


def _write(report: dict[str, Any], out: Path) -> None:
    from codelens.viz import Page

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", markdown(report))
    page = Page(f"codelens circuits: {report['task']}")
    for heading, figure in figures(report, out):
        page.add(figure, heading=heading)
    page.save(out / "report.html")


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table per level."""
    keep = report.get("keep_above")
    settings = f"{report['pairs']} pairs, tau={report['tau']}" + (
        f", fast path keeps without a test above {keep:g}." if keep is not None else "."
    )
    lines = [f"# Circuits: {report['task']}", "", settings]
    for level, e in report["levels"].items():
        lines += [
            "",
            f"## {level}: {e['senders']} senders, {e['edges']} edges "
            f"(metric full {e['metric_full']:.3f}, empty {e['metric_empty']:.3f})",
            "",
            "| method | edges | nodes | forwards | backwards | seconds | faithfulness "
            "| completeness | CPR | CMD |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, r in e["methods"].items():
            lines.append(
                f"| {method} | {r['circuit_edges']} | {r['circuit_nodes']} | {r['forwards']} "
                f"| {r['backwards']} | {r['seconds']:.1f} | {r['faithfulness']:.3f} "
                f"| {r['completeness']:.3f} | {r['curve']['cpr']:.3f} | {r['curve']['cmd']:.3f} |"
            )
        if "fast_vs_acdc" in e:
            f = e["fast_vs_acdc"]
            lines += [
                "",
                f"Fast path vs exhaustive ACDC: Jaccard {f['jaccard']:.3f}, "
                f"{f['forwards_ratio']:.1f}x fewer forwards, {f['seconds_ratio']:.1f}x less time.",
            ]
        if "tl_node_attribution" in e:
            t = e["tl_node_attribution"]
            lines += [
                "",
                f"Node attribution vs TransformerLens 4.3 `attribution_patch` ({t['nodes']} "
                f"nodes): Spearman {t['spearman_signed']:.3f} (signed), "
                f"{t['spearman_magnitude']:.3f} (magnitudes).",
            ]
    return "\n".join(lines) + "\n"
