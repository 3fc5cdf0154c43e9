"""CodebookLayer speed and memory against the bare score product + top-k.

The bare ``bmm + topk`` on the same shapes is the floor any codebook must pay; the
ratio says what CodebookLayer adds (chunking, code lookup, the straight-through
combination, the reconstruction loss). Peak memory of a large forward is measured
in a fresh subprocess (CPU: peak RSS growth; CUDA: max allocated).

    python benchmarks/codebook_layer.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from einops import rearrange

from codelens import CodebookLayer

SHAPES = [
    # name, groups (heads), d, codes, k, tokens
    ("TokFSM scale", 4, 32, 1_000, 1, 8_192),
    ("Pythia-410m scale", 16, 64, 10_000, 8, 2_048),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_times(fns: list, device: str, repeats: int) -> list[float]:
    """Median time of each function, measured interleaved so they share the machine's state."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def bench_shape(groups, d, n_codes, k, tokens, device, repeats) -> dict[str, float]:
    torch.manual_seed(0)
    layer = CodebookLayer(groups, d, n_codes, k).to(device)
    x = torch.randn(tokens, groups, d, device=device)
    codes_t = rearrange(layer.codes.detach(), "g c d -> g d c").contiguous()
    x_g = rearrange(x, "n g d -> g n d").contiguous()

    def bare():
        return torch.bmm(x_g, codes_t).topk(k, dim=-1).indices

    def forward():
        with torch.no_grad():
            return layer(x)

    x_grad = x.clone().requires_grad_(True)

    def forward_backward():
        out = layer(x_grad)
        (out.square().mean() + layer.reconstruction_loss).backward()

    t_bare, t_fwd, t_fb = _median_times([bare, forward, forward_backward], device, repeats)
    return {
        "bare_ms": 1e3 * t_bare,
        "forward_ms": 1e3 * t_fwd,
        "forward_backward_ms": 1e3 * t_fb,
        "forward_ratio": t_fwd / t_bare,
        "forward_backward_ratio": t_fb / t_bare,
    }


def _rss_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(
    device: str, tokens: int, groups: int, d: int, n_codes: int, budget_mb: float
) -> None:
    """Runs in a subprocess: print the peak memory a single forward adds."""
    layer = CodebookLayer(groups, d, n_codes, 8, memory_budget_mb=budget_mb).to(device)
    x = torch.randn(tokens, groups, d, device=device)
    with torch.no_grad():
        layer(x[:16])  # warm-up allocations
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            layer(x)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark (Linux)
            before = _rss_mb("VmRSS")
            layer(x)
            peak = _rss_mb("VmHWM") - before
    print(json.dumps({"peak_mb": peak}))


def peak_memory(
    device: str, tokens: int, groups: int, d: int, n_codes: int, budget_mb: float
) -> float:
    args = [device, tokens, groups, d, n_codes, budget_mb]
    code = f"import benchmarks.codebook_layer as b; b._peak_child(*{args!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        f"{'shape':<20}{'bare ms':>10}{'fwd ms':>10}{'fwd+bwd ms':>12}"
        f"{'fwd/bare':>10}{'fb/bare':>9}"
    )
    for name, groups, d, n_codes, k, tokens in SHAPES:
        r = bench_shape(groups, d, n_codes, k, tokens, args.device, args.repeats)
        print(
            f"{name:<20}{r['bare_ms']:>10.1f}{r['forward_ms']:>10.1f}{r['forward_backward_ms']:>12.1f}"
            f"{r['forward_ratio']:>10.2f}{r['forward_backward_ratio']:>9.2f}"
        )
    tokens, groups, d, n_codes = 16_384, 16, 64, 10_000
    full_scores_mb = tokens * groups * n_codes * 4 / 2**20
    print(
        f"\nmemory: {tokens} tokens x {groups} heads x C={n_codes} "
        f"(unchunked scores would take {full_scores_mb:,.0f} MiB)"
    )
    for budget in (1024.0, 256.0):
        peak = peak_memory(args.device, tokens, groups, d, n_codes, budget)
        verdict = "within" if peak <= budget else "OVER"
        print(
            f"  budget {budget:>6.0f} MiB: peak forward memory {peak:8.1f} MiB ({verdict} budget)"
        )


if __name__ == "__main__":
    main()
