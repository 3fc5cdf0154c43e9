"""Codebook initialisation from real activations, and dead-code replacement."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.codebook import CodebookLayer
from codelens.model import HookedCodebookTransformer
from codelens.progress import bar
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
    """
    groups, n, d = x.shape
    if n == 0:
        raise ValueError("k-means needs at least one sample")
    gen = generator
    if plus_plus:
        centroids = _plus_plus(x, n_clusters, gen)
    else:
        if n >= n_clusters:  # distinct samples
            pick = torch.rand((groups, n), generator=gen).argsort(-1)[:, :n_clusters]
        else:
            pick = torch.randint(n, (groups, n_clusters), generator=gen)
        pick = pick.to(x.device)
        centroids = torch.gather(x, 1, pick[..., None].expand(-1, -1, d)).clone()
    if n < n_clusters:
        scale = x.std() * 0.01
        noise = torch.randn(centroids.shape, generator=gen, device="cpu").to(x.device)
        centroids += scale * noise
        return centroids
    for _ in range(iters):
        assign = _nearest(x, centroids, memory_budget_mb)  # [G, N]
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, d), x)
        sizes = torch.zeros(groups, n_clusters, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype)
        )
        empty = sizes == 0
        centroids = torch.where(empty[..., None], centroids, sums / sizes.clamp(min=1)[..., None])
        if empty.any():
            fresh = torch.randint(n, (groups, n_clusters), generator=gen).to(x.device)
            refill = torch.gather(x, 1, fresh[..., None].expand(-1, -1, d))
            centroids = torch.where(empty[..., None], refill, centroids)
    return centroids


def _nearest(
    x: Float[Tensor, "G N d"], centroids: Float[Tensor, "G C d"], memory_budget_mb: float
) -> Int[Tensor, "G N"]:
    """Index of each sample's nearest centroid, over sample chunks within the budget."""
    groups, n, _ = x.shape
    per_sample = groups * centroids.shape[1] * x.element_size()
    chunk = max(1, min(n, int(memory_budget_mb * 2**20) // per_sample))
    return torch.cat([torch.cdist(part, centroids).argmin(-1) for part in x.split(chunk, 1)], 1)


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
) -> None:
    """Initialise every codebook (or those at ``sites``) from the activations it will quantise.

    Layer by layer: sites of layer l are fitted on activations computed with the
    already-initialised codebooks of earlier layers active, so each codebook sees
    the inputs it will get. With ``combine="sum"`` and k > 1 the centroids are
    divided by k, so the k chosen codes start out summing to about the input.
    """
    if method == "random":
        return
    if method not in ("kmeans", "kmeans++"):
        raise ValueError(f"init must be random, kmeans or kmeans++, got {method!r}")
    batches = list(batches)
    chosen = list(model.codebooks) if sites is None else list(sites)
    missing = [s for s in chosen if s not in model.codebooks]
    if missing:
        raise ValueError(f"no codebook at {missing}; sites: {list(model.codebooks)}")
    by_layer: dict[int, list[str]] = {}
    for site in chosen:
        by_layer.setdefault(_forward_order(site), []).append(site)
    codebooks = {site: model.codebook(site) for site in chosen}
    for cb in codebooks.values():
        cb.bypass = True
    try:
        for _, layer_sites in bar(sorted(by_layer.items()), desc=f"{method} init, per layer"):
            acts = _collect(model, layer_sites, batches, samples)
            for site in layer_sites:
                cb = codebooks[site]
                x = acts[site].transpose(0, 1).contiguous()  # [G, N, d]
                centroids = kmeans(
                    x, cb.n_codes, plus_plus=method == "kmeans++", generator=generator
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


def _collect(model, sites: list[str], batches: list[Tensor], samples: int) -> dict[str, Tensor]:
    stored: dict[str, list[Tensor]] = {s: [] for s in sites}

    def make(site):
        def fn(x, hook):
            cb = model.codebook(site)
            stored[site].append(x.reshape(-1, cb.n_groups, cb.d).detach())

        return fn

    with model.hooks(fwd_hooks=[(s, make(s)) for s in sites]):
        have = 0
        for tokens in batches:
            model(tokens, return_type=None)
            have += tokens.numel()
            if have >= samples:
                break
    return {s: torch.cat(v)[:samples] for s, v in stored.items()}


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
