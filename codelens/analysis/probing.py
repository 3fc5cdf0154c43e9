"""k-sparse probing: how well the k features that best separate a label predict it.

SAEBench's sparse probing (arXiv 2503.09532), which a later study found the most reliable
of its feature metrics, for any per-document features: codes, SAE latents, neurons, raw
activations. For a binary label (a topic against the rest):

1. the documents are split into train and test per class (``test_fraction`` of each);
2. each split is balanced by subsampling its majority class, so chance is 0.5;
3. on the train split only, the k features with the largest absolute difference of the
   class means are selected;
4. a logistic regression on those k features (standardised with the train split's mean
   and deviation) is fit on the train split and its accuracy measured on the test split.

A k larger than the number of features is an error in `k_sparse_probe`; `probing_table`
leaves such a cell empty (None), so sets of different widths share one table.

Per-document features: `document_code_rates` gives each document's firing rate of every
code (the share of its kept tokens where the code is active), `pooled_features` any
feature dictionary's values (`codelens.baselines.LinearFeatures`: SAE latents, or the
raw activations and neurons of `identity_features`) averaged over its kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from codelens.vocab import Code, collect_codes

__all__ = [
    "PROBE_KS",
    "CodeColumns",
    "balanced_split",
    "document_code_rates",
    "k_sparse_probe",
    "pooled_features",
    "probing_table",
    "rates_from_codes",
]

PROBE_KS = (1, 2, 5, 10, 20)
"""SAEBench's k values."""


