"""Training steps per second with and without codebooks, same model and data, one run.

Runs the real training loop (`codelens.training.trainer.train`) on TokFSM data twice for
the same model: once plain, once with attention + MLP codebooks (k=1, C=1000, all
weights trained), and prints steps/s and the overhead ratio, plus the codebook usage
metrics logged at the end of the codebook run.

    python benchmarks/training_overhead.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from codelens.experiments.tokfsm import FULL
from codelens.training.config import TrainConfig
from codelens.training.trainer import train


def run(codebook: dict | None, steps: int, run_dir: Path) -> tuple[float, dict]:
    config = TrainConfig(
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
    times: list[float] = []
    train(config, progress=False, on_step=lambda step, m: times.append(time.perf_counter()))
    warm = times[10:]  # skip warm-up steps
    steps_per_s = (len(warm) - 1) / (warm[-1] - warm[0])
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return steps_per_s, last


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plain, _ = run(None, args.steps, Path(tmp) / "plain")
        coded, metrics = run({"n_codes": 1000, "k": 1}, args.steps, Path(tmp) / "codebooks")
    print(f"threads={args.threads} steps={args.steps} model={FULL.model['model_type']} batch=64x33")
    print(f"without codebooks: {plain:.2f} steps/s")
    print(f"with codebooks:    {coded:.2f} steps/s")
    print(f"overhead ratio (time per step, with / without): {plain / coded:.2f}")
    print("codebook usage at the end of the codebook run:")
    for key, value in sorted(metrics.items()):
        if "/" in key and key.split("/")[1] in (
            "dead_fraction",
            "perplexity",
            "perplexity_fraction",
        ):
            print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
    main()
