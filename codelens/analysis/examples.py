"""The top activating examples of a code: where it fires most strongly in a token sample.

A code is on or off at each token; among the tokens where it is on, the strength is its
score against the activation (`CodebookLayer.code_score`, what top-k ranks codes by).
`top_examples` returns the strongest firings with the text around them, the question a
dictionary's user asks first about any feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.analysis.search import token_strings
from codelens.vocab import Code, cached_batches, codes_hook


@dataclass(frozen=True)
class Example:
    """Code firing at ``position`` of sequence ``sequence`` with ``score``; ``tokens`` are
    the strings of the ``context`` tokens up to and including that position."""

    sequence: int
    position: int
    score: float
    tokens: tuple[str, ...]

    def __str__(self) -> str:
        *before, last = self.tokens
        return f"{self.score:8.3f}  {''.join(before)}[[{last}]]"


@torch.no_grad()
def top_examples(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    code: Code,
    *,
    n: int = 10,
    context: int = 12,
    batch_size: int = 32,
) -> list[Example]:
    """The ``n`` strongest firings of ``code`` on ``tokens``, strongest first (fewer when it
    fires less often; none when it never fires)."""
    if not isinstance(code, Code):
        raise TypeError(f"code must be a codelens.vocab.Code, got {code!r}")
    if code.site not in model.codebooks:
        raise ValueError(f"no codebook at {code.site!r}; sites: {list(model.codebooks)}")
    for name, value in (("n", n), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    cb = model.codebook(code.site)
    cb.code_score(torch.zeros(cb.n_groups, cb.d), code.group, code.id)  # range check
    tokens = torch.as_tensor(tokens)
    best_scores, best_where = torch.empty(0), torch.empty(0, 2, dtype=torch.long)
    names = [code.site, codes_hook(code.site)]
    for rows, cache in cached_batches(model, tokens, names, batch_size=batch_size):
        acts = cache[code.site]
        acts = acts.reshape(*acts.shape[:2], cb.n_groups, cb.d)
        fires = (cache[codes_hook(code.site)][:, :, code.group] == code.id).any(-1)
        score = cb.code_score(acts, code.group, code.id).float().masked_fill(~fires, -torch.inf)
        where = fires.nonzero().cpu()
        where[:, 0] += rows.start
        best_scores = torch.cat([best_scores, score[fires].cpu()])
        best_where = torch.cat([best_where, where])
        keep = best_scores.argsort(descending=True, stable=True)[:n]
        best_scores, best_where = best_scores[keep], best_where[keep]
    strings = token_strings(model.tokenizer, tokens)
    return [
        Example(seq, pos, score, tuple(strings[seq][max(0, pos - context + 1) : pos + 1]))
        for score, (seq, pos) in zip(best_scores.tolist(), best_where.tolist(), strict=True)
    ]
