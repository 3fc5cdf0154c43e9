"""circuitsvis token views of codes: where a code fires, which codes fire, top examples.

Every function takes plain data (token strings, code-id tensors) and returns a
`CircuitsVisView`, which shows itself in Jupyter/Colab and can be added to a `Page`.
circuitsvis inserts token strings as HTML, so tokens are HTML-escaped here: `<bos>`,
`</script>` and `&amp;` display literally.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codelens.viz._page import CircuitsVisView

__all__ = ["attention_pattern", "code_tokens", "site_code_tokens", "top_examples"]


def _html_tokens(tokens: Sequence[str]) -> list[str]:
    """Escape tokens for circuitsvis, which sets them as innerHTML."""
    return [html.escape(str(t), quote=False) for t in tokens]


def _codes_2d(tokens: Sequence[str], codes: Tensor) -> Tensor:
    """Codes as a [pos, k] int tensor matching the token count."""
    codes = torch.as_tensor(codes).detach().cpu()
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2:
        raise ValueError(f"codes must be [pos] or [pos, k], got shape {tuple(codes.shape)}")
    if codes.shape[0] != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but codes cover {codes.shape[0]} positions")
    return codes.long()


def code_tokens(
    tokens: Sequence[str],
    codes: Int[Tensor, "pos k"] | Int[Tensor, " pos"],
    code: int,
    title: str | None = None,
) -> CircuitsVisView:
    """Text coloured where `code` is among the active codes (value 1) and blank elsewhere."""
    codes = _codes_2d(tokens, codes)
    values = (codes == int(code)).any(dim=-1).float()
    return CircuitsVisView(
        "ColoredTokens",
        {"tokens": _html_tokens(tokens), "values": values, "minValue": 0.0, "maxValue": 1.0},
        title=title if title is not None else f"code {int(code)}",
    )


def site_code_tokens(
    tokens: Sequence[str],
    codes: Int[Tensor, "pos k"] | Int[Tensor, " pos"],
    max_codes: int = 24,
    title: str | None = None,
) -> CircuitsVisView:
    """Text with one selectable colour layer per code; hovering a token lists the codes.

    The `max_codes` codes most frequent in this text get a layer (1 where they fire),
    so the hover table shows 1 for each code id active at that token.
    """
    codes = _codes_2d(tokens, codes)
    if codes.shape[0] == 0:
        raise ValueError("no tokens to show")
    ids, counts = torch.unique(codes, return_counts=True)
    # Most frequent first, ties by smaller id (unique() returns ids sorted ascending).
    order = torch.argsort(-counts, stable=True)[:max_codes]
    shown = ids[order]
    values = (codes[:, :, None] == shown[None, None, :]).any(dim=1).float()
    return CircuitsVisView(
        "ColoredTokensMulti",
        {
            "tokens": _html_tokens(tokens),
            "values": values,
            "labels": [f"code {int(c)}" for c in shown],
        },
        title=title,
    )


def top_examples(
    examples: Sequence[tuple[Sequence[str], int]],
    code: int | None = None,
    site: str | None = None,
    context: int | None = 8,
) -> CircuitsVisView:
    """Top examples of a code: a token window around each firing position, highlighted.

    examples: (tokens, firing index) pairs, best first. `context` tokens are kept on
    each side of the firing token (None keeps the whole sequence).
    """
    if not examples:
        raise ValueError("no examples to show")
    windows: list[list[str]] = []
    acts: list[list[float]] = []
    for tokens, idx in examples:
        if not 0 <= idx < len(tokens):
            raise ValueError(f"firing index {idx} outside a {len(tokens)}-token example")
        lo = 0 if context is None else max(0, idx - context)
        hi = len(tokens) if context is None else min(len(tokens), idx + context + 1)
        windows.append(_html_tokens(tokens[lo:hi]))
        acts.append([1.0 if lo + j == idx else 0.0 for j in range(hi - lo)])
    return CircuitsVisView(
        "TopkSamples",
        {
            "tokens": [[windows]],
            "activations": [[acts]],
            "zerothDimensionName": "Site",
            "firstDimensionName": "Code",
            "zerothDimensionLabels": [site or "site"],
            "firstDimensionLabels": ["?" if code is None else str(int(code))],
        },
        title=None if code is None else f"top examples of code {int(code)}",
    )


def attention_pattern(
    tokens: Sequence[str],
    pattern: Float[Tensor, "heads q k"],
    title: str | None = None,
) -> CircuitsVisView:
    """Attention patterns of several heads over one text (circuitsvis AttentionPatterns)."""
    pattern = torch.as_tensor(pattern).detach().float().cpu()
    if pattern.ndim == 2:
        pattern = pattern[None]
    n = len(tokens)
    if pattern.ndim != 3 or tuple(pattern.shape[1:]) != (n, n):
        raise ValueError(f"pattern must be [heads, {n}, {n}], got {tuple(pattern.shape)}")
    return CircuitsVisView(
        "AttentionPatterns",
        {"tokens": _html_tokens(tokens), "attention": pattern},
        title=title,
    )
