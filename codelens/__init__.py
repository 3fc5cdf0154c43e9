"""codelens: codebook features on TransformerLens 4.

Attention-head and MLP outputs are replaced by the sum of their top-k codes from
learned codebooks, so every activation becomes a few discrete, searchable,
patchable code ids.
"""

from codelens.codebook import EMPTY_SLOT, CodebookLayer
from codelens.config import CodebookConfig
from codelens.model import HookedCodebookTransformer

__all__ = ["EMPTY_SLOT", "CodebookConfig", "CodebookLayer", "HookedCodebookTransformer"]
__version__ = "0.1.0"
