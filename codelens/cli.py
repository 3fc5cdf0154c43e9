"""The ``codelens`` command line: train, run the TokFSM experiment, browse codes, convert."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> None:
    from codelens.training.config import TrainConfig
    from codelens.training.trainer import train

    config = TrainConfig.from_file(args.config, args.overrides)
    result = train(config)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; run directory: {result.run_dir}")
    for key in ("lm_loss", "accuracy", "lm_loss_bypassed", "bottleneck_cost"):
        if key in result.final_eval:
            print(f"  {key}: {result.final_eval[key]:.4f}")


def _experiment(module_name: str, args: argparse.Namespace) -> None:
    """Run an experiment module's QUICK or FULL preset and say where its report is."""
    module = importlib.import_module(f"codelens.experiments.{module_name}")
    exp = module.QUICK if args.quick else module.FULL
    corpus = getattr(args, "corpus", None)
    if corpus not in (None, "stories"):  # steer only
        exp = module.corpus_preset(corpus, args.quick)
    settings = {
        "topics": tuple(args.topics.split(",")) if getattr(args, "topics", None) else None,
        "text_column": getattr(args, "text_column", None),
        "label_column": getattr(args, "label_column", None),
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    if settings:
        exp = dataclasses.replace(exp, **settings)
    if args.run_dir:
        exp = exp.with_run_dir(args.run_dir)
    if args.seed is not None:
        exp = dataclasses.replace(exp, seed=args.seed)
    fsm = {  # another FSM (fsm command only)
        "n_states": getattr(args, "n_states", None),
        "n_successors": getattr(args, "n_successors", None),
        "seed": getattr(args, "fsm_seed", None),
    }
    if any(v is not None for v in fsm.values()):
        fsm = {key: value for key, value in fsm.items() if value is not None}
        exp = dataclasses.replace(exp, fsm={**exp.fsm, **fsm})
    if getattr(args, "seeds", None):
        from codelens.experiments.seeds import run_seeds

        run_seeds(module, exp, args.seeds)
        print(f"per seed: {Path(exp.run_dir)}/seed-*/report.md; over seeds: seeds.md, seeds.json")
        return
    report = module.run_experiment(exp)
    print(module.summary_line(report))
    print(f"report: {Path(exp.run_dir) / 'report.md'} (also report.json, report.html)")


def _browse(args: argparse.Namespace) -> None:
    from codelens.browse import browse, sample_tokens_for
    from codelens.checkpoint import is_checkpoint
    from codelens.data.text import load_text_dataset, load_tokenizer, pack_to_tensor
    from codelens.model import HookedCodebookTransformer

    path = Path(args.path)
    if Path(args.output).is_dir():
        raise SystemExit(
            f"-o {args.output} is a directory; give the HTML file to write, e.g. "
            f"{Path(args.output) / 'codes.html'}"
        )
    if (path / "config.json").is_file() and (path / "final").is_dir():
        model_dir, tokens = sample_tokens_for(path, args.sequences)
    elif is_checkpoint(path):
        if args.text is None:
            raise SystemExit("browsing a model directory needs --text FILE (a corpus to run it on)")
        model_dir = path
        tokenizer = load_tokenizer(path / "tokenizer")
        texts = load_text_dataset(args.text)
        tokens = pack_to_tensor(texts, tokenizer, args.block_len, args.sequences)
    else:
        raise SystemExit(f"{path} is neither a codelens run directory nor a saved codelens model")
    model = HookedCodebookTransformer.from_pretrained(model_dir)
    if not model.codebooks:
        raise SystemExit(f"{model_dir} has no codebooks to browse")
    out = browse(model, tokens, args.output, title=f"codelens: {path}")
    print(f"code browser for {tokens.shape[0]} x {tokens.shape[1]} tokens written to {out}")


def _circuit(args: argparse.Namespace) -> None:
    import torch

    from codelens.experiments.circuit_study import markdown, run_study

    stage = Path(args.run_dir)
    if args.faithfulness is not None:
        _check_faithfulness_options(args)
    torch.set_num_threads(args.threads)
    if (stage / "report.json").is_file() and (stage / "codebooks" / "final").is_dir():
        model, task, methods, tau = _steering_circuit_task(stage, args.pairs, args.seed)
    else:
        model, task, methods, tau = _fsm_circuit_task(stage, args.pairs, args.seed)
    levels = ("components", "codes") if args.level == "both" else (args.level,)
    if "codes" in levels and not model.codebooks:
        levels = ("components",)
    out = Path(args.out or stage / "circuits")
    if args.faithfulness is not None:
        _circuits_at_faithfulness(model, task, levels, args, out)
        return
    tau = tau if args.tau is None else args.tau
    report = run_study(
        model,
        task,
        out,
        levels=levels,
        methods=methods if args.methods is None else tuple(args.methods.split(",")),
        tau=tau,
        steps=args.steps,
        keep_above=None if args.keep_above is None else args.keep_above * tau,
        compare_tl=args.compare_tl,
    )
    print(markdown(report))
    print(f"report: {out / 'report.md'} (also report.json, report.html, circuits/*.json)")


def _faithfulness(text: str) -> float:
    """``--faithfulness``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _check_faithfulness_options(args: argparse.Namespace) -> None:
    """``--faithfulness`` searches over a ranking: no tau, no ACDC or fast path."""
    from codelens.circuits.target import RANKINGS

    if args.tau is not None or args.keep_above is not None or args.compare_tl:
        raise ValueError(
            "--faithfulness chooses the circuit's size by a search: drop --tau, --keep-above "
            "and --compare-tl (they belong to the tau study)"
        )
    wrong = [m for m in (args.methods or "eap-ig").split(",") if m not in RANKINGS]
    if wrong:
        raise ValueError(
            f"--faithfulness searches over an edge ranking, one of {RANKINGS}; "
            f"{wrong} select by --tau instead"
        )


def _circuits_at_faithfulness(model, task, levels, args: argparse.Namespace, out: Path) -> None:
    """``codelens circuit --faithfulness F``: the smallest circuit per level and ranking."""
    from codelens.circuits.target import find_circuit

    methods = tuple((args.methods or "eap-ig").split(","))
    print(
        f"| level | method | edges kept | of | faithfulness (target {args.faithfulness:g}) "
        "| forwards (+bwd) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        for method in methods:
            circuit = find_circuit(model, task, level, method, args.faithfulness, steps=args.steps)
            name = f"{level}-{method}-f{args.faithfulness:g}.json"
            circuit.save(out / "circuits" / name)
            s = circuit.settings
            print(
                f"| {level} | {method} | {s['n_edges']} | {s['graph_edges']} "
                f"({100 * s['n_edges'] / s['graph_edges']:.2f}%) | {s['faithfulness']:.3f} "
                f"| {circuit.forwards} (+{circuit.backwards}) | {circuit.seconds:.1f} |"
            )
    print(f"circuits: {out / 'circuits'}/*-f{args.faithfulness:g}.json")


def _fsm_circuit_task(stage: Path, pairs: int | None, seed: int | None):
    """A TokFSM training run: the next-state task, every method, tau 0.02."""
    import json

    from codelens.data.fsm import FSMConfig, TokFSM
    from codelens.experiments.circuit_tasks import fsm_next_state_task
    from codelens.model import HookedCodebookTransformer

    config = stage / "config.json"
    if not (config.is_file() and (stage / "final").is_dir()):
        raise SystemExit(
            f"{stage} is not a training run directory (config.json and final/) "
            "or a steering run directory (report.json and codebooks/final/)"
        )
    fsm_settings = json.loads(config.read_text()).get("data", {}).get("fsm")
    if fsm_settings is None:
        raise SystemExit(f"{stage} was not trained on TokFSM data: no task to build")
    model = HookedCodebookTransformer.from_pretrained(stage / "final")
    task = fsm_next_state_task(
        TokFSM(FSMConfig(**fsm_settings)),
        64 if pairs is None else pairs,
        seed=0 if seed is None else seed,
    )
    return model, task, ("acdc", "eap", "eap-ig", "fast"), 0.02


def _steering_circuit_task(stage: Path, pairs: int | None, seed: int | None):
    """A `codelens steer` run: its topic task, the topic circuit's methods and tau."""
    import json

    from codelens.data.text import load_tokenizer
    from codelens.experiments.steering import (
        TOPIC_CIRCUIT_METHODS,
        SteeringExperiment,
        topic_task,
    )
    from codelens.model import HookedCodebookTransformer

    settings = json.loads((stage / "report.json").read_text()).get("experiment")
    try:
        exp = SteeringExperiment(**settings)
    except TypeError as err:
        raise SystemExit(
            f"{stage}/report.json has no steering experiment this codelens reads: {err}"
        ) from None
    if exp.corpus != "stories":
        raise SystemExit(
            f"{stage} is a steering run on corpus {exp.corpus!r}; the topic circuit is built "
            "from story pairs, so `codelens circuit` needs a run on the stories"
        )
    model = HookedCodebookTransformer.from_pretrained(stage / "codebooks" / "final")
    task = topic_task(load_tokenizer(stage / "tokenizer"), exp, pairs, seed)
    return model, task, TOPIC_CIRCUIT_METHODS, exp.circuit_tau


def _convert(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from codelens.model import HookedCodebookTransformer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    model = HookedCodebookTransformer.from_pretrained(
        args.source, tokenizer=tokenizer, base_model=args.base_model
    )
    out = model.save_pretrained(args.destination)
    print(f"{args.source}: {len(model.codebooks)} codebook sites; codelens checkpoint at {out}")


class _VersionAction(argparse.Action):
    """``codelens --version``: the versions every report records, one per line."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from codelens.environment import stack

        for name, version in stack().items():
            print(f"{name} {version}")
        parser.exit()


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 threads or -5 sequences is a mistake)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="codelens", description=__doc__)
    parser.add_argument(
        "--version", action=_VersionAction, help="print codelens' version and its stack, then exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train or fine-tune a model with codebooks")
    train.add_argument("config", help="YAML or JSON training config")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. steps=100 codebook.k=4"
    )
    train.set_defaults(run=_train)

    fsm = commands.add_parser("fsm", help="run the TokFSM experiment and write its report")
    fsm.add_argument("--quick", action="store_true", help="small FSM, a few minutes on a CPU")
    fsm.add_argument("--run-dir", help="where to write models and the report")
    fsm.add_argument("--seed", type=int, help="training and sampling seed")
    fsm.add_argument("--seeds", type=int, nargs="+", help="run once per seed; mean and range")
    fsm.add_argument("--states", dest="n_states", type=int, help="FSM states (another FSM)")
    fsm.add_argument("--successors", dest="n_successors", type=int, help="successors per state")
    fsm.add_argument("--fsm-seed", type=int, help="seed of the FSM's transition table")
    fsm.set_defaults(run=functools.partial(_experiment, "tokfsm"))

    steer = commands.add_parser(
        "steer", help="run the topic steering experiment on stories or a labelled corpus"
    )
    steer.add_argument("--quick", action="store_true", help="small corpus and model, for CI")
    steer.add_argument(
        "--corpus",
        metavar="SPEC",
        help="stories (default), fortunes (apt-get install fortunes fortunes-min), "
        "linux-doc (apt-get install linux-doc-6.1), a "
        ".jsonl/.json/.csv/.parquet file with text and label columns, a directory with one "
        "text file or sub-directory per label, or a Hugging Face dataset id",
    )
    steer.add_argument("--topics", help="comma-separated topics to steer (default: the corpus')")
    steer.add_argument("--text-column", help="the corpus' text column (default: text)")
    steer.add_argument("--label-column", help="the corpus' label column (default: label)")
    steer.add_argument("--run-dir", help="where to write models and the report")
    steer.add_argument("--seed", type=int, help="corpus, training and sampling seed")
    steer.add_argument("--seeds", type=int, nargs="+", help="run once per seed; mean and range")
    steer.set_defaults(run=functools.partial(_experiment, "steering"))

    browse = commands.add_parser("browse", help="write a static HTML code browser")
    browse.add_argument("path", help="a run directory or a saved codelens model directory")
    browse.add_argument("-o", "--output", default="codes.html", help="the HTML file to write")
    browse.add_argument(
        "--sequences", type=_positive, default=64, help="sequences to run the model on"
    )
    browse.add_argument("--text", help="corpus file for a model directory (txt, jsonl, parquet)")
    browse.add_argument(
        "--block-len", type=_positive, default=128, help="tokens per sequence (--text)"
    )
    browse.set_defaults(run=_browse)

    circuit = commands.add_parser(
        "circuit",
        help="find circuits (ACDC, EAP, EAP-IG, fast path) in a TokFSM or steering run",
    )
    circuit.add_argument(
        "run_dir",
        metavar="RUN",
        help="a TokFSM training run directory (config.json, final/) or a `codelens steer` run "
        "directory (report.json, codebooks/final/: the topic circuit)",
    )
    circuit.add_argument("--level", choices=("components", "codes", "both"), default="both")
    circuit.add_argument(
        "--methods",
        help="comma-separated from acdc,eap,eap-ig,fast (default: all four for TokFSM; "
        "the steering run's topic-circuit methods)",
    )
    circuit.add_argument(
        "--tau", type=float, help="ACDC / selection threshold (default: 0.02; steering: its own)"
    )
    circuit.add_argument(
        "--faithfulness",
        type=_faithfulness,
        metavar="F",
        help="instead of a tau, find the fewest top-ranked edges (--methods eap or eap-ig, "
        "default eap-ig) whose faithfulness reaches F in (0, 1], e.g. 0.8",
    )
    circuit.add_argument("--steps", type=_positive, default=5, help="integrated-gradient steps")
    circuit.add_argument(
        "--keep-above",
        type=float,
        metavar="X",
        help="fast path: keep edges whose attribution is >= X * tau without a forward "
        "(default: test every edge it keeps)",
    )
    circuit.add_argument(
        "--pairs",
        type=_positive,
        help="clean/corrupted prompt pairs (default: 64; steering: its own)",
    )
    circuit.add_argument(
        "--seed", type=int, help="seed of the prompt pairs (default: 0; steering: its own)"
    )
    circuit.add_argument("--threads", type=_positive, default=1, help="torch CPU threads")
    circuit.add_argument(
        "--compare-tl", action="store_true", help="also rank-correlate with TL's attribution_patch"
    )
    circuit.add_argument("-o", "--out", help="output directory (default: RUN/circuits)")
    circuit.set_defaults(run=_circuit)

    convert = commands.add_parser(
        "convert", help="write a codelens checkpoint of the paper authors' released model"
    )
    convert.add_argument("source", help="hub id or directory (codebook-features format)")
    convert.add_argument("destination", help="the codelens checkpoint directory to write")
    convert.add_argument("--base-model", help="base model hub id or directory, if not known")
    convert.add_argument("--tokenizer", help="tokenizer hub id or directory, if not shipped")
    convert.set_defaults(run=_convert)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as err:  # bad input, missing or unwritable files
        print(f"codelens {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
