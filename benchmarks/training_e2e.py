"""End-to-end training: tokens/s and peak memory with and without codebooks.

Runs the real training loop (`codelens.training.trainer.train`) for the same model and
data, plain and with codebooks, each run in a fresh child process (so its peak memory is
its own: peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). The two
runs take turns, one step each (each process waits while the other steps), so both see
the same machine; the first ``--warmup`` steps of each run are untimed.
Prints, per setting, the median tokens/s, the peak memory, and the step-time ratio
(with / without; target <= 1.5).

Settings on the CPU (the default run):
- ``tokfsm``: the TokFSM experiment (`codelens.experiments.tokfsm.FULL`: GPT-2 shape,
  4 layers, d=128, batch 64 x 33, attention + MLP codebooks k=1, C=1000/4000), at 1 and
  2 threads;
- ``pythia-cpu``: a Pythia-style model scaled to this CPU (GPT-NeoX, 4 layers, d=256,
  4 heads of 64, seq 256, batch 4; attention codebooks per head, C=2500, k=8), 1 thread.

``--pythia-410m`` (for a GPU): the Pythia-410M shape (24 layers, d=1024, 16 heads,
vocab 50304, random weights), seq 1024, attention codebooks C=10000, k=8, bf16 autocast,
batch ``--batch`` (default 8).

    python benchmarks/training_e2e.py [--steps 5] [--warmup 2] [--rounds 1] [--only NAME]
    python benchmarks/training_e2e.py --pythia-410m [--batch 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from codelens.experiments.tokfsm import FULL

PYTHIA_CPU = {
    "model_type": "gpt_neox",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 256,
    "vocab_size": 4096,
}
PYTHIA_410M = {
    "model_type": "gpt_neox",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 2048,
    "vocab_size": 50304,
}


def settings(pythia_410m: bool, batch: int) -> list[dict[str, Any]]:
    """The benchmarked settings: name, threads, model, data and codebooks of each."""
    fsm_long = {"n_states": 100, "n_successors": 10, "seed": 42}
    if pythia_410m:
        return [
            {
                "name": "pythia-410m",
                "threads": None,
                "model_config": PYTHIA_410M,
                "fsm": fsm_long | {"seq_len": 1024},
                "batch_size": batch,
                "codebook": {"n_codes": 10_000, "k": 8, "sites": ["attn"]},
                "bf16": True,
            }
        ]
    tokfsm = {
        "model_config": FULL.model,
        "fsm": FULL.fsm,
        "batch_size": 64,
        "codebook": {"n_codes": 1000, "mlp_n_codes": 4000, "k": 1},
        "bf16": False,
    }
    return [
        {"name": "tokfsm", "threads": 1} | tokfsm,
        {"name": "tokfsm", "threads": 2} | tokfsm,
        {
            "name": "pythia-cpu",
            "threads": 1,
            "model_config": PYTHIA_CPU,
            "fsm": fsm_long | {"seq_len": 256},
            "batch_size": 4,
            "codebook": {"n_codes": 2500, "k": 8, "sites": ["attn"]},
            "bf16": False,
        },
    ]


def child(setting: dict[str, Any], with_codebooks: bool, steps: int, warmup: int) -> dict:
    """One training run in this process: median seconds per step and peak memory."""
    from codelens.training.config import TrainConfig
    from codelens.training.trainer import train

    if setting["threads"]:
        torch.set_num_threads(setting["threads"])
    cuda = torch.cuda.is_available()
    times: list[float] = []
    last = [0.0]

    def on_step(step: int, metrics: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        if step == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        print("step", flush=True)  # then wait for the other run's step (see `run_pair`)
        sys.stdin.readline()
        last[0] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            run_dir=tmp,
            data={"fsm": setting["fsm"]},
            model_config=setting["model_config"],
            codebook=setting["codebook"] if with_codebooks else None,
            steps=warmup + steps,
            batch_size=setting["batch_size"],
            lr=1e-4,
            warmup_steps=1,
            eval_every=0,
            eval_batches=1,
            log_every=warmup + steps,
            checkpoint_every=0,
            init="random",
            bf16=setting["bf16"],
        )
        last[0] = time.perf_counter()
        train(config, progress=False, on_step=on_step)
    step = statistics.median(times[warmup:])
    tokens = setting["batch_size"] * setting["fsm"]["seq_len"]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"step_s": step, "tokens_per_s": tokens / step, "peak_mb": peak}


def run_pair(setting: dict, steps: int, warmup: int) -> tuple[dict, dict]:
    """The plain and the codebook run, in two child processes taking turns step by step
    (each waits while the other runs a step), so both see the same machine."""
    env = dict(os.environ, OMP_NUM_THREADS=str(setting["threads"] or ""))
    if not setting["threads"]:
        env.pop("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory() as logs:
        procs, errs = [], []
        for with_codebooks in (False, True):
            payload = json.dumps([setting, with_codebooks, steps, warmup])
            err = open(Path(logs) / f"{with_codebooks}.err", "w")  # noqa: SIM115
            errs.append(err)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--child", payload],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )
        try:
            results: list[dict | None] = [_next(p, logs, i) for i, p in enumerate(procs)]
            while any(r is None for r in results):
                for i, proc in enumerate(procs):
                    if results[i] is None:
                        proc.stdin.write("go\n")
                        proc.stdin.flush()
                        results[i] = _next(proc, logs, i)
        except BaseException:
            for proc in procs:  # the two children this call started
                proc.kill()
            raise
        finally:
            for proc, err in zip(procs, errs, strict=True):
                proc.wait()
                err.close()
    return results[0], results[1]


def _next(proc: subprocess.Popen, logs: str, index: int) -> dict | None:
    """None when the child finished a step, its result when it finished the run."""
    for line in proc.stdout:
        if line.strip() == "step":
            return None
        if line.startswith("{"):
            return json.loads(line)
    error = (Path(logs) / f"{bool(index)}.err").read_text()
    raise RuntimeError(f"child run failed:\n{error[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs per setting")
    parser.add_argument("--pythia-410m", action="store_true", help="the GPU setting")
    parser.add_argument("--batch", type=int, default=8, help="batch size of --pythia-410m")
    parser.add_argument("--only", default=None, help="run only the settings of this name")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    if args.pythia_410m and not torch.cuda.is_available():
        parser.error(
            "--pythia-410m needs a CUDA GPU (the 410M shape at seq 1024 is hours per step here)"
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    memory = "peak allocated (CUDA)" if torch.cuda.is_available() else "peak RSS of the process"
    print(f"device: {device}; {args.steps} timed steps after {args.warmup}; memory: {memory}")
    print(
        f"{'setting':<14}{'threads':>8}{'tok/s plain':>13}{'tok/s codebooks':>17}"
        f"{'MiB plain':>11}{'MiB codebooks':>15}{'step ratio':>12}"
    )
    for setting in settings(args.pythia_410m, args.batch):
        if args.only and setting["name"] != args.only:
            continue
        pairs = [run_pair(setting, args.steps, args.warmup) for _ in range(args.rounds)]
        plain, coded = [p for p, _ in pairs], [c for _, c in pairs]
        tps = [statistics.median(r["tokens_per_s"] for r in rs) for rs in (plain, coded)]
        peak = [max(r["peak_mb"] for r in rs) for rs in (plain, coded)]
        ratio = tps[0] / tps[1]
        print(
            f"{setting['name']:<14}{setting['threads'] or '-':>8}{tps[0]:>13.0f}{tps[1]:>17.0f}"
            f"{peak[0]:>11.0f}{peak[1]:>15.0f}{ratio:>11.2f}x"
            f"  ({'met' if ratio <= 1.5 else 'MISSED'} <= 1.5)"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
