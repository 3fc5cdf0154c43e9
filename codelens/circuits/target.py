"""Circuits at a target faithfulness: the fewest top-ranked edges whose exact
faithfulness reaches ``f*``, found by a search over sizes that is verified with forwards.

Selecting a circuit by a threshold on per-edge scores (ACDC's or EAP's ``tau``) says
nothing about what the circuit does together: on a k=8 model many small code edges each
fall below ``tau`` yet together carry the behaviour. Here the size is chosen by what the
circuit does. Any ranking works (EAP, EAP-IG, or scores from elsewhere such as an
attribution graph, through `circuit_at_faithfulness`); edges are ranked by ``|score|``
and the circuit of size ``n`` is the top ``n``.

The search, with ``f(n)`` the faithfulness of the top ``n`` edges (one patched forward
each; ``f(0) = 0`` and ``f(all edges) = 1`` by definition):

1. exponential: ``n = 1, 2, 4, ...`` until ``f(n) >= f*`` (or the cap ``max_edges``);
2. binary search between the last size below ``f*`` and the first at or above it,
   keeping ``f(lo) < f* <= f(hi)``, until ``hi = lo + 1``.

About ``log2(edges)`` forwards in each phase. Faithfulness need not grow with ``n`` (an
edge can push the metric either way), so the answer is the smallest size *among those
evaluated* that reaches ``f*``: every evaluated smaller size, including ``n - 1``, was
measured below ``f*``, but an unevaluated smaller size can still reach it. Every size
evaluated and its faithfulness are kept in ``circuit.settings["search"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from codelens.circuits.graph import LEVELS, active_codes, build_graph
from codelens.circuits.methods import attribution_scores
from codelens.circuits.patching import Metric, Patcher
from codelens.circuits.result import Circuit

RANKINGS = ("eap", "eap-ig")
"""Built-in edge rankings for `find_circuit`."""

Scores = Float[Tensor, "R S"] | Mapping[str, float]
Ranking = Callable[[Patcher, Metric], Scores]


def _metric_name(metric: Metric) -> str:
    return getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))


def _check_target(faithfulness: float) -> float:
    target = float(faithfulness)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"faithfulness must lie in (0, 1], got {faithfulness}")
    return target


def _score_matrix(patcher: Patcher, scores: Scores) -> Float[Tensor, "R S"]:
    """``scores`` as a receivers x senders matrix (a mapping's missing edges score 0)."""
    graph = patcher.graph
    shape = tuple(graph.valid.shape)
    if isinstance(scores, Mapping):
        index = graph.edge_index()
        unknown = [name for name in scores if name not in index]
        if unknown:
            raise ValueError(f"scores name edges that are not in the graph: {unknown[:5]}")
        matrix = torch.zeros(shape)
        for name, value in scores.items():
            matrix[index[name]] = float(value)
    elif isinstance(scores, Tensor) and tuple(scores.shape) == shape:
        matrix = scores.detach().float().cpu()
    else:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"scores must be a {shape} (receivers x senders) tensor or a mapping "
            f"edge name -> score, got {got}"
        )
    if not torch.isfinite(matrix[graph.valid]).all():
        raise ValueError("scores must be finite on every edge")
    return matrix * graph.valid


