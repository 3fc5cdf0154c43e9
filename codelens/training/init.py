"""Codebook initialisation from real activations, and dead-code replacement."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.codebook import CodebookLayer
from codelens.model import HookedCodebookTransformer
from codelens.progress import bar
from codelens.training import parallel
from codelens.training.parallel import Ranks
from codelens.vocab import is_block_hook, layer_of


@torch.no_grad()
def kmeans(
    x: Float[Tensor, "G N d"],
    n_clusters: int,
    *,
    iters: int = 15,
    plus_plus: bool = False,
    generator: torch.Generator | None = None,
    memory_budget_mb: float = 256.0,
    ranks: Ranks | None = None,
) -> Float[Tensor, "G C d"]:
    """Batched Lloyd k-means, all groups at once (Euclidean).

    Starts from random samples (or k-means++ seeding). Fewer samples than clusters
    are allowed: the extra centroids are noisy copies of samples. Empty clusters are
    re-seeded from samples drawn afresh at every iteration, so one that lands on a spot
    another centroid already holds gets a new sample next time. (Re-seeding at the
    samples farthest from their centroids instead, as scikit-learn does, fitted outliers
    and initialised a codebook model to a worse loss.)

    Samples are assigned in chunks whose distance matrix fits ``memory_budget_mb``
    (the paper's shape, 16 heads x 65536 samples x 10000 codes, would be 42 GB at once).

    Under several processes (``ranks``) ``x`` is this rank's share of the samples, which
    follow those of the lower ranks. Each rank assigns its own samples; the per-centroid
    sums and counts are added over ranks, and samples picked by index (the starting
    centroids, re-seeds) come from the rank holding them. With ``generator`` seeded
    alike on every rank, every rank returns the centroids of one process on all the
    samples. k-means++ seeding, sequential over clusters, and the case of fewer samples
    than clusters gather all samples on every rank.
    """
    share = _Share(x, ranks or Ranks())
    groups, _, d = x.shape
    n = share.total
    if n == 0:
        raise ValueError("k-means needs at least one sample")
    gen = generator
    if plus_plus or n < n_clusters:
        x_all = share.gathered()
    if plus_plus:
        centroids = _plus_plus(x_all, n_clusters, gen)
    elif n >= n_clusters:  # distinct samples
        pick = torch.rand((groups, n), generator=gen).argsort(-1)[:, :n_clusters]
        centroids = share.take(pick.to(x.device))
    else:
        pick = torch.randint(n, (groups, n_clusters), generator=gen).to(x.device)
        centroids = torch.gather(x_all, 1, pick[..., None].expand(-1, -1, d)).clone()
    if n < n_clusters:
        scale = x_all.std() * 0.01
        noise = torch.randn(centroids.shape, generator=gen, device="cpu").to(x.device)
        centroids += scale * noise
        return centroids
    scale = _fixed_point_scale(share)
    chunk = _chunk_length(x, n_clusters, memory_budget_mb)
    for _ in range(iters):
        sums = torch.zeros(groups, n_clusters, d, dtype=torch.int64, device=x.device)
        sizes = torch.zeros(groups, n_clusters, dtype=torch.int64, device=x.device)
        for part in x.split(chunk, 1):
            assign = torch.cdist(part, centroids).argmin(-1)  # [G, chunk]
            fixed = torch.round(part.double() * scale[:, None, None]).long()
            sums.scatter_add_(1, assign[..., None].expand(-1, -1, d), fixed)
            sizes.scatter_add_(1, assign, torch.ones_like(assign))
        sums, sizes = share.summed(sums, sizes)
        empty = sizes == 0
        means = sums.double() / scale[:, None, None] / sizes.clamp(min=1)[..., None]
        centroids = torch.where(empty[..., None], centroids, means.to(x.dtype))
        if empty.any():
            fresh = torch.randint(n, (groups, n_clusters), generator=gen).to(x.device)
            centroids = torch.where(empty[..., None], share.take(fresh), centroids)
    return centroids


def _chunk_length(x: Float[Tensor, "G N d"], n_clusters: int, memory_budget_mb: float) -> int:
    """Samples per assignment chunk, so that its distance matrix fits the budget."""
    groups, n, _ = x.shape
    per_sample = groups * n_clusters * x.element_size()
    return max(1, min(n, int(memory_budget_mb * 2**20) // per_sample))


def _fixed_point_scale(share: _Share) -> Float[Tensor, " G"]:
    """Per group, the power of two that turns every sample into int64 fixed point with
    room for the sum of all samples.

    Lloyd's sums are taken in fixed point because integer sums are exact in any order:
    float sums added over ranks (or by a GPU's atomics) differ from one process's in the
    last bit, and with repeated activations (every sequence that starts with the same
    token gives the same one) such a bit flips exact ties between centroids, and with
    them the result. Rounding a sample moves it by at most 2 x samples x 2^-62 of its
    group's largest value (2^-45 of it for 65536 samples).
    """
    largest = share.largest(share.x.abs().amax(dim=(1, 2)) if share.x.shape[1] else None)
    if not bool(torch.isfinite(largest).all()):
        raise ValueError("k-means samples hold NaN or inf")
    exponent = torch.frexp(largest.double()).exponent  # largest < 2**exponent
    room = 62 - math.ceil(math.log2(share.total)) - exponent
    return torch.ldexp(torch.ones_like(largest, dtype=torch.float64), room.clamp(-1000, 1000))


class _Share:
    """This rank's share of the k-means samples: rank r holds ``x``, samples
    ``start .. start + N`` of ``total`` (one process: all of them)."""

    def __init__(self, x: Float[Tensor, "G N d"], ranks: Ranks) -> None:
        self.x, self.ranks = x, ranks
        counts = torch.tensor([x.shape[1]], device=x.device)
        if ranks.several:
            each = [torch.zeros_like(counts) for _ in range(ranks.world)]
            dist.all_gather(each, counts)
            counts = torch.cat(each)
        self.counts = counts.tolist()
        self.start, self.total = sum(self.counts[: ranks.rank]), sum(self.counts)

    def summed(self, *parts: Tensor) -> list[Tensor]:
        """Each of ``parts`` added over ranks (one all-reduce)."""
        if not self.ranks.several:
            return list(parts)
        flat = parallel.sum_over_ranks(torch.cat([p.flatten() for p in parts]), self.ranks)
        return [
            f.view_as(p) for f, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)
        ]

    def largest(self, values: Float[Tensor, " G"] | None) -> Float[Tensor, " G"]:
        """The elementwise largest of every rank's ``values`` (None: this rank has none)."""
        if values is None:
            values = torch.zeros(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
        if self.ranks.several:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def take(self, index: Int[Tensor, "G K"]) -> Float[Tensor, "G K d"]:
        """Samples by global index, on every rank (each contributes those it holds)."""
        x, d = self.x, self.x.shape[-1]
        if not self.ranks.several:
            return torch.gather(x, 1, index[..., None].expand(-1, -1, d))
        at = index - self.start
        mine = (at >= 0) & (at < x.shape[1])
        found = torch.zeros(*index.shape, d, dtype=x.dtype, device=x.device)
        if x.shape[1]:
            rows = at.clamp(0, x.shape[1] - 1)[..., None].expand(-1, -1, d)
            found = torch.where(mine[..., None], torch.gather(x, 1, rows), found)
        return self.summed(found)[0]  # adding the other ranks' zeros is exact

    def gathered(self) -> Float[Tensor, "G total d"]:
        """All samples, in order, on every rank."""
        if not self.ranks.several:
            return self.x
        longest = max(self.counts)
        padded = torch.zeros(
            self.x.shape[0], longest, self.x.shape[2], dtype=self.x.dtype, device=self.x.device
        )
        padded[:, : self.x.shape[1]] = self.x
        each = [torch.empty_like(padded) for _ in self.counts]
        dist.all_gather(each, padded)
        return torch.cat([part[:, :n] for part, n in zip(each, self.counts, strict=True)], 1)


def _plus_plus(x: Tensor, n_clusters: int, gen: torch.Generator | None) -> Tensor:
    """k-means++ seeding for every group at once (sequential over clusters)."""
    groups, n, d = x.shape
    first = torch.randint(n, (groups,), generator=gen, device="cpu").to(x.device)
    centroids = [x[torch.arange(groups), first]]
    nearest = (x - centroids[0][:, None]).pow(2).sum(-1)
    for _ in range(1, n_clusters):
        probs = nearest / nearest.sum(-1, keepdim=True).clamp(min=1e-12)
        probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, torch.ones_like(probs))
        idx = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(x.device)
        chosen = x[torch.arange(groups), idx]
        centroids.append(chosen)
        nearest = torch.minimum(nearest, (x - chosen[:, None]).pow(2).sum(-1))
    return torch.stack(centroids, dim=1)


@torch.no_grad()
def init_codebooks(
    model: HookedCodebookTransformer,
    batches: Iterable[Tensor],
    *,
    method: str = "kmeans",
    samples: int = 8192,
    generator: torch.Generator | None = None,
    sites: Iterable[str] | None = None,
    ranks: Ranks | None = None,
) -> None:
    """Initialise every codebook (or those at ``sites``) from the activations it will quantise.

    Layer by layer: sites of layer l are fitted on activations computed with the
    already-initialised codebooks of earlier layers active, so each codebook sees
    the inputs it will get. With ``combine="sum"`` and k > 1 the centroids are
    divided by k, so the k chosen codes start out summing to about the input.

    The samples are the first ``samples`` tokens of ``batches`` (rows of equal length).
    Under several processes (``ranks``, every rank passing the same batches and a
    generator seeded alike) each rank runs and keeps only its share of those rows, and
    `kmeans` adds its sums over ranks: every rank ends with the codebooks one process
    would fit.
    """
    if method == "random":
        return
    if method not in ("kmeans", "kmeans++"):
        raise ValueError(f"init must be random, kmeans or kmeans++, got {method!r}")
    batches = list(batches)
    ranks = ranks or Ranks()
    chosen = list(model.codebooks) if sites is None else list(sites)
    missing = [s for s in chosen if s not in model.codebooks]
    if missing:
        raise ValueError(f"no codebook at {missing}; sites: {list(model.codebooks)}")
    if not batches:
        raise ValueError(f"{method} initialisation needs at least one batch of tokens")
    by_layer: dict[int, list[str]] = {}
    for site in chosen:
        by_layer.setdefault(_forward_order(site), []).append(site)
    codebooks = {site: model.codebook(site) for site in chosen}
    for cb in codebooks.values():
        cb.bypass = True
    try:
        for _, layer_sites in bar(sorted(by_layer.items()), desc=f"{method} init, per layer"):
            acts = _collect(model, layer_sites, batches, samples, ranks)
            for site in layer_sites:
                cb = codebooks[site]
                x = acts[site].transpose(0, 1).contiguous()  # [G, N, d]
                centroids = kmeans(
                    x,
                    cb.n_codes,
                    plus_plus=method == "kmeans++",
                    generator=generator,
                    ranks=ranks,
                )
                if cb.combine == "sum":
                    centroids = centroids / cb.k
                cb.codes.copy_(centroids.to(cb.codes.dtype))
                cb.bypass = False
    finally:
        for cb in codebooks.values():
            cb.bypass = False


def _forward_order(site: str) -> int:
    """The block a site is in; embeddings before every block, the rest after them."""
    if is_block_hook(site):
        return layer_of(site)
    return -1 if "embed" in site else 1 << 30


def _collect(
    model: HookedCodebookTransformer,
    sites: list[str],
    batches: list[Tensor],
    samples: int,
    ranks: Ranks,
) -> dict[str, Float[Tensor, "N G d"]]:
    """This rank's share of the first ``samples`` tokens' activations at ``sites``.

    The rows holding those tokens are split into ``ranks.world`` contiguous parts; this
    rank runs its part in forwards of at most a batch's rows.
    """
    rows = torch.cat(batches)
    seq = rows.shape[1]
    rows = rows[: -(-samples // seq)]
    first = sum(len(part) for part in rows.tensor_split(ranks.world)[: ranks.rank])
    own = rows.tensor_split(ranks.world)[ranks.rank]
    keep = min(len(own) * seq, max(0, samples - first * seq))  # tokens past ``samples`` go
    stored: dict[str, list[Tensor]] = {s: [] for s in sites}

    def make(site):
        def fn(x, hook):
            cb = model.codebook(site)
            stored[site].append(x.reshape(-1, cb.n_groups, cb.d).detach())

        return fn

    with model.hooks(fwd_hooks=[(s, make(s)) for s in sites]):
        for tokens in own.split(len(batches[0])):
            model(tokens, return_type=None)
    out = {}
    for site in sites:
        cb = model.codebook(site)
        if stored[site]:
            out[site] = torch.cat(stored[site])[:keep]
        else:  # a rank with no rows (fewer rows than ranks) still takes part in k-means
            like = next(model.parameters())
            out[site] = like.new_zeros(0, cb.n_groups, cb.d)
    return out


@torch.no_grad()
def replace_dead_codes(
    model: HookedCodebookTransformer,
    dead: dict[str, Bool[Tensor, "G C"]],
    inputs: dict[str, Float[Tensor, "N G d"]],
    *,
    generator: torch.Generator | None = None,
    noise: float = 0.01,
) -> dict[str, int]:
    """Re-initialise dead codes from recent inputs (plus a little noise).

    Returns the number of codes replaced per site.
    """
    replaced = {}
    for site, mask in dead.items():
        cb = model.codebook(site)
        replaced[site] = int(mask.sum())
        fresh = revived_codes(
            cb, cb.codes, mask, inputs.get(site), generator=generator, noise=noise
        )
        cb.codes.copy_(fresh)
    return replaced


@torch.no_grad()
def revived_codes(
    cb: CodebookLayer,
    codes: Float[Tensor, "G C d"],
    dead: Bool[Tensor, "G C"],
    pool: Float[Tensor, "N G d"] | None,
    *,
    generator: torch.Generator | None = None,
    noise: float = 0.01,
) -> Float[Tensor, "G C d"]:
    """``codes`` (the whole codebook of ``cb``) with the dead ones drawn afresh from
    ``pool``; ``codes`` itself when nothing is dead or the pool is empty."""
    if not bool(dead.any()) or pool is None or len(pool) == 0:
        return codes
    rows = torch.randint(len(pool), (cb.n_groups, cb.n_codes), generator=generator)
    rows = rows.to(pool.device)
    fresh = pool[rows, torch.arange(cb.n_groups, device=pool.device)[:, None]]
    jitter = torch.randn(fresh.shape, generator=generator).to(fresh.device)
    fresh = fresh + noise * fresh.std() * jitter
    if cb.combine == "sum":
        fresh = fresh / cb.k
    return torch.where(dead[..., None], fresh.to(codes.dtype), codes)
