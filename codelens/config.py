"""`CodebookConfig`: where codebooks go in a model and how they quantise."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Similarity = Literal["cosine", "dot", "euclidean"]
Combine = Literal["sum", "mean"]
SITES = ("attn", "mlp")


@dataclass(frozen=True)
class CodebookConfig:
    """How and where to attach codebooks.

    Attributes:
        n_codes: codes per codebook (C).
        mlp_n_codes: codes per MLP codebook; ``None`` means ``n_codes``. An MLP output
            is as wide as all heads together, so it can need more codes than a head.
        k: codes chosen per activation (top-k).
        sites: ``"attn"`` puts one codebook per head on ``blocks.{l}.attn.hook_z``;
            ``"mlp"`` puts ``mlp_groups`` codebooks on ``blocks.{l}.hook_mlp_out``.
        layers: the layers that get codebooks; ``None`` means every layer.
        similarity: how codes are scored against an activation.
        combine: ``"sum"`` (default) makes a site's output the plain sum of its active
            code vectors, so each code's write is exactly its vector and swapping one
            slot changes the output by exactly one vector; ``"mean"`` divides by k, as
            the original implementation did.
        layer_norm: score a LayerNorm-ed (no affine) copy of the activation; the output
            is always built from the code vectors themselves.
        layer_norm_affine: give that LayerNorm a per-codebook gain and bias (loaded,
            not trained), as the original implementation had; needs ``layer_norm``.
        mlp_groups: independent codebooks per MLP output (each sees d_model / groups).
        memory_budget_mb: the largest score matrix (tokens x codes) built at once;
            top-k runs in token chunks that fit it.
    """

    n_codes: int = 1000
    k: int = 1
    mlp_n_codes: int | None = None
    sites: tuple[str, ...] = SITES
    layers: tuple[int, ...] | None = None
    similarity: Similarity = "cosine"
    combine: Combine = "sum"
    layer_norm: bool = False
    layer_norm_affine: bool = False
    mlp_groups: int = 1
    memory_budget_mb: float = 1024.0

    def __post_init__(self) -> None:
        for name in ("n_codes", "k", "mlp_n_codes", "mlp_groups"):
            value = getattr(self, name)
            if value is not None or name != "mlp_n_codes":
                object.__setattr__(self, name, _whole(name, value))
        for name in ("layer_norm", "layer_norm_affine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.sites, str):
            raise ValueError(
                f"sites must be a tuple of site kinds such as ('attn',), got the string "
                f"{self.sites!r}"
            )
        for name in ("sites", "layers"):
            value = getattr(self, name)
            if not (value is None and name == "layers" or isinstance(value, Iterable)):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.layers is not None:
            layers = tuple(_whole("layers entry", x) for x in self.layers)
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat a layer, got {self.layers}")
            object.__setattr__(self, "layers", layers)
        if self.n_codes < 1:
            raise ValueError(f"n_codes must be >= 1, got {self.n_codes}")
        if not 1 <= self.k <= self.n_codes:
            raise ValueError(f"k must be between 1 and n_codes={self.n_codes}, got k={self.k}")
        if self.mlp_n_codes is not None and not self.k <= self.mlp_n_codes:
            raise ValueError(
                f"mlp_n_codes must be >= k={self.k}, got mlp_n_codes={self.mlp_n_codes}"
            )
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ValueError(f"sites must be a non-empty subset of {SITES}, got {self.sites}")
        if self.similarity not in ("cosine", "dot", "euclidean"):
            raise ValueError(
                f"similarity must be cosine, dot or euclidean, got {self.similarity!r}"
            )
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {self.combine!r}")
        if self.layer_norm_affine and not self.layer_norm:
            raise ValueError("layer_norm_affine=True needs layer_norm=True")
        if self.mlp_groups < 1:
            raise ValueError(f"mlp_groups must be >= 1, got {self.mlp_groups}")
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise ValueError(f"memory_budget_mb must be a number, got {budget!r}")
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"memory_budget_mb must be a finite number > 0, got {budget}")

    def site_n_codes(self, kind: str) -> int:
        """Codebook size at a kind of site (``"attn"`` or ``"mlp"``)."""
        if kind == "mlp" and self.mlp_n_codes is not None:
            return self.mlp_n_codes
        return self.n_codes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what checkpoints store)."""
        d = dataclasses.asdict(self)
        d["sites"] = list(self.sites)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodebookConfig:
        """Build from a dict, rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown CodebookConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def _whole(name: str, value: Any) -> int:
    """``value`` as an int, refusing floats, bools and strings (2.5 codes is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)
