"""The best single neuron at a code's recall: the paper's comparison of codes and neurons.

- neuron: any scalar activation dimension. The caller chooses which count (MLP hidden units
  ``mlp.hook_post``, MLP or attention output dims, residual dims).
- best neuron at matched recall, the paper's procedure: for a target recall r and P labelled
  tokens, neuron x with sign s in {+1, -1} classifies ``s * x >= t``, where t is the m-th
  largest value of ``s * x`` on the labelled tokens, m = ceil(r * P) (the (1 - r) quantile
  of the labelled values, taken at a data point, so exactly m labelled tokens lie strictly
  above or on it). Its precision is the fraction of labelled tokens among all tokens with
  ``s * x >= t``; the best neuron is the (neuron, sign) of highest precision.
- ties: tokens whose value equals the threshold are all on the firing side, never split,
  because a neuron cannot tell tied tokens apart. The neuron's recall can then exceed r (the
  achieved recall is reported) and its precision is that of the whole tied set: a ReLU unit
  whose threshold falls on 0 fires on every token at 0. Equal neuron precision is broken by
  higher achieved recall, then lower neuron index, then sign +1 before -1. Precisions are
  exact ratios in float64, so equal fractions compare equal.

Memory: neuron thresholds sort ``[N, chunk]`` column blocks sized by ``memory_budget_mb``
(about 24 bytes per token and neuron in a block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "NeuronMatch",
    "NeuronMatches",
    "best_neurons_for_labels",
    "neuron_precision_at_recall",
]


class NeuronMatch(NamedTuple):
    """The best neuron at one recall: it classifies ``sign * x[:, neuron] >= threshold``."""

    precision: float
    neuron: int
    threshold: float
    sign: int


@dataclass(frozen=True)
class NeuronMatches:
    """Best neuron per (label, recall) pair; ``recall`` is the achieved one (>= target)."""

    precision: Float[Tensor, " L"]
    recall: Float[Tensor, " L"]
    neuron: Int[Tensor, " L"]
    sign: Int[Tensor, " L"]
    threshold: Float[Tensor, " L"]
    hits: Int[Tensor, " L"]
    fires: Int[Tensor, " L"]

    def __len__(self) -> int:
        return self.precision.shape[0]

    def __getitem__(self, i: int) -> NeuronMatch:
        return NeuronMatch(
            float(self.precision[i]),
            int(self.neuron[i]),
            float(self.threshold[i]),
            int(self.sign[i]),
        )


def _check_neurons(neurons: Any) -> Float[Tensor, "N D"]:
    neurons = torch.as_tensor(neurons)
    if neurons.ndim != 2 or neurons.shape[0] == 0 or neurons.shape[1] == 0:
        raise ValueError(
            f"neurons must be a non-empty [n_tokens, n_neurons] tensor, "
            f"got shape {tuple(neurons.shape)}"
        )
    if not neurons.is_floating_point():
        raise ValueError(f"neurons must be a float tensor, got {neurons.dtype}")
    if bool(neurons.isnan().any()):
        raise ValueError("neurons contain NaN")
    return neurons.detach()


def best_neurons_for_labels(
    neurons: Float[Tensor, "N D"],
    labels_matrix: Bool[Tensor, "N L"] | Bool[Tensor, " N"],
    recalls: Float[Tensor, " L"] | Sequence[float] | float,
    *,
    memory_budget_mb: float = 512.0,
) -> NeuronMatches:
    """Best neuron's precision at matched recall for many (label, recall) pairs at once.

    Column l of ``labels_matrix`` goes with ``recalls[l]``; a single label column (or a 1-D
    label) is shared by all recalls, and a single recall by all columns. Vectorised over
    neurons (chunked to ``memory_budget_mb``) and over the recalls of a label; the tokens of
    each distinct label column are sorted once per chunk. See the module docstring for the
    procedure and tie handling.
    """
    neurons = _check_neurons(neurons)
    n_tokens, n_neurons = neurons.shape
    groups, n_positive = _label_groups(labels_matrix, recalls, n_tokens, neurons.device)
    best = _Best(n_positive, neurons.device)
    chunk = max(1, int(memory_budget_mb * 2**20) // (24 * n_tokens))
    for start in range(0, n_neurons, chunk):
        x = neurons[:, start : start + chunk].float()
        all_sorted = _sort_rows(x.T.contiguous())  # [Dc, N] ascending
        for group in groups:
            fires, hits, thresholds = _candidates(x, all_sorted, group)
            best.update(group.pairs, start, fires, hits, thresholds)
    return best.matches()


class _LabelGroup(NamedTuple):
    """The (label, recall) pairs that share one distinct label column: the column, the
    pairs' indices, each pair's ``m`` (positives to keep: ceil(recall * p)) and ``p``."""

    positive: Bool[Tensor, " N"]
    pairs: Int[Tensor, " J"]
    m: Int[Tensor, " J"]
    p: int


def _label_groups(
    labels_matrix: Any, recalls: Any, n_tokens: int, device: torch.device
) -> tuple[list[_LabelGroup], Int[Tensor, " L"]]:
    """Check the labels and recalls; group the pairs by distinct label column. Also returns
    each pair's number of positive tokens."""
    labels = torch.as_tensor(labels_matrix)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n_tokens:
        raise ValueError(
            f"labels must be [{n_tokens}] or [{n_tokens}, L] to match neurons, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor, got {labels.dtype}")
    target = torch.as_tensor(recalls, dtype=torch.float64).reshape(-1).cpu()
    if target.numel() == 0 or labels.shape[1] == 0:
        raise ValueError("no (label, recall) pairs given")
    n_pairs = max(labels.shape[1], target.numel())
    if labels.shape[1] not in (1, n_pairs) or target.numel() not in (1, n_pairs):
        raise ValueError(f"{labels.shape[1]} label columns do not match {target.numel()} recalls")
    if bool(((target <= 0) | (target > 1) | target.isnan()).any()):
        raise ValueError(f"recalls must be in (0, 1], got {target.tolist()}")
    target = target.expand(n_pairs)
    columns, column_of = torch.unique(labels.cpu().to(torch.uint8), dim=1, return_inverse=True)
    columns = columns.bool()
    n_positive = columns.sum(dim=0)
    empty = (n_positive[column_of] == 0).nonzero().squeeze(1).tolist()
    if empty:
        raise ValueError(f"label columns {empty} have no positive token")
    column_of = column_of.expand(n_pairs)
    groups = []
    for u in range(columns.shape[1]):
        pairs = (column_of == u).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        p = int(n_positive[u])
        m = torch.ceil(target[pairs] * p - 1e-6).long().clamp(1, p)
        groups.append(_LabelGroup(columns[:, u].to(device), pairs.to(device), m.to(device), p))
    return groups, n_positive[column_of].to(device)


