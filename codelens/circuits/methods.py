"""Circuit discovery: exact ACDC, edge attribution patching (EAP), EAP with integrated
gradients, and the fast path (attribution proposes, exact patching verifies).

Every method runs through one `Patcher`, so they search the same graph under the same
ablation, and each returns a `Circuit` with its forwards, backwards and wall time.

ACDC's criterion is a *damage*: the KL divergence itself when the metric is a distance,
otherwise ``|m(full model) - m(circuit)|``; an edge is removed when removing it adds
less than ``tau`` to the damage. Attribution scores estimate ``m(ablated) - m(full)``
per edge from gradients of the metric with respect to the edge mask; a circuit is the
edges whose ``|score| >= tau`` (or the ``n_edges`` best).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from codelens.circuits.metrics import check_threshold, metric_name, metric_value
from codelens.circuits.patching import Metric, Patcher
from codelens.circuits.result import Circuit, node_of
from codelens.progress import bar

METHODS = ("acdc", "eap", "eap-ig", "fast")


_name = metric_name


class _Damage:
    """How far a masked run is from the full model's behaviour (one forward per call)."""

    def __init__(self, patcher: Patcher, metric: Metric):
        self.patcher, self.metric = patcher, metric
        self.is_distance = bool(getattr(metric, "is_distance", False))
        with torch.no_grad():
            self.full = metric_value(metric, patcher.clean_logits)

    @torch.no_grad()
    def __call__(self, mask: Tensor) -> float:
        value = metric_value(self.metric, self.patcher.run(mask))
        return value if self.is_distance else abs(value - self.full)


def _edge_order(patcher: Patcher) -> list[tuple[int, int]]:
    """Edges in ACDC's order: receivers in reverse topological order, each receiver's
    senders latest first."""
    valid = patcher.graph.valid
    order = []
    for r in reversed(range(valid.shape[0])):
        order += [(r, s) for s in reversed(valid[r].nonzero().flatten().tolist())]
    return order


def _acdc_sweep(
    patcher: Patcher, damage: _Damage, mask: Tensor, edges, tau: float, scores: Tensor
) -> Tensor:
    current = damage(mask)
    for r, s in bar(edges, desc="ACDC edges", total=len(edges)):
        mask[r, s] = 1.0
        new = damage(mask)
        scores[r, s] = new - current
        if new - current < tau:
            current = new
        else:
            mask[r, s] = 0.0
    return mask


def acdc(patcher: Patcher, metric: Metric, tau: float) -> Circuit:
    """Exact ACDC: try removing every edge, one forward each, in reverse topological order."""
    check_threshold("tau", tau)
    started, forwards = time.perf_counter(), patcher.forwards
    damage = _Damage(patcher, metric)
    scores = torch.zeros(patcher.full_mask().shape)
    mask = _acdc_sweep(patcher, damage, patcher.empty_mask(), _edge_order(patcher), tau, scores)
    kept = (mask.cpu() == 0) & patcher.graph.valid
    return Circuit.from_tensors(
        patcher.graph,
        kept,
        scores,
        "acdc",
        {"tau": tau, "metric": _name(metric)},
        forwards=patcher.forwards - forwards,
        backwards=0,
        seconds=time.perf_counter() - started,
    )


def _gradient(patcher: Patcher, metric: Metric, alpha: float) -> Tensor:
    return _gradient_at(patcher, metric, patcher.full_mask() * alpha)


def _gradient_at(patcher: Patcher, metric: Metric, mask: Tensor) -> Tensor:
    """d metric / d mask at ``mask`` (one forward and backward), zero off the edges."""
    mask = mask.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = metric(patcher.run(mask))
        if not (isinstance(value, Tensor) and value.numel() == 1 and value.requires_grad):
            raise ValueError(
                f"attribution differentiates the metric, but {_name(metric)} returned "
                f"{type(value).__name__} {value!r:.60}: return a one-element tensor computed "
                "from the logits (not a Python float, not detached)"
            )
        (grad,) = torch.autograd.grad(value, mask)
    grad = grad.detach().cpu()
    if not (torch.isfinite(value.detach()).all() and torch.isfinite(grad).all()):
        raise ValueError(
            f"the metric {_name(metric)} or its gradient is not finite at this mask "
            f"(metric {float(value)}): attribution scores would be NaN"
        )
    return grad * patcher.graph.valid


