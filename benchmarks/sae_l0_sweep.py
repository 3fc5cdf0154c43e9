"""The SAE L0 sweep alone, on a finished `codelens fsm` run, into a new directory.

Loads the run's model without codebooks (``baseline/final``), its first codebook model
and its ``report.json`` (the codes' recall per state), then does what the pipeline's
baselines stage does for the best-L0 SAE: caches the base model's activations at the
codebook sites, trains TopK SAEs for each k of the grid at every site, scores each k by
mean state precision at the codes' recall, and retrains the best k with the full steps.
Writes ``sweep.json`` and ``sweep.md`` into ``OUT`` (which must not exist yet), and
prints per-k figures with wall and CPU seconds.

    python benchmarks/sae_l0_sweep.py RUN_DIR OUT [--ks 4 8 16] [--sweep-steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from codelens import HookedCodebookTransformer
from codelens.baselines import cache_activations
from codelens.data.fsm import FSMConfig, TokFSM
from codelens.experiments import baselines as bl
from codelens.experiments import tokfsm
from codelens.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished `codelens fsm` run directory")
    parser.add_argument("out", type=Path, help="a new directory for sweep.json and sweep.md")
    parser.add_argument("--ks", type=int, nargs="+", help="the grid (default: the pipeline's)")
    parser.add_argument("--sweep-steps", type=int, help="Adam steps per sweep point")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    report_file = args.run_dir / "report.json"
    if not report_file.is_file():
        raise SystemExit(f"{args.run_dir} has no report.json: not a finished `codelens fsm` run")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new directory")
    if args.out.resolve().is_relative_to(args.run_dir.resolve()):
        raise SystemExit("write the sweep outside the run directory")
    torch.set_num_threads(args.threads)

    report = json.loads(report_file.read_text())
    fields = {f.name for f in dataclasses.fields(tokfsm.FSMExperiment)}
    exp = tokfsm.FSMExperiment(**{k: v for k, v in report["experiment"].items() if k in fields})
    overrides = {"sweep_ks": args.ks, "sweep_steps": args.sweep_steps}
    exp.baselines = {
        **(exp.baselines or {}),
        **{k: v for k, v in overrides.items() if v is not None},
    }
    first = next(name for name in exp.codebook_models)
    started = time.perf_counter()
    base = HookedCodebookTransformer.from_pretrained(args.run_dir / "baseline" / "final")
    coded = HookedCodebookTransformer.from_pretrained(args.run_dir / tokfsm._slug(first) / "final")
    if base.codebooks or not coded.codebooks:
        raise SystemExit(f"{args.run_dir}: expected baseline/ without and {first} with codebooks")
    fsm = TokFSM(FSMConfig(**exp.fsm))
    data = tokfsm.baseline_data(base, coded, fsm, exp, report, first)
    loading = time.perf_counter() - started

    started = time.perf_counter()
    sites = list(coded.codebooks)
    acts = cache_activations(
        base, data.train_tokens, sites, token_mask=data.train_mask, batch_size=64
    )
    caching = time.perf_counter() - started
    cpu = time.process_time()
    best, sweep = bl.best_l0_sae(
        base,
        acts,
        data.heldout,
        data.settings,
        exp.seed,
        score=lambda features: data.state_precision(base, features),
        ce_tokens=data.tokens,
    )
    cpu = time.process_time() - cpu
    best_score = data.state_precision(base, best.features)  # after retraining, if any
    sweep_wall = sum(p.summary["seconds"] for p in sweep.points)
    result = {
        "run_dir": str(args.run_dir),
        "codebook_model": first,
        "settings": data.settings,
        "sites": sites,
        "train_tokens": int(data.train_mask.sum()),
        "threads": args.threads,
        "loading s": loading,
        "caching s": caching,
        "sweep s": sweep_wall,
        "best-k retraining s": best.seconds - sweep_wall,
        "sweep and retraining CPU s": cpu,
        "best_sae": best.name,
        "best_state_precision": best_score,
        "best_metrics": best.metrics,
        "sae_sweep": sweep.as_dict(),
    }
    section = {
        "settings": data.settings,
        "sweep_score": "state precision",
        "sae_sweep": result["sae_sweep"],
    }
    lines = [
        f"# SAE L0 sweep on {args.run_dir} ({first}'s sites and recall)",
        "",
        f"Caching {caching:.1f} s; sweep {sweep_wall:.1f} s; retraining the best k with "
        f"{data.settings['steps']} steps {result['best-k retraining s']:.1f} s; sweep and "
        f"retraining {cpu:.1f} CPU s; {args.threads} thread(s). Best: {best.name}, state "
        f"precision {100 * best_score:.1f}% as trained with {data.settings['steps']} steps.",
        *bl.sweep_lines(section),
    ]
    args.out.mkdir(parents=True)
    atomic_write_text(args.out / "sweep.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
