"""Steer a model with codes and measure what it writes.

Hooks from codes: `force_code_hooks` forces `Code`s on (e.g. the ``.code`` of
`codelens.analysis.topic_codes` picks), `swap_code_hooks` relabels other topics' codes
(`codelens.analysis.topic_swaps`). Then `generate_texts` samples continuations
under those hooks, `continuation_texts` decodes them, `perplexity` (under a reference
model) and `heldout_loss` measure fluency, and `on_topic_share` counts the texts a
`codelens.data.stories.TopicClassifier` puts on a topic. `steering_trial` does all of
that for one hook list, and `sweep_steering` tries options (codes or features, any
hooks) and picks the most on-topic one that stays fluent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from codelens.interventions import HookList, Positions, force_codes, intervene, swap_codes
from codelens.vocab import Code

if TYPE_CHECKING:
    from codelens.analysis.topics import TopicSwap
    from codelens.data.stories import TopicClassifier
    from codelens.model import HookedCodebookTransformer

__all__ = [
    "SteeringTrial",
    "continuation_texts",
    "force_code_hooks",
    "generate_texts",
    "heldout_loss",
    "on_topic_share",
    "perplexity",
    "steering_trial",
    "swap_code_hooks",
    "sweep_steering",
]


# ---------------------------------------------------------------------------- steering hooks


def force_code_hooks(
    model: HookedCodebookTransformer,
    codes: Sequence[Code],
    slots: str,
    positions: Positions = None,
) -> HookList:
    """Hooks forcing ``codes`` on at ``positions`` (default: all); codes of one (site,
    group) go together.

    With ``slots="all"`` a head's codes are repeated to fill its k slots, so its output
    keeps its usual size (k-means codes start as centroids divided by k): one code alone
    in k empty slots would mostly silence the head rather than steer it.
    """
    by_key: dict[tuple[str, int], list[int]] = {}
    for c in codes:
        if not isinstance(c, Code):
            raise TypeError(f"codes must be Code(site, group, id)s, got {c!r}")
        by_key.setdefault((c.site, c.group), []).append(c.id)
    hooks = []
    for (site, group), ids in by_key.items():
        if slots == "all":
            k = model.codebooks[site].k
            ids = (ids * -(-k // len(ids)))[:k]
        hooks += force_codes(model, site, ids, group=group, slots=slots, positions=positions)
    return hooks


def swap_code_hooks(
    model: HookedCodebookTransformer, swaps: Sequence[TopicSwap], force: bool = False
) -> HookList:
    """Hooks swapping each head's ``sources`` to its target code (`topic_swaps` entries);
    with ``force``, the target is also forced into the head's lowest slot."""
    hooks: HookList = []
    for s in swaps:
        code = s.target.code
        mapping = dict.fromkeys(s.sources, code.id)
        hooks += swap_codes(model, code.site, mapping, group=code.group)
        if force:
            hooks += force_codes(model, code.site, [code.id], group=code.group, slots="lowest")
    return hooks


# ---------------------------------------------------------------------------- generation


def _prompt_batch(tokenizer: Any, prompt: str, n: int) -> Tensor:
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
    return torch.tensor([ids] * n, dtype=torch.long)


@torch.no_grad()
def generate_texts(
    model: HookedCodebookTransformer,
    prompts: tuple[str, ...],
    samples: int,
    new_tokens: int,
    seed: int,
    hooks: list | Callable[[int], list] | None = None,
) -> list[tuple[Tensor, int]]:
    """Sampled continuations (temperature 1, KV cache) of each prompt, under ``hooks``.

    ``hooks`` is a hook list, or a function of the prompt length (BOS included) that
    returns one. Returns ``(tokens, prompt_length)`` per prompt; ``tokens`` is
    ``[samples, P + new]``.
    """
    model.eval()
    out = []
    for i, prompt in enumerate(prompts):
        batch = _prompt_batch(model.tokenizer, prompt, samples)
        if batch.shape[1] + new_tokens > model.cfg.n_ctx:
            raise ValueError(
                f"prompt {prompt!r} ({batch.shape[1]} tokens) + {new_tokens} new tokens exceeds "
                f"the model's context of {model.cfg.n_ctx} tokens"
            )
        torch.manual_seed(seed + i)
        active = hooks(batch.shape[1]) if callable(hooks) else hooks or []
        with intervene(model, *active):
            tokens = model.generate(
                batch,
                max_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                stop_at_eos=False,
                verbose=False,
            )
        out.append((tokens.cpu(), batch.shape[1]))
    return out