def circuit_at_faithfulness(
    patcher: Patcher,
    metric: Metric,
    scores: Scores,
    faithfulness: float = 0.8,
    *,
    max_edges: int | None = None,
    method: str = "ranking",
    settings: dict[str, Any] | None = None,
) -> Circuit:
    """The fewest top-``|score|`` edges whose faithfulness reaches ``faithfulness``.

    ``scores``: one score per edge, a receivers x senders tensor (as from
    `attribution_scores`) or a mapping edge name -> score (edges it leaves out score 0).
    Ties keep the graph's edge order. ``max_edges`` caps the sizes tried (default: every
    edge). Raises ``ValueError`` when no size up to the cap reaches the target, naming
    the best faithfulness reached and its size. The circuit's ``settings`` record the
    target, the faithfulness reached and every size the search evaluated (``search``);
    ``forwards`` counts the search's forwards only (see the module docstring). Its
    ``scores`` are ``|score|`` unless ``method`` is ``"eap"`` or ``"eap-ig"`` (signed, which
    `Circuit.ranking` orders by magnitude), so ``ranking()`` is the order searched.
    """
    target = _check_target(faithfulness)
    if getattr(metric, "is_distance", False):
        raise ValueError(
            "faithfulness needs a task metric (higher = more of the behaviour), not a "
            "distance such as KL"
        )
    started, forwards = time.perf_counter(), patcher.forwards
    graph = patcher.graph
    matrix = _score_matrix(patcher, scores)
    rows, cols = graph.valid.nonzero(as_tuple=True)
    n_total = len(rows)
    cap = n_total if max_edges is None else int(max_edges)
    if not 1 <= cap <= n_total:
        raise ValueError(f"max_edges must be in [1, {n_total}], got {max_edges}")
    order = torch.sort(matrix[rows, cols].abs(), descending=True, stable=True).indices
    rows, cols = rows[order], cols[order]
    device = patcher.clean.device
    with torch.no_grad():
        full = float(metric(patcher.clean_logits))
        empty = float(metric(patcher.run(patcher.full_mask())))
    if full == empty:
        raise ValueError(
            "the metric is the same for the full model and the empty circuit, so "
            "faithfulness is undefined; pick a metric the corruption changes"
        )
    measured: dict[int, float] = {0: 0.0}

    def f(n: int) -> float:
        if n not in measured:
            mask = graph.valid.float()
            mask[rows[:n], cols[:n]] = 0.0
            with torch.no_grad():
                value = float(metric(patcher.run(mask.to(device))))
            measured[n] = (value - empty) / (full - empty)
        return measured[n]

    lo, hi = 0, 1
    while f(hi) < target:
        if hi == cap:
            best = max((n for n in measured if n > 0), key=lambda n: measured[n])
            raise ValueError(
                f"no circuit of at most {cap} of {n_total} edges reaches faithfulness "
                f"{target:g}: the best reached is {measured[best]:.4f} with {best} edges "
                f"(sizes tried: {sorted(measured)[1:]})"
            )
        lo, hi = hi, min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    kept = torch.zeros_like(graph.valid)
    kept[rows[:hi], cols[:hi]] = True
    return Circuit.from_tensors(
        graph,
        kept,
        matrix if method in RANKINGS else matrix.abs(),
        method,
        {
            **(settings or {}),
            "faithfulness_target": target,
            "faithfulness": measured[hi],
            "n_edges": hi,
            "max_edges": max_edges,
            "metric": _metric_name(metric),
            "search": [[n, measured[n]] for n in sorted(measured)],
        },
        forwards=patcher.forwards - forwards,
        backwards=0,
        seconds=time.perf_counter() - started,
    )


def find_circuit(
    model,
    task,
    level: str = "codes",
    method: str | Ranking = "eap-ig",
    faithfulness: float = 0.8,
    *,
    steps: int = 5,
    max_edges: int | None = None,
) -> Circuit:
    """The smallest circuit of ``task`` (``clean``, ``corrupted``, a task ``metric``:
    a `Task`, or anything with those) on ``model`` whose faithfulness reaches
    ``faithfulness``, with edges ranked by ``method``.

    ``level``: ``"components"`` or ``"codes"`` (codes active on the task's clean or
    corrupted tokens). ``method``: ``"eap"``, ``"eap-ig"`` (``steps`` integrated-gradient
    steps), or a function ``(patcher, metric) -> scores`` (see `circuit_at_faithfulness`)
    for any other ranking. The circuit's ``forwards`` include the ranking's and its
    ``backwards`` are EAP's or EAP-IG's (a ranking function's own are not counted);
    ``settings["graph_edges"]`` is the graph's edge count.
    """
    target = _check_target(faithfulness)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not (isinstance(method, str) or callable(method)):
        raise ValueError(f"method must be a name or a function, got {type(method).__name__}")
    if isinstance(method, str) and method not in RANKINGS:
        raise ValueError(
            f"method must be a ranking, one of {RANKINGS}, or a function "
            f"(patcher, metric) -> scores, got {method!r} (ACDC and the fast path select "
            "by tau: use discover)"
        )
    started = time.perf_counter()
    active = active_codes(model, task.clean, task.corrupted) if level == "codes" else None
    graph = build_graph(model, level, active)
    patcher = Patcher(model, graph, task.clean, corrupted=task.corrupted)
    before = patcher.forwards
    if isinstance(method, str):
        scores = attribution_scores(patcher, task.metric, 1 if method == "eap" else steps)
        name, settings = method, ({"steps": steps} if method == "eap-ig" else {})
        backwards = patcher.forwards - before
    else:
        scores = method(patcher, task.metric)
        name, settings, backwards = getattr(method, "__name__", "ranking"), {}, 0
    ranked = patcher.forwards - before
    circuit = circuit_at_faithfulness(
        patcher,
        task.metric,
        scores,
        target,
        max_edges=max_edges,
        method=name,
        settings={**settings, "graph_edges": graph.n_edges},
    )
    circuit.forwards += ranked
    circuit.backwards = backwards
    circuit.seconds = time.perf_counter() - started
    return circuit
