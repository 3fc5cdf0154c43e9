"""Fused attention (SDPA) against the bridge's eager attention: peak memory and time of a
training step at long context.

The bridge recomputes attention eagerly so that ``hook_attn_scores`` and ``hook_pattern``
fire, and keeps a ``[batch, heads, T, T]`` score and pattern tensor per layer for the
backward pass. `codelens._bridge.use_sdpa` runs `scaled_dot_product_attention` instead
whenever neither hook is hooked. This script runs one forward and backward of a Pythia-shaped
GPT-NeoX (``--layers``, ``--d-model``, ``--heads``) on ``--batch`` x ``--seq`` tokens in a
fresh child process per mode, eager being forced by a no-op hook on every ``hook_pattern``,
and prints peak RSS above the loaded model, step time and their ratios, plus the largest
logit difference between the two modes.

    python benchmarks/attention_memory.py [--seq 1024] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def step(mode: str, args: argparse.Namespace) -> dict[str, float]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import digit_tokenizer

    from codelens import HookedCodebookTransformer
    from codelens.vocab import every_layer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = {
        "model_type": "gpt_neox",
        "hidden_size": args.d_model,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.d_model,
        "max_position_embeddings": args.seq,
        "vocab_size": 13,
    }
    model = HookedCodebookTransformer.from_config(config, digit_tokenizer(), seed=0)
    tokens = torch.randint(0, 10, (args.batch, args.seq))
    hooks = []
    if mode == "eager":
        hooks = [(n, lambda x, hook: x) for n in every_layer(args.layers, "attn.hook_pattern")]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
        logits.float().logsumexp(-1).mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mib": (peak - before) / 1024,
        "seconds": seconds,
        "logit0": logits[0, -1, :8].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("fused", "eager"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step(args.child, args)))
        return
    results = {}
    for mode in ("fused", "eager"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", mode],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    fused, eager = results["fused"], results["eager"]
    diff = max(abs(a - b) for a, b in zip(fused["logit0"], eager["logit0"], strict=True))
    print(
        f"GPT-NeoX {args.layers} layers, d={args.d_model}, {args.heads} heads, "
        f"{args.batch} x {args.seq} tokens, forward + backward, {args.threads} thread(s)"
    )
    for mode in ("fused", "eager"):
        r = results[mode]
        print(f"  {mode:5}: peak {r['peak_mib']:8.1f} MiB above the model, {r['seconds']:6.2f} s")
    print(
        f"  fused / eager: memory {fused['peak_mib'] / eager['peak_mib']:.2f}x, "
        f"time {fused['seconds'] / eager['seconds']:.2f}x; largest logit difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
