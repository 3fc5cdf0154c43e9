"""Code search: label tokens by a regular expression, find the codes that classify them.

`regex_labels` marks the tokens of a regex feature on the text they spell; `search_codes`
runs the model, ranks codes with `best_codes_for_labels` and compares each one with the best
neuron at the same recall (`best_neurons_for_labels`).

``search_codes(model, tokens, regex_labels(str_tokens, "20[0-9][0-9]")).table()``
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.analysis.codes import CodeMatch, RankBy, _check_labels, best_codes_for_labels
from codelens.analysis.firing import CodeFiring, _token_tensor, code_firing
from codelens.analysis.neurons import NeuronMatches, best_neurons_for_labels
from codelens.vocab import cached_batches, check_tokens, codes_hook, every_layer, is_block_hook

__all__ = ["SearchResult", "regex_labels", "search_codes", "token_strings"]


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


def token_strings(tokenizer: Any, tokens: Tensor) -> list[list[str]]:
    """Each token decoded on its own (BOS as ""), so a row joins into the text it spells."""
    tokens = torch.as_tensor(tokens)
    bos = tokenizer.bos_token_id
    spelled = {t: "" if t == bos else tokenizer.decode([t]) for t in tokens.unique().tolist()}
    return [[spelled[t] for t in row] for row in tokens.tolist()]


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
    """Full hook names: ``blocks.{layer}.…`` names as given, other suffixes for every layer."""
    if isinstance(neuron_hooks, str):
        neuron_hooks = (neuron_hooks,)
    names: list[str] = []
    for hook in neuron_hooks:
        if is_block_hook(hook) or hook in model.hook_dict:
            candidates = [hook]
        else:
            candidates = every_layer(model.cfg.n_layers, hook)
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
    tokens = check_tokens(tokens)
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
    names = [codes_hook(s) for s in sites] + neuron_names

    codes: dict[str, list[Tensor]] = {s: [] for s in sites}
    widths: dict[str, int] = {}
    acts: Tensor | None = None
    n_tokens = tokens.numel()
    row = 0
    for rows, cache in cached_batches(model, tokens, names, batch_size=batch_size):
        batch_shape = tokens[rows].shape
        for site in sites:
            codes[site].append(cache[codes_hook(site)].cpu())
        if neuron_names:
            cols = []
            for name in neuron_names:
                value = cache[name]
                if tuple(value.shape[:2]) != tuple(batch_shape):
                    raise ValueError(
                        f"{name} has shape {tuple(value.shape)}: not one vector per token"
                    )
                cols.append(value.reshape(batch_shape.numel(), -1).float().cpu())
                widths[name] = cols[-1].shape[1]
            block = torch.cat(cols, dim=1)
            if acts is None:
                acts = torch.empty(n_tokens, block.shape[1])
            acts[row : row + block.shape[0]] = block
        row += batch_shape.numel()
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
