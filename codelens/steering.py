"""Steer a model with codes and measure what it writes.

Hooks from codes: `force_code_hooks` forces `Code`s on (e.g. the ``.code`` of
`codelens.analysis.topic_codes` picks), `swap_code_hooks` relabels other topics' codes
(`codelens.analysis.topic_swaps`). Then `generate_texts` samples continuations
under those hooks, `continuation_texts` decodes them, `perplexity` (under a reference
model) and `heldout_loss` measure fluency, and `on_topic_share` counts the texts a
topic classifier puts on a topic (`real_text_on_topic`: the same judge on real topic
text cut to a generation's length, the reference). `steering_trial` does all of that
for one hook list, and `sweep_steering` tries options (codes or features, any hooks) and
picks the most on-topic one that stays fluent.

Choosing what to steer with, by what it does rather than by how precisely it fires:
`code_effects` measures, teacher-forced and batched, how much forcing each candidate
code raises the likelihood of a topic's documents over other documents; `choose_steering`
builds options from the best codes (`steering_options`: how many, in how many slots)
and sweeps them by generation under a fluency guard (`option_trial`,
`option_hooks`, `option_record`).

The activation-addition baseline: `mean_difference_direction` (topic documents' mean
activation at a hook minus other documents') and `add_direction_hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codelens.interventions import (
    HookList,
    Positions,
    force_codes,
    intervene,
    position_selector,
    swap_codes,
)
from codelens.vocab import Code, cached_batches, codes_hook

if TYPE_CHECKING:
    from codelens.analysis.topic_classifier import TopicClassifier
    from codelens.analysis.topics import TopicSwap
    from codelens.model import HookedCodebookTransformer

__all__ = [
    "MEASURED",
    "CodeEffects",
    "SteeringTrial",
    "add_direction_hooks",
    "choose_steering",
    "code_effects",
    "continuation_texts",
    "force_code_hooks",
    "generate_texts",
    "heldout_loss",
    "mean_difference_direction",
    "on_topic_share",
    "option_hooks",
    "option_record",
    "option_trial",
    "perplexity",
    "real_text_on_topic",
    "steering_options",
    "steering_trial",
    "swap_code_hooks",
    "sweep_steering",
]


# ---------------------------------------------------------------------------- steering hooks


def force_code_hooks(
    model: HookedCodebookTransformer,
    codes: Sequence[Code],
    slots: str | int,
    positions: Positions = None,
) -> HookList:
    """Hooks forcing ``codes`` on at ``positions`` (default: all); codes of one (site,
    group) go together.

    How strongly: ``slots="lowest"`` puts each code in one of its head's lowest-scoring
    slots (the head keeps its best codes); an int m fills the m lowest slots, the head's
    codes repeated; ``slots="all"`` fills all k slots, so the head writes only the
    forced codes, at its usual size (k-means codes start as centroids divided by k): one
    code alone in k empty slots would mostly silence the head rather than steer it.
    """
    by_key: dict[tuple[str, int], list[int]] = {}
    for c in codes:
        if not isinstance(c, Code):
            raise TypeError(f"codes must be Code(site, group, id)s, got {c!r}")
        by_key.setdefault((c.site, c.group), []).append(c.id)
    hooks = []
    for (site, group), ids in by_key.items():
        fill = _fill(model, site, slots)
        if fill < len(ids):
            raise ValueError(f"{len(ids)} codes of {site} group {group} do not fit {fill} slots")
        if slots != "lowest":
            ids = (ids * -(-fill // len(ids)))[:fill]
        mode = "all" if slots == "all" else "lowest"
        hooks += force_codes(model, site, ids, group=group, slots=mode, positions=positions)
    return hooks


def _fill(model: HookedCodebookTransformer, site: str, slots: str | int) -> int:
    """How many of the lowest slots a single forced code fills at ``site``."""
    k = model.codebooks[site].k
    if slots == "all":
        return k
    if slots == "lowest":
        return 1
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= k:
        raise ValueError(f"slots must be 'lowest', 'all' or an int in [1, k={k}], got {slots!r}")
    return slots


def swap_code_hooks(
    model: HookedCodebookTransformer, swaps: Sequence[TopicSwap], force: float = 0
) -> HookList:
    """Hooks swapping each head's ``sources`` to its target code (`topic_swaps` entries);
    the target is also forced into the head's ``force`` lowest slots (0: swaps alone;
    each slot adds the code's vector once more, so ``force`` sets the strength).

    A fractional ``force`` steps between whole slots: the heads whose targets are most
    precise, a ``force - floor(force)`` share of them, get ``ceil(force)`` slots, the
    others ``floor(force)`` (1.5: two slots in the better half of the heads, one elsewhere).
    """
    k = min((model.codebooks[s.target.code.site].k for s in swaps), default=math.inf)
    if isinstance(force, bool) or not isinstance(force, (int, float)) or not 0 <= force <= k:
        raise ValueError(f"force must be a number in [0, k={k}] slots, got {force!r}")
    by_precision = sorted(range(len(swaps)), key=lambda i: -swaps[i].target.precision)
    n_stronger = round((force - math.floor(force)) * len(swaps))
    stronger = set(by_precision[:n_stronger])
    hooks: HookList = []
    for i, s in enumerate(swaps):
        code = s.target.code
        mapping = dict.fromkeys(s.sources, code.id)
        hooks += swap_codes(model, code.site, mapping, group=code.group)
        slots = math.ceil(force) if i in stronger else math.floor(force)
        if slots:
            hooks += force_codes(
                model, code.site, [code.id] * slots, group=code.group, slots="lowest"
            )
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
    hooks: HookList | None = None,
) -> list[tuple[Tensor, int]]:
    """Sampled continuations (temperature 1, KV cache) of each prompt, under ``hooks``.

    Returns ``(tokens, prompt_length)`` per prompt (BOS included in the length);
    ``tokens`` is ``[samples, P + new]``.
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
        with intervene(model, *(hooks or [])):
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


