"""PCA and ICA directions of cached activations, as `ProjectionFeatures`.

PCA features are the projections on the principal components (decoder = components;
scikit-learn); ICA features are the sources of codelens' torch FastICA (`fast_ica`;
decoder = its mixing matrix), so both read out ``x ~ mean + features @ decoder`` like an
SAE. Both take a tensor or an `ActivationStore` site's memory map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from codelens.baselines.features import ProjectionFeatures
from codelens.baselines.ica import fast_ica


def _sklearn():
    try:
        from sklearn import decomposition
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PCA/ICA baselines need scikit-learn: pip install scikit-learn") from err
    return decomposition


def _check(acts: Any, n_components: int | None) -> tuple[Any, int]:
    if not isinstance(acts, np.ndarray):
        acts = torch.as_tensor(acts)
    floating = acts.is_floating_point() if isinstance(acts, Tensor) else acts.dtype.kind == "f"
    if len(acts.shape) != 2 or acts.shape[0] < 2 or not floating:
        raise ValueError(f"acts must be a float [n_tokens >= 2, d] tensor, got {tuple(acts.shape)}")
    d = acts.shape[1]
    n = d if n_components is None else n_components
    if not 1 <= n <= min(d, acts.shape[0]):
        raise ValueError(f"n_components must be in [1, {min(d, acts.shape[0])}], got {n}")
    return acts, n


def _sample_rows(n: int, max_tokens: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of at most ``max_tokens`` rows drawn at random (None: all rows)."""
    if max_tokens is None or n <= max_tokens:
        return None
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens]
    return np.sort(pick.numpy())


def pca_features(
    acts: Float[Tensor, "N d"],
    site: str,
    n_components: int | None = None,
    *,
    group: int | None = None,
    max_tokens: int = 100_000,
    seed: int = 0,
) -> ProjectionFeatures:
    """The top ``n_components`` (default all) principal directions of ``acts``."""
    acts, n = _check(acts, n_components)
    rows = _sample_rows(acts.shape[0], max_tokens, seed)
    x = acts if rows is None else acts[rows]
    x = x.double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    pca = _sklearn().PCA(n_components=n, random_state=seed).fit(x)
    components = torch.from_numpy(pca.components_).float()  # [F, d], orthonormal rows
    return ProjectionFeatures(
        site, components.T, components, torch.from_numpy(pca.mean_), method="pca", group=group
    )


def ica_features(
    acts: Float[Tensor, "N d"] | np.ndarray,
    site: str,
    n_components: int | None = None,
    *,
    group: int | None = None,
    max_tokens: int | None = 20_000,
    max_iter: int = 400,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ProjectionFeatures:
    """FastICA's ``n_components`` (default d) independent sources of ``acts`` (whitened to
    unit variance; at most ``max_tokens`` tokens, drawn at random, are fitted; None: all,
    streamed from a store's memory map in chunks). Runs on ``device`` (see `fast_ica`)."""
    acts, n = _check(acts, n_components)
    rows = _sample_rows(acts.shape[0], max_tokens, seed)
    ica = fast_ica(acts, n, rows=rows, max_iter=max_iter, seed=seed, device=device)
    return ProjectionFeatures(site, ica.unmixing, ica.mixing, ica.mean, method="ica", group=group)
