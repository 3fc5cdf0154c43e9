"""PCA and ICA directions of cached activations (scikit-learn), as `ProjectionFeatures`.

PCA features are the projections on the principal components (decoder = components);
ICA features are FastICA's sources (decoder = its mixing matrix), so both read out
``x ~ mean + features @ decoder`` like an SAE.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from codelens.baselines.features import ProjectionFeatures


def _sklearn():
    try:
        from sklearn import decomposition
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PCA/ICA baselines need scikit-learn: pip install scikit-learn") from err
    return decomposition


def _check(acts: Tensor, n_components: int | None, max_tokens: int, seed: int):
    acts = torch.as_tensor(acts)
    if acts.ndim != 2 or acts.shape[0] < 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be a float [n_tokens >= 2, d] tensor, got {tuple(acts.shape)}")
    d = acts.shape[1]
    n = d if n_components is None else n_components
    if not 1 <= n <= min(d, acts.shape[0]):
        raise ValueError(f"n_components must be in [1, {min(d, acts.shape[0])}], got {n}")
    if acts.shape[0] > max_tokens:
        pick = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
        acts = acts[pick[:max_tokens]]
    return acts.double().numpy(), n


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
    x, n = _check(acts, n_components, max_tokens, seed)
    pca = _sklearn().PCA(n_components=n, random_state=seed).fit(x)
    components = torch.from_numpy(pca.components_).float()  # [F, d], orthonormal rows
    return ProjectionFeatures(
        site, components.T, components, torch.from_numpy(pca.mean_), method="pca", group=group
    )


def ica_features(
    acts: Float[Tensor, "N d"],
    site: str,
    n_components: int | None = None,
    *,
    group: int | None = None,
    max_tokens: int = 20_000,
    max_iter: int = 400,
    seed: int = 0,
) -> ProjectionFeatures:
    """FastICA's ``n_components`` (default d) independent sources of ``acts`` (whitened to
    unit variance; at most ``max_tokens`` tokens, drawn at random, are fitted)."""
    x, n = _check(acts, n_components, max_tokens, seed)
    ica = _sklearn().FastICA(
        n_components=n, whiten="unit-variance", max_iter=max_iter, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        ica.fit(x)
    return ProjectionFeatures(
        site,
        torch.from_numpy(ica.components_.T.copy()),  # unmixing: sources = (x - mean) @ this
        torch.from_numpy(ica.mixing_.T.copy()),
        torch.from_numpy(ica.mean_),
        method="ica",
        group=group,
    )
