"""CodebookLayer speed and memory against the bare score product + top-k.

The limit is what any top-k codebook must pay: the batched score product and top-k into
preallocated buffers, on the same shapes. Two tables:

- training (the shapes of issue 18): ``CodebookLayer(similarity="dot", layer_norm=True)``
  in training mode on an input that requires grad; forward, and forward + backward (a
  downstream gradient on the output plus the reconstruction loss). Every round runs each
  shape in a fresh process that times limit, forward and forward + backward interleaved;
  the tables give medians over all rounds and repeats, and ratios of those medians.
  The original codebook-features layer needs TransformerLens 1.7 and cannot be installed
  next to codelens, so its column is issue 18's recorded ratio (orig / limit, measured
  the same way on 2026-12-02), not a measurement of this run.
- inference: the no-grad forward on two shapes, same interleaving, one process.

Peak memory of a large forward is measured in a fresh subprocess (CPU: peak RSS growth;
CUDA: max allocated).

    python benchmarks/codebook_layer.py [--device cuda] [--threads 2] [--rounds 3] [--repeats 5]
    python benchmarks/codebook_layer.py --profile fsm_attn --threads 1   # ops of one shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from einops import rearrange

from codelens import CodebookLayer

ROOT = Path(__file__).resolve().parents[1]

TRAINING_SHAPES = {
    # name: groups, d, codes, k, tokens
    "fsm_attn": (4, 32, 1_000, 1, 8_192),
    "fsm_mlp": (1, 128, 1_000, 1, 8_192),
    "fsm_attn10k": (4, 32, 10_000, 1, 8_192),
    "lm_attn": (16, 64, 10_000, 8, 2_048),
    "lm_mlp": (1, 1024, 10_000, 8, 2_048),
}
# issue 18, original codebook-features 0.1.2 layer: (forward / limit, forward+backward / limit)
ORIGINAL_RATIOS = {
    "fsm_attn": (111.7 / 60.8, 165.8 / 60.8),
    "fsm_mlp": (38.8 / 23.1, 60.9 / 23.1),
    "fsm_attn10k": (1964.4 / 698.3, 1861.7 / 698.3),
    "lm_attn": (2356.6 / 1000.8, 2472.7 / 1000.8),
    "lm_mlp": (381.6 / 260.4, 519.0 / 260.4),
}
INFERENCE_SHAPES = [
    ("TokFSM scale", 4, 32, 1_000, 1, 8_192),
    ("Pythia-410m scale", 16, 64, 10_000, 8, 2_048),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved_times(fns: list, device: str, repeats: int) -> list[list[float]]:
    """Seconds of each function per repeat, measured round robin so they share the
    machine's state (one warm-up call each first)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return times


def _limit(x: torch.Tensor, layer: CodebookLayer):
    """The bare batched product + top-k into preallocated buffers."""
    weight = rearrange(layer.codes.detach(), "g c d -> g d c").contiguous()
    grouped = rearrange(x.detach(), "n g d -> g n d").contiguous()
    n = grouped.shape[1]
    scores = torch.empty(layer.n_groups, n, layer.n_codes, device=x.device)
    values = torch.empty(layer.n_groups, n, layer.k, device=x.device)
    ids = torch.empty(layer.n_groups, n, layer.k, dtype=torch.long, device=x.device)

    def limit() -> None:
        torch.bmm(grouped, weight, out=scores)
        torch.topk(scores, layer.k, dim=-1, out=(values, ids))

    return limit


