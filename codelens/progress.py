"""Progress bars for long operations: tqdm on a terminal, silent elsewhere or on request.

Training, k-means initialisation, every batched collection (`codelens.vocab.cached_batches`:
code search, the browser, top examples) and ACDC show a bar while they run. A bar is drawn
only when stderr is a terminal (logs and CI stay clean); ``CODELENS_PROGRESS=0`` in the
environment turns every bar off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

ENV = "CODELENS_PROGRESS"


def enabled() -> bool:
    """Whether bars may be drawn (``CODELENS_PROGRESS`` is not ``0``)."""
    return os.environ.get(ENV, "1") != "0"


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None, **kwargs: Any) -> tqdm:
    """``iterable`` wrapped in a tqdm bar: drawn on a terminal only, off when asked."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=None if enabled() else True,  # None: tqdm's own "is stderr a terminal?"
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )
