"""Evaluation memory: measured peak per micro-batch, and the bound it gives at paper scale.

`codelens.training.trainer.evaluate` runs each evaluation batch in forwards of
``micro_batch`` rows. Its memory above the model is then set by one micro-batch:

    per row ~ logits (T x V, kept, copied to float32, log-softmax: 3 x 4 bytes)
            + the cached inputs and outputs of every codebook site (2 x T x width x 4)
            + one layer's attention (eager: scores and pattern, H x T x T, 3 x 4 bytes)

(bytes for float32; under bf16 autocast the logits are 2 + 4 + 4 and the site inputs 2),
plus a fixed part: the codebook score chunks (at most ``memory_budget_mb``; on the CPU
at most `codelens.codebook.SCRATCH_MB` and top-k's copy).
This script measures the peak resident memory of `evaluate` on a small Pythia-shaped
model (GPT-NeoX, 2 layers, d=128, 4 heads, vocab 2048, attention codebooks C=1000, k=8)
for a batch of 64 x 1024 tokens at several micro-batch sizes, each in a fresh child
process (peak RSS minus the RSS before evaluating), and prints it beside the formula.
It then prints the formula's bound for a batch of 256 x 1024 at the Pythia-410M shape.

    python benchmarks/eval_memory.py [--rows 64] [--micro 0 16 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

SMALL = {
    "model_type": "gpt_neox",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 1024,
    "vocab_size": 2048,
}
PYTHIA_410M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
PYTHIA_410M_VOCAB = 50304
SEQ = 1024


def bytes_per_row(
    seq: int, vocab: int, width: int, sites: int, heads: int, bf16: bool = False
) -> int:
    """The formula above: evaluation memory per micro-batch row, in bytes."""
    logits = seq * vocab * ((2 if bf16 else 4) + 4 + 4)
    cached = sites * seq * width * ((2 if bf16 else 4) + 4)
    attention = 3 * heads * seq * seq * 4
    return logits + cached + attention


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(rows: int, micro: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import digit_tokenizer

    from codelens import CodebookConfig, HookedCodebookTransformer
    from codelens.training.trainer import evaluate

    torch.set_num_threads(1)
    codebook = CodebookConfig(n_codes=1000, k=8, sites=("attn",))
    model = HookedCodebookTransformer.from_config(SMALL, digit_tokenizer(), codebook, seed=0)
    tokens = torch.randint(0, SMALL["vocab_size"], (rows, SEQ), generator=torch.Generator())
    evaluate(model, [tokens[:1, :16]], 1)  # first-call set-up outside the measurement
    before = rss_mb()
    evaluate(model, [tokens], micro)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"before_mb": before, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 16, 4])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    width, layers = SMALL["hidden_size"], SMALL["num_hidden_layers"]
    heads, vocab = SMALL["num_attention_heads"], SMALL["vocab_size"]
    print(f"small Pythia shape {SMALL}, attention codebooks; batch {args.rows} x {SEQ}")
    print(f"{'micro-batch':>12}{'measured MiB':>14}{'formula MiB':>13}{'ratio':>7}")
    measured_by_rows = {}
    for micro in args.micro:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps([args.rows, micro])],
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        measured = got["peak_mb"] - got["before_mb"]
        formula = (micro or args.rows) * bytes_per_row(SEQ, vocab, width, layers, heads) / 2**20
        measured_by_rows[micro or args.rows] = measured
        print(
            f"{micro or args.rows:>12}{measured:>14.0f}{formula:>13.0f}{measured / formula:>7.2f}"
        )
    if len(measured_by_rows) >= 2:
        (small, low), *_, (large, high) = sorted(measured_by_rows.items())
        slope = (high - low) / (large - small)
        per_row = bytes_per_row(SEQ, vocab, width, layers, heads) / 2**20
        print(
            f"per row: measured {slope:.1f} MiB (between {small} and {large} rows), formula "
            f"{per_row:.1f} MiB (ratio {slope / per_row:.2f}); fixed part "
            f"{low - small * slope:.0f} MiB"
        )
    width, layers = PYTHIA_410M["hidden_size"], PYTHIA_410M["num_hidden_layers"]
    heads = PYTHIA_410M["num_attention_heads"]
    print(f"formula bound, Pythia-410M shape, batch 256 x {SEQ} (above the weights):")
    for bf16 in (False, True):
        per_row = bytes_per_row(SEQ, PYTHIA_410M_VOCAB, width, layers, heads, bf16)
        cells = ", ".join(f"micro-batch {m}: {m * per_row / 2**30:.1f} GiB" for m in (256, 16, 4))
        print(f"  {'bf16 autocast' if bf16 else 'float32'}: {cells}")


if __name__ == "__main__":
    main()
