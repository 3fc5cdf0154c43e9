"""Data for codelens experiments: labelled corpora (`corpus`), text loading and BPE
(`text`), token caches, TokFSM (`fsm`) and generated stories (`stories`).

The labelled-corpus API is exported here and imported on first use, so that
``import codelens.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codelens.data.corpus import (
        FORTUNE_TOPICS,
        LabelledCorpus,
        default_prompts,
        load_labelled_corpus,
    )

__all__ = ["FORTUNE_TOPICS", "LabelledCorpus", "default_prompts", "load_labelled_corpus"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'codelens.data' has no attribute {name!r}")
    value = getattr(importlib.import_module("codelens.data.corpus"), name)
    globals()[name] = value
    return value
