"""Codes as classifiers of token labels and classes: precision, recall, f1, best codes.

- precision and recall of a code for a binary label per token: with ``count`` the tokens where
  it fires, ``hits`` those of them that are labelled and ``n_positive`` the labelled tokens,
  precision = P(label | fires) = hits / count and recall = P(fires | label) =
  hits / n_positive. A code that never fires has precision 0; f1 = 2PR / (P + R), 0 if both
  are 0. For classes (`codes_for_classes`) the label is "the token's class is c".
- best code for a label (`best_codes_for_labels`, ``rank_by``): highest precision, or
  highest f1. By precision the winner can be a code for a sliver of the feature (precision
  1 at recall 0.05, where the best neuron is often as precise); f1 picks the code that
  classifies the feature as a whole, and the neuron is then matched at its recall.
- ties: codes of equal precision are ranked by recall, then lower code index. Precisions
  are exact ratios in float64, so equal fractions compare equal.

Memory: `codes_for_classes` keeps an int64 co-occurrence matrix and two float64 matrices of
``n_codes_total x n_classes`` (24 bytes per entry, about twice that at peak: 50k codes x 100
classes keeps 120 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.analysis.firing import CodeFiring, _cooccurrence, _token_tensor
from codelens.vocab import Code

__all__ = [
    "ClassCodes",
    "CodeMatch",
    "CodeStats",
    "best_codes_for_labels",
    "code_label_stats",
    "codes_for_classes",
]


# ---------------------------------------------------------------- codes vs one label


@dataclass(frozen=True)
class CodeStats:
    """Per-code firing counts and precision / recall / f1 for one binary label."""

    count: Int[Tensor, " C"]
    hits: Int[Tensor, " C"]
    precision: Float[Tensor, " C"]
    recall: Float[Tensor, " C"]
    f1: Float[Tensor, " C"]
    n_positive: int
    n_tokens: int


@dataclass(frozen=True)
class CodeMatch:
    """One code's quality as a classifier of a label (``index``: its global code index)."""

    code: Code
    precision: float
    recall: float
    count: int
    f1: float
    index: int = -1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, flat: ``{"site", "group", "code", "precision", ...}``."""
        return {
            "site": self.code.site,
            "group": self.code.group,
            "code": self.code.id,
            "precision": self.precision,
            "recall": self.recall,
            "count": self.count,
            "f1": self.f1,
        }


def _check_labels(labels: Any, firing: CodeFiring) -> Bool[Tensor, " N"]:
    labels = _token_tensor(labels, firing, "labels")
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor, got {labels.dtype}")
    if not bool(labels.any()):
        raise ValueError("labels has no positive token: precision and recall are undefined")
    return labels


def _f1(precision: Tensor, recall: Tensor) -> Tensor:
    total = precision + recall
    return torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-300), 0.0)


def code_label_stats(firing: CodeFiring, labels: Bool[Tensor, " N"]) -> CodeStats:
    """Precision, recall and f1 of every code for one label, all codes at once."""
    labels = _check_labels(labels, firing)
    as_class = torch.where(labels, 0, -1)
    hits = _cooccurrence(firing, as_class, 1)[:, 0]
    count = firing.counts()
    n_positive = int(labels.sum())
    precision = hits.double() / count.clamp(min=1).double()
    recall = hits.double() / n_positive
    return CodeStats(
        count, hits, precision, recall, _f1(precision, recall), n_positive, firing.n_tokens
    )


def _rank(first: Tensor, second: Tensor, eligible: Tensor, top: int) -> Tensor:
    """Indices of eligible entries by ``first``, then ``second``, then index (stable sorts)."""
    index = eligible.nonzero().squeeze(1)
    index = index[torch.sort(second[index], descending=True, stable=True).indices]
    index = index[torch.sort(first[index], descending=True, stable=True).indices]
    return index[:top]


RankBy = Literal["precision", "f1"]


def best_codes_for_labels(
    firing: CodeFiring,
    labels: Bool[Tensor, " N"],
    *,
    min_count: int = 5,
    top: int = 10,
    rank_by: RankBy = "precision",
) -> list[CodeMatch]:
    """The ``top`` codes for one label, by precision (ties: recall) or by f1 (ties:
    precision), then index.

    Only codes firing on at least ``min_count`` tokens and at least one labelled token count,
    so a code seen once does not win with precision 1. By precision, the best code may
    cover a sliver of the label (precision 1 at recall 0.05, where a neuron is as precise);
    f1 picks the code that classifies the label as a whole.
    """
    if min_count < 1 or top < 1:
        raise ValueError(f"min_count and top must be >= 1, got {min_count} and {top}")
    if rank_by not in ("precision", "f1"):
        raise ValueError(f"rank_by must be 'precision' or 'f1', got {rank_by!r}")
    stats = code_label_stats(firing, labels)
    eligible = (stats.count >= min_count) & (stats.hits > 0)
    if rank_by == "f1":
        best = _rank(stats.f1, stats.precision, eligible, top)
    else:
        best = _rank(stats.precision, stats.recall, eligible, top)
    matches = []
    for index in best.tolist():
        matches.append(
            CodeMatch(
                firing.code(index),
                float(stats.precision[index]),
                float(stats.recall[index]),
                int(stats.count[index]),
                float(stats.f1[index]),
                index,
            )
        )
    return matches


# ---------------------------------------------------------------- codes vs classes


@dataclass(frozen=True)
class ClassCodes:
    """Every code as a classifier of every class ("the FSM is in state s").

    ``precision[i, c]`` = P(class c | code i fires), ``recall[i, c]`` = P(code i fires |
    class c). ``majority[i]`` is the class code i co-occurs with most (-1 if it never fires on
    a token with a class; ties: lower class); ``best_code[c]`` the code of highest precision
    for class c (ties: recall, then index; -1 if none qualifies).
    """

    cooccurrence: Int[Tensor, "C K"]
    count: Int[Tensor, " C"]
    class_count: Int[Tensor, " K"]
    precision: Float[Tensor, "C K"]
    recall: Float[Tensor, "C K"]
    majority: Int[Tensor, " C"]
    majority_precision: Float[Tensor, " C"]
    majority_recall: Float[Tensor, " C"]
    best_code: Int[Tensor, " K"]
    best_precision: Float[Tensor, " K"]
    best_recall: Float[Tensor, " K"]
    firing: CodeFiring = field(repr=False)

    def table(self) -> list[dict[str, Any]]:
        """One row per class with a best code: class, site, group, code, precision, recall."""
        rows = []
        for c, index in enumerate(self.best_code.tolist()):
            if index < 0:
                continue
            code = self.firing.code(index)
            rows.append(
                {
                    "class": c,
                    "site": code.site,
                    "group": code.group,
                    "code": code.id,
                    "precision": float(self.best_precision[c]),
                    "recall": float(self.best_recall[c]),
                    "count": int(self.count[index]),
                }
            )
        return rows


def codes_for_classes(
    firing: CodeFiring, classes: Int[Tensor, " N"], n_classes: int, *, min_count: int = 1
) -> ClassCodes:
    """Precision and recall of every code for every class, from one co-occurrence count.

    ``classes`` gives each token's class in ``[0, n_classes)``, or -1 for none (e.g. BOS): such
    a token still counts where a code fires, as a negative for every class. Best codes per
    class need ``count >= min_count`` and at least one hit.
    """
    if n_classes < 1 or min_count < 1:
        raise ValueError(f"n_classes and min_count must be >= 1, got {n_classes}, {min_count}")
    classes = _token_tensor(classes, firing, "classes")
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise ValueError(f"classes must be an integer tensor, got {classes.dtype}")
    classes = classes.long()
    if int(classes.min()) < -1 or int(classes.max()) >= n_classes:
        raise ValueError(
            f"classes must be in [-1, {n_classes}), "
            f"got min {int(classes.min())}, max {int(classes.max())}"
        )
    if not bool((classes >= 0).any()):
        raise ValueError("no token has a class (all classes are -1)")
    cooc = _cooccurrence(firing, classes, n_classes)
    count = firing.counts()
    class_count = torch.bincount(classes[classes >= 0], minlength=n_classes).to(cooc.device)
    precision = cooc.double() / count.clamp(min=1).double()[:, None]
    recall = cooc.double() / class_count.clamp(min=1).double()[None, :]

    top = cooc.max(dim=1)
    majority = torch.where(top.values > 0, top.indices, -1)
    fired = majority >= 0
    pick = majority.clamp(min=0)[:, None]
    majority_precision = torch.where(fired, precision.gather(1, pick)[:, 0], 0.0)
    majority_recall = torch.where(fired, recall.gather(1, pick)[:, 0], 0.0)

    eligible = (count >= min_count)[:, None] & (cooc > 0)
    scored = torch.where(eligible, precision, -1.0)
    tied = eligible & (scored == scored.max(dim=0, keepdim=True).values)
    best = torch.where(tied, recall, -1.0).argmax(dim=0)
    has = tied.any(dim=0)
    classes_idx = torch.arange(n_classes, device=cooc.device)
    best_code = torch.where(has, best, -1)
    best_precision = torch.where(has, precision[best, classes_idx], 0.0)
    best_recall = torch.where(has, recall[best, classes_idx], 0.0)
    return ClassCodes(
        cooc,
        count,
        class_count,
        precision,
        recall,
        majority,
        majority_precision,
        majority_recall,
        best_code,
        best_precision,
        best_recall,
        firing,
    )
