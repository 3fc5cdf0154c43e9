"""SAE training time per model at the experiments' codebook sites (target: <= 5 min).

Builds a random-weight model of each experiment's full shape with its codebooks, caches
the base model's activations at every codebook site for the tokens the experiment fits
on, and trains the experiment's SAEs (one per site: at the codes' L0 with the full steps,
and each k of the L0 sweep with the sweep's steps) with the settings
`codelens.experiments.baselines` uses; the sweep's best k is trained once more with the
full steps. Training cost does not depend on
what the weights learned, only on shapes and steps, so random weights measure it.
Prints seconds per model (all sites) and per SAE, one thread as the experiments run: wall
seconds, and CPU seconds (what the run takes on an idle core; on a shared machine the wall
time is longer).

    python benchmarks/sae_training.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from codelens import CodebookConfig, HookedCodebookTransformer
from codelens.baselines import SAEConfig, cache_activations, train_sae
from codelens.experiments import tokfsm
from codelens.experiments.baselines import DEFAULT_SETTINGS, matched_k
from codelens.experiments.steering import FULL as STEERING_FULL


def _tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {f"t{i}": i for i in range(vocab - 1)} | {"<bos>": vocab - 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<bos>")),
        bos_token="<bos>",
        unk_token="<bos>",
    )


def measure(name: str, config: dict, codebook: dict, vocab: int, n_seq: int, seq_len: int):
    cb = CodebookConfig(
        **{k: v for k, v in codebook.items() if k != "sites"},
        sites=tuple(codebook.get("sites", ("attn", "mlp"))),
    )
    model = HookedCodebookTransformer.from_config(config, _tokenizer(vocab), cb, seed=0)
    tokens = torch.randint(
        0, vocab - 1, (n_seq, seq_len), generator=torch.Generator().manual_seed(0)
    )
    sites = list(model.codebooks)
    started = time.perf_counter()
    with model.codebooks_bypassed():
        acts = cache_activations(model, tokens, sites, batch_size=64)
    caching = time.perf_counter() - started
    s = DEFAULT_SETTINGS
    for k in ["matched", *s["sweep_ks"]]:
        per_sae, cpu = [], []
        for site in sites:
            d = acts[site].shape[1]
            config_k = matched_k(model, site) if k == "matched" else int(k)
            sae_config = SAEConfig(
                n_latents=s["expansion"] * d,
                k=config_k,
                steps=s["steps"] if k == "matched" else s["sweep_steps"],
                batch_size=s["batch_size"],
                lr=s["lr"],
            )
            stats = train_sae(acts[site], site, sae_config)[1]
            per_sae.append(stats.seconds)
            cpu.append(stats.cpu_seconds)
        print(
            json.dumps(
                {
                    "model": name,
                    "sae k": k,
                    "steps": sae_config.steps,
                    "sites": len(sites),
                    "tokens": acts[sites[0]].shape[0],
                    "caching s": round(caching, 1),
                    "training s (all sites)": round(sum(per_sae), 1),
                    "per SAE s": [round(x, 1) for x in per_sae],
                    "training CPU s (all sites)": round(sum(cpu), 1),
                    "within 5 min (wall)": caching + sum(per_sae) <= 300,
                    "within 5 min (CPU)": caching + sum(cpu) <= 300,
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fsm_stage = next(iter(tokfsm.FULL.codebook_models.values()))
    measure(
        "TokFSM full (GPT-2 128d, 4 layers)",
        tokfsm.FULL.model | {"vocab_size": 12},
        fsm_stage["codebook"],
        12,
        DEFAULT_SETTINGS["train_sequences"],
        tokfsm.FULL.fsm["seq_len"],
    )
    measure(
        "stories full (GPT-NeoX 128d, 3 layers)",
        STEERING_FULL.model | {"vocab_size": STEERING_FULL.vocab_size},
        STEERING_FULL.codebook_stage["codebook"],
        STEERING_FULL.vocab_size,
        DEFAULT_SETTINGS["train_blocks"],
        128,
    )


if __name__ == "__main__":
    main()
