"""Codes and neurons as classifiers of token features: precision, recall and code search.

One implementation serves both analyses of the paper:

- TokFSM, "codes vs neurons": every code is a classifier of "the FSM is in state s".
  `codes_for_classes` scores all codes against all states at once; `best_neurons_for_labels`
  gives the best neuron's precision at each state code's recall.
- Language models, "code search by regular expression": `regex_labels` marks the tokens of a
  regex feature, `search_codes` runs the model, ranks codes with `best_codes_for_labels` and
  compares each one with the best neuron at the same recall.

Definitions:

- code: ``(site, group, id)``, code ``id`` of codebook group ``group`` (an attention head or
  an MLP group) at hook site ``site``. It *fires* at a token when ``id`` is among the k ids
  that group chose there (``{site}.hook_codes``). A repeated id counts once; ``EMPTY_SLOT``
  (-1) never fires.
- code index: one integer per code of every site, sites in the order given, then
  ``group * n_codes + id`` inside a site (`CodeFiring.code_index`, `CodeFiring.describe`).
- precision and recall of a code for a binary label per token: with ``count`` the tokens where
  it fires, ``hits`` those of them that are labelled and ``n_positive`` the labelled tokens,
  precision = P(label | fires) = hits / count and recall = P(fires | label) =
  hits / n_positive. A code that never fires has precision 0; f1 = 2PR / (P + R), 0 if both
  are 0. For classes (`codes_for_classes`) the label is "the token's class is c".
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
  higher achieved recall, then lower neuron index, then sign +1 before -1. Codes of equal
  precision are ranked by recall, then lower code index. Precisions are exact ratios in
  float64, so equal fractions compare equal.
- best code for a label (`best_codes_for_labels`, ``rank_by``): highest precision, or
  highest f1. By precision the winner can be a code for a sliver of the feature (precision
  1 at recall 0.05, where the best neuron is often as precise); f1 picks the code that
  classifies the feature as a whole, and the neuron is then matched at its recall.

Memory: `CodeFiring` holds int64 ``[N, slots]`` (slots = sum over sites of groups * k);
statistics are accumulated over token chunks with ``scatter_add_``. `codes_for_classes` keeps
an int64 co-occurrence matrix and two float64 matrices of ``n_codes_total x n_classes``
(24 bytes per entry, about twice that at peak: 50k codes x 100 classes keeps 120 MB). Neuron
thresholds sort ``[N, chunk]`` column blocks sized by ``memory_budget_mb`` (about 24 bytes
per token and neuron in a block).

TokFSM use, with ``states`` the FSM state per token (-1 at BOS):

    firing = code_firing({site: cache[f"{site}.hook_codes"] for site in sites}, n_codes)
    per_class = codes_for_classes(firing, states, n_states)
    found = per_class.best_code >= 0
    labels = states.reshape(-1, 1) == found.nonzero().reshape(1, -1)
    neurons = best_neurons_for_labels(acts, labels, per_class.best_recall[found])

LM use: ``search_codes(model, tokens, regex_labels(str_tokens, "20[0-9][0-9]")).table()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "ClassCodes",
    "CodeFiring",
    "CodeMatch",
    "CodeStats",
    "NeuronMatch",
    "NeuronMatches",
    "SearchResult",
    "best_codes_for_labels",
    "best_neurons_for_labels",
    "code_firing",
    "code_label_stats",
    "codes_for_classes",
    "neuron_precision_at_recall",
    "regex_labels",
    "search_codes",
]

_EVENTS_PER_CHUNK = 1 << 22
"""Firing events gathered at once when counting (bounds the temporary index tensors)."""


# ---------------------------------------------------------------- which codes fire


@dataclass(frozen=True)
class CodeFiring:
    """Which codes fire at each of N tokens, as global code indices.

    ``ids[n]`` lists the codes firing at token n, one slot per (site, group, k slot), -1 for
    an empty or repeated slot: a fixed-width sparse matrix. `pairs` gives the same as
    (token, code index) pairs. Tokens are the caller's tokens flattened row-major;
    ``token_shape`` remembers their shape so labels of that shape are accepted.
    """

    ids: Int[Tensor, "N slots"]
    sites: tuple[str, ...]
    groups: tuple[int, ...]
    codes_per_group: tuple[int, ...]
    token_shape: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def offsets(self) -> tuple[int, ...]:
        """First code index of every site, then the total."""
        out = [0]
        for g, c in zip(self.groups, self.codes_per_group, strict=True):
            out.append(out[-1] + g * c)
        return tuple(out)

    @property
    def n_codes_total(self) -> int:
        return self.offsets[-1]

    def code_index(self, site: str, group: int, code: int) -> int:
        """The global index of code ``code`` of group ``group`` at ``site``."""
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; sites: {list(self.sites)}")
        s = self.sites.index(site)
        if not 0 <= group < self.groups[s]:
            raise ValueError(f"group must be in [0, {self.groups[s]}) at {site}, got {group}")
        if not 0 <= code < self.codes_per_group[s]:
            raise ValueError(
                f"code must be in [0, {self.codes_per_group[s]}) at {site}, got {code}"
            )
        return self.offsets[s] + group * self.codes_per_group[s] + code

    def decode(
        self, index: Int[Tensor, " M"]
    ) -> tuple[Int[Tensor, " M"], Int[Tensor, " M"], Int[Tensor, " M"]]:
        """(site position in ``sites``, group, code id) of many code indices at once."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.numel() and (index.min() < 0 or index.max() >= self.n_codes_total):
            raise ValueError(f"code indices must be in [0, {self.n_codes_total})")
        offsets = torch.tensor(self.offsets)
        site = torch.searchsorted(offsets, index, right=True) - 1
        local = index - offsets[site]
        per_group = torch.tensor(self.codes_per_group)[site]
        return site, local // per_group, local % per_group

    def describe(self, index: int) -> tuple[str, int, int]:
        """``(site, group, code)`` of one code index."""
        site, group, code = (int(v) for v in self.decode(torch.tensor([int(index)])))
        return self.sites[site], group, code

    def pairs(self) -> tuple[Int[Tensor, " E"], Int[Tensor, " E"]]:
        """Every firing as (token, code index) pairs, sorted by token."""
        token, slot = (self.ids >= 0).nonzero(as_tuple=True)
        return token, self.ids[token, slot]

    def fires(self, index: int) -> Bool[Tensor, " N"]:
        """Where one code fires."""
        return (self.ids == int(index)).any(dim=1)

    def counts(self) -> Int[Tensor, " C"]:
        """Tokens at which each code fires."""
        none = torch.zeros(self.n_tokens, dtype=torch.long, device=self.ids.device)
        return _cooccurrence(self, none, 1)[:, 0]

    def select(self, mask: Bool[Tensor, " N"]) -> CodeFiring:
        """Only the tokens where ``mask`` is true (e.g. to drop BOS or padding)."""
        mask = _token_tensor(mask, self, "mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        ids = self.ids[mask.to(self.ids.device)]
        return CodeFiring(ids, self.sites, self.groups, self.codes_per_group, (ids.shape[0],))


def code_firing(
    codes_by_site: Mapping[str, Int[Tensor, "... G k"]], n_codes: Mapping[str, int] | int
) -> CodeFiring:
    """Index which codes fire at each token, from ``{site}.hook_codes`` ids of every site.

    All sites must share the same leading (token) shape. ``n_codes`` is the codebook size,
    one for all sites or per site. Ids must be in ``[-1, n_codes)``.
    """
    if not codes_by_site:
        raise ValueError("codes_by_site is empty: give the code ids of at least one site")
    lead: tuple[int, ...] | None = None
    device = None
    blocks, groups, sizes = [], [], []
    offset = 0
    for site, ids in codes_by_site.items():
        ids = torch.as_tensor(ids)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"code ids of {site} must be an integer tensor, got {ids.dtype}")
        if ids.ndim < 3:
            raise ValueError(
                f"code ids of {site} must be [..., G, k] with token dims first, "
                f"got shape {tuple(ids.shape)}"
            )
        if lead is None:
            lead, device = tuple(ids.shape[:-2]), ids.device
        elif tuple(ids.shape[:-2]) != lead:
            raise ValueError(
                f"code ids of {site} cover tokens {tuple(ids.shape[:-2])}, other sites {lead}"
            )
        if isinstance(n_codes, Mapping):
            if site not in n_codes:
                raise ValueError(f"n_codes has no entry for site {site!r}")
            size = int(n_codes[site])
        else:
            size = int(n_codes)
        if size < 1:
            raise ValueError(f"n_codes must be >= 1, got {size} for {site}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= size):
            raise ValueError(
                f"code ids of {site} must be in [-1, {size}), "
                f"got min {int(ids.min())}, max {int(ids.max())}"
            )
        g, k = ids.shape[-2:]
        flat = _drop_repeats(ids.to(device=device, dtype=torch.long).reshape(-1, g, k))
        group_base = offset + torch.arange(g, device=device)[:, None] * size
        glob = torch.where(flat >= 0, flat + group_base, -1)
        blocks.append(rearrange(glob, "n g k -> n (g k)"))
        groups.append(g)
        sizes.append(size)
        offset += g * size
    assert lead is not None
    if math.prod(lead) == 0:
        raise ValueError("code ids cover no tokens")
    return CodeFiring(
        torch.cat(blocks, dim=1), tuple(codes_by_site), tuple(groups), tuple(sizes), lead
    )


def _drop_repeats(ids: Int[Tensor, "n g k"]) -> Int[Tensor, "n g k"]:
    """Sort each group's k ids and blank repeats, so that a code fires once per token."""
    if ids.shape[-1] == 1:
        return ids
    ids = ids.sort(dim=-1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
    return ids.masked_fill(repeat, -1)


def _token_tensor(values: Any, firing: CodeFiring, name: str) -> Tensor:
    """``values`` per token as a flat tensor; shape must be [N] or the firing's token shape."""
    values = torch.as_tensor(values)
    shape = tuple(values.shape)
    if values.numel() == 0:
        raise ValueError(f"{name} is empty")
    if shape not in ((firing.n_tokens,), firing.token_shape):
        raise ValueError(
            f"{name} has shape {shape} but the codes cover {firing.n_tokens} tokens "
            f"(shape {firing.token_shape})"
        )
    return values.reshape(-1)


def _cooccurrence(
    firing: CodeFiring, classes: Int[Tensor, " N"], n_classes: int
) -> Int[Tensor, "C K"]:
    """Tokens where each code fires and the token's class is c (class -1 counts nowhere)."""
    ids = firing.ids
    classes = classes.to(ids.device)
    out = torch.zeros(firing.n_codes_total * n_classes, dtype=torch.long, device=ids.device)
    step = max(1, _EVENTS_PER_CHUNK // max(1, ids.shape[1]))
    for start in range(0, firing.n_tokens, step):
        chunk = ids[start : start + step]
        cls = classes[start : start + step, None].expand_as(chunk)
        keep = (chunk >= 0) & (cls >= 0)
        index = chunk[keep] * n_classes + cls[keep]
        out.scatter_add_(0, index, torch.ones_like(index))
    return out.view(firing.n_codes_total, n_classes)


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

    site: str
    group: int
    code: int
    precision: float
    recall: float
    count: int
    f1: float
    index: int = -1

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "group": self.group,
            "code": self.code,
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
        site, group, code = firing.describe(index)
        matches.append(
            CodeMatch(
                site,
                group,
                code,
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
            site, group, code = self.firing.describe(index)
            rows.append(
                {
                    "class": c,
                    "site": site,
                    "group": group,
                    "code": code,
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


# ---------------------------------------------------------------- neurons at matched recall


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

    device = neurons.device
    groups = []
    for u in range(columns.shape[1]):
        pairs = (column_of == u).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        p = int(n_positive[u])
        m = torch.ceil(target[pairs] * p - 1e-6).long().clamp(1, p)
        groups.append((columns[:, u].to(device), pairs.to(device), m.to(device), p))

    best_p = torch.full((n_pairs,), -1.0, dtype=torch.float64, device=device)
    best_hits = torch.zeros(n_pairs, dtype=torch.long, device=device)
    best_fires = torch.ones(n_pairs, dtype=torch.long, device=device)
    best_neuron = torch.zeros(n_pairs, dtype=torch.long, device=device)
    best_sign = torch.ones(n_pairs, dtype=torch.long, device=device)
    best_t = torch.zeros(n_pairs, dtype=torch.float64, device=device)

    chunk = max(1, int(memory_budget_mb * 2**20) // (24 * n_tokens))
    for start in range(0, n_neurons, chunk):
        x = neurons[:, start : start + chunk].float()
        all_sorted = _sort_rows(x.T.contiguous())  # [Dc, N] ascending
        for positive, pairs, m, p in groups:
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
                [
                    p - torch.searchsorted(pos_sorted, high),
                    torch.searchsorted(pos_sorted, low, right=True),
                ],
                dim=1,
            )
            thresholds = torch.stack([high, -low], dim=1).double()
            fires, hits, thresholds = (
                rearrange(t, "d s j -> (d s) j") for t in (fires, hits, thresholds)
            )
            precision = hits.double() / fires.double()
            tied = precision == precision.max(dim=0, keepdim=True).values
            pick = torch.where(tied, hits, -1).argmax(dim=0)  # first: lower neuron, sign +
            cols = torch.arange(pick.shape[0], device=device)
            p_new, h_new = precision[pick, cols], hits[pick, cols]
            better = (p_new > best_p[pairs]) | (
                (p_new == best_p[pairs]) & (h_new > best_hits[pairs])
            )
            upd = pairs[better]
            best_p[upd] = p_new[better]
            best_hits[upd] = h_new[better]
            best_fires[upd] = fires[pick, cols][better]
            best_neuron[upd] = start + pick[better] // 2
            best_sign[upd] = 1 - 2 * (pick[better] % 2)
            best_t[upd] = thresholds[pick, cols][better]

    pos_per_pair = n_positive[column_of].to(device)
    return NeuronMatches(
        best_p,
        best_hits.double() / pos_per_pair.double(),
        best_neuron,
        best_sign,
        best_t,
        best_hits,
        best_fires,
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


# ---------------------------------------------------------------- regex features


def regex_labels(
    token_strs: Sequence[Sequence[str]] | Sequence[str],
    pattern: str | re.Pattern[str],
    *,
    group: int | str = 0,
    flags: int = 0,
) -> Bool[Tensor, "*batch pos"]:
    """Label tokens inside matches of ``pattern`` on the text the tokens spell.

    Each sequence's token strings are joined into its text; a token is positive when its
    characters overlap a match (so ``" 2019"`` is positive for ``2019``), and a match may span
    several tokens. ``group`` selects which capture group is the feature, so the pattern can
    demand context it does not label (``r"in (\\d{4})"`` with ``group=1``); empty matches
    label nothing. ``list[str]`` gives ``[pos]``, ``list[list[str]]`` (equal lengths)
    ``[batch, pos]``.
    """
    try:
        regex = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
    except re.error as err:
        raise ValueError(f"invalid regular expression {pattern!r}: {err}") from err
    if not isinstance(regex, re.Pattern):
        raise ValueError(f"pattern must be a string or compiled regex, got {type(pattern)}")
    if isinstance(group, str) and group not in regex.groupindex:
        raise ValueError(f"pattern {regex.pattern!r} has no group named {group!r}")
    if isinstance(group, int) and not 0 <= group <= regex.groups:
        raise ValueError(f"pattern {regex.pattern!r} has {regex.groups} groups, not {group}")
    if isinstance(token_strs, str):
        raise ValueError("token_strs must be a list of token strings, not one string")
    if len(token_strs) == 0:
        raise ValueError("token_strs is empty")
    nested = [not isinstance(t, str) for t in token_strs]
    if not any(nested):
        return _label_sequence(token_strs, regex, group)  # type: ignore[arg-type]
    if not all(nested):
        raise ValueError("token_strs mixes strings and lists: give list[str] or list[list[str]]")
    lengths = {len(seq) for seq in token_strs}
    if len(lengths) != 1:
        raise ValueError(
            f"sequences have different lengths {sorted(lengths)}: label them one at a time"
        )
    return torch.stack([_label_sequence(seq, regex, group) for seq in token_strs])  # type: ignore[arg-type]


def _label_sequence(tokens: Sequence[str], regex: re.Pattern[str], group: int | str) -> Tensor:
    bad = [i for i, t in enumerate(tokens) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"tokens must be strings; positions {bad[:5]} are not")
    if len(tokens) == 0:
        raise ValueError("a token sequence is empty")
    text = "".join(tokens)
    lengths = torch.tensor([len(t) for t in tokens])
    inside = torch.zeros(len(text) + 1, dtype=torch.long)
    for match in regex.finditer(text):
        start, end = match.span(group)
        if end > start:  # a group that did not take part spans (-1, -1)
            inside[start] += 1
            inside[end] -= 1
    in_match = inside.cumsum(0)[: len(text)] > 0
    char_token = torch.repeat_interleave(torch.arange(len(tokens)), lengths)
    labels = torch.zeros(len(tokens), dtype=torch.bool)
    labels[char_token[in_match]] = True
    return labels


# ---------------------------------------------------------------- end-to-end search


@dataclass
class SearchResult:
    """Codes found for a label, each with the best neuron at its recall.

    ``neurons[i]`` belongs to ``matches[i]`` (None without neuron hooks). ``neuron_hooks``
    lists (hook name, width) in the column order of ``neuron_acts``; ``firing``,
    ``neuron_acts`` and ``labels`` are the (masked) data the numbers come from.
    """

    matches: list[CodeMatch]
    neurons: NeuronMatches | None
    neuron_hooks: tuple[tuple[str, int], ...]
    firing: CodeFiring = field(repr=False)
    labels: Bool[Tensor, " N"] = field(repr=False)
    neuron_acts: Float[Tensor, "N D"] | None = field(default=None, repr=False)

    def neuron_name(self, index: int) -> str:
        """``"hook[unit]"`` for a column of ``neuron_acts``."""
        start = 0
        for name, width in self.neuron_hooks:
            if index < start + width:
                return f"{name}[{index - start}]"
            start += width
        raise ValueError(f"neuron index {index} out of range [0, {start})")

    def for_labels(
        self,
        labels: Bool[Tensor, " N"],
        *,
        min_count: int = 5,
        top: int = 10,
        rank_by: RankBy = "precision",
        memory_budget_mb: float = 512.0,
    ) -> SearchResult:
        """The same search for other labels of the same (masked) tokens, without running
        the model again: ``labels`` is flat, one per token of ``firing``."""
        labels = _check_labels(labels, self.firing)
        matches = best_codes_for_labels(
            self.firing, labels, min_count=min_count, top=top, rank_by=rank_by
        )
        neurons = None
        if self.neuron_acts is not None and matches:
            recalls = torch.tensor([m.recall for m in matches], dtype=torch.float64)
            neurons = best_neurons_for_labels(
                self.neuron_acts, labels, recalls, memory_budget_mb=memory_budget_mb
            )
        return SearchResult(
            matches, neurons, self.neuron_hooks, self.firing, labels, self.neuron_acts
        )

    def table(self) -> list[dict[str, Any]]:
        """One dict per code match, with its best neuron's numbers, for reports."""
        rows = []
        for i, match in enumerate(self.matches):
            row = match.as_dict()
            if self.neurons is not None:
                neuron_precision = float(self.neurons.precision[i])
                row |= {
                    "neuron": self.neuron_name(int(self.neurons.neuron[i])),
                    "neuron_sign": int(self.neurons.sign[i]),
                    "neuron_threshold": float(self.neurons.threshold[i]),
                    "neuron_precision": neuron_precision,
                    "neuron_recall": float(self.neurons.recall[i]),
                    "precision_gain": match.precision - neuron_precision,
                }
            rows.append(row)
        return rows


def _neuron_hook_names(model: Any, neuron_hooks: Sequence[str]) -> list[str]:
    """Full hook names: ``"blocks.…"`` names as given, other suffixes for every layer."""
    if isinstance(neuron_hooks, str):
        neuron_hooks = (neuron_hooks,)
    names: list[str] = []
    for hook in neuron_hooks:
        if hook.startswith("blocks.") or hook in model.hook_dict:
            candidates = [hook]
        else:
            candidates = [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)]
        missing = [c for c in candidates if c not in model.hook_dict]
        if missing:
            raise ValueError(f"the model has no hook points {missing} (neuron hook {hook!r})")
        names += [c for c in candidates if c not in names]
    return names


def search_codes(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    labels: Bool[Tensor, "batch pos"],
    *,
    sites: Sequence[str] | None = None,
    neuron_hooks: Sequence[str] = ("mlp.hook_post",),
    batch_size: int = 16,
    min_count: int = 5,
    top: int = 10,
    rank_by: RankBy = "precision",
    token_mask: Bool[Tensor, "batch pos"] | None = None,
    memory_budget_mb: float = 512.0,
) -> SearchResult:
    """Find the codes that best classify ``labels``, and the best neuron at each one's recall.

    Runs ``model.run_with_cache`` in batches of ``batch_size`` sequences, keeping only the
    code ids of ``sites`` (default: every codebook site) and the activations of
    ``neuron_hooks`` (suffixes such as ``"mlp.hook_post"`` mean every layer; full names are
    used as given; ``()`` skips neurons), gathered on the CPU. ``token_mask`` drops tokens
    (BOS, padding) from all statistics.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(
            f"tokens must be a non-empty [batch, pos] tensor, got {tuple(tokens.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = torch.as_tensor(labels)
    if labels.numel() != tokens.numel() or labels.shape not in (tokens.shape, (tokens.numel(),)):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, tokens {tuple(tokens.shape)}: they must match"
        )
    codebooks = model.codebooks
    if not codebooks:
        raise ValueError("the model has no codebooks to search")
    sites = list(codebooks) if sites is None else list(sites)
    unknown = [s for s in sites if s not in codebooks]
    if unknown or not sites:
        raise ValueError(f"no codebook at sites {unknown}; codebook sites: {list(codebooks)}")
    neuron_names = _neuron_hook_names(model, neuron_hooks)
    names = [f"{s}.hook_codes" for s in sites] + neuron_names

    device = next(model.parameters()).device
    codes: dict[str, list[Tensor]] = {s: [] for s in sites}
    widths: dict[str, int] = {}
    acts: Tensor | None = None
    n_tokens = tokens.numel()
    row = 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            _, cache = model.run_with_cache(batch, names_filter=names)
            for site in sites:
                codes[site].append(cache[f"{site}.hook_codes"].cpu())
            if neuron_names:
                cols = []
                for name in neuron_names:
                    value = cache[name]
                    if tuple(value.shape[:2]) != tuple(batch.shape):
                        raise ValueError(
                            f"{name} has shape {tuple(value.shape)}: not one vector per token"
                        )
                    cols.append(value.reshape(batch.numel(), -1).float().cpu())
                    widths[name] = cols[-1].shape[1]
                block = torch.cat(cols, dim=1)
                if acts is None:
                    acts = torch.empty(n_tokens, block.shape[1])
                acts[row : row + block.shape[0]] = block
            row += batch.numel()
            del cache

    firing = code_firing(
        {s: torch.cat(codes[s]) for s in sites}, {s: codebooks[s].n_codes for s in sites}
    )
    labels = labels.reshape(-1)
    if token_mask is not None:
        mask = _token_tensor(token_mask, firing, "token_mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a bool tensor, got {mask.dtype}")
        firing, labels = firing.select(mask), labels[mask]
        acts = None if acts is None else acts[mask]
    data = SearchResult([], None, tuple((n, widths[n]) for n in neuron_names), firing, labels, acts)
    return data.for_labels(
        labels, min_count=min_count, top=top, rank_by=rank_by, memory_budget_mb=memory_budget_mb
    )
