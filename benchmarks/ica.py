"""Torch FastICA (`codelens.baselines.fast_ica`) against scikit-learn's FastICA.

On one known mixture (``--d`` non-Gaussian sources of several kinds, mixed by a random
square matrix, ``--n`` samples) it prints, from one run:

- the seconds of each fit on the same CPU threads (``--threads``), their ratio, and the
  Amari distance of each to the true mixing (0 = perfect unmixing);
- the same torch fit on CUDA, where a GPU is present;
- memory: the peak anonymous resident memory (RssAnon, sampled every 5 ms) that a fit
  adds, in fresh processes: scikit-learn on ``--n`` samples held in RAM, as
  `ica_features` used to be, and torch streaming ``--scale`` x as many samples from a
  memory-mapped store on disk (``--chunk-rows`` rows at a time). Pages of the memory
  map are page cache, which the kernel reclaims, so they are not counted.

    python benchmarks/ica.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from codelens.baselines.ica import amari_distance, fast_ica


def mixing_matrix(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sources(n: int, d: int, seed: int) -> torch.Tensor:
    """``[n, d]`` independent sources, cycling through six non-Gaussian kinds."""
    u = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u.clamp(1e-9, 1 - 1e-9)
    kinds = [
        lambda v: torch.log(v / (1 - v)),  # logistic
        lambda v: v * 2 - 1,  # uniform
        lambda v: torch.sign(v - 0.5) * -torch.log(1 - 2 * (v - 0.5).abs()),  # Laplace
        lambda v: -torch.log(v) - 1,  # exponential
        lambda v: torch.sign(v - 0.5),  # binary
        lambda v: (v * 2 - 1) ** 3,  # peaked
    ]
    return torch.stack([kinds[j % len(kinds)](u[:, j]) for j in range(d)], 1)


def mixture(n: int, d: int, seed: int, chunk: int = 50_000):
    """The mixed samples, float32, made ``chunk`` rows at a time (never all in float64)."""
    a = mixing_matrix(d, seed)
    for i, start in enumerate(range(0, n, chunk)):
        yield (sources(min(chunk, n - start), d, seed * 1000 + i) @ a).float()


class PeakAnon:
    """Samples this process's RssAnon (kB) every 5 ms; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak, self._stop = self.now(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return max(self.peak, self.now())


def child(mode: str, n: int, d: int, seed: int, chunk_rows: int, threads: int, store: str) -> None:
    """One memory measurement in a fresh process, printed as JSON."""
    torch.set_num_threads(threads)
    if mode == "sklearn":
        from sklearn.decomposition import FastICA
        from threadpoolctl import threadpool_limits

        base = PeakAnon.now()
        meter = PeakAnon()
        acts = torch.cat(list(mixture(n, d, seed)))  # the activations, held in RAM
        with threadpool_limits(threads):
            FastICA(n_components=d, whiten="unit-variance", max_iter=400, random_state=0).fit(
                acts.double().numpy()
            )
        peak = meter.stop()
        print(json.dumps({"mode": mode, "n": n, "added_mb": (peak - base) / 1024}))
        return
    mapped = np.memmap(store, dtype=np.float32, mode="r", shape=(n, d))
    base = PeakAnon.now()
    meter = PeakAnon()
    fast_ica(mapped, d, seed=0, chunk_rows=chunk_rows)
    peak = meter.stop()
    print(json.dumps({"mode": mode, "n": n, "added_mb": (peak - base) / 1024}))


def timed(fit) -> tuple[float, object]:
    started = time.perf_counter()
    out = fit()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="samples (ica_features' default)")
    parser.add_argument("--d", type=int, default=64, help="sources = dimensions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=int, default=10, help="torch's sample multiple (memory)")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["sklearn", "torch-store"], help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.d, args.seed, args.chunk_rows, args.threads, args.store)
        return

    from sklearn.decomposition import FastICA
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    x = torch.cat(list(mixture(args.n, args.d, args.seed)))
    a = mixing_matrix(args.d, args.seed).float()
    print(f"known mixture: {args.n} samples x {args.d} sources, {args.threads} CPU thread(s)")
    with threadpool_limits(args.threads):
        sk_s, sk = timed(
            lambda: FastICA(
                n_components=args.d, whiten="unit-variance", max_iter=400, random_state=0
            ).fit(x.double().numpy())
        )
    t_s, ours = timed(lambda: fast_ica(x, args.d, seed=0))
    sk_amari = amari_distance(a @ torch.from_numpy(sk.components_.T).float())
    t_amari = amari_distance(a @ ours.unmixing)
    print(
        f"  scikit-learn FastICA: {sk_s:7.2f} s  {sk.n_iter_:3d} iterations  Amari {sk_amari:.4f}"
    )
    print(f"  torch fast_ica (CPU): {t_s:7.2f} s  {ours.n_iter:3d} iterations  Amari {t_amari:.4f}")
    diff = t_amari - sk_amari
    print(f"  torch / scikit-learn time: {t_s / sk_s:.2f}  (Amari difference {diff:+.4f})")
    if torch.cuda.is_available():
        xg = x.cuda()
        fast_ica(xg, args.d, seed=0, max_iter=2)  # warm-up: CUDA context and kernels
        torch.cuda.synchronize()
        g_s, gpu = timed(lambda: fast_ica(xg, args.d, seed=0))
        print(
            f"  torch fast_ica (CUDA {torch.cuda.get_device_name()}): {g_s:7.3f} s  "
            f"{gpu.n_iter:3d} iterations  Amari {amari_distance(a @ gpu.unmixing):.4f}  "
            f"scikit-learn / CUDA time: {sk_s / g_s:.1f}x"
        )

    common = [f"--d={args.d}", f"--seed={args.seed}", f"--threads={args.threads}"]
    common.append(f"--chunk-rows={args.chunk_rows}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "acts.f32"
        with open(store, "wb") as out:  # the store on disk, written chunk by chunk
            for block in mixture(args.n * args.scale, args.d, args.seed):
                out.write(block.numpy().tobytes())
        for mode, n in (("sklearn", args.n), ("torch-store", args.n * args.scale)):
            out = subprocess.run(
                [sys.executable, __file__, f"--child={mode}", f"--n={n}", f"--store={store}"]
                + common,
                check=True,
                capture_output=True,
                text=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    sk_mb, t_mb = results["sklearn"]["added_mb"], results["torch-store"]["added_mb"]
    print("memory a fit adds (peak RssAnon over the process before the fit):")
    print(f"  scikit-learn, {args.n} samples in RAM:          {sk_mb:8.1f} MB")
    print(
        f"  torch, {args.n * args.scale} samples from a memory map: {t_mb:8.1f} MB  "
        f"({args.scale}x the samples in {t_mb / sk_mb:.2f}x the memory; "
        f"chunk_rows={args.chunk_rows})"
    )


if __name__ == "__main__":
    main()