def _check_labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype != torch.bool:
        raise ValueError(
            f"labels must be a 1-d bool tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    return labels.cpu()


def balanced_split(
    labels: Bool[Tensor, " n"], test_fraction: float = 0.2, seed: int = 0
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Row indices of a train and a test split, each with as many positives as negatives.

    ``test_fraction`` of each class (at least one, at most all but one) goes to test; then
    the majority class of each split is subsampled to the minority's size. Raises when a
    class has fewer than 2 rows."""
    labels = _check_labels(labels)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_pos = int(labels.sum())
    if min(n_pos, len(labels) - n_pos) < 2:
        raise ValueError(
            f"probing needs >= 2 rows of each class (one to train, one to test); got "
            f"{n_pos} positive and {len(labels) - n_pos} negative"
        )
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for rows in (labels.nonzero()[:, 0], (~labels).nonzero()[:, 0]):
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        parts.append((rows[n_test:], rows[:n_test]))
    (pos_train, pos_test), (neg_train, neg_test) = parts
    m_train, m_test = min(len(pos_train), len(neg_train)), min(len(pos_test), len(neg_test))
    train = torch.cat([pos_train[:m_train], neg_train[:m_train]])
    test = torch.cat([pos_test[:m_test], neg_test[:m_test]])
    return train, test


def k_sparse_probe(
    features: Float[Tensor, "n f"],
    labels: Bool[Tensor, " n"],
    ks: Sequence[int] = PROBE_KS,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    c: float = 1.0,
) -> dict[int, float]:
    """Test accuracy of a logistic regression on the top-k features, per k (see the module
    docstring); ``c`` is the inverse L2 regularisation strength. Raises for a k above the
    number of features."""
    features, labels = torch.as_tensor(features), _check_labels(labels)
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a float [n, f] tensor, got {features.dtype} {tuple(features.shape)}"
        )
    if features.shape[0] != len(labels):
        raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of k >= 1, got {ks}")
    if max(ks) > features.shape[1]:
        raise ValueError(f"k={max(ks)} is more than the {features.shape[1]} features")
    if not torch.isfinite(features).all():
        raise ValueError("features hold NaN or infinite values")
    train, test = balanced_split(labels, test_fraction, seed)
    x = features.detach().double().cpu().numpy()
    y = labels.numpy()
    tr, te = train.numpy(), test.numpy()
    x_train, y_train, x_test, y_test = x[tr], y[tr], x[te], y[te]
    gap = np.abs(x_train[y_train].mean(0) - x_train[~y_train].mean(0))
    order = np.argsort(-gap, kind="stable")
    out = {}
    for k in ks:
        cols = order[:k]
        mean, std = x_train[:, cols].mean(0), x_train[:, cols].std(0)
        std[std == 0] = 1.0
        probe = LogisticRegression(C=c, max_iter=1000)
        probe.fit((x_train[:, cols] - mean) / std, y_train)
        out[k] = float((probe.predict((x_test[:, cols] - mean) / std) == y_test).mean())
    return out


def probing_table(
    feature_sets: dict[str, Float[Tensor, "n f"]],
    labels: Sequence[str],
    topics: Sequence[str],
    ks: Sequence[int] = PROBE_KS,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per feature set and k: the k-sparse probe's test accuracy for each topic
    against the rest (``labels``: each document's topic), and its mean over ``topics``
    (None where k exceeds the set's features)."""
    labels = [str(label) for label in labels]
    missing = [t for t in topics if t not in labels]
    if not topics or missing:
        raise ValueError(
            f"topics {missing or list(topics)} have no documents; labels: {sorted(set(labels))}"
        )
    names = np.asarray(labels)
    rows = []
    for method, features in feature_sets.items():
        if len(features) != len(labels):
            raise ValueError(f"{method}: {len(features)} feature rows but {len(labels)} labels")
        usable = [k for k in ks if k <= features.shape[1]]
        per_topic = {
            t: k_sparse_probe(
                features,
                torch.from_numpy(names == t),
                usable,
                test_fraction=test_fraction,
                seed=seed,
            )
            if usable
            else {}
            for t in topics
        }
        for k in ks:
            if k not in usable:
                rows.append({"method": method, "k": k, "accuracy": None, "per_topic": {}})
                continue
            accuracy = {t: per_topic[t][k] for t in topics}
            mean = sum(accuracy.values()) / len(accuracy)
            rows.append({"method": method, "k": k, "accuracy": mean, "per_topic": accuracy})
    return rows


# ---------------------------------------------------------------- per-document features


@dataclass(frozen=True)
class CodeColumns:
    """Which code each column of `rates_from_codes` is: site by site, group by group,
    code id by code id. ``sites`` holds (site, groups, codes per group)."""

    sites: tuple[tuple[str, int, int], ...]

    def __len__(self) -> int:
        return sum(g * c for _, g, c in self.sites)

    def code(self, column: int) -> Code:
        if not 0 <= column < len(self):
            raise ValueError(f"column {column} out of range [0, {len(self)})")
        for site, groups, codes in self.sites:
            if column < groups * codes:
                return Code(site, column // codes, column % codes)
            column -= groups * codes
        raise AssertionError("unreachable")  # pragma: no cover


def _kept_per_document(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
        )
    kept = mask.sum(1)
    if (kept == 0).any():
        raise ValueError(f"documents {(kept == 0).nonzero()[:, 0].tolist()[:10]} keep no tokens")
    return kept


def rates_from_codes(
    codes: dict[str, Int[Tensor, "docs pos G k"]],
    mask: Bool[Tensor, "docs pos"],
    n_codes: dict[str, int],
) -> tuple[Float[Tensor, "docs total"], CodeColumns]:
    """Each document's firing rate of every code: the share of its kept (``mask``) tokens
    where the code is among the token's active codes (`codelens.vocab.collect_codes` ids;
    empty slots, id -1, count for nothing). Counted with one bincount per site."""
    if not codes:
        raise ValueError("no codes given")
    first = next(iter(codes.values()))
    kept = _kept_per_document(mask, tuple(first.shape[:2])).double()
    parts, layout = [], []
    for site, ids in codes.items():
        if ids.ndim != 4 or ids.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"codes of {site} must be [docs, pos, G, k] like the others, got {tuple(ids.shape)}"
            )
        docs, _, groups, _ = ids.shape
        n = int(n_codes[site])
        if ids.numel() and int(ids.max()) >= n:
            raise ValueError(f"codes of {site} hold ids >= n_codes={n}")
        doc = torch.arange(docs)[:, None, None, None]
        group = torch.arange(groups)[None, None, :, None]
        flat = (doc * groups + group) * n + ids.long()
        valid = (ids >= 0) & torch.as_tensor(mask)[:, :, None, None]
        counts = torch.bincount(flat[valid], minlength=docs * groups * n)
        parts.append(counts.view(docs, groups * n).double() / kept[:, None])
        layout.append((site, groups, n))
    return torch.cat(parts, 1).float(), CodeColumns(tuple(layout))


def document_code_rates(
    model: Any,
    tokens: Int[Tensor, "docs pos"],
    mask: Bool[Tensor, "docs pos"],
    *,
    sites: Sequence[str] | None = None,
    batch_size: int = 32,
) -> tuple[Float[Tensor, "docs total"], CodeColumns]:
    """`rates_from_codes` of the codes ``model`` puts on ``tokens`` at every codebook site
    (or ``sites``)."""
    _kept_per_document(mask, tuple(torch.as_tensor(tokens).shape))
    codes = collect_codes(model, tokens, sites=sites, batch_size=batch_size)
    return rates_from_codes(codes, mask, {s: model.codebook(s).n_codes for s in codes})


@torch.no_grad()
def pooled_features(
    model: Any,
    tokens: Int[Tensor, "docs pos"],
    mask: Bool[Tensor, "docs pos"],
    features: Sequence[Any],
    *,
    batch_size: int = 32,
) -> Float[Tensor, "docs F"]:
    """Each document's mean over its kept tokens of every feature of ``features``
    (`codelens.baselines.LinearFeatures` at sites of ``model``, side by side in order):
    SAE latents, or raw activations and neurons with `codelens.baselines.identity_features`."""
    from codelens.baselines.activations import iter_activations

    if not features:
        raise ValueError("no features given")
    tokens = torch.as_tensor(tokens)
    kept = _kept_per_document(mask, tuple(tokens.shape))
    doc_of_token = torch.repeat_interleave(torch.arange(len(kept)), kept)
    out = torch.zeros(len(kept), sum(f.n_features for f in features), dtype=torch.float64)
    sites = list(dict.fromkeys(f.site for f in features))
    row = 0
    for block in iter_activations(model, tokens, sites, token_mask=mask, batch_size=batch_size):
        n = next(iter(block.values())).shape[0]
        column = 0
        for f in features:
            x = block[f.site]
            if f.group is not None:  # one head of a hook_z site: its slice of the heads
                x = x.reshape(n, -1, f.d_in)[:, f.group]
            values = f.encode(x.to(f.decoder.device)).double().cpu()
            out[:, column : column + f.n_features].index_add_(
                0, doc_of_token[row : row + n], values
            )
            column += f.n_features
        row += n
    return (out / kept[:, None]).float()
