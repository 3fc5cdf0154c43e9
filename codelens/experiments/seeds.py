"""Run an experiment on several seeds and report each measure's mean and range.

Each seed runs the whole pipeline into ``{run_dir}/seed-{s}`` with its own report; the
summary (``seeds.json``, ``seeds.md`` in ``run_dir``) gives, per measure, the mean, the
minimum and the maximum over seeds: the experiment's headline numbers
(``module.headline(report)``) and every cell of the codes-against-baselines table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from codelens.experiments.report import _atomic_write


def run_seeds(module: ModuleType, exp: Any, seeds: Sequence[int]) -> dict[str, Any]:
    """Run ``module.run_experiment`` once per seed; write and return the summary."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, got {seeds}")
    reports = {}
    for seed in seeds:
        run = dataclasses.replace(exp, seed=seed, run_dir=str(Path(exp.run_dir) / f"seed-{seed}"))
        reports[seed] = module.run_experiment(run)
    summary = summarise(module, reports)
    run_dir = Path(exp.run_dir)
    _atomic_write(run_dir / "seeds.json", json.dumps(summary, indent=2))
    _atomic_write(run_dir / "seeds.md", markdown(summary))
    return summary


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarise(module: ModuleType, reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and range over seeds of the headline measures and of the baselines table."""
    headline: dict[str, list[float]] = {}
    for report in reports.values():
        for key, value in module.headline(report).items():
            headline.setdefault(key, []).append(float(value))
    table: dict[str, dict[str, list[float]]] = {}
    for report in reports.values():
        for row in report.get("baselines", {}).get("rows", []):
            cells = table.setdefault(row["method"], {})
            for key, value in row.items():
                if key != "method" and isinstance(value, int | float):
                    cells.setdefault(key, []).append(float(value))
    n = len(reports)
    return {
        "seeds": list(reports),
        "wall_seconds": _spread([r["timings"]["total s"] for r in reports.values()]),
        "headline": {k: _spread(v) for k, v in headline.items() if len(v) == n},
        "baselines": {
            method: {k: _spread(v) for k, v in cells.items() if len(v) == n}
            for method, cells in table.items()
        },
    }


def _cell(spread: dict[str, float] | None, scale: float) -> str:
    if spread is None:
        return "n/a"
    return (
        f"{scale * spread['mean']:.3g} ({scale * spread['min']:.3g} to {scale * spread['max']:.3g})"
    )


def markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: mean (min to max) over seeds."""
    from codelens.experiments.baselines import COLUMNS

    lines = [
        f"# Over seeds {summary['seeds']}: mean (min to max)",
        "",
        f"Wall time per seed: {_cell(summary['wall_seconds'], 1)} s.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_cell(v, 1)} |" for k, v in summary["headline"].items()]
    if summary["baselines"]:
        used = [c for c in COLUMNS if any(c[0] in cells for cells in summary["baselines"].values())]
        lines += [
            "",
            "## Codes against baselines",
            "",
            "| method | " + " | ".join(c[1] for c in used) + " |",
            "|---|" + "---|" * len(used),
        ]
        for method, cells in summary["baselines"].items():
            row = " | ".join(_cell(cells.get(key), scale) for key, _, scale in used)
            lines.append(f"| {method} | {row} |")
    return "\n".join(lines) + "\n"
