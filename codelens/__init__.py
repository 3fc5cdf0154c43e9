"""codelens: codebook features on TransformerLens 4.

Attention-head and MLP outputs are replaced by the sum of their top-k codes from
learned codebooks, so every activation becomes a few discrete, searchable,
patchable code ids.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codelens.codebook import EMPTY_SLOT, CodebookLayer
    from codelens.config import CodebookConfig
    from codelens.model import HookedCodebookTransformer
    from codelens.vocab import Code

__all__ = ["EMPTY_SLOT", "Code", "CodebookConfig", "CodebookLayer", "HookedCodebookTransformer"]
__version__ = "0.1.0"

# Where each top-level name lives. They are imported on first use, so that
# ``import codelens`` (and the command line's --help) does not pay for torch and
# TransformerLens up front.
_HOMES = {
    "EMPTY_SLOT": "codelens.codebook",
    "CodebookLayer": "codelens.codebook",
    "CodebookConfig": "codelens.config",
    "HookedCodebookTransformer": "codelens.model",
    "Code": "codelens.vocab",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'codelens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
