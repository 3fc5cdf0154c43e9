"""How path-dependent exhaustive ACDC is on one graph: a reference for edge overlap.

Reads an ACDC circuit saved by ``codelens circuit`` (its per-edge scores are the damage
increases ACDC measured on its path, so its whole path can be replayed without a forward)
and reports how many of its decisions lie within a small margin of tau. ``--flip F``
replays ACDC to the decision closest to tau among the 1000 that follow the fraction ``F``
of its edge order, flips that one decision, and continues exhaustively; ``--taus`` reruns
exhaustive ACDC at other thresholds. Each prints the Jaccard overlap with the saved run.

    python benchmarks/acdc_stability.py --run RUN_DIR \
        --acdc RUN_DIR/circuits/circuits/codes-acdc.json \
        [--flip 0,0.5] [--taus 0.019,0.021] [--pairs 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from codelens.circuits import Circuit, Patcher, acdc, active_codes, build_graph
from codelens.circuits.methods import _Damage, _edge_order


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a TokFSM training run directory")
    parser.add_argument("--acdc", required=True, help="an ACDC circuit JSON of that run")
    parser.add_argument("--flip", default="", help="comma-separated fractions of the order")
    parser.add_argument("--taus", default="", help="comma-separated thresholds to rerun at")
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from codelens.data.fsm import FSMConfig, TokFSM
    from codelens.experiments.circuit_tasks import fsm_next_state_task
    from codelens.model import HookedCodebookTransformer

    reference = Circuit.load(args.acdc)
    if reference.method != "acdc":
        raise SystemExit(f"{args.acdc} is a {reference.method} circuit, not ACDC's")
    tau = float(reference.settings["tau"])
    run = Path(args.run)
    fsm = TokFSM(FSMConfig(**json.loads((run / "config.json").read_text())["data"]["fsm"]))
    model = HookedCodebookTransformer.from_pretrained(run / "final")
    task = fsm_next_state_task(fsm, args.pairs)
    active = active_codes(model, task.clean, task.corrupted)
    graph = build_graph(model, reference.level, active if reference.level == "codes" else None)
    if set(reference.scores) != set(graph.edge_index()):
        raise SystemExit(f"{args.acdc} was not found on this run's {reference.level} graph")
    patcher = Patcher(model, graph, task.clean, corrupted=task.corrupted)
    names = {rs: name for name, rs in graph.edge_index().items()}
    order = _edge_order(patcher)
    score = torch.tensor([reference.scores[names[e]] for e in order])
    kept = set(reference.edges)

    margin = (score - tau).abs() / tau
    print(f"ACDC ({reference.level}, tau {tau}): {len(kept)} of {len(order)} edges kept")
    for m in (0.05, 0.1, 0.25, 0.5):
        near = margin < m
        print(
            f"  decisions within {m:.0%} of tau: {int(near.sum())} "
            f"({int((near & (score >= tau)).sum())} of them kept)"
        )
    print(f"  kept edges' median increase: {float(score[score >= tau].median()) / tau:.2f} tau")

    damage = _Damage(patcher, task.metric)

    def from_position(i: int, flip: bool) -> tuple[set[str], int]:
        mask, expected = patcher.empty_mask(), 0.0
        for e, s in zip(order[:i], score[:i].tolist(), strict=True):
            if s < tau:
                mask[e], expected = 1.0, expected + s
        current = damage(mask)
        if abs(current - expected) > 1e-4:
            raise SystemExit("replaying the saved scores does not reproduce ACDC's path")
        forwards = patcher.forwards
        if (float(score[i]) < tau) != flip:
            mask[order[i]] = 1.0
            current = damage(mask)
        for e in order[i + 1 :]:
            mask[e] = 1.0
            new = damage(mask)
            if new - current < tau:
                current = new
            else:
                mask[e] = 0.0
        return {names[e] for e in order if mask[e] == 0}, patcher.forwards - forwards

    for fraction in [float(f) for f in args.flip.split(",") if f]:
        start = int(fraction * len(order))
        i = start + int(margin[start : start + 1000].argmin())
        began = time.perf_counter()
        edges, forwards = from_position(i, flip=True)
        r, s = order[i]
        print(
            f"flip decision {i} ({graph.senders[s]}->{graph.receivers[r]}, increase "
            f"{float(score[i]):.4f}): {len(edges)} edges, Jaccard {jaccard(edges, kept):.3f} "
            f"({forwards} forwards, {time.perf_counter() - began:.0f}s)"
        )
    for other in [float(t) for t in args.taus.split(",") if t]:
        circuit = acdc(patcher, task.metric, other)
        print(
            f"tau {other}: {len(circuit.edges)} edges, Jaccard "
            f"{jaccard(set(circuit.edges), kept):.3f} ({circuit.forwards} forwards, "
            f"{circuit.seconds:.0f}s)"
        )


if __name__ == "__main__":
    main()