def continuation_texts(tokenizer: Any, generated: list[tuple[Tensor, int]]) -> list[str]:
    """The new text of every sample, cut at the first end-of-text (a new story)."""
    eos = tokenizer.eos_token_id
    texts = []
    for tokens, p in generated:
        for row in tokens[:, p:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode(row))
    return texts


# ---------------------------------------------------------------------------- judging it


@torch.no_grad()
def perplexity(model: HookedCodebookTransformer, generated: list[tuple[Tensor, int]]) -> float:
    """Perplexity of the generated tokens (not the prompts) under ``model``."""
    model.eval()
    nll, n = 0.0, 0
    for tokens, p in generated:
        logprobs = model(tokens).log_softmax(-1)[:, p - 1 : -1]
        picked = logprobs.gather(-1, tokens[:, p:, None])
        nll -= float(picked.sum())
        n += picked.numel()
    return math.exp(nll / n)


def on_topic_share(classifier: TopicClassifier, texts: list[str], topic: str) -> float:
    """Share of texts whose top topic is ``topic``."""
    return sum(p == topic for p in classifier.predict(texts)) / len(texts)


@torch.no_grad()
def heldout_loss(model: HookedCodebookTransformer, blocks: Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over packed held-out blocks."""
    model.eval()
    losses = [
        float(model(blocks[i : i + batch_size], return_type="loss"))
        * len(blocks[i : i + batch_size])
        for i in range(0, len(blocks), batch_size)
    ]
    return sum(losses) / len(blocks)


# ---------------------------------------------------------------------------- sweeping


@dataclass(frozen=True)
class SteeringTrial:
    """Generations under one steering: their on-topic share, perplexity and texts."""

    on_topic: float
    perplexity: float
    texts: list[str]


def steering_trial(
    model: HookedCodebookTransformer,
    reference: HookedCodebookTransformer,
    classifier: TopicClassifier,
    topic: str,
    hooks: list | Callable[[int], list] | None,
    prompts: tuple[str, ...],
    *,
    samples: int,
    new_tokens: int,
    seed: int,
) -> SteeringTrial:
    """Sample from ``model`` under ``hooks`` (see `generate_texts`); the share of texts on
    ``topic`` and their perplexity under ``reference``."""
    generated = generate_texts(model, prompts, samples, new_tokens, seed, hooks)
    texts = continuation_texts(model.tokenizer, generated)
    return SteeringTrial(
        on_topic_share(classifier, texts, topic), perplexity(reference, generated), texts
    )


def sweep_steering(
    options: Sequence[dict[str, Any]],
    trial: Callable[[dict[str, Any]], SteeringTrial],
    *,
    perplexity_before: float,
    max_perplexity_ratio: float,
    skip: Callable[[dict[str, Any], list[dict[str, Any]]], bool] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run ``trial`` for each option, in order (``skip(option, swept so far)`` leaves one
    out); returns every swept option with its ``on_topic`` and ``perplexity_ratio``
    (against ``perplexity_before``), and the most on-topic option whose ratio is at most
    ``max_perplexity_ratio`` (ties: the earlier, simpler one), or None."""
    swept: list[dict[str, Any]] = []
    for option in options:
        if skip is not None and skip(option, swept):
            continue
        result = trial(option)
        ratio = result.perplexity / perplexity_before
        swept.append({**option, "on_topic": result.on_topic, "perplexity_ratio": ratio})
    fluent = [o for o in swept if o["perplexity_ratio"] <= max_perplexity_ratio]
    return swept, max(fluent, key=lambda o: o["on_topic"]) if fluent else None
