"""Run an experiment on several seeds and report each measure's mean and range.

Each seed runs the whole pipeline into ``{run_dir}/seed-{s}`` with its own report; a seed
whose directory already holds the finished report of the same experiment is read back, not
rerun, so seeds can run in separate processes (``--seeds 1`` each, then all of them once
more to summarise) or resume after an interruption. The
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

from codelens.files import atomic_write_text


def run_seeds(module: ModuleType, exp: Any, seeds: Sequence[int]) -> dict[str, Any]:
    """Run ``module.run_experiment`` once per seed; write and return the summary."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, got {seeds}")
    reports = {}
    for seed in seeds:
        run = dataclasses.replace(exp, seed=seed, run_dir=str(Path(exp.run_dir) / f"seed-{seed}"))
        reports[seed] = _finished_report(run) or module.run_experiment(run)
    summary = summarise(module, reports)
    run_dir = Path(exp.run_dir)
    atomic_write_text(run_dir / "seeds.json", json.dumps(summary, indent=2))
    atomic_write_text(run_dir / "seeds.md", markdown(summary))
    return summary


def _finished_report(run: Any) -> dict[str, Any] | None:
    """The report already in ``run.run_dir`` if it is of exactly this experiment (its
    directory aside); an error if it is of another, so no result is mixed or overwritten."""
    path = Path(run.run_dir) / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(run)))
    recorded = dict(report.get("experiment", {}))
    wanted.pop("run_dir"), recorded.pop("run_dir", None)
    differ = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
    if differ:
        raise ValueError(
            f"{path} is the report of another experiment (settings differ: {', '.join(differ)}); "
            "move it away or choose another run directory"
        )
    print(f"seed {run.seed}: reusing the finished report in {run.run_dir}")
    return report


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
        "commits": {
            seed: r.get("environment", {}).get("codelens commit") for seed, r in reports.items()
        },
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
        "codelens commit per seed: "
        + ", ".join(f"{s}: {c or 'unknown'}" for s, c in summary.get("commits", {}).items())
        + ".",
    ]
    if len(set(summary.get("commits", {}).values())) > 1:
        lines += [
            "",
            "**The seeds ran at different commits**: a default changed between them would "
            "make their rows differ for that reason too.",
        ]
    lines += [
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
