"""Attribution graphs over codes: cost against prompt length and model size, and quality
on a trained TokFSM model. One CPU thread throughout.

Default: random-weight models with codebooks at every site (the TokFSM quick and full
shapes, k=1, and the stories shape, GPT-NeoX, k=8), prompts of 16 to 256 tokens. Each
graph is built in a forked child, which reports its wall time and the rise of its peak
resident memory over its memory at the fork (Linux ``ru_maxrss``).

``--run DIR``: a trained TokFSM codebook model (``codelens fsm`` writes them, e.g.
runs/tokfsm-quick/attn-mlp-k-1-C-200-800/final) and its FSM settings: per prompt, the
worst relative error of the graph's rebuilt logits and scores, the Spearman between
predicted and measured single-code removal effects over the top-50 nodes (also over the
removals that flipped no selection), and the time of a 32-token prompt's graph.

    python benchmarks/attribution.py [--lengths 16 32 64 128 256] [--sizes quick full stories]
    python benchmarks/attribution.py --run DIR --n-states 20 --n-successors 4 [--prompts 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from codelens import CodebookConfig, HookedCodebookTransformer
from codelens.circuits.attribution import attribution_graph, validate_graph

SIZES = {
    "quick": (
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 256},
        CodebookConfig(n_codes=200, mlp_n_codes=800, k=1),
    ),
    "full": (
        {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 512},
        CodebookConfig(n_codes=1000, mlp_n_codes=4000, k=1),
    ),
    "stories": (
        {
            "model_type": "gpt_neox",
            "hidden_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 512,
        },
        CodebookConfig(n_codes=1024, mlp_n_codes=4096, k=8),
    ),
}


def _tokenizer():
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import digit_tokenizer

    return digit_tokenizer()


def _random_model(size: str, n_ctx: int) -> HookedCodebookTransformer:
    config, codebook = SIZES[size]
    positions = "n_positions" if config["model_type"] == "gpt2" else "max_position_embeddings"
    config = {**config, positions: n_ctx, "vocab_size": 13}
    return HookedCodebookTransformer.from_config(config, _tokenizer(), codebook, seed=0)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _in_child(work) -> tuple[float, float]:
    """Run ``work()`` in a forked child: (seconds, peak RSS rise in MiB)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        start_rss = _rss_mib()
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(write, f"{seconds} {peak - start_rss}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    seconds, rise = map(float, text.split())
    return seconds, rise


def cost(sizes: list[str], lengths: list[int]) -> None:
    print("model    layers d_model  k  tokens  nodes   seconds  peak RSS rise MiB")
    for size in sizes:
        model = _random_model(size, max(lengths))
        gen = torch.Generator().manual_seed(0)
        attribution_graph(model, torch.arange(4))  # warm up the code paths
        for length in lengths:
            tokens = torch.randint(0, 10, (length,), generator=gen)
            seconds, rise = _in_child(lambda m=model, t=tokens: attribution_graph(m, t))
            cb = next(iter(model.codebooks.values()))
            n_nodes = length * sum(c.n_groups * c.k for c in model.codebooks.values())
            print(
                f"{size:8s} {model.cfg.n_layers:6d} {model.cfg.d_model:7d} {cb.k:2d} "
                f"{length:7d} {n_nodes + length:6d} {seconds:9.2f} {rise:18.1f}",
                flush=True,
            )


def quality(run: str, n_states: int, n_successors: int, n_prompts: int, top_n: int) -> None:
    from codelens.data.fsm import FSMConfig, TokFSM

    model = HookedCodebookTransformer.from_pretrained(run)
    fsm = TokFSM(FSMConfig(n_states=n_states, n_successors=n_successors, seq_len=33, seed=42))
    tokens, _ = fsm.sample(n_prompts, generator=torch.Generator().manual_seed(0))
    errors, rhos, held, direct, unflipped, flipped, times = [], [], [], [], [], [], []
    for row in tokens:
        prompt = row[:32]
        start = time.perf_counter()
        graph = attribution_graph(model, prompt)
        times.append(time.perf_counter() - start)
        errors.append(float(graph.reconstruction_error().max()))
        check = validate_graph(model, graph, top_n=top_n)
        rhos.append(check.spearman)
        held.append(check.spearman_held)
        direct.append(int((check.predicted != 0).sum()))
        if check.spearman_unflipped is not None:
            unflipped.append(check.spearman_unflipped)
        flipped.append(check.flipped_runs / len(check.nodes))
        print(
            f"prompt: {graph.n_nodes} nodes, {times[-1]:.2f} s, max rel error {errors[-1]:.2e}, "
            f"Spearman {check.spearman:.3f}, removals that flipped a selection "
            f"{check.flipped_runs}/{len(check.nodes)}, Spearman without them "
            f"{check.spearman_unflipped}, with selections held {check.spearman_held:.3f}, "
            f"nodes with a direct edge to the logit {direct[-1]}",
            flush=True,
        )
    print(
        f"\n{run}: {n_prompts} prompts of 32 tokens, top {top_n} nodes\n"
        f"  max relative reconstruction error {max(errors):.2e}\n"
        f"  Spearman median {statistics.median(rhos):.3f} (min {min(rhos):.3f}, "
        f"max {max(rhos):.3f})\n"
        f"  Spearman with every other selection held: median {statistics.median(held):.3f} "
        f"(min {min(held):.3f})\n"
        f"  top nodes with a direct edge to the logit (a non-zero prediction): median "
        f"{statistics.median(direct)}\n"
        f"  share of removals that flipped a selection: median {statistics.median(flipped):.2f}\n"
        f"  Spearman over removals without flips: median "
        f"{statistics.median(unflipped) if unflipped else float('nan'):.3f} "
        f"({len(unflipped)} prompts with at least 3 such removals)\n"
        f"  graph time: median {statistics.median(times):.2f} s, max {max(times):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--run", help="a trained TokFSM codebook model directory")
    parser.add_argument("--n-states", type=int, default=20)
    parser.add_argument("--n-successors", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--top-n", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.run:
        quality(args.run, args.n_states, args.n_successors, args.prompts, args.top_n)
    else:
        cost(args.sizes, args.lengths)


if __name__ == "__main__":
    main()