def attribution_scores(patcher: Patcher, metric: Metric, steps: int = 1) -> Tensor:
    """Per-edge estimate of ``m(edge ablated) - m(full)``.

    ``steps=1``: EAP, the gradient at the full model (one forward and backward).
    ``steps>1``: integrated gradients along the path from the full model to every
    edge ablated (midpoint rule, one forward and backward per step); the scores then
    sum to ``m(every edge ablated) - m(full)`` as steps grow.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1 and getattr(metric, "is_distance", False):
        raise ValueError(
            "EAP needs a task metric: a distance from the full model (KL) has zero gradient "
            "there; use eap-ig (steps > 1) or a task metric such as LogitDifference"
        )
    if steps == 1:
        return _gradient(patcher, metric, 0.0)
    total = torch.zeros(patcher.full_mask().shape)
    for i in range(steps):
        total += _gradient(patcher, metric, (i + 0.5) / steps)
    return total / steps


def _select(scores: Tensor, valid: Tensor, tau: float, n_edges: int | None) -> Tensor:
    magnitude = scores.abs().masked_fill(~valid, -1.0)
    if n_edges is None:
        return (magnitude >= tau) & valid
    if not 0 <= n_edges <= int(valid.sum()):
        raise ValueError(f"n_edges must be in [0, {int(valid.sum())}], got {n_edges}")
    kept = torch.zeros_like(valid)
    kept.view(-1)[magnitude.view(-1).topk(n_edges).indices] = True
    return kept


def eap(
    patcher: Patcher,
    metric: Metric,
    tau: float = 0.0,
    n_edges: int | None = None,
    steps: int = 1,
) -> Circuit:
    """Edge attribution patching (``steps=1``) or EAP-IG (``steps>1``)."""
    check_threshold("tau", tau)
    started, forwards = time.perf_counter(), patcher.forwards
    scores = attribution_scores(patcher, metric, steps)
    kept = _select(scores, patcher.graph.valid, tau, n_edges)
    method = "eap" if steps == 1 else "eap-ig"
    settings = {"tau": tau, "n_edges": n_edges, "steps": steps, "metric": _name(metric)}
    used = patcher.forwards - forwards
    return Circuit.from_tensors(
        patcher.graph,
        kept,
        scores,
        method,
        settings,
        forwards=used,
        backwards=used,
        seconds=time.perf_counter() - started,
    )


def eap_ig(patcher: Patcher, metric: Metric, steps: int = 10, **kwargs) -> Circuit:
    """EAP with integrated gradients over the edge masks (see `attribution_scores`)."""
    if steps < 2:
        raise ValueError(f"eap-ig needs steps >= 2, got {steps}")
    return eap(patcher, metric, steps=steps, **kwargs)


def fast_path(
    patcher: Patcher,
    metric: Metric,
    tau: float,
    *,
    attribution_metric: Metric | None = None,
    screen: float | None = None,
    keep_above: float | None = None,
) -> Circuit:
    """ACDC in which attribution decides which edges need an exact forward.

    The sweep visits edges in ACDC's order, one stage of receivers at a time (a layer's
    query, key and value inputs, a layer's MLP, the logits). Before each stage, one
    forward and backward at the current circuit give every incoming edge's attribution:
    the first-order change of the task metric if that edge alone were removed now. An
    edge with ``|attribution| >= screen`` (default ``tau / 2``, in units of the task
    metric) is a candidate and gets ACDC's exact test (one forward). The edges between
    two candidates are tested as one run: removed together in one forward if together
    they add less than ``tau`` to the damage, otherwise split in two, down to single
    edges that get ACDC's test.

    A node whose every outgoing edge is already removed cannot reach the output, so
    removing its incoming edges changes nothing: ACDC removes them, one forward each.
    On a component graph they are removed here without a forward (exactly ACDC's
    decision); at a code site a patched input could still switch the site to a code that
    is not a node of the graph, so they are removed as one verified run.

    No edge is removed without an exact forward that includes it (except those of such
    dead components), so top-k code choices that flip when an upstream edge is patched
    (invisible to the straight-through gradient at codebook sites) are still caught.
    ``keep_above`` (off by default) keeps an edge whose ``|attribution|`` reaches it
    without testing it; this saves the forwards of the strongest edges at the risk of
    keeping an edge whose removal the gradient overestimates. The result is an ACDC
    circuit, not necessarily exhaustive ACDC's: on code graphs many of ACDC's decisions
    sit within a few percent of ``tau``, and one flipped decision changes the rest of its
    path (``benchmarks/acdc_stability.py``, docs/circuits.md).

    ``attribution_metric`` must be a task metric; it defaults to ``metric`` (then
    ``metric`` must not be a distance such as KL, which has no useful gradient).
    """
    started, forwards = time.perf_counter(), patcher.forwards
    attr_metric = attribution_metric or metric
    if getattr(attr_metric, "is_distance", False):
        raise ValueError(
            "the fast path screens edges with a task metric's gradient; pass "
            "attribution_metric (e.g. a LogitDifference) when the metric is KL"
        )
    check_threshold("tau", tau)
    screen = check_threshold("screen", tau / 2 if screen is None else screen)
    if keep_above is not None:
        check_threshold("keep_above", keep_above)
    if keep_above is not None and keep_above < screen:
        raise ValueError(f"keep_above ({keep_above}) must be >= screen ({screen})")
    run = _FastPath(patcher, _Damage(patcher, metric), attr_metric, tau, screen, keep_above)
    for stage in patcher.graph.receiver_stage.unique().flip(0).tolist():
        run.stage(stage)
    kept = (run.mask.cpu() == 0) & patcher.graph.valid
    settings = {
        "tau": tau,
        "screen": screen,
        "keep_above": keep_above,
        "metric": _name(metric),
        "attribution_metric": _name(attr_metric),
    }
    return Circuit.from_tensors(
        patcher.graph,
        kept,
        run.scores,
        "fast",
        settings,
        forwards=patcher.forwards - forwards,
        backwards=run.backwards,
        seconds=time.perf_counter() - started,
    )


class _FastPath:
    """One `fast_path` run: the mask of removed edges so far, every edge's score, the
    damage of the current circuit, and the backward passes spent on attribution."""

    def __init__(
        self,
        patcher: Patcher,
        damage: _Damage,
        attr_metric: Metric,
        tau: float,
        screen: float,
        keep_above: float | None,
    ) -> None:
        self.patcher, self.damage, self.attr_metric = patcher, damage, attr_metric
        self.tau, self.screen, self.keep_above = tau, screen, keep_above
        self.graph = patcher.graph
        self.valid = self.graph.valid
        self.mask = patcher.empty_mask()
        self.scores = torch.zeros(self.valid.shape)
        self.current = damage(self.mask)
        self.backwards = 0
        self.columns = {n: torch.tensor(c) for n, c in self.graph.node_columns().items()}

    def stage(self, stage: int) -> None:
        """Decide every edge into one stage of receivers, in ACDC's order."""
        rows = [
            r
            for r in reversed(range(self.valid.shape[0]))
            if self.graph.receiver_stage[r] == stage and self.valid[r].any()
        ]
        is_dead = self._dead(rows)
        if self.graph.level != "codes":  # dead components: ACDC's decision, no forward
            for r in rows:
                if is_dead[r]:
                    self.mask[r, self.valid[r]] = 1.0
            rows = [r for r in rows if not is_dead[r]]
        attribution = None
        if not all(is_dead[r] for r in rows):
            attribution = _gradient_at(self.patcher, self.attr_metric, self.mask).abs()
            self.backwards += 1
        run: list[tuple[int, int]] = []
        for r in rows:
            for s in reversed(self.valid[r].nonzero().flatten().tolist()):
                strength = 0.0 if is_dead[r] else float(attribution[r, s])
                if strength < self.screen:
                    run.append((r, s))
                elif self.keep_above is not None and strength >= self.keep_above:
                    self.scores[r, s] = strength
                else:
                    self.remove(run)
                    self.remove([(r, s)])
                    run = []
        self.remove(run)

    def _dead(self, rows: list[int]) -> dict[int, bool]:
        """Receivers whose node has every outgoing edge removed (those edges enter later
        stages, so this is final), read from one copy of the mask."""
        gone = (self.mask.cpu() == 1) | ~self.valid
        is_dead = {}
        for r in rows:
            cols = self.columns.get(node_of(self.graph.receivers[r]))
            is_dead[r] = cols is not None and bool(gone[:, cols].all())
        return is_dead

    def remove(self, edges: list[tuple[int, int]]) -> None:
        """ACDC on ``edges``, in order, removing runs of them at once while a run adds
        less than ``tau``; a run that adds more is split in two."""
        if not edges:
            return
        rows, cols = torch.tensor(edges).T
        self.mask[rows, cols] = 1.0
        new = self.damage(self.mask)
        increase = new - self.current
        if increase < self.tau:
            self.current = new
            self.scores[rows, cols] = increase / len(edges)
            return
        self.mask[rows, cols] = 0.0
        if len(edges) == 1:
            self.scores[rows, cols] = increase
            return
        half = len(edges) // 2
        self.remove(edges[:half])
        self.remove(edges[half:])


def discover(patcher: Patcher, method: str, metric: Metric, tau: float, **kwargs) -> Circuit:
    """Run one of `METHODS` by name."""
    if method == "acdc":
        return acdc(patcher, metric, tau, **kwargs)
    if method == "eap":
        return eap(patcher, metric, tau=tau, **kwargs)
    if method == "eap-ig":
        return eap_ig(patcher, metric, tau=tau, **kwargs)
    if method == "fast":
        return fast_path(patcher, metric, tau, **kwargs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