def real_text_on_topic(
    classifier: TopicClassifier,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    topics: Sequence[str],
    n_tokens: int,
) -> dict[str, float]:
    """Each topic's share of its real documents, cut to their first ``n_tokens`` tokens,
    that ``classifier`` puts on the topic.

    The reference for a share of steered generations ``n_tokens`` long: a bag-of-words
    judge needs words, and on short texts it may call little even of genuine topic text
    on topic."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    missing = [t for t in topics if t not in labels]
    if missing:
        raise ValueError(f"topics {missing} have no documents; labels: {sorted(set(labels))}")
    cut = [tokenizer.decode(tokenizer.encode(text)[:n_tokens]) for text in texts]
    return {
        t: on_topic_share(classifier, [c for c, y in zip(cut, labels, strict=True) if y == t], t)
        for t in topics
    }


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
    hooks: HookList | None,
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


MEASURED = ("on_topic", "perplexity_ratio", "first_on_topic", "first_perplexity_ratio")
"""The keys `sweep_steering` adds to an option (the rest are its settings)."""


def sweep_steering(
    options: Sequence[dict[str, Any]],
    trial: Callable[[dict[str, Any]], SteeringTrial],
    *,
    perplexity_before: float,
    max_perplexity_ratio: float,
    skip: Callable[[dict[str, Any], list[dict[str, Any]]], bool] | None = None,
    confirm: Callable[[dict[str, Any]], SteeringTrial] | None = None,
    finalists: int = 3,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run ``trial`` for each option, in order (``skip(option, swept so far)`` leaves one
    out); returns every swept option with its ``on_topic`` and ``perplexity_ratio``
    (against ``perplexity_before``), and the most on-topic option whose ratio is at most
    ``max_perplexity_ratio`` (ties: the earlier, simpler one), or None.

    With ``confirm`` (e.g. the same prompts, other seeds) and more fluent options than
    ``finalists``, the ``finalists`` most on-topic fluent options are generated again and
    judged on both trials together (their ``on_topic`` and ``perplexity_ratio`` become the
    means of the two; the first trial's stay as ``first_on_topic``,
    ``first_perplexity_ratio``), and the pick is the best of those still fluent (of the
    others only if none is): the most on-topic of many noisy measurements is likely one
    that was lucky, and a second look picks the option that is good rather than the one
    that drew well.
    """
    if finalists < 1:
        raise ValueError(f"finalists must be >= 1, got {finalists}")
    swept: list[dict[str, Any]] = []
    for option in options:
        if skip is not None and skip(option, swept):
            continue
        result = trial(option)
        ratio = result.perplexity / perplexity_before
        swept.append({**option, "on_topic": result.on_topic, "perplexity_ratio": ratio})

    def fluent() -> list[dict[str, Any]]:
        return [o for o in swept if o["perplexity_ratio"] <= max_perplexity_ratio]

    ranked: list[dict[str, Any]] = []
    if confirm is not None and len(fluent()) > finalists:
        ranked = sorted(fluent(), key=lambda o: -o["on_topic"])[:finalists]
        for option in ranked:
            first = {key: option[key] for key in ("on_topic", "perplexity_ratio")}
            again = confirm({k: v for k, v in option.items() if k not in MEASURED})
            ratio = math.sqrt(first["perplexity_ratio"] * again.perplexity / perplexity_before)
            option.update(
                on_topic=(first["on_topic"] + again.on_topic) / 2,
                perplexity_ratio=ratio,  # same token counts: the geometric mean
                first_on_topic=first["on_topic"],
                first_perplexity_ratio=first["perplexity_ratio"],
            )
    # confirmed options first; the others only where no finalist stayed fluent
    candidates = [o for o in fluent() if o in ranked] or fluent()
    return swept, max(candidates, key=lambda o: o["on_topic"]) if candidates else None


