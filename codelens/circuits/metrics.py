"""Metrics a circuit is judged by: a task metric (higher = more of the behaviour) or
the KL divergence from the full model (a distance: 0 = the full model's behaviour)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

ReadAt = int | Int[Tensor, " batch"]
"""Where a metric reads the logits: one position for every row, or one per row."""


def _at(logits: Float[Tensor, "b t v"], positions: ReadAt) -> Float[Tensor, "b v"]:
    rows = torch.arange(logits.shape[0], device=logits.device)
    if isinstance(positions, int):
        return logits[:, positions]
    if positions.shape != (logits.shape[0],):
        raise ValueError(
            f"positions must be an int or one index per sequence ({logits.shape[0]}), "
            f"got shape {tuple(positions.shape)}"
        )
    return logits[rows, positions.to(logits.device)]


class LogitDifference:
    """Mean over the batch of ``logit[correct] - logit[wrong]`` at ``positions``.

    ``correct`` / ``wrong`` hold one token id per sequence, or ``[batch, n]`` ids whose
    logits are averaged (a set of words, e.g. a topic's vocabulary).
    """

    is_distance = False
    name = "logit_difference"

    def __init__(
        self, correct: Int[Tensor, " b"], wrong: Int[Tensor, " b"], positions: ReadAt = -1
    ):
        if correct.dim() not in (1, 2) or wrong.dim() != correct.dim():
            raise ValueError(
                f"correct and wrong must both be [batch] or [batch, n] ids, got "
                f"{tuple(correct.shape)} and {tuple(wrong.shape)}"
            )
        if correct.shape[0] != wrong.shape[0]:
            raise ValueError(f"correct has {correct.shape[0]} rows, wrong {wrong.shape[0]}")
        self.correct, self.wrong, self.positions = correct, wrong, positions

    def __call__(self, logits: Float[Tensor, "b t v"]) -> Tensor:
        at = _at(logits, self.positions)
        if at.shape[0] != self.correct.shape[0]:
            raise ValueError(f"logits have batch {at.shape[0]}, answers {self.correct.shape[0]}")
        correct = self.correct.to(at.device).reshape(at.shape[0], -1)
        wrong = self.wrong.to(at.device).reshape(at.shape[0], -1)
        return (at.gather(1, correct).mean(1) - at.gather(1, wrong).mean(1)).mean()


class KLDivergence:
    """Mean over the batch of ``KL(full model || patched)`` of the next-token
    distribution at ``positions``: 0 for the full model, larger = further from it."""

    is_distance = True
    name = "kl_divergence"

    def __init__(self, clean_logits: Float[Tensor, "b t v"], positions: ReadAt = -1):
        self.positions = positions
        self.reference = _at(clean_logits, positions).detach().float().log_softmax(-1)

    def __call__(self, logits: Float[Tensor, "b t v"]) -> Tensor:
        patched = _at(logits, self.positions).float().log_softmax(-1)
        return F.kl_div(patched, self.reference, log_target=True, reduction="batchmean")


def metric_name(metric: Callable[..., Any]) -> str:
    """How a metric is named in results and errors."""
    return getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))


def metric_value(metric: Callable[[Tensor], Any], logits: Float[Tensor, "b t v"]) -> float:
    """``metric(logits)`` as a float, refusing anything but one finite number.

    A NaN would make every comparison against ``tau`` false, so a circuit method would
    quietly keep every edge (or none) and write a report of it.
    """
    value = metric(logits)
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"the metric {metric_name(metric)} must return one number, got a tensor of shape "
            f"{tuple(value.shape)}"
        )
    if not isinstance(value, Tensor | numbers.Real):
        raise ValueError(
            f"the metric {metric_name(metric)} must return a number, got {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(
            f"the metric {metric_name(metric)} returned {number}: circuits cannot be judged by "
            "a non-finite value (check the model's logits and the metric)"
        )
    return number


def check_threshold(name: str, value: Any) -> float:
    """A circuit threshold (``tau``, ``screen``, ...): a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)
