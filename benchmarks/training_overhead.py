"""Training step time with and without codebooks, same model and data, step by step.

Runs the real training loop (`codelens.training.trainer.train`) on TokFSM data for the
same model, plain and with attention + MLP codebooks (k=1, C=1000, all weights trained).
The two runs live in two threads that take turns, one step each, so every step of one
run is timed next to a step of the other and both see the same machine (on a shared,
busy CPU, runs timed one after the other can differ by 2x). The first 10 steps of each
run are warm-up. Prints each round's median step time, the overhead ratio (time per
step, with / without) per round and its median, and the codebook usage metrics logged at
the end of the last codebook run.

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
import threading
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


class _Turns:
    """Two training loops in two threads taking turns, one step each."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.names, self.turn, self.finished = names, names[0], set()
        self.cond = threading.Condition()

    def _other(self, name: str) -> str:
        return self.names[1] if name == self.names[0] else self.names[0]

    def handover(self, name: str) -> None:
        """Give the turn to the other loop and wait for it to come back (or finish)."""
        with self.cond:
            self.turn = self._other(name)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == name or self._other(name) in self.finished)

    def finish(self, name: str) -> None:
        with self.cond:
            self.finished.add(name)
            self.turn = self._other(name)
            self.cond.notify_all()


def run_pair(steps: int, tmp: Path) -> tuple[dict[str, float], dict]:
    """Median seconds per step of the plain and the codebook run, taking turns."""
    turns = _Turns(("plain", "codebooks"))
    step_times: dict[str, list[float]] = {"plain": [], "codebooks": []}
    errors: list[BaseException] = []

    def loop(name: str, codebook: dict | None) -> None:
        started = [time.perf_counter()]

        def on_step(step: int, metrics: dict) -> None:
            step_times[name].append(time.perf_counter() - started[0])
            turns.handover(name)
            started[0] = time.perf_counter()

        try:
            train(_config(codebook, steps, tmp / name), progress=False, on_step=on_step)
        except BaseException as error:  # surfaced after both threads end
            errors.append(error)
        finally:
            turns.finish(name)

    threads = [
        threading.Thread(target=loop, args=("plain", None)),
        threading.Thread(target=loop, args=("codebooks", CODEBOOK)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    medians = {name: statistics.median(t[WARMUP_STEPS:]) for name, t in step_times.items()}
    lines = (tmp / "codebooks" / "metrics.jsonl").read_text().splitlines()
    return medians, json.loads(lines[-1])


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
            medians, metrics = run_pair(args.steps, Path(tmp) / str(round_))
            plain, coded = medians["plain"], medians["codebooks"]
            ratios.append(coded / plain)
            print(
                f"round {round_}: step without {1e3 * plain:.0f} ms, with {1e3 * coded:.0f} ms, "
                f"ratio {coded / plain:.2f}"
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
