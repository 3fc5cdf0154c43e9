"""Judging a circuit by what it does (MIB definitions, arXiv 2504.13151).

With m the task metric, M the full model and the empty circuit (every edge ablated):
faithfulness ``f(C) = (m(C) - m(empty)) / (m(M) - m(empty))`` (1 = the circuit alone
does what the model does), completeness ``f(M without C)`` (0 = nothing outside the
circuit matters). The curve evaluates ``f`` on the top ``k`` edges of a ranking at each
fraction ``k`` of the graph's edges; CPR is the area under ``f`` (higher is better), CMD
the area under ``|1 - f|`` (lower is better, 0 ideal), trapezoids over ``k``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from codelens.circuits.metrics import metric_value
from codelens.circuits.patching import Metric, Patcher
from codelens.circuits.result import Circuit

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's circuit sizes, as fractions of the graph's edges."""


@torch.no_grad()
def _metric(patcher: Patcher, metric: Metric, mask) -> float:
    return metric_value(metric, patcher.run(mask.to(patcher.clean.device)))


class _Scale:
    def __init__(self, patcher: Patcher, metric: Metric):
        self.full = metric_value(metric, patcher.clean_logits)
        self.empty = _metric(patcher, metric, patcher.full_mask())
        if self.full == self.empty:
            raise ValueError(
                "the metric is the same for the full model and the empty circuit, so "
                "faithfulness is undefined; pick a metric the corruption changes"
            )

    def __call__(self, value: float) -> float:
        return (value - self.empty) / (self.full - self.empty)


def faithfulness(patcher: Patcher, circuit: Circuit, metric: Metric) -> float:
    """``f(C)``: the circuit alone, everything else ablated."""
    scale = _Scale(patcher, metric)
    return scale(_metric(patcher, metric, circuit.mask(patcher.graph)))


def completeness(patcher: Patcher, circuit: Circuit, metric: Metric) -> float:
    """``f(M without C)``: the circuit ablated, everything else kept (0 = complete)."""
    scale = _Scale(patcher, metric)
    complement = patcher.graph.valid.float() - circuit.mask(patcher.graph)
    return scale(_metric(patcher, metric, complement))


@dataclass
class Curve:
    """Faithfulness of the top edges at each fraction of the graph, with CPR and CMD."""

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float

    def to_dict(self) -> dict:
        return asdict(self)


def faithfulness_curve(
    patcher: Patcher, circuit: Circuit, metric: Metric, fractions=FRACTIONS
) -> Curve:
    """Faithfulness of ``circuit``'s top-ranked edges at each of ``fractions``."""
    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
    scale = _Scale(patcher, metric)
    ranking = circuit.ranking()
    sizes = [max(1, round(f * len(ranking))) for f in fractions]
    faith = [
        scale(_metric(patcher, metric, circuit.mask(patcher.graph, ranking[:n]))) for n in sizes
    ]
    x = torch.tensor(fractions)
    f = torch.tensor(faith)
    cpr = float(torch.trapezoid(f, x))
    cmd = float(torch.trapezoid((1 - f).abs(), x))
    return Curve(fractions, sizes, faith, cpr, cmd)
