"""What the token cache saves: a training run's data set-up, first start against second.

The first start of a from-scratch text run trains the BPE tokenizer and tokenises the
corpus into a memory-mapped token file; every later start (a resume, another rank)
loads the tokenizer, hashes the source file and maps the token file. Before the cache,
every start of every rank paid the first start's cost. The corpus is generated stories
(`codelens.data.stories`, ``--tokens`` tokens at about 90 per story), or ``--corpus``.

    python benchmarks/token_cache.py --tokens 10_000_000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from codelens.data.stories import generate_stories
from codelens.training.config import TrainConfig
from codelens.training.trainer import build_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000, help="approximate corpus size")
    parser.add_argument("--corpus", help="a .txt/.jsonl corpus instead of generated stories")
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "stories.txt"
        if not args.corpus:
            started = time.perf_counter()
            stories = generate_stories(args.tokens // 90, seed=0)
            corpus.write_text("\n\n".join(s.text.replace("\n\n", "\n") for s in stories))
            print(f"generated {len(stories)} stories in {time.perf_counter() - started:.1f} s")
        config = TrainConfig(
            run_dir=str(Path(tmp) / "run"),
            data={
                "source": str(corpus),
                "block_len": args.block_len,
                "vocab_size": args.vocab_size,
                "cache_dir": str(Path(tmp) / "cache"),
            },
            model_config={"model_type": "gpt_neox"},
            steps=1,
            batch_size=1,
        )
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            source, tokenizer, _ = build_data(config)
            source.batch(0)
            seconds.append(time.perf_counter() - started)
        token_file = next((Path(tmp) / "cache" / "tokens").glob("*.bin"))
        header = json.loads(token_file.with_suffix(".json").read_text())
        n_tokens = token_file.stat().st_size // 2
        print(
            f"corpus: {corpus.stat().st_size / 2**20:.1f} MiB of text, {n_tokens:,} tokens "
            f"in blocks of {args.block_len} (vocabulary {len(tokenizer)}), token file "
            f"{token_file.stat().st_size / 2**20:.1f} MiB"
        )
        print(f"first start  (train BPE, tokenise, write the file): {seconds[0]:7.2f} s")
        tokenising = header["tokenise_seconds"]
        print(f"  of which tokenising and writing the token file:   {tokenising:7.2f} s")
        print(f"second start (load tokenizer and source hash, map file): {seconds[1]:6.2f} s")
        print(
            f"saved per start and per rank: {seconds[0] - seconds[1]:.2f} s "
            f"({seconds[0] / seconds[1]:.0f}x faster)"
        )


if __name__ == "__main__":
    main()
