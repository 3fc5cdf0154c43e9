"""Circuits at a target faithfulness on trained models: edges kept, share of the graph,
faithfulness reached and forwards, per level and ranking, measured in one run.

    python benchmarks/target_faithfulness.py --tokfsm RUN --stories RUN [--train]

``--tokfsm RUN``: a `codelens fsm` run (its codebook model's directory, e.g.
``runs/tokfsm-quick``, is found inside it); ``--stories RUN``: a `codelens steer` run.
With ``--train``, a run directory that holds no model yet gets the training stages of
the QUICK preset only (``codelens fsm --quick`` / ``codelens steer --quick`` without
their analyses, which a shared CPU cannot afford): baseline, then codebooks. For
comparison each row also gives the faithfulness of the same ranking cut at ``tau``
(the circuit ``eap`` / ``eap_ig`` select, as ``codelens circuit`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from codelens.circuits import Patcher, active_codes, build_graph, faithfulness, find_circuit
from codelens.circuits.methods import eap
from codelens.files import atomic_write_json


def _train_tokfsm(run: Path) -> Path:
    from codelens.experiments.tokfsm import QUICK, _train_stage

    exp = QUICK.with_run_dir(str(run))
    base = _train_stage(exp, "baseline", exp.baseline, None)
    ((name, settings),) = exp.codebook_models.items()
    return _train_stage(exp, name, settings, str(base.run_dir / "final")).run_dir


def _train_stories(run: Path) -> None:
    from codelens.data.stories import generate_stories, write_corpus
    from codelens.data.text import train_bpe_tokenizer
    from codelens.experiments.steering import QUICK, _train_stage

    exp = QUICK.with_run_dir(str(run))
    write_corpus(run / "corpus.jsonl", exp.n_stories, seed=exp.seed)
    texts = [s.text for s in generate_stories(exp.n_stories, seed=exp.seed)]
    train_bpe_tokenizer(texts, exp.vocab_size, save_dir=run / "tokenizer")
    _train_stage(exp, "baseline", exp.baseline, None)
    _train_stage(exp, "codebooks", exp.codebook_stage, str(run / "baseline" / "final"))
    atomic_write_json(
        run / "report.json",
        {"experiment": dataclasses.asdict(exp), "stages": "training only (this script)"},
    )


def _tokfsm_task(run: Path, train: bool):
    from codelens.data.fsm import FSMConfig, TokFSM
    from codelens.experiments.circuit_tasks import fsm_next_state_task
    from codelens.model import HookedCodebookTransformer

    found = sorted(run.glob("*k-1*/final"))
    if not found and train:
        found = [_train_tokfsm(run) / "final"]
    if not found:
        raise SystemExit(f"{run} holds no TokFSM codebook model (pass --train to train one)")
    stage = found[0].parent
    fsm = json.loads((stage / "config.json").read_text())["data"]["fsm"]
    model = HookedCodebookTransformer.from_pretrained(stage / "final")
    return stage, model, fsm_next_state_task(TokFSM(FSMConfig(**fsm)), 64), 0.02


def _stories_task(run: Path, train: bool):
    from codelens.data.text import load_tokenizer
    from codelens.experiments.steering import SteeringExperiment, topic_task
    from codelens.model import HookedCodebookTransformer

    if not (run / "codebooks" / "final").is_dir():
        if not train:
            raise SystemExit(f"{run} holds no steering model (pass --train to train one)")
        _train_stories(run)
    exp = SteeringExperiment(**json.loads((run / "report.json").read_text())["experiment"])
    model = HookedCodebookTransformer.from_pretrained(run / "codebooks" / "final")
    return run, model, topic_task(load_tokenizer(run / "tokenizer"), exp), exp.circuit_tau


def measure(model, task, tau: float, target: float, steps: int) -> list[str]:
    rows = []
    for level in ("components", "codes"):
        for method in ("eap", "eap-ig"):
            circuit = find_circuit(model, task, level, method, target, steps=steps)
            s = circuit.settings
            # the same ranking cut at tau instead (fresh graph and patcher, not timed)
            active = active_codes(model, task.clean, task.corrupted) if level == "codes" else None
            patcher = Patcher(
                model, build_graph(model, level, active), task.clean, corrupted=task.corrupted
            )
            at_tau = eap(patcher, task.metric, tau=tau, steps=1 if method == "eap" else steps)
            rows.append(
                f"| {level} | {method} | {s['n_edges']} | {s['graph_edges']:,} "
                f"| {100 * s['n_edges'] / s['graph_edges']:.2f}% | {s['faithfulness']:.3f} "
                f"| {len(s['search']) - 1} | {circuit.forwards} (+{circuit.backwards}) "
                f"| {circuit.seconds:.1f} | {len(at_tau.edges)} "
                f"| {faithfulness(patcher, at_tau, task.metric):.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokfsm", type=Path, help="a codelens fsm run directory")
    parser.add_argument("--stories", type=Path, help="a codelens steer run directory")
    parser.add_argument("--train", action="store_true", help="train a missing model (QUICK)")
    parser.add_argument("--faithfulness", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, run, build in (
        ("TokFSM", args.tokfsm, _tokfsm_task),
        ("stories", args.stories, _stories_task),
    ):
        if run is None:
            continue
        started = time.perf_counter()
        stage, model, task, tau = build(run, args.train)
        print(f"\n{name}: {stage}, {task.name}, {task.clean.shape[0]} pairs, tau {tau}")
        print(
            f"| level | ranking | edges kept | graph edges | share | faithfulness "
            f"(target {args.faithfulness:g}) | sizes tried | forwards (+bwd) | seconds "
            "| edges at tau | faithfulness at tau |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        measure(model, task, tau, args.faithfulness, args.steps)
        print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
