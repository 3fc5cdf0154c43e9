"""Evaluation and k-means initialisation shared over ranks: rows per rank, time, agreement.

Runs `codelens.training.trainer.evaluate` (a GPT-NeoX with attention and MLP codebooks,
``--batches`` batches of ``--rows`` x ``--seq`` tokens) and `codelens.training.init.kmeans`
(``--groups`` x ``--samples`` samples of width ``--width``, ``--codes`` clusters) in 1
process and in 2 gloo processes (torchrun, 1 thread each; each rank takes half the rows
and half the samples). Both launches pay the same start-up; each rank times its own
calls after a warm-up evaluation. Prints the rows each rank evaluated, the slowest
rank's seconds, and the largest difference from 1 process (evaluation figures, relative;
centroids, absolute).

    python benchmarks/sharded_eval_kmeans.py [--dtype float32] [--rows 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NEOX = {
    "model_type": "gpt_neox",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 256,
    "vocab_size": 2048,
}


def measure(args: argparse.Namespace, out: Path) -> None:
    """One rank's (or the single process's) timed evaluation and k-means."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import digit_tokenizer

    from codelens import CodebookConfig
    from codelens.model import HookedCodebookTransformer
    from codelens.training.init import kmeans
    from codelens.training.parallel import Ranks
    from codelens.training.trainer import evaluate

    ranks = Ranks()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        ranks = Ranks(dist.get_rank(), dist.get_world_size())
    codebook = CodebookConfig(n_codes=256, k=4, sites=("attn", "mlp"))
    model = HookedCodebookTransformer.from_config(NEOX, digit_tokenizer(), codebook, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, NEOX["vocab_size"], (args.rows, args.seq), generator=gen)
        for _ in range(args.batches)
    ]
    seen = [0]
    hook = model.blocks[0].register_forward_pre_hook(
        lambda m, a: seen.__setitem__(0, seen[0] + len(a[0]))
    )
    evaluate(model, [batches[0][: 2 * ranks.world, :8]], ranks=ranks)  # warm-up
    seen[0] = 0
    if ranks.several:
        dist.barrier()
    start = time.perf_counter()
    figures = evaluate(model, batches, micro_batch=args.micro, ranks=ranks)
    eval_seconds = time.perf_counter() - start
    hook.remove()
    x = torch.randn(args.groups, args.samples, args.width, generator=gen)
    share = x.tensor_split(ranks.world, 1)[ranks.rank]
    if ranks.several:
        dist.barrier()
    start = time.perf_counter()
    centroids = kmeans(share, args.codes, generator=torch.Generator().manual_seed(1), ranks=ranks)
    kmeans_seconds = time.perf_counter() - start
    report = {
        "eval_rows": seen[0] // 2,  # two forwards per row: with and without codebooks
        "eval_seconds": eval_seconds,
        "kmeans_samples": share.shape[1],
        "kmeans_seconds": kmeans_seconds,
        "figures": figures,
    }
    (out / f"report-{ranks.world}-{ranks.rank}.json").write_text(json.dumps(report))
    save_file(
        {"centroids": centroids}, str(out / f"centroids-{ranks.world}-{ranks.rank}.safetensors")
    )
    if ranks.several:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, out: Path, world: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
    cmd += [f"--master_port={port}", __file__, "--worker", str(out), *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32768)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.worker:
        measure(args, Path(args.worker))
        return
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for world in (1, 2):
            launch(args, out, world)
        reports = {
            w: [json.loads((out / f"report-{w}-{r}.json").read_text()) for r in range(w)]
            for w in (1, 2)
        }
        one = reports[1][0]
        print(
            f"{args.dtype}: evaluation of {args.batches} x {args.rows} x {args.seq} tokens "
            f"(micro-batch {args.micro}); k-means of {args.groups} x {args.samples} x "
            f"{args.width} samples into {args.codes} clusters; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        for w, ranks in reports.items():
            slowest_eval = max(r["eval_seconds"] for r in ranks)
            slowest_kmeans = max(r["kmeans_seconds"] for r in ranks)
            worst = max(
                abs(r["figures"][k] - v) / max(1.0, abs(v))
                for r in ranks
                for k, v in one["figures"].items()
            )
            centroids = [
                load_file(out / f"centroids-{w}-{r}.safetensors")["centroids"] for r in range(w)
            ]
            base = load_file(out / "centroids-1-0.safetensors")["centroids"]
            apart = max(float((c - base).abs().max()) for c in centroids)
            print(
                f"  {w} process(es): eval rows per rank {[r['eval_rows'] for r in ranks]}, "
                f"{slowest_eval:.2f} s ({one['eval_seconds'] / slowest_eval:.2f}x); k-means "
                f"samples per rank {[r['kmeans_samples'] for r in ranks]}, {slowest_kmeans:.2f} s "
                f"({one['kmeans_seconds'] / slowest_kmeans:.2f}x); vs 1 process: figures "
                f"{worst:.1e}, centroids {apart:.1e}"
            )


if __name__ == "__main__":
    main()
