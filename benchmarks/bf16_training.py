"""bf16 autocast against float32: the loss after the same training steps.

Trains a TokFSM experiment's model from scratch with attention + MLP codebooks (k=1,
all weights trained), twice from the same seed and data: in float32 and under bf16
autocast (on the CPU here, on CUDA where one is present). ``--scale quick`` (default) is
`codelens.experiments.tokfsm.QUICK` (GPT-2 shape, 2 layers, d=64, C=200/800, about
40 s a run on one thread); ``--scale full`` is ``FULL`` (4 layers, d=128, C=1000/4000,
minutes a run). Prints the training loss (mean of the
last logged interval) and the evaluation LM loss after ``--steps`` steps, and their
relative differences (target: within 2%).

    python benchmarks/bf16_training.py [--scale quick|full] [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from codelens.experiments.tokfsm import FULL, QUICK, FSMExperiment
from codelens.training.config import TrainConfig
from codelens.training.trainer import train

SCALES = {"quick": (QUICK, 200), "full": (FULL, 1000)}


def run(exp: FSMExperiment, n_codes: int, bf16: bool, steps: int, run_dir: Path):
    """The last logged training metrics, the final evaluation and the seconds taken."""
    config = TrainConfig(
        run_dir=str(run_dir),
        data={"fsm": exp.fsm},
        model_config=exp.model,
        codebook={"n_codes": n_codes, "mlp_n_codes": 4 * n_codes, "k": 1},
        steps=steps,
        batch_size=64,
        lr=3e-3,
        warmup_steps=10,
        eval_every=steps,
        eval_batches=4,
        log_every=10,
        checkpoint_every=0,
        init_samples=8192,
        bf16=bf16,
    )
    started = time.perf_counter()
    result = train(config, progress=False)
    seconds = time.perf_counter() - started
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [x for x in lines if x["split"] == "train"][-1]
    return last_train, result.final_eval, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exp, n_codes = SCALES[args.scale]
    print(
        f"TokFSM {args.scale} model {exp.model}, attn+mlp codebooks k=1 "
        f"C={n_codes}/{4 * n_codes}, {args.steps} steps, {device}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = run(exp, n_codes, False, args.steps, Path(tmp) / "fp32")
        bf16 = run(exp, n_codes, True, args.steps, Path(tmp) / "bf16")
    rows = [
        ("train loss (last 10 steps)", fp32[0]["loss"], bf16[0]["loss"]),
        ("train lm_loss (last 10 steps)", fp32[0]["lm_loss"], bf16[0]["lm_loss"]),
        ("train recon (last 10 steps)", fp32[0]["recon"], bf16[0]["recon"]),
        ("eval lm_loss", fp32[1]["lm_loss"], bf16[1]["lm_loss"]),
        ("eval lm_loss_bypassed", fp32[1]["lm_loss_bypassed"], bf16[1]["lm_loss_bypassed"]),
    ]
    print(f"{'':<32}{'fp32':>10}{'bf16':>10}{'rel. diff':>11}")
    for name, a, b in rows:
        print(f"{name:<32}{a:>10.4f}{b:>10.4f}{(b - a) / a:>+11.2%}")
    worst = max(abs(b - a) / a for _, a, b in rows[:4])
    print(
        f"largest relative difference (train loss, lm_loss, recon, eval lm_loss): {worst:.2%} "
        f"(target <= 2%: {'met' if worst <= 0.02 else 'MISSED'})"
    )
    print(f"wall time: fp32 {fp32[2]:.0f} s, bf16 {bf16[2]:.0f} s")


if __name__ == "__main__":
    main()
