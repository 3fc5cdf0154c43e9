"""Paired clean/corrupted datasets with their metric, for circuit discovery."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.circuits.metrics import LogitDifference
from codelens.data.fsm import TokFSM


@dataclass
class Task:
    """Clean and corrupted tokens, paired row by row, and the metric at the last position."""

    name: str
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    metric: LogitDifference


def fsm_next_state_task(
    fsm: TokFSM, n_pairs: int = 64, state_index: int = 1, seed: int = 0
) -> Task:
    """TokFSM: which state is the model in, read off its next-state prediction?

    Prompts end on the last digit of their ``state_index``-th state (0-based). The
    corrupted prompt is another rollout whose state there differs. The metric is the
    logit difference, at the last position, between the first digit most likely to
    follow the clean state and the one most likely to follow the corrupted state
    (pairs kept only where these differ and each is its state's strict favourite).
    """
    if not 0 <= state_index < fsm.states_per_seq - 1:
        raise ValueError(
            f"state_index must be in [0, {fsm.states_per_seq - 1}) so a next state exists"
        )
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    first = fsm.encode(fsm.transitions)[..., 0 :: fsm.n_digits]  # [S, n_succ]
    counts = torch.zeros(fsm.n_states, 10).scatter_add_(1, first, torch.ones_like(first).float())
    top2 = counts.topk(2, dim=1)
    favourite = torch.where(top2.values[:, 0] > top2.values[:, 1], top2.indices[:, 0], -1)
    if int((favourite >= 0).sum()) < 2 or favourite[favourite >= 0].unique().numel() < 2:
        raise ValueError("this FSM has too few states with a favourite first digit to pair")
    gen = torch.Generator().manual_seed(seed)
    tokens, states = fsm.sample(max(8 * n_pairs, 256), generator=gen)
    end = (state_index + 1) * fsm.n_digits + 1
    state = states[:, state_index]
    fav = favourite[state]
    clean_rows, corrupt_rows = [], []
    order = torch.randperm(len(state), generator=gen).tolist()
    for i, j in zip(order, order[1:] + order[:1], strict=True):
        if fav[i] >= 0 and fav[j] >= 0 and fav[i] != fav[j]:
            clean_rows.append(i)
            corrupt_rows.append(j)
        if len(clean_rows) == n_pairs:
            break
    if len(clean_rows) < n_pairs:
        raise ValueError(f"found only {len(clean_rows)} usable pairs, asked for {n_pairs}")
    clean_rows_t, corrupt_rows_t = torch.tensor(clean_rows), torch.tensor(corrupt_rows)
    metric = LogitDifference(fav[clean_rows_t], fav[corrupt_rows_t])
    return Task(
        name=f"tokfsm next-state first digit (state {state_index})",
        clean=tokens[clean_rows_t, :end],
        corrupted=tokens[corrupt_rows_t, :end],
        metric=metric,
    )


def story_topic_task(
    tokenizer, topic: str, other: str, n_pairs: int = 32, length: int = 48, seed: int = 0
) -> Task:
    """Stories: does the model know which topic the story is about?

    Clean prompts are the first ``length`` tokens (after BOS) of stories about ``topic``,
    corrupted ones of stories about ``other``. The metric is the mean logit, at the last
    position, of ``topic``'s single-token lexicon words minus that of ``other``'s.
    """
    from codelens.data.stories import LEXICONS, TOPICS, generate_stories

    unknown = [t for t in (topic, other) if t not in TOPICS]
    if unknown or topic == other:
        raise ValueError(
            f"need two different corpus topics from {list(TOPICS)}, got {topic}, {other}"
        )

    def words(t: str) -> Tensor:
        ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in LEXICONS[t]]
        single = sorted({i[0] for i in ids if len(i) == 1})
        if not single:
            raise ValueError(f"no word of the {t} lexicon is a single token of this tokenizer")
        return torch.tensor(single)

    def prompts(t: str, offset: int) -> Tensor:
        rows = []
        for story in generate_stories(8 * n_pairs, seed=seed + offset, topics=[t]):
            ids = tokenizer.encode(story.text, add_special_tokens=False)
            if len(ids) >= length:
                rows.append([tokenizer.bos_token_id, *ids[:length]])
            if len(rows) == n_pairs:
                return torch.tensor(rows)
        raise ValueError(f"fewer than {n_pairs} {t} stories have {length} tokens")

    mine, theirs = words(topic), words(other)
    return Task(
        name=f"stories: {topic} vs {other} topic words",
        clean=prompts(topic, 0),
        corrupted=prompts(other, 1),
        metric=LogitDifference(mine.expand(n_pairs, -1), theirs.expand(n_pairs, -1)),
    )
