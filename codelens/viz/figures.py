"""Plotly figures for codebook experiments, built from plain data (tensors, dicts, files).

Each function returns a `plotly.graph_objects.Figure`; show it in a notebook, save it with
`fig.write_html`, or add it to a `Page`. Text that plotly would read as markup (labels,
titles, metric names) is escaped so `<bos>` shows literally.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor

__all__ = [
    "code_usage",
    "intervention_results",
    "precision_recall",
    "steering_results",
    "training_curves",
]


def _t(text: Any) -> str:
    """Escape text for plotly, which interprets a subset of HTML in labels and titles."""
    return html.escape(str(text), quote=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def code_usage(
    counts: Int[Tensor, " n_codes"] | Mapping[str, Int[Tensor, " n_codes"]],
    title: str = "Code usage",
    bins: int = 50,
) -> go.Figure:
    """Histogram of how often each code fired (log y); the title gives the dead-code share.

    counts: per-code firing counts for one codebook, or a dict site -> counts (one
    trace per site). Bins are computed here, so the figure size does not grow with the
    codebook size.
    """
    per_site = dict(counts) if isinstance(counts, Mapping) else {"codes": counts}
    if not per_site:
        raise ValueError("no counts given")
    per_site = {
        k: torch.as_tensor(v).detach().cpu().flatten().double() for k, v in per_site.items()
    }
    hi = max(float(v.max()) if v.numel() else 0.0 for v in per_site.values())
    edges = torch.linspace(0.0, max(hi, 1.0), bins + 1, dtype=torch.float64)
    width = float(edges[1] - edges[0])
    fig = go.Figure()
    dead_total = codes_total = 0
    for site, c in per_site.items():
        dead = int((c == 0).sum())
        dead_total += dead
        codes_total += c.numel()
        hist = torch.histc(c, bins=bins, min=0.0, max=float(edges[-1])) if c.numel() else None
        share = dead / c.numel() if c.numel() else 0.0
        fig.add_bar(
            x=((edges[:-1] + edges[1:]) / 2).tolist(),
            y=[] if hist is None else hist.tolist(),
            width=width,
            name=_t(f"{site} (dead {share:.1%})"),
            opacity=0.75 if len(per_site) > 1 else 1.0,
        )
    dead_share = dead_total / codes_total if codes_total else 0.0
    fig.update_layout(
        title=_t(f"{title} (dead codes: {dead_share:.1%} of {codes_total})"),
        barmode="overlay",
        bargap=0.0,
        xaxis_title="times the code fired",
        yaxis_title="number of codes",
        yaxis_type="log",
        showlegend=len(per_site) > 1,
    )
    return fig


def precision_recall(
    code_pr: Sequence[Mapping[str, Any]],
    neuron_pr: Sequence[Mapping[str, Any]] = (),
    title: str = "Precision and recall: codes vs best neurons",
) -> go.Figure:
    """Scatter of precision vs recall for codes and for the best-matching neurons.

    Each row is a dict with "precision", "recall" and an optional "label" (hover text).
    Codes are large open circles and neurons small crosses drawn over them, so a code and a
    neuron at the same point (often precision 1) both stay visible.
    """
    fig = go.Figure()
    styles = (
        ("codes", code_pr, {"symbol": "circle-open", "size": 13, "line": {"width": 2}}),
        ("best neurons", neuron_pr, {"symbol": "x-thin-open", "size": 8, "line": {"width": 2}}),
    )
    for name, rows, marker in styles:
        if not rows:
            continue
        fig.add_scatter(
            x=[float(r["recall"]) for r in rows],
            y=[float(r["precision"]) for r in rows],
            text=[_t(r.get("label", "")) for r in rows],
            mode="markers",
            name=name,
            marker=marker,
            hovertemplate="%{text}<br>recall %{x:.3f}<br>precision %{y:.3f}<extra></extra>",
        )
    # a margin past 0 and 1, so markers on the edges are drawn whole
    fig.update_layout(
        title=_t(title),
        xaxis={"title": "recall", "range": [-0.05, 1.05]},
        yaxis={"title": "precision", "range": [-0.05, 1.05]},
    )
    return fig


def intervention_results(
    rows: Sequence[Mapping[str, Any]],
    x: str = "kind",
    metrics: Sequence[str] | None = None,
    title: str = "Intervention results",
    units: Mapping[str, str] | None = None,
) -> go.Figure:
    """Grouped bars: one group per intervention kind (key `x`), one bar per metric.

    metrics defaults to every numeric key in the rows, in first-seen order; an optional
    "<metric>_err" key gives an error bar. ``units`` maps a metric to its unit (e.g.
    ``"bits"``); metrics of different units go to side-by-side panels, one unit per y
    axis (a metric without a unit gets a panel of its own, titled by its name).
    """
    if metrics is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key, value in row.items():
                if key != x and not key.endswith("_err") and _is_number(value):
                    seen.setdefault(key, None)
        metrics = list(seen)
    units = dict(units or {})
    panels: dict[str, list[str]] = {}
    for metric in metrics:
        panels.setdefault(units.get(metric, metric), []).append(metric)
    fig = make_subplots(rows=1, cols=max(1, len(panels)), horizontal_spacing=0.12)
    labels = [_t(row.get(x, i)) for i, row in enumerate(rows)]
    for col, (unit, names) in enumerate(panels.items(), start=1):
        for metric in names:
            errs = [row.get(f"{metric}_err") for row in rows]
            fig.add_bar(
                x=labels,
                y=[row.get(metric) for row in rows],
                name=_t(metric),
                error_y=(
                    {"type": "data", "array": [e or 0.0 for e in errs]}
                    if any(e is not None for e in errs)
                    else None
                ),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text=_t(unit), rangemode="tozero", row=1, col=col)
        fig.update_xaxes(title_text=_t(x), row=1, col=col)
    fig.update_layout(title=_t(title), barmode="group")
    return fig


def steering_results(
    rows: Sequence[Mapping[str, Any]],
    topic: str = "topic",
    before: str = "before",
    after: str = "after",
    title: str = "Steering: on-topic share before and after",
) -> go.Figure:
    """Grouped bars of the on-topic share per topic before and after steering."""
    topics = [_t(row[topic]) for row in rows]
    fig = go.Figure()
    fig.add_bar(x=topics, y=[row[before] for row in rows], name=_t(before))
    fig.add_bar(x=topics, y=[row[after] for row in rows], name=_t(after))
    fig.update_layout(
        title=_t(title),
        barmode="group",
        xaxis_title=_t(topic),
        yaxis={"title": "on-topic share", "range": [0, 1.05]},
    )
    return fig


def _metric_group(name: str) -> str:
    """Group of a metric: its prefix before the first '/' (else the metric itself)."""
    return name.split("/", 1)[0] if "/" in name else name


def _read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (file still being written) is skipped."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not JSON ({err})") from err
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ValueError(f"{path}:{n}: expected an object with a numeric 'step'")
        records.append(record)
    return records


def _readable_range(values: Sequence[float], share: float = 0.1) -> list[float] | None:
    """A y range at least ``share`` of the values' magnitude tall, or None (plotly's own).

    A metric that barely moves (1.1111 to 1.1112) would otherwise fill the panel with
    its noise; at this floor it reads as the flat line it is.
    """
    if not values:
        return None
    low, high = min(values), max(values)
    floor = share * max(abs(low), abs(high))
    if high - low >= floor or floor == 0:
        return None
    middle = (low + high) / 2
    return [middle - floor / 2, middle + floor / 2]


def training_curves(metrics_jsonl_path: str | os.PathLike, title: str = "Training") -> go.Figure:
    """Lines for every numeric metric in a JSON-lines log, one subplot per metric group.

    Each line is an object with a "step"; metrics named "group/name" share a subplot
    ("loss/ce" and "loss/recon" go to "loss"), other metrics get their own.
    """
    records = _read_jsonl(metrics_jsonl_path)
    series: dict[str, tuple[list[float], list[float | None]]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or not _is_number(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(float(value) if math.isfinite(value) else None)
    if not series:
        raise ValueError(f"{metrics_jsonl_path}: no numeric metrics found")
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(_metric_group(name), []).append(name)
    fig = make_subplots(
        rows=len(groups),
        cols=1,
        shared_xaxes=True,
        subplot_titles=[_t(g) for g in groups],
        vertical_spacing=min(0.08, 0.3 / len(groups)),
    )
    for row, (group, names) in enumerate(groups.items(), start=1):
        for name in names:
            steps, values = series[name]
            fig.add_scatter(
                x=steps,
                y=values,
                mode="lines",
                name=_t(name),
                legendgroup=_t(group),
                row=row,
                col=1,
            )
        shown = [v for name in names for v in series[name][1] if v is not None]
        span = _readable_range(shown)
        if span is not None:
            fig.update_yaxes(range=span, row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(groups), col=1)
    fig.update_layout(title=_t(title), height=max(400, 260 * len(groups)))
    return fig