def _candidates(
    x: Float[Tensor, "N Dc"], all_sorted: Float[Tensor, "Dc N"], group: _LabelGroup
) -> tuple[Int[Tensor, "DS J"], Int[Tensor, "DS J"], Float[Tensor, "DS J"]]:
    """Every neuron of the chunk, both signs (rows ``2d`` and ``2d + 1``), at the loosest
    threshold that keeps ``m`` positives: tokens fired, positives hit, thresholds."""
    n_tokens = x.shape[0]
    positive, _, m, p = group
    pos_sorted = _sort_rows(x[positive].T.contiguous())  # [Dc, P]
    high = pos_sorted[:, p - m].contiguous()  # m-th largest: x >= high keeps m
    low = pos_sorted[:, m - 1].contiguous()  # m-th smallest: x <= low keeps m
    fires = torch.stack(
        [
            n_tokens - torch.searchsorted(all_sorted, high),
            torch.searchsorted(all_sorted, low, right=True),
        ],
        dim=1,
    )  # [Dc, 2, J]
    hits = torch.stack(
        [p - torch.searchsorted(pos_sorted, high), torch.searchsorted(pos_sorted, low, right=True)],
        dim=1,
    )
    thresholds = torch.stack([high, -low], dim=1).double()
    return tuple(rearrange(t, "d s j -> (d s) j") for t in (fires, hits, thresholds))


class _Best:
    """The best neuron so far for every (label, recall) pair, over chunks of neurons."""

    def __init__(self, n_positive: Int[Tensor, " L"], device: torch.device) -> None:
        n_pairs = n_positive.shape[0]
        self.n_positive = n_positive
        self.precision = torch.full((n_pairs,), -1.0, dtype=torch.float64, device=device)
        self.hits = torch.zeros(n_pairs, dtype=torch.long, device=device)
        self.fires = torch.ones(n_pairs, dtype=torch.long, device=device)
        self.neuron = torch.zeros(n_pairs, dtype=torch.long, device=device)
        self.sign = torch.ones(n_pairs, dtype=torch.long, device=device)
        self.threshold = torch.zeros(n_pairs, dtype=torch.float64, device=device)

    def update(
        self, pairs: Tensor, start: int, fires: Tensor, hits: Tensor, thresholds: Tensor
    ) -> None:
        """Keep, per pair, the chunk's best candidate where it beats the best so far (ties
        in precision: more hits; within the chunk: lower neuron, then sign +)."""
        precision = hits.double() / fires.double()
        tied = precision == precision.max(dim=0, keepdim=True).values
        pick = torch.where(tied, hits, -1).argmax(dim=0)
        cols = torch.arange(pick.shape[0], device=pick.device)
        p_new, h_new = precision[pick, cols], hits[pick, cols]
        better = (p_new > self.precision[pairs]) | (
            (p_new == self.precision[pairs]) & (h_new > self.hits[pairs])
        )
        upd = pairs[better]
        self.precision[upd] = p_new[better]
        self.hits[upd] = h_new[better]
        self.fires[upd] = fires[pick, cols][better]
        self.neuron[upd] = start + pick[better] // 2
        self.sign[upd] = 1 - 2 * (pick[better] % 2)
        self.threshold[upd] = thresholds[pick, cols][better]

    def matches(self) -> NeuronMatches:
        return NeuronMatches(
            self.precision,
            self.hits.double() / self.n_positive.double(),
            self.neuron,
            self.sign,
            self.threshold,
            self.hits,
            self.fires,
        )


def _sort_rows(x: Float[Tensor, "R M"]) -> Float[Tensor, "R M"]:
    """Each row sorted ascending; on CPU NumPy's sort is several times faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def neuron_precision_at_recall(
    neurons: Float[Tensor, "N D"], labels: Bool[Tensor, " N"], recall: float | Tensor
) -> NeuronMatch:
    """Best neuron's ``(precision, neuron, threshold, sign)`` for one label at one recall."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [n_tokens], got shape {tuple(labels.shape)}")
    recall = torch.as_tensor(recall, dtype=torch.float64)
    if recall.numel() != 1:
        raise ValueError(f"recall must be one number, got {recall.numel()} values")
    return best_neurons_for_labels(neurons, labels, recall.reshape(1))[0]
