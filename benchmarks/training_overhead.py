"""Training step time with and without codebooks, same model and data, interleaved.

Runs the real training loop (`codelens.training.trainer.train`) on TokFSM data for the
same model, plain and with attention + MLP codebooks (k=1, C=1000, all weights trained),
alternating the two for ``--rounds`` rounds; each run's first 10 steps are warm-up. Prints
steps/s per run, the overhead ratio per round (time per step, with / without) and its
median, plus the codebook usage metrics logged at the end of the last codebook run.

``--profile`` instead profiles a few steps of each run with torch.profiler and prints,
per op, the CPU time per step the codebook run spends beyond the plain one: where the
extra goes.

    python benchmarks/training_overhead.py [--steps 40] [--rounds 3] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from codelens.experiments.tokfsm import FULL
from codelens.training.config import TrainConfig
from codelens.training.trainer import train

CODEBOOK = {"n_codes": 1000, "k": 1}
WARMUP_STEPS = 10


def _config(codebook: dict | None, steps: int, run_dir: Path) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir),
        data={"fsm": FULL.fsm},
        model_config=FULL.model,
        codebook=codebook,
        steps=steps,
        batch_size=64,
        lr=1e-3,
        warmup_steps=10,
        eval_every=0,
        eval_batches=1,
        log_every=steps,
        checkpoint_every=0,
        dead_code_window=50_000 if codebook else None,
        init="random",
    )


def run(codebook: dict | None, steps: int, run_dir: Path) -> tuple[float, dict]:
    """Steps per second after warm-up, and the last logged metrics."""
    times: list[float] = []
    train(
        _config(codebook, steps, run_dir),
        progress=False,
        on_step=lambda step, m: times.append(time.perf_counter()),
    )
    warm = times[WARMUP_STEPS:]
    steps_per_s = (len(warm) - 1) / (warm[-1] - warm[0])
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return steps_per_s, last


def profiled(codebook: dict | None, run_dir: Path, active: int) -> dict[str, float]:
    """Self CPU ms per step of every op, over ``active`` profiled steps after warm-up."""
    plan = schedule(wait=WARMUP_STEPS - 2, warmup=2, active=active, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=plan) as prof:
        step: Callable = lambda *_: prof.step()  # noqa: E731
        train(_config(codebook, WARMUP_STEPS + active, run_dir), progress=False, on_step=step)
    return {e.key: e.self_cpu_time_total / 1e3 / active for e in prof.key_averages()}


def print_profile(threads: int, active: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = profiled(None, Path(tmp) / "plain", active)
        coded = profiled(CODEBOOK, Path(tmp) / "codebooks", active)
    total_plain, total_coded = sum(plain.values()), sum(coded.values())
    print(f"threads={threads}, {active} profiled steps per run (self CPU ms per step)")
    print(
        f"total: plain {total_plain:.0f}, codebooks {total_coded:.0f} "
        f"(ratio {total_coded / total_plain:.2f})"
    )
    extra = sorted(((coded.get(k, 0) - plain.get(k, 0), k) for k in plain | coded), reverse=True)
    print(f"{'op':<60}{'plain':>9}{'codebooks':>11}{'extra':>9}")
    for delta, key in extra[:20]:
        print(f"{key[:59]:<60}{plain.get(key, 0):>9.1f}{coded.get(key, 0):>11.1f}{delta:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be more than {WARMUP_STEPS + 1} (the warm-up)")
    if args.profile:
        print_profile(args.threads, active=6)
        return
    print(
        f"threads={args.threads} steps={args.steps} (first {WARMUP_STEPS} untimed) "
        f"rounds={args.rounds} model={FULL.model['model_type']} batch=64x33 codebooks={CODEBOOK}"
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            plain, _ = run(None, args.steps, Path(tmp) / f"plain{round_}")
            coded, metrics = run(CODEBOOK, args.steps, Path(tmp) / f"codebooks{round_}")
            ratios.append(plain / coded)
            print(
                f"round {round_}: without {plain:.2f} steps/s, with {coded:.2f} steps/s, "
                f"ratio {plain / coded:.2f}"
            )
    ratio = statistics.median(ratios)
    verdict = "met" if ratio <= 1.5 else "MISSED"
    print(
        f"overhead ratio (time per step, with / without), median: {ratio:.2f} "
        f"(target <= 1.5: {verdict})"
    )
    print("codebook usage at the end of the last codebook run:")
    for key, value in sorted(metrics.items()):
        if "/" in key and key.split("/")[1] in (
            "dead_fraction",
            "perplexity",
            "perplexity_fraction",
        ):
            print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
    main()
