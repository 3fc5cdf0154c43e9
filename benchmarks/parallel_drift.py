"""How far 2 training processes (gloo, DDP or FSDP2) end from 1 process, same config.

Trains a tiny GPT-NeoX with codebooks on TokFSM data for ``--steps`` steps in one
process, then under ``torchrun --nproc_per_node=2`` with each ``--parallel`` mode, and
prints the largest absolute difference of any final weight, and where it is. In float64
the runs take the same decisions and differ by about 1e-14; in float32 summation order
differs at about 1e-7, and a near-tie between two codes that this flips sends a code
another way (more often with a high learning rate and many revived codes).

    python benchmarks/parallel_drift.py [--dtype float32] [--lr 3e-3] [--grad-clip 1.0]
        [--dead-code-window 1000] [--n-codes 64] [--steps 20] [--parallel ddp fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from codelens.checkpoint import read_tensors
from codelens.training.config import TrainConfig
from codelens.training.trainer import train

NEOX = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


def make_config(run_dir: Path, args: argparse.Namespace, parallel: str) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir),
        data={"fsm": {"n_states": 12, "n_successors": 3, "seq_len": 24, "seed": 3}},
        model_config=NEOX,
        codebook={"n_codes": args.n_codes, "k": 1},
        steps=args.steps,
        batch_size=16,
        lr=args.lr,
        warmup_steps=3,
        grad_clip=args.grad_clip,
        dead_code_window=args.dead_code_window,
        eval_every=0,
        eval_batches=2,
        log_every=5,
        checkpoint_every=0,
        init_samples=512,
        seed=1,
        parallel=parallel,
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    return read_tensors(final / "model.safetensors") | read_tensors(final / "codebooks.safetensors")


def run_two_processes(config: TrainConfig, dtype: str) -> None:
    cfg_file = Path(config.run_dir).with_suffix(".json")
    cfg_file.write_text(json.dumps(config.to_dict()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={port}", __file__, "--worker", str(cfg_file), "--dtype", dtype]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--dead-code-window", type=int, default=1000, help="0: off")
    parser.add_argument("--n-codes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.worker:  # one rank of a torchrun launch
        train(TrainConfig.from_dict(json.loads(Path(args.worker).read_text())), progress=False)
        return
    args.grad_clip = args.grad_clip or None
    args.dead_code_window = args.dead_code_window or None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train(make_config(root / "single", args, "ddp"), progress=False)
        single = final_weights(root / "single")
        print(
            f"{args.dtype}, lr {args.lr}, grad_clip {args.grad_clip}, dead_code_window "
            f"{args.dead_code_window}, n_codes {args.n_codes}, {args.steps} steps"
        )
        for mode in args.parallel:
            run_two_processes(make_config(root / mode, args, mode), args.dtype)
            other = final_weights(root / mode)
            diff, name = max(
                (float((single[n].double() - other[n].double()).abs().max()), n) for n in single
            )
            print(f"  {mode} (2 processes) vs 1 process: max |difference| {diff:.2e} ({name})")


if __name__ == "__main__":
    main()
