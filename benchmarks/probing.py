"""k-sparse probing of story topics on a finished `codelens steer` run, and how well the
topic classifier that judges steering does on held-out stories.

Loads the run's model without codebooks (``baseline/final``) and its codebook model
(``codebooks/final``), rebuilds the search stories as the pipeline does (the run's seed
+ 1; ``--documents`` of them, default the run's ``n_search``), trains TopK SAEs at every
codebook site on the training stories' activations (k matched to the codes' L0, and each
k of ``--sae-ks``), and prints the probing table of `probing_section` (codes, SAEs, base
MLP neurons, raw activations) for the run's steered topics. Then fits the
`TopicClassifier` as the pipeline does (``n_classifier`` stories, seed + 2) and prints its
accuracy on ``n_classifier / 2`` other stories. Writes nothing.

    python benchmarks/probing.py RUN_DIR [--documents 1600] [--sae-ks 4 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from codelens import HookedCodebookTransformer
from codelens.analysis import TopicClassifier
from codelens.baselines import cache_activations
from codelens.data.stories import TOPICS, generate_stories
from codelens.data.text import load_tokenizer, pack_to_tensor
from codelens.experiments import baselines as bl
from codelens.experiments import steering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a `codelens steer` run directory")
    parser.add_argument("--documents", type=int, help="search stories to probe on")
    parser.add_argument("--sae-ks", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--steps", type=int, help="SAE Adam steps (default: the run's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    report_file = args.run_dir / "report.json"
    if not report_file.is_file():
        raise SystemExit(f"{args.run_dir} has no report.json: not a `codelens steer` run")
    torch.set_num_threads(args.threads)
    report = json.loads(report_file.read_text())
    fields = {f.name for f in dataclasses.fields(steering.SteeringExperiment)}
    exp = steering.SteeringExperiment(
        **{k: v for k, v in report["experiment"].items() if k in fields}
    )
    settings = bl.check_settings(exp.baselines or {})
    if args.steps:
        settings["steps"] = args.steps
    started = time.perf_counter()
    base = HookedCodebookTransformer.from_pretrained(args.run_dir / "baseline" / "final")
    coded = HookedCodebookTransformer.from_pretrained(args.run_dir / "codebooks" / "final")
    tokenizer = load_tokenizer(args.run_dir / "tokenizer")

    n_docs = args.documents or exp.n_search
    stories = generate_stories(n_docs, seed=exp.seed + 1)
    texts = [s.text for s in stories]
    ids = [TOPICS.index(s.topic) for s in stories]
    tokens, topic_of_row = steering.corpus_rows(
        tokenizer, texts, ids, exp.search_len, one_per_text=True
    )
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    train_texts = [s.text for s in generate_stories(exp.n_stories, seed=exp.seed)]
    train_tokens = pack_to_tensor(train_texts, tokenizer, 128, settings["train_blocks"])
    sites = bl.codebook_sites(coded)
    acts = cache_activations(base, train_tokens, sites, batch_size=32)
    held = cache_activations(base, tokens[:32], sites, batch_size=32)
    methods = []
    for name, k_of in [
        ("SAE matched L0", lambda s: bl.matched_k(coded, s)),
        *[(f"SAE k={k} per site", lambda s, k=k: k) for k in args.sae_ks],
    ]:
        t = time.perf_counter()
        features, metrics = bl.train_saes(acts, held, k_of, settings, exp.seed)
        methods.append(bl.Baseline(name, features, time.perf_counter() - t, metrics))
        ev = sum(m["explained_variance"] for m in metrics.values()) / len(metrics)
        print(f"{name}: trained in {time.perf_counter() - t:.1f}s, explained variance {ev:.3f}")
    t = time.perf_counter()
    section = bl.probing_section(
        base,
        coded,
        methods,
        tokens,
        mask,
        [TOPICS[i] for i in topic_of_row.tolist()],
        exp.topics,
        seed=exp.seed,
    )
    print(f"probing: {time.perf_counter() - t:.1f}s on {len(tokens)} of {n_docs} stories\n")
    print("\n".join(bl.probing_markdown(section)))
    for row in section["rows"]:
        if row["k"] == 1 and row["accuracy"] is not None:
            per_topic = {t: round(100 * a, 1) for t, a in row["per_topic"].items()}
            print(f"k=1 per topic, {row['method']}: {per_topic}")

    fit_on = generate_stories(exp.n_classifier, seed=exp.seed + 2)
    check = generate_stories(exp.n_classifier // 2, seed=exp.seed + 5)
    classifier = TopicClassifier.fit([s.text for s in fit_on], [s.topic for s in fit_on])
    accuracy = classifier.accuracy([s.text for s in check], [s.topic for s in check])
    print(
        f"\nTopicClassifier: fit on {len(fit_on)} stories, {100 * accuracy:.1f}% right on "
        f"{len(check)} held-out stories; total {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
