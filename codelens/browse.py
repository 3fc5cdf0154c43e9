"""Build the static code browser for a model over a token sample."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.model import HookedCodebookTransformer
from codelens.progress import bar
from codelens.viz import build_browser, collect_browser_data


@torch.no_grad()
def collect_codes(
    model: HookedCodebookTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    sites: list[str] | None = None,
    batch_size: int = 32,
) -> dict[str, Int[Tensor, "batch pos G k"]]:
    """Code ids at every codebook site for ``tokens``, gathered on the CPU in batches."""
    sites = list(model.codebooks) if sites is None else sites
    if not sites:
        raise ValueError("the model has no codebooks")
    names = [f"{s}.hook_codes" for s in sites]
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {s: [] for s in sites}
    for start in bar(range(0, len(tokens), batch_size), desc="browser, batches"):
        _, cache = model.run_with_cache(
            tokens[start : start + batch_size].to(device), names_filter=names
        )
        for site in sites:
            parts[site].append(cache[f"{site}.hook_codes"].cpu())
    return {s: torch.cat(p) for s, p in parts.items()}


def token_strings(model: HookedCodebookTransformer, tokens: Tensor) -> list[list[str]]:
    """Each token id as its vocabulary string (byte-level markers made readable)."""
    vocab = {i: model.tokenizer.decode([i]) for i in torch.unique(tokens).tolist()}
    return [[vocab[t] for t in row] for row in tokens.tolist()]


def browse(
    model: HookedCodebookTransformer,
    tokens: Int[Tensor, "batch pos"],
    out: str | Path,
    *,
    title: str = "codelens code browser",
    max_examples: int = 8,
    max_codes_per_group: int | None = None,
) -> Path:
    """Write one self-contained HTML page to browse the codes ``model`` uses on ``tokens``."""
    codes = collect_codes(model, tokens)
    data = collect_browser_data(codes, token_strings(model, tokens), max_examples, title=title)
    return build_browser(data, out, max_examples, max_codes_per_group=max_codes_per_group)


def sample_tokens_for(path: Path, n_sequences: int) -> tuple[Path, Tensor]:
    """For a run directory: its final model and held-out batches of its own data."""
    from codelens.training.config import TrainConfig
    from codelens.training.trainer import build_data

    config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
    config.batch_size = n_sequences
    model_dir = path / "final"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    source, _, _ = build_data(config, tokenizer)
    return model_dir, source.eval_batch(0)