# ---------------------------------------------------------------------------- measured effects


@dataclass(frozen=True)
class CodeEffects:
    """What forcing each code does to held-out documents (`code_effects`).

    Per code, the change of the mean per-token log-likelihood (nats) against the unforced
    model: ``topic`` on the topic's documents, ``other`` on other topics' documents, and
    ``fluency`` on both together (token-weighted; a large drop means the code breaks the
    model). ``effect`` = ``topic - other``: how much more the forced model expects the
    topic's text than other text.
    """

    codes: tuple[Code, ...]
    topic: Float[Tensor, " codes"]
    other: Float[Tensor, " codes"]
    fluency: Float[Tensor, " codes"]

    @property
    def effect(self) -> Float[Tensor, " codes"]:
        return self.topic - self.other

    def ranked(
        self, top: int | None = None, *, min_effect: float = 0.0, one_per_head: bool = True
    ) -> list[Code]:
        """Codes by effect, best first: those above ``min_effect``, at most ``top``, and
        with ``one_per_head`` only the best of each (site, group), so they force together."""
        order = torch.sort(self.effect, descending=True, stable=True).indices.tolist()
        picks: list[Code] = []
        heads: set[tuple[str, int]] = set()
        for i in order:
            code = self.codes[i]
            if float(self.effect[i]) <= min_effect or len(picks) == top:
                break
            if one_per_head and (code.site, code.group) in heads:
                continue
            heads.add((code.site, code.group))
            picks.append(code)
        return picks

    def record(self, code: Code) -> dict[str, float]:
        """One code's numbers, JSON-ready: ``{"effect", "topic", "other", "fluency"}``."""
        i = self.codes.index(code)
        return {
            "effect": float(self.effect[i]),
            "topic": float(self.topic[i]),
            "other": float(self.other[i]),
            "fluency": float(self.fluency[i]),
        }


def _check_codes(model: HookedCodebookTransformer, codes: Sequence[Code]) -> None:
    for c in codes:
        if not isinstance(c, Code):
            raise TypeError(f"codes must be Code(site, group, id)s, got {c!r}")
        if c.site not in model.codebooks:
            raise ValueError(f"no codebook at {c.site!r}; sites: {list(model.codebooks)}")
        layer = model.codebooks[c.site]
        if not (c.group < layer.n_groups and c.id < layer.n_codes):
            raise ValueError(
                f"{c} is outside the codebook at {c.site} "
                f"({layer.n_groups} groups of {layer.n_codes} codes)"
            )


