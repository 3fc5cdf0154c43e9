"""Circuit discovery cost: forwards, backwards and wall time per method, and the ratio
of exhaustive ACDC's to each method's, all measured in one run on the same graph.

Default: the hand-built planted model (offline, seconds). ``--run`` adds a TokFSM
training run (``codelens fsm`` writes them, e.g. runs/tokfsm-quick/attn-mlp-k-1-C-200-800).

    python benchmarks/circuits.py [--run RUN_DIR] [--level codes] [--tau 0.02] [--keep-above 8]

``--keep-above X`` adds a fast path that keeps edges with attribution >= X * tau untested.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from codelens.circuits import (
    Patcher,
    acdc,
    active_codes,
    build_graph,
    eap,
    eap_ig,
    faithfulness,
    fast_path,
)
from codelens.experiments.planted_circuit import planted_model


def bench(
    name: str,
    model,
    clean,
    corrupted,
    metric,
    level: str,
    tau: float,
    steps: int,
    keep: float | None,
) -> None:
    active = active_codes(model, clean, corrupted) if level == "codes" else None
    graph = build_graph(model, level, active)
    patcher = Patcher(model, graph, clean, corrupted=corrupted)
    print(f"\n{name}, {level}: {graph.n_edges} edges, batch {tuple(clean.shape)}, tau={tau}")
    runs = {
        "acdc (exhaustive)": acdc(patcher, metric, tau),
        "eap": eap(patcher, metric, tau=tau),
        f"eap-ig ({steps} steps)": eap_ig(patcher, metric, steps, tau=tau),
        "fast path": fast_path(patcher, metric, tau),
    }
    if keep is not None:
        runs[f"fast, keep>={keep:g}tau"] = fast_path(patcher, metric, tau, keep_above=keep * tau)
    base = runs["acdc (exhaustive)"]
    print(
        f"{'method':<22}{'edges':>7}{'fwd':>7}{'bwd':>6}{'seconds':>9}"
        f"{'fwd ratio':>11}{'time ratio':>11}{'jaccard':>9}{'faithful':>10}"
    )
    for label, c in runs.items():
        print(
            f"{label:<22}{len(c.edges):>7}{c.forwards:>7}{c.backwards:>6}{c.seconds:>9.2f}"
            f"{base.forwards / max(1, c.forwards):>10.1f}x{base.seconds / c.seconds:>10.1f}x"
            f"{c.jaccard(base):>9.3f}{faithfulness(patcher, c, metric):>10.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a TokFSM training run directory")
    parser.add_argument("--level", choices=("components", "codes"), default="codes")
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--keep-above", type=float, help="also the fast path with keep_above")
    args = parser.parse_args()
    torch.set_num_threads(1)
    planted = planted_model()
    for level in ("components", "codes"):
        bench(
            "planted model",
            planted.model,
            planted.clean,
            planted.corrupted,
            planted.metric,
            level,
            0.1,
            args.steps,
            args.keep_above,
        )
    if args.run:
        from codelens.data.fsm import FSMConfig, TokFSM
        from codelens.experiments.circuit_tasks import fsm_next_state_task
        from codelens.model import HookedCodebookTransformer

        run = Path(args.run)
        fsm = TokFSM(FSMConfig(**json.loads((run / "config.json").read_text())["data"]["fsm"]))
        model = HookedCodebookTransformer.from_pretrained(run / "final")
        task = fsm_next_state_task(fsm, args.pairs)
        bench(
            f"TokFSM {run.name}",
            model,
            task.clean,
            task.corrupted,
            task.metric,
            args.level,
            args.tau,
            args.steps,
            args.keep_above,
        )


if __name__ == "__main__":
    main()
