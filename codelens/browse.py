"""Build the static code browser for a model over a token sample."""

from __future__ import annotations

import json
from pathlib import Path

from jaxtyping import Int
from torch import Tensor

from codelens.analysis.search import token_strings
from codelens.model import HookedCodebookTransformer
from codelens.viz import build_browser, collect_browser_data
from codelens.vocab import collect_codes


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
    strings = token_strings(model.tokenizer, tokens)
    data = collect_browser_data(codes, strings, max_examples, title=title)
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