def _row_forcing(
    rows: Int[Tensor, " r"],
    groups: Int[Tensor, " r"],
    ids: Int[Tensor, " r"],
    start: int,
    fill: int,
) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_codes`` hook putting code ``ids[i]`` of group ``groups[i]`` into the
    ``fill`` lowest slots of batch row ``rows[i]`` from position ``start`` on."""

    def hook(codes: Int[Tensor, "batch pos G k"], hook: Any) -> Tensor:
        codes = codes.clone()
        r, g, i = rows.to(codes.device), groups.to(codes.device), ids.to(codes.device)
        lowest = codes[r, start:, g]  # [r, pos - start, k]
        lowest[..., codes.shape[3] - fill :] = i[:, None, None]
        codes[r, start:, g] = lowest
        return codes

    return hook


@torch.no_grad()
def _mean_logliks(
    model: HookedCodebookTransformer,
    tokens: Int[Tensor, "docs pos"],
    codes: Sequence[Code],
    *,
    slots: str | int,
    start: int,
    batch_size: int,
) -> tuple[Float[Tensor, " docs"], Float[Tensor, "codes docs"]]:
    """Each document's mean next-token log-likelihood, unforced and with each code forced;
    the (code, document) pairs run ``batch_size`` rows a forward."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    n_docs = tokens.shape[0]

    def loglik(batch: Tensor) -> Tensor:
        logprobs = model(batch).log_softmax(-1)[:, :-1]
        return logprobs.gather(-1, batch[:, 1:, None])[..., 0].mean(-1).float().cpu()

    plain = torch.cat([loglik(tokens[i : i + batch_size]) for i in range(0, n_docs, batch_size)])
    pairs = [(c, d) for c in range(len(codes)) for d in range(n_docs)]
    forced = torch.empty(len(pairs))
    for begin in range(0, len(pairs), batch_size):
        chunk = pairs[begin : begin + batch_size]
        by_site: dict[str, list[tuple[int, int, int]]] = {}
        for row, (c, _) in enumerate(chunk):
            code = codes[c]
            by_site.setdefault(code.site, []).append((row, code.group, code.id))
        hooks = []
        for site, entries in by_site.items():
            rows, groups, ids = torch.tensor(entries, dtype=torch.long).unbind(1)
            fill = _fill(model, site, slots)
            hooks.append((codes_hook(site), _row_forcing(rows, groups, ids, start, fill)))
        batch = tokens[torch.tensor([d for _, d in chunk], device=device)]
        with model.hooks(fwd_hooks=hooks):
            forced[begin : begin + len(chunk)] = loglik(batch)
    return plain, forced.view(len(codes), n_docs)


