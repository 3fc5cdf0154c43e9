"""Plotly figures: a circuit as a layered graph, and faithfulness curves side by side."""

from __future__ import annotations

import plotly.graph_objects as go

from codelens.circuits.evaluate import Curve
from codelens.circuits.graph import node_stage
from codelens.circuits.result import Circuit, node_of


def circuit_figure(circuit: Circuit, title: str | None = None) -> go.Figure:
    """The circuit's nodes in columns by layer, its edges as lines (width ~ |score|)."""
    nodes = circuit.nodes
    stages = sorted({node_stage(n) for n in nodes})
    column = {s: i for i, s in enumerate(stages)}
    rows: dict[float, int] = {}
    pos = {}
    for node in sorted(nodes, key=node_stage):
        s = node_stage(node)
        pos[node] = (column[s], rows.get(s, 0))
        rows[s] = rows.get(s, 0) + 1
    top = max((abs(circuit.scores[e]) for e in circuit.edges), default=1.0) or 1.0
    fig = go.Figure()
    for edge in circuit.edges:
        sender, receiver = edge.split("->")
        (x0, y0), (x1, y1) = pos[sender], pos[node_of(receiver)]
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                hoverinfo="text",
                text=f"{edge}: {circuit.scores[edge]:.4g}",
                showlegend=False,
                line={"width": 1 + 5 * abs(circuit.scores[edge]) / top, "color": "#7f8c8d"},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers+text",
            text=nodes,
            textposition="top center",
            showlegend=False,
            marker={"size": 12, "color": ["#e67e22" if ":" in n else "#2980b9" for n in nodes]},
        )
    )
    fig.update_layout(
        title=title or circuit.summary(),
        xaxis={"visible": False},
        yaxis={"visible": False},
        plot_bgcolor="white",
        height=max(350, 40 * max(rows.values(), default=1)),
    )
    return fig


def curves_figure(
    curves: dict[str, Curve], title: str = "Faithfulness over circuit size"
) -> go.Figure:
    """Faithfulness against the fraction of edges kept, one line per named curve."""
    fig = go.Figure()
    for name, curve in curves.items():
        fig.add_trace(
            go.Scatter(
                x=curve.fractions,
                y=curve.faithfulness,
                mode="lines+markers",
                name=f"{name} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=title,
        xaxis={"title": "fraction of edges kept", "type": "log"},
        yaxis={"title": "faithfulness"},
    )
    return fig
