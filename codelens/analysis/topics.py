"""Topic codes: every code as a classifier of "this token is in a story about topic t".

`topic_stats` runs the model over stories (one row each, a topic per row) and scores every
code for every topic; `topic_codes` picks each topic's most precise codes (`TopicCode`, to
force them) and `topic_swaps` each head's codes of other topics with this topic's code to
swap them to (`TopicSwap`; `codelens.steering.swap_code_hooks` turns those into hooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from codelens.analysis.codes import ClassCodes, codes_for_classes
from codelens.analysis.firing import code_firing
from codelens.vocab import Code, collect_codes

if TYPE_CHECKING:
    from codelens.model import HookedCodebookTransformer

__all__ = ["TopicCode", "TopicSwap", "topic_codes", "topic_stats", "topic_swaps"]


@dataclass(frozen=True)
class TopicCode:
    """A code as a classifier of "this token is in a story of the topic"."""

    code: Code
    precision: float
    recall: float
    count: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, flat: ``{"site", "group", "code", "precision", "recall", "count"}``."""
        c = self.code
        return {
            "site": c.site,
            "group": c.group,
            "code": c.id,
            "precision": self.precision,
            "recall": self.recall,
            "count": self.count,
        }


@dataclass(frozen=True)
class TopicSwap:
    """In one head: other topics' codes (``sources``, ids in the head) and the topic's
    ``target`` code that replaces them."""

    target: TopicCode
    sources: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**self.target.as_dict(), "sources": list(self.sources)}


@torch.no_grad()
def topic_stats(
    model: HookedCodebookTransformer,
    tokens: Tensor,
    topic_of_row: Tensor,
    n_topics: int,
    *,
    skip: int = 1,
) -> ClassCodes:
    """Every code as a classifier of "this token is in a story of topic t".

    Each row is one story; its first ``skip`` tokens are left out (BOS, and an opening
    that has not named the topic yet). `topic_codes` and `topic_swaps` read the result.
    """
    codes = {s: ids[:, skip:] for s, ids in collect_codes(model, tokens).items()}
    firing = code_firing(codes, {s: model.codebooks[s].n_codes for s in codes})
    classes = topic_of_row[:, None].expand(-1, tokens.shape[1] - skip).reshape(-1)
    return codes_for_classes(firing, classes, n_topics)


def _topic_code(stats: ClassCodes, index: int, topic: int) -> TopicCode:
    return TopicCode(
        stats.firing.code(index),
        float(stats.precision[index, topic]),
        float(stats.recall[index, topic]),
        int(stats.count[index]),
    )


def topic_codes(
    stats: ClassCodes,
    *,
    top: int,
    min_recall: float,
    min_count: int = 20,
    one_per_head: bool = False,
) -> list[list[TopicCode]]:
    """For each topic, its ``top`` codes by precision for "token in a story of this topic".

    A code qualifies when it fires on at least ``min_count`` tokens and on at least
    ``min_recall`` of the topic's tokens (so a code of one rare word does not win).
    ``one_per_head`` keeps only the best code of each (site, group), so the codes can
    be forced together.
    """
    eligible = (stats.count >= min_count)[:, None] & (stats.recall >= min_recall)
    score = torch.where(eligible, stats.precision, -1.0)
    result = []
    for t in range(score.shape[1]):
        order = torch.sort(score[:, t], descending=True, stable=True).indices
        picks: list[TopicCode] = []
        heads: set[tuple[str, int]] = set()
        for index in order.tolist():
            if score[index, t] < 0 or len(picks) == top:
                break
            code = stats.firing.code(index)
            if one_per_head and (code.site, code.group) in heads:
                continue
            heads.add((code.site, code.group))
            picks.append(_topic_code(stats, index, t))
        result.append(picks)
    return result


def topic_swaps(
    stats: ClassCodes,
    topic: int,
    *,
    sites: list[str] | None = None,
    min_count: int = 20,
    source_precision: float = 0.5,
    target_precision: float = 0.8,
) -> list[TopicSwap]:
    """Per head: the codes of every other topic, and this topic's code to swap them to.

    A code belongs to topic u when it fires on at least ``min_count`` tokens and at
    least ``source_precision`` (above chance) of them are in stories of u (u its majority
    topic). The target is this topic's most frequent code in the head among those of
    precision at least ``target_precision``. Heads (of ``sites``, default all) without a target or
    without other topics' codes are left out. Swapping leaves everything else the head
    writes alone: where the model reads another topic from the context, it reads this one.
    """
    n_topics = stats.precision.shape[1]
    if source_precision <= 1 / n_topics:
        raise ValueError(
            f"source_precision {source_precision} is not above chance (1/{n_topics} topics): "
            "every code would count as another topic's"
        )
    firing = stats.firing
    frequent = stats.count >= min_count
    site_of, group_of, code_of = firing.decode(torch.arange(firing.n_codes_total))
    wanted = torch.tensor([sites is None or s in sites for s in firing.sites])[site_of]
    target_ok = frequent & wanted & (stats.precision[:, topic] >= target_precision)
    source_ok = (
        frequent
        & wanted
        & (stats.majority >= 0)
        & (stats.majority != topic)
        & (stats.majority_precision >= source_precision)
    )
    recall = torch.where(target_ok, stats.recall[:, topic], -1.0)
    order = torch.sort(recall, descending=True, stable=True).indices[: int(target_ok.sum())]
    swaps, heads = [], set()
    for index in order.tolist():
        head = (int(site_of[index]), int(group_of[index]))
        sources = source_ok & (site_of == head[0]) & (group_of == head[1])
        if head in heads or not sources.any():
            continue
        heads.add(head)
        ids = tuple(code_of[sources].tolist())
        swaps.append(TopicSwap(_topic_code(stats, index, topic), ids))
    return swaps
