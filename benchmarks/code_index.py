"""Approximate top-k (FAISS code index) against exact chunked top-k on one large codebook.

One group of C=100,000 codes, d=64, 2,048 queries, k=8, cosine similarity (the default):
times `CodebookLayer.top_k` under ``torch.no_grad`` exact (chunked product + top-k) and
through each `CodeIndex` setting, interleaved, and prints recall@8 against the exact ids
and the speed-up. Index build time is printed apart (an index is built once per change of
the codes, so inference amortises it).

Two data sets, both printed:
- ``clustered``: codes and queries from one mixture of 1,000 Gaussian clusters whose
  centres and spreads share a power-law spectrum (variance 1/i along axis i; each
  cluster's spread is half the centres'), standing in for trained codes, which are
  centroids of the activations they are then queried with;
- ``random``: isotropic Gaussian codes and queries, the worst case for any index (no
  structure to exploit).

    python benchmarks/code_index.py [--threads 2] [--repeats 3] [--codes 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from codelens import CodebookLayer
from codelens.code_index import CodeIndex

SETTINGS = [
    ("flat", {}),
    ("hnsw", {"ef_search": 16}),
    ("hnsw", {"ef_search": 32}),
    ("hnsw", {"ef_search": 64}),
    ("hnsw", {"ef_search": 128}),
    ("ivf", {"nprobe": 2}),
    ("ivf", {"nprobe": 4}),
    ("ivf", {"nprobe": 8}),
    ("ivf", {"nprobe": 16}),
    ("ivf", {"nprobe": 32}),
]


def clustered(n: int, d: int, generator: torch.Generator, clusters: int = 1000) -> torch.Tensor:
    spectrum = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    centres = torch.randn(clusters, d, generator=generator) * spectrum
    members = torch.randint(0, clusters, (n,), generator=generator)
    return centres[members] + 0.5 * torch.randn(n, d, generator=generator) * spectrum


def data(kind: str, codes: int, queries: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randn(codes, d, generator=generator), torch.randn(
            queries, d, generator=generator
        )
    both = clustered(codes + queries, d, generator)
    return both[:codes], both[codes:]


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float((found[..., :, None] == exact[..., None, :]).any(-1).float().mean())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(kind: str, n_codes: int, n_queries: int, d: int, k: int, repeats: int) -> None:
    codes, queries = data(kind, n_codes, n_queries, d)
    layer = CodebookLayer(1, d, n_codes, k)
    with torch.no_grad():
        layer.codes.copy_(codes[None])
    x = queries[:, None, :]
    indexes = {}
    build_s = {}
    for name, _ in SETTINGS:
        if name not in indexes:
            indexes[name] = CodeIndex(name)
            build_s[name] = timed(lambda index=indexes[name]: index.build(layer))

    def search(name: str, options: dict):
        def fn():
            index = indexes[name]
            for option, value in options.items():
                setattr(index, option, value)
            layer.code_index = index
            with torch.no_grad():
                found = layer.top_k(x)
            layer.code_index = None
            return found

        return fn

    def exact_fn():
        with torch.no_grad():
            return layer.top_k(x)

    fns = [exact_fn] + [search(name, options) for name, options in SETTINGS]
    exact = exact_fn()
    results = [fn() for fn in fns]  # warm-up, and the ids to score
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            bucket.append(timed(fn))
    medians = [statistics.median(t) for t in times]
    print(
        f"\n{kind}: C={n_codes:,} d={d} queries={n_queries:,} k={k}, cosine, medians of {repeats}"
    )
    print("  build: " + ", ".join(f"{name} {s:.1f} s" for name, s in build_s.items()))
    print(f"  {'method':<22}{'ms':>10}{'recall@' + str(k):>11}{'speed-up':>10}")
    print(f"  {'exact chunked top-k':<22}{1e3 * medians[0]:>10.1f}{1.0:>11.3f}{1.0:>10.1f}")
    best = None
    for (name, options), found, t in zip(SETTINGS, results[1:], medians[1:], strict=True):
        label = name + "".join(f" {key}={value}" for key, value in options.items())
        r, speedup = recall(found, exact), medians[0] / t
        print(f"  {label:<22}{1e3 * t:>10.1f}{r:>11.3f}{speedup:>10.1f}")
        if name != "flat" and r >= 0.95 and (best is None or speedup > best[2]):
            best = (label, r, speedup)
    if best is None:
        print("  target (approximate >= 10x at recall >= 0.95): MISSED, no setting reached 0.95")
    else:
        verdict = "met" if best[2] >= 10 else "MISSED"
        print(
            f"  target (approximate >= 10x at recall >= 0.95): {verdict}: "
            f"{best[0]} at recall {best[1]:.3f}, {best[2]:.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codes", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--data", choices=("clustered", "random", "both"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={args.threads}")
    kinds = ("clustered", "random") if args.data == "both" else (args.data,)
    for kind in kinds:
        run(kind, args.codes, args.queries, 64, 8, args.repeats)


if __name__ == "__main__":
    main()
