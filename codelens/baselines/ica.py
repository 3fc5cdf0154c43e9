"""FastICA in torch (parallel, logcosh) on any device, streamed in chunks of rows.

The data is read ``chunk_rows`` rows at a time, from a tensor or from anything sliced by
rows (a memory-mapped `codelens.baselines.activations.ActivationStore` site), so the
sample count is bounded by disk, not memory: one pass gathers the mean and covariance
(float64), the whitening comes from its eigendecomposition, and each iteration is one
more pass. An iteration is ``W <- mean(g(W x) x^T) - diag(mean(g'(W x))) W`` on the
whitened ``x``, ``g = tanh``, then a symmetric decorrelation ``W <- (W W^T)^(-1/2) W``;
it stops when no row of ``W`` turns by more than ``tol`` (scikit-learn's rule). The
whitening is folded into the per-chunk products, so no whitened copy is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class ICAResult:
    """``sources = (x - mean) @ unmixing`` (unit variance); ``x ~ mean + sources @ mixing``."""

    unmixing: Float[Tensor, "d F"]
    mixing: Float[Tensor, "F d"]
    mean: Float[Tensor, " d"]
    n_iter: int
    converged: bool


def _chunks(data: Any, rows: np.ndarray | None, chunk_rows: int, device, dtype):
    """The data's rows (all, or the sorted ``rows``) as device tensors, chunk by chunk."""
    n = len(data) if rows is None else len(rows)
    for start in range(0, n, chunk_rows):
        pick = (
            slice(start, start + chunk_rows) if rows is None else rows[start : start + chunk_rows]
        )
        block = data[pick]
        if not isinstance(block, Tensor):
            block = torch.from_numpy(np.array(block))  # a writable copy of the rows
        yield block.to(device=device, dtype=dtype, non_blocking=True)


def _sym_decorrelate(w: Tensor) -> Tensor:
    """``(W W^T)^(-1/2) W``: the nearest matrix with orthonormal rows."""
    s, u = torch.linalg.eigh(w @ w.T)
    return (u * s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt()) @ u.T @ w


def fast_ica(
    data: Any,
    n_components: int | None = None,
    *,
    rows: np.ndarray | None = None,
    max_iter: int = 400,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int = 65_536,
) -> ICAResult:
    """Independent components of ``data`` ([N, d]: a tensor, array or memory map).

    ``rows`` (sorted indices) restricts the fit to those rows. Chunks are moved to
    ``device`` (default: the data's own, else CPU) in ``dtype``; the moments and the
    n x n updates are float64. Results come back on the CPU in float32.
    """
    if len(getattr(data, "shape", ())) != 2:
        raise ValueError(f"data must be [n_samples, d], got shape {getattr(data, 'shape', None)}")
    n_rows = len(data) if rows is None else len(rows)
    d = int(data.shape[1])
    n = d if n_components is None else n_components
    if n_rows < 2 or not 1 <= n <= min(d, n_rows):
        raise ValueError(f"n_components must be in [1, {min(d, n_rows)}], got {n}")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got {max_iter}, {tol}")
    if device is None:
        device = data.device if isinstance(data, Tensor) else "cpu"
    device = torch.device(device)

    def passes():
        return _chunks(data, rows, chunk_rows, device, dtype)

    # Moments in one float64 pass, about the first chunk's mean (no cancellation).
    total = torch.zeros(d, dtype=torch.float64, device=device)
    second = torch.zeros(d, d, dtype=torch.float64, device=device)
    centre = None
    for x in passes():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data contain NaN or infinite values")
        if centre is None:
            centre = x.double().mean(0)
        x64 = x.double() - centre  # a new tensor: the caller's data is never written
        total += x64.sum(0)
        second += x64.T @ x64
    shift = total / n_rows
    mean = centre + shift
    cov = second / n_rows - torch.outer(shift, shift)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0)[:n], vectors.flip(1)[:, :n]
    if values[-1] <= values[0] * 1e-12:
        raise ValueError(
            f"the data span fewer than n_components={n} dimensions; use fewer components"
        )
    whiten = vectors * values.rsqrt()  # [d, n]: (x - mean) @ whiten has unit covariance

    mean_low = mean.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    w = _sym_decorrelate(torch.randn(n, n, generator=gen, dtype=torch.float64).to(device))
    converged, n_iter = False, 0
    while n_iter < max_iter and not converged:
        n_iter += 1
        project = (whiten @ w.T).to(dtype)  # [d, n]: centred x to current sources
        g_x = torch.zeros(n, d, dtype=torch.float64, device=device)
        gp_sum = torch.zeros(n, dtype=torch.float64, device=device)
        for x in passes():
            x = x - mean_low
            g = torch.tanh(x @ project)  # logcosh's derivative
            g_x += (g.T @ x).double()
            gp_sum += (1 - g * g).sum(0, dtype=torch.float64)
        expect = g_x @ whiten / n_rows  # mean of g(sources) x whitened^T
        w_new = _sym_decorrelate(expect - (gp_sum / n_rows)[:, None] * w)
        turn = float(((w_new * w).sum(1).abs() - 1).abs().max())
        w, converged = w_new, turn < tol
    unmixing = whiten @ w.T  # [d, n]
    mixing = torch.linalg.pinv(unmixing)  # [n, d]
    return ICAResult(
        unmixing.float().cpu(), mixing.float().cpu(), mean.float().cpu(), n_iter, converged
    )


def amari_distance(transfer: Float[Tensor, "n n"]) -> float:
    """How far the map from true to recovered sources (mixing @ unmixing) is from a
    scaled permutation: 0 when every source is recovered exactly, at most 1 (Amari et
    al. 1996, normalised by ``2 n (n - 1)``). Symmetric under transposition."""
    p = transfer.double().abs()
    n = p.shape[0]
    if p.ndim != 2 or p.shape != (n, n) or n < 2:
        raise ValueError(f"the transfer matrix must be square with n >= 2, got {tuple(p.shape)}")
    rows = (p.sum(1) / p.max(1).values - 1).sum()
    cols = (p.sum(0) / p.max(0).values - 1).sum()
    return float((rows + cols) / (2 * n * (n - 1)))