def code_effects(
    model: HookedCodebookTransformer,
    codes: Sequence[Code],
    topic_tokens: Int[Tensor, "docs pos"],
    other_tokens: Int[Tensor, "docs2 pos2"],
    *,
    slots: str | int = "all",
    start: int = 1,
    batch_size: int = 64,
) -> CodeEffects:
    """Force each code alone (as `force_code_hooks` does, at every position from
    ``start`` on; the default leaves BOS alone) on held-out documents, teacher-forced, and
    measure the change of their mean per-token log-likelihood (see `CodeEffects`).

    Documents are rows of token ids (BOS first, no padding); use other documents than
    those the codes were found on. Forced rows of many codes share one forward
    (``batch_size`` rows): one pass over (codes x documents), no generation.
    """
    codes = tuple(codes)
    _check_codes(model, codes)
    for site in {c.site for c in codes}:
        _fill(model, site, slots)
    for name, tokens in (("topic_tokens", topic_tokens), ("other_tokens", other_tokens)):
        if tokens.ndim != 2 or tokens.shape[0] == 0 or not 0 <= start < tokens.shape[1] - 1:
            raise ValueError(
                f"{name} must be [documents >= 1, positions > start + 1={start + 1}], "
                f"got {tuple(tokens.shape)}"
            )
    if not codes:
        return CodeEffects((), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    model.eval()
    changes = []
    for tokens in (topic_tokens, other_tokens):
        plain, forced = _mean_logliks(
            model, tokens, codes, slots=slots, start=start, batch_size=batch_size
        )
        changes.append((forced - plain).mean(1))
    n_topic = topic_tokens.shape[0] * (topic_tokens.shape[1] - 1)
    n_other = other_tokens.shape[0] * (other_tokens.shape[1] - 1)
    fluency = (changes[0] * n_topic + changes[1] * n_other) / (n_topic + n_other)
    return CodeEffects(codes, changes[0], changes[1], fluency)


# ---------------------------------------------------------------------------- choosing


def steering_options(
    codes: Sequence[Code], k: int, swaps: Mapping[str, Sequence[TopicSwap]] | None = None
) -> list[dict[str, Any]]:
    """What `choose_steering` tries, lightest touch first.

    ``codes``: best first, one per (site, group) (`CodeEffects.ranked`); ``swaps``:
    named `topic_swaps` lists (e.g. first-layer heads, all heads). Swap options: every
    other topic's codes swapped to this topic's, alone, then with this topic's code also
    forced into 1, 1.5, 2 and k/2 of the head's lowest slots (ever stronger; 1.5: two in
    the heads with the more precise half of the targets, one elsewhere). Forcing
    options (`force_code_hooks`, at every position), for the best 1, 2, 4, ... codes:
    each in its head's lowest slot, in its k/2 lowest slots (k >= 4), then in all k slots.
    """
    options = []
    strengths = sorted({f for f in (0, 1, 1.5, 2, k // 2) if f <= k})
    for name, heads in (swaps or {}).items():
        if heads:
            options += [{"swaps": list(heads), "heads": name, "force": f} for f in strengths]
    if not codes:
        return options
    codes = list(codes)
    counts = sorted({min(2**i, len(codes)) for i in range(len(codes).bit_length() + 1)})
    ways = (["lowest"] if k > 1 else []) + ([k // 2] if k >= 4 else []) + ["all"]
    for slots in ways:
        options += [{"codes": codes[:n], "slots": slots} for n in counts]
    return options


def option_hooks(model: HookedCodebookTransformer, option: dict[str, Any]) -> HookList:
    """Hooks for one `steering_options` entry (it steers at every position)."""
    if "swaps" in option:
        return swap_code_hooks(model, option["swaps"], option["force"])
    return force_code_hooks(model, option["codes"], option["slots"])


def option_record(
    option: dict[str, Any], details: Callable[[Code], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A `steering_options` entry (or a swept one) as report JSON: codes and swaps as
    dicts, each code's dict updated by ``details(code)`` (e.g. its precision, its effect)."""

    def code_dict(c: Code) -> dict[str, Any]:
        return {**c.as_dict(), **(details(c) if details else {})}

    def value(key: str, v: Any) -> Any:
        if key == "codes":
            return [code_dict(c) for c in v]
        if key == "swaps":
            return [s.as_dict() for s in v]
        return v

    return {key: value(key, v) for key, v in option.items()}


def _past_broken(option: dict[str, Any], swept: list[dict[str, Any]], limit: float) -> bool:
    """True for an option stronger than a swept one of its kind whose perplexity ratio
    already exceeded ``limit``: more forced codes in the same slots, or
    the same swaps with the target forced into more slots."""

    def weaker(o: dict[str, Any]) -> bool:
        if "codes" in option and "codes" in o:
            return o["slots"] == option["slots"] and len(o["codes"]) < len(option["codes"])
        if "swaps" in option and "swaps" in o:
            return o["heads"] == option["heads"] and o["force"] < option["force"]
        return False

    return any(weaker(o) and o["perplexity_ratio"] > limit for o in swept)


def option_trial(
    model: HookedCodebookTransformer,
    reference: HookedCodebookTransformer,
    classifier: Any,
    topic: str,
    prompts: tuple[str, ...],
    *,
    samples: int,
    new_tokens: int,
    seed: int,
) -> Callable[[dict[str, Any]], SteeringTrial]:
    """The `steering_trial` of a `steering_options` entry on ``prompts`` (every option
    gets the same prompts and seeds, so an option that changes nothing scores exactly
    as the unsteered model)."""

    def trial(option: dict[str, Any]) -> SteeringTrial:
        return steering_trial(
            model, reference, classifier, topic, option_hooks(model, option), prompts,
            samples=samples, new_tokens=new_tokens, seed=seed,
        )  # fmt: skip

    return trial


def choose_steering(
    model: HookedCodebookTransformer,
    effects: CodeEffects,
    trial: Callable[[dict[str, Any]], SteeringTrial],
    *,
    perplexity_before: float,
    max_perplexity_ratio: float = 2.0,
    max_codes: int = 8,
    swaps: Mapping[str, Sequence[TopicSwap]] | None = None,
    confirm: Callable[[dict[str, Any]], SteeringTrial] | None = None,
    finalists: int = 3,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """How to steer toward a topic, chosen by measured effect, then by generation.

    The codes: those of positive ``effects`` (`CodeEffects.ranked`), best first, one per
    (site, group), at most ``max_codes``. The options (`steering_options`, with ``swaps``)
    are judged by ``trial`` (e.g. `option_trial` on sweep prompts, not the prompts you
    evaluate on) in `sweep_steering`: the most on-topic option whose perplexity is at
    most ``max_perplexity_ratio`` times ``perplexity_before`` (the unsteered trial's),
    ties to the simpler, earlier one. More codes in the same slots are not tried
    once fewer broke the guard. With ``confirm``, the ``finalists`` best are judged
    again before the pick (`sweep_steering`). Returns (every swept option, the pick or
    None).
    """
    if max_codes < 1:
        raise ValueError(f"max_codes must be >= 1, got {max_codes}")
    k = model.codebook_config.k
    options = steering_options(effects.ranked(max_codes), k, swaps)
    return sweep_steering(
        options,
        trial,
        perplexity_before=perplexity_before,
        max_perplexity_ratio=max_perplexity_ratio,
        skip=lambda option, swept: _past_broken(option, swept, max_perplexity_ratio),
        confirm=confirm,
        finalists=finalists,
    )


# ---------------------------------------------------------------------------- activation addition


@torch.no_grad()
def mean_difference_direction(
    model: HookedCodebookTransformer,
    hook: str,
    topic_tokens: Int[Tensor, "docs pos"],
    other_tokens: Int[Tensor, "docs2 pos2"],
    *,
    start: int = 1,
    batch_size: int = 32,
) -> Float[Tensor, " d"]:
    """The mean activation at ``hook`` (e.g. `codelens.vocab.resid_pre`) over the topic
    documents' tokens minus that over other documents' tokens, from position ``start``
    on: the activation-addition baseline's steering vector (`add_direction_hooks`)."""
    means = []
    for name, tokens in (("topic_tokens", topic_tokens), ("other_tokens", other_tokens)):
        if tokens.ndim != 2 or tokens.shape[0] == 0 or not 0 <= start < tokens.shape[1]:
            raise ValueError(
                f"{name} must be [documents >= 1, positions > start={start}], "
                f"got {tuple(tokens.shape)}"
            )
        total, count = None, 0
        for _, cache in cached_batches(model, tokens, [hook], batch_size=batch_size):
            x = cache[hook][:, start:].float()
            x = x.reshape(-1, x.shape[-1])
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
        means.append(total / count)
    return (means[0] - means[1]).cpu()


def add_direction_hooks(
    model: HookedCodebookTransformer,
    hook: str,
    direction: Float[Tensor, " d"],
    scale: float,
    positions: Positions = None,
) -> HookList:
    """Hooks adding ``scale * direction`` to the activation at ``hook`` at ``positions``
    (default all; the rules of `codelens.interventions.PositionSelector`, so under
    `intervene` they follow the KV cache): activation addition."""
    if hook not in model.hook_dict:
        raise ValueError(f"the model has no hook {hook!r}")
    if direction.ndim != 1:
        raise ValueError(f"direction must be one vector [d], got {tuple(direction.shape)}")
    push = (float(scale) * direction.detach().float()).cpu()
    where = position_selector(model, positions, hook)
    on_device: dict[torch.device, Tensor] = {}

    def add(x: Float[Tensor, "batch pos d"], hook: Any) -> Tensor:
        if x.shape[-1] != push.shape[0]:
            raise ValueError(
                f"direction has {push.shape[0]} dims, the activation at {hook.name} {x.shape[-1]}"
            )
        if x.device not in on_device:
            on_device[x.device] = push.to(x.device)
        delta = on_device[x.device].to(x.dtype)
        keep = where.mask(x.shape[1], x.device)
        if keep is None:
            return x + delta
        return x + keep[:, None].to(x.dtype) * delta

    return [(hook, add)]
