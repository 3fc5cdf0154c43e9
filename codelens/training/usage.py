"""Token-level code usage and codebook quality metrics, gathered by hooks during training.

Counts are kept on the model's device and never read back per forward; they are
reduced across ranks and read only when metrics are logged or dead codes checked.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from codelens.model import HookedCodebookTransformer
from codelens.vocab import codes_hook


class CodebookMonitor:
    """Counts how often every code is chosen and keeps each site's latest inputs.

    ``window_counts`` accumulate until `reset_window` (the dead-code window);
    ``metric_counts`` until `reset_metrics` (the logging interval). ``inputs[site]``
    holds the last rows of the last forward (at least ``keep_inputs`` tokens of
    grouped activations, ``[rows, T, G, d]``); `pooled_inputs` gives the pool dead codes
    are re-initialised from. Forwards inside `paused` (evaluation) are not seen.
    """

    def __init__(self, model: HookedCodebookTransformer, keep_inputs: int = 4096) -> None:
        self.model = model
        self.keep_inputs = keep_inputs
        self.window_counts: dict[str, Tensor] = {}
        self.metric_counts: dict[str, Tensor] = {}
        self.window_tokens = 0
        self.inputs: dict[str, Tensor] = {}
        self.active = True
        for site, cb in model.codebooks.items():
            zeros = torch.zeros(cb.n_groups, cb.n_codes, dtype=torch.long, device=cb.codes.device)
            self.window_counts[site] = zeros.clone()
            self.metric_counts[site] = zeros
        self._handles: list[Any] = []

    def hooks(self) -> list[tuple[str, Any]]:
        """Forward hooks for ``model.hooks(...)`` (removed by the caller's context)."""
        hooks = []
        for site in self.model.codebooks:
            hooks.append((codes_hook(site), self._count_hook(site)))
            hooks.append((site, self._input_hook(site)))
        return hooks

    def _count_hook(self, site: str):
        def count(ids: Int[Tensor, "... G k"], hook: Any) -> None:
            if not self.active or recomputing():  # paused, or checkpointing's recompute
                return
            cb = self.model.codebook(site)
            size = cb.n_groups * cb.n_codes
            flat = rearrange(ids, "... g k -> g (... k)")
            offsets = torch.arange(cb.n_groups, device=ids.device)[:, None] * cb.n_codes
            bins = torch.where(
                flat >= 0, flat + offsets, size
            ).flatten()  # empty slots: one spare bin
            counts = torch.zeros(size + 1, dtype=torch.long, device=ids.device)
            counts = counts.index_add_(0, bins, torch.ones_like(bins))[:size]
            counts = counts.view(cb.n_groups, cb.n_codes)
            self.window_counts[site] += counts
            self.metric_counts[site] += counts

        return count

    def _input_hook(self, site: str):
        def keep(x: Tensor, hook: Any) -> None:
            if not self.active or recomputing():
                return
            cb = self.model.codebook(site)
            grouped = x.detach().reshape(x.shape[0], -1, cb.n_groups, cb.d)
            rows = -(-self.keep_inputs // grouped.shape[1])
            self.inputs[site] = grouped[-rows:]

        return keep

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards run inside (evaluation) neither count usage nor feed the input pool."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def pooled_inputs(self) -> dict[str, Float[Tensor, "N G d"]]:
        """The last ``keep_inputs`` input tokens of the last forward, per site.

        Under torch.distributed (a collective: call it on every rank) the rows of every
        rank are put back into the global batch's order (rank r holds rows r, r + W, ...),
        so the pool is the one a single process would have.
        """
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        pools = {}
        for site, rows in self.inputs.items():
            if world > 1:
                parts = [torch.empty_like(rows) for _ in range(world)]
                dist.all_gather(parts, rows.contiguous())
                rows = rearrange(torch.stack(parts), "w b ... -> (b w) ...")
            pools[site] = rows.flatten(0, 1)[-self.keep_inputs :]
        return pools

    def add_tokens(self, n: int) -> None:
        self.window_tokens += n

    def reset_window(self) -> None:
        for counts in self.window_counts.values():
            counts.zero_()
        self.window_tokens = 0

    def reset_metrics(self) -> None:
        for counts in self.metric_counts.values():
            counts.zero_()

    def all_reduce_window(self) -> None:
        """Sum the dead-code window counts over ranks (no-op outside torch.distributed)."""
        _all_reduce(self.window_counts.values())

    def all_reduce_metrics(self) -> None:
        """Sum the logging-interval counts over ranks."""
        _all_reduce(self.metric_counts.values())

    def state(self) -> dict[str, Tensor]:
        """The counters for a checkpoint, summed over ranks (a collective under
        torch.distributed: every rank calls it; the ranks' own counts are left as they are)."""
        state = {f"window.{s}": c.clone() for s, c in self.window_counts.items()}
        state |= {f"metric.{s}": c.clone() for s, c in self.metric_counts.items()}
        _all_reduce(state.values())
        state["window_tokens"] = torch.tensor(self.window_tokens)
        return state

    def load_state(self, state: dict[str, Tensor], *, holds_counts: bool = True) -> None:
        """Restore `state`; with ``holds_counts=False`` (every rank but the first) the counts
        start at zero, so the next sum over ranks counts the saved totals once."""
        for site in self.window_counts:
            for name, counts in (("window", self.window_counts), ("metric", self.metric_counts)):
                saved = state[f"{name}.{site}"]
                counts[site].copy_(saved if holds_counts else torch.zeros_like(saved))
        self.window_tokens = int(state["window_tokens"])


_recompute = threading.local()


@contextlib.contextmanager
def recomputation() -> Iterator[None]:
    """Mark the forward that activation checkpointing reruns in the backward pass, so
    hooks that record what a forward saw (`CodebookMonitor`) record it once."""
    previous = recomputing()
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = previous


def recomputing() -> bool:
    """Whether this thread is inside `recomputation`."""
    return getattr(_recompute, "active", False)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, ...]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the first forward
    as it is, the recomputation marked."""
    return contextlib.nullcontext(), recomputation()


def _all_reduce(tensors) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def usage_metrics(counts: Int[Tensor, "G C"]) -> dict[str, float]:
    """Dead-code fraction and usage entropy / perplexity, averaged over groups."""
    counts = counts.double()
    total = counts.sum(-1, keepdim=True).clamp(min=1)
    p = counts / total
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    return {
        "dead_fraction": float((counts == 0).double().mean()),
        "entropy": float(entropy.mean()),
        "perplexity": float(entropy.exp().mean()),
        "perplexity_fraction": float(entropy.exp().mean() / counts.shape[-1]),
        "tokens": float(total.mean()),
    }


def reconstruction_metrics(
    quantized: Float[Tensor, "N G d"], inputs: Float[Tensor, "N G d"]
) -> dict[str, float]:
    """MSE of the quantised activations and the share of input variance they explain."""
    _, groups, d = inputs.shape
    totals = ReconstructionTotals(groups, d, inputs.device)
    totals.add(quantized, inputs)
    return totals.metrics()


class ReconstructionTotals:
    """`reconstruction_metrics` of one batch, summed over its micro-batches (and ranks).

    Keeps the sums the two metrics are made of in one float64 vector on the inputs'
    device (tokens, squared error, squares, then the sum of the inputs per group and
    dimension): adding micro-batches reads nothing back to the host, and the vector of
    each rank's rows summed over ranks gives the figures of the whole batch.
    """

    def __init__(self, groups: int, d: int, device: torch.device | str | None = None) -> None:
        self.groups, self.d = groups, d
        self.sums: Float[Tensor, " S"] = torch.zeros(
            3 + groups * d, dtype=torch.float64, device=device
        )

    def add(self, quantized: Float[Tensor, "N G d"], inputs: Float[Tensor, "N G d"]) -> None:
        x = inputs.double()
        self.sums[0] += len(x)
        self.sums[1] += (quantized.double() - x).pow(2).sum()
        self.sums[2] += x.pow(2).sum()
        self.sums[3:] += x.sum(0).flatten()

    def metrics(self) -> dict[str, float]:
        n, squared_error, squares = self.sums[:3].tolist()
        total = self.sums[3:]
        groups, d = self.groups, self.d
        centred = squares - float(total.pow(2).sum()) / n  # sum |x - mean|^2
        variance = max(centred / (n * groups), 1e-12)
        error = squared_error / (n * groups)
        return {
            "mse": squared_error / (n * groups * d),
            "explained_variance": 1 - error / variance,
        }


def summarise(metrics: dict[str, float]) -> str:
    """A compact progress-bar text of the key figures."""
    keys = ("loss", "lm_loss", "recon", "dead", "lr")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and math.isfinite(metrics[k])]
    return " ".join(parts)