def _training_case(name: str, device: str, threads: int):
    """One shape's layer in training mode, its input, and its forward + backward."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    groups, d, n_codes, k, tokens = TRAINING_SHAPES[name]
    layer = CodebookLayer(groups, d, n_codes, k, similarity="dot", layer_norm=True)
    layer = layer.to(device).train()
    x = torch.randn(tokens, groups, d, device=device, requires_grad=True)
    upstream = torch.randn(tokens, groups, d, device=device)

    def forward_backward() -> None:
        out = layer(x)
        torch.autograd.backward([out, layer.reconstruction_loss], [upstream, None])
        x.grad = layer.codes.grad = None

    return layer, x, forward_backward


def _training_child(name: str, device: str, threads: int, repeats: int) -> None:
    """Runs in a fresh process: per-repeat ms of limit, forward, forward+backward."""
    layer, x, forward_backward = _training_case(name, device, threads)

    def forward() -> None:
        layer(x)

    times = _interleaved_times([_limit(x, layer), forward, forward_backward], device, repeats)
    keys = ("limit", "forward", "forward_backward")
    print(json.dumps({key: [1e3 * t for t in ts] for key, ts in zip(keys, times, strict=True)}))


def profile_shape(name: str, device: str, threads: int, calls: int = 10) -> None:
    """Self time per call of every op in the training forward and forward + backward of
    one shape (torch.profiler): what the layer spends beyond the limit's product + top-k."""
    from torch.profiler import ProfilerActivity, profile

    layer, x, forward_backward = _training_case(name, device, threads)
    forward_backward()  # warm-up
    for label, run in (("forward", lambda: layer(x)), ("forward+backward", forward_backward)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / calls
        print(f"\n{name} {label}, threads={threads}: self CPU {total:.1f} ms per call")
        print(f"{'op':<48}{'ms/call':>9}{'calls/call':>12}")
        for event in events[:15]:
            ms = event.self_cpu_time_total / 1e3 / calls
            print(f"{event.key[:47]:<48}{ms:>9.2f}{event.count / calls:>12.1f}")


def _run_child(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_table(device: str, threads: int, rounds: int, repeats: int) -> None:
    samples = {
        name: {"limit": [], "forward": [], "forward_backward": []} for name in TRAINING_SHAPES
    }
    for _ in range(rounds):
        for name in TRAINING_SHAPES:
            args = [name, device, threads, repeats]
            code = f"import benchmarks.codebook_layer as b; b._training_child(*{args!r})"
            for key, values in _run_child(code).items():
                samples[name][key] += values
    print(
        f"\ntraining: similarity=dot, layer_norm=True, x.requires_grad; medians of {rounds} "
        f"rounds x {repeats} repeats (ms); orig = issue 18's recorded ratios, not re-measured"
    )
    header = (
        f"{'case':<12}{'limit':>9}{'fwd':>9}{'fwd+bwd':>9}{'fwd/lim':>9}{'fb/lim':>8}"
        f"{'orig fwd/lim':>14}{'orig fb/lim':>13}{'fwd target':>12}{'fb target':>11}"
    )
    print(header)
    for name, times in samples.items():
        limit, fwd, fb = (statistics.median(times[k]) for k in times)
        orig_fwd, orig_fb = ORIGINAL_RATIOS[name]
        r_fwd, r_fb = fwd / limit, fb / limit
        ok_fwd = "ok" if r_fwd <= 1.3 and r_fwd < orig_fwd else "MISSED"
        ok_fb = "ok" if r_fb <= 1.6 and r_fb < orig_fb else "MISSED"
        print(
            f"{name:<12}{limit:>9.1f}{fwd:>9.1f}{fb:>9.1f}{r_fwd:>9.2f}{r_fb:>8.2f}"
            f"{orig_fwd:>14.2f}{orig_fb:>13.2f}{ok_fwd:>12}{ok_fb:>11}"
        )
    print("targets: fwd/limit <= 1.3, fwd+bwd/limit <= 1.6, and below the original's ratio")


def inference_table(device: str, repeats: int) -> None:
    print(f"\ninference (no-grad forward, similarity=cosine), medians of {repeats} repeats")
    print(f"{'shape':<20}{'limit ms':>10}{'fwd ms':>10}{'fwd/limit':>11}")
    for name, groups, d, n_codes, k, tokens in INFERENCE_SHAPES:
        torch.manual_seed(0)
        layer = CodebookLayer(groups, d, n_codes, k).to(device)
        x = torch.randn(tokens, groups, d, device=device)

        def forward(layer=layer, x=x) -> None:
            with torch.no_grad():
                layer(x)

        times = _interleaved_times([_limit(x, layer), forward], device, repeats)
        limit, fwd = (statistics.median(t) for t in times)
        print(f"{name:<20}{1e3 * limit:>10.1f}{1e3 * fwd:>10.1f}{fwd / limit:>11.2f}")


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
    return _run_child(f"import benchmarks.codebook_layer as b; b._peak_child(*{args!r})")["peak_mb"]


def memory_table(device: str) -> None:
    tokens, groups, d, n_codes = 16_384, 16, 64, 10_000
    full_scores_mb = tokens * groups * n_codes * 4 / 2**20
    print(
        f"\nmemory: {tokens} tokens x {groups} heads x C={n_codes} "
        f"(unchunked scores would take {full_scores_mb:,.0f} MiB)"
    )
    for budget in (1024.0, 256.0):
        peak = peak_memory(device, tokens, groups, d, n_codes, budget)
        verdict = "within" if peak <= budget else "OVER"
        print(
            f"  budget {budget:>6.0f} MiB: peak forward memory {peak:8.1f} MiB ({verdict} budget)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("training", "inference", "memory"), default=None)
    parser.add_argument("--profile", choices=tuple(TRAINING_SHAPES), default=None)
    args = parser.parse_args()
    if args.profile:
        profile_shape(args.profile, args.device, args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={args.threads}")
    if args.only in (None, "training"):
        training_table(args.device, args.threads, args.rounds, args.repeats)
    if args.only in (None, "inference"):
        inference_table(args.device, args.repeats)
    if args.only in (None, "memory"):
        memory_table(args.device)


if __name__ == "__main__":
    main()
