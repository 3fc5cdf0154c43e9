"""The SAE L0 sweep (pick of the best k, errors) and memory-bounded feature encoding."""

import math

import pytest
import torch
from conftest import tiny_model

from codelens.baselines import SAEConfig, encode_all, encode_batch_size, neurons, sae_metrics
from codelens.baselines.sweep import check_grid, pick_best, sweep_l0
from codelens.experiments import baselines as bl

SITES = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


def _planted(n, d=16, n_dict=16, active=2, seed=0):
    """Exactly ``active``-sparse non-negative combinations of one planted dictionary
    (the same for every ``seed``, which draws the tokens)."""
    dictionary = torch.randn(n_dict, d, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_dict, generator=gen).argsort(dim=1)[:, :active]
    z = torch.zeros(n, n_dict).scatter(1, idx, 1 + torch.rand(n, active, generator=gen))
    return z @ dictionary


def _config(site, k, steps=300):
    return SAEConfig(n_latents=48, k=k, steps=steps, batch_size=256, lr=3e-3, seed=0)


def test_sweep_picks_the_k_of_best_score_on_a_planted_toy():
    """Activations are exactly 2-sparse in a planted dictionary; the score is held-out
    explained variance minus 0.05 per latent per token, so k=2 (the planted L0) wins:
    k=1 cannot reconstruct a 2-sparse token, larger k gain little and pay for their L0."""
    acts = {s: _planted(2000, seed=i) for i, s in enumerate(SITES)}
    heldout = {s: _planted(1000, seed=10 + i) for i, s in enumerate(SITES)}

    def score(saes):
        return sum(
            sae_metrics(sae, heldout[sae.site])["explained_variance"] - 0.05 * sae.config.k
            for sae in saes
        ) / len(saes)

    sweep = sweep_l0(acts, [4, 1, 2], _config, score, heldout=heldout)
    assert [p.k for p in sweep.points] == [1, 2, 4]  # sorted
    scores = {p.k: p.score for p in sweep.points}
    assert sweep.best_k == 2 == max(scores, key=scores.get), scores
    two = next(p for p in sweep.points if p.k == 2)
    assert two.summary["explained_variance"] > 0.9  # it found the planted dictionary
    assert sweep.points[0].summary["explained_variance"] < two.summary["explained_variance"]
    assert two.summary["l0"] == pytest.approx(2 * len(SITES), abs=0.1)  # summed over sites
    assert set(two.per_site) == set(SITES) and two.summary["seconds"] > 0
    assert [s.site for s in sweep.best] == SITES and {s.config.k for s in sweep.best} == {2}
    assert sweep.as_dict()["best_k"] == 2


def test_pick_best_ties_go_to_the_smaller_k_and_nan_never_wins():
    assert pick_best({4: 0.9, 8: 0.9, 16: 0.8}) == 4
    assert pick_best({4: math.nan, 8: 0.1}) == 8
    with pytest.raises(ValueError, match="NaN"):
        pick_best({4: math.nan})
    with pytest.raises(ValueError, match="no scores"):
        pick_best({})


def test_sweep_errors_for_bad_grids_and_configs():
    acts = {SITES[0]: _planted(300)}
    with pytest.raises(ValueError, match="grid is empty"):
        sweep_l0(acts, [], _config, lambda s: 0.0, heldout=acts)
    with pytest.raises(ValueError, match=r"sweep k \[64\] exceed the SAE's 48 latents"):
        sweep_l0(acts, [4, 64], _config, lambda s: 0.0, heldout=acts)
    with pytest.raises(ValueError, match="repeated"):
        check_grid([4, 4], 48)
    with pytest.raises(ValueError, match="positive integers"):
        check_grid([0, 2.5, True], 48)
    with pytest.raises(ValueError, match="no held-out"):
        sweep_l0(acts, [2], _config, lambda s: 0.0, heldout={})
    with pytest.raises(ValueError, match="both model and ce_tokens"):
        sweep_l0(acts, [2], _config, lambda s: 0.0, heldout=acts, model=object())
    with pytest.raises(ValueError, match="k=2"):
        sweep_l0(acts, [2], lambda s, k: _config(s, 3), lambda s: 0.0, heldout=acts)
    with pytest.raises(ValueError, match="unknown baseline settings \\['sae_ks'\\]"):
        bl.check_settings({"sae_ks": ["matched", 32]})


# ---------------------------------------------------------------- encode_all


def _counting_model():
    model = tiny_model("gpt2", seed=0)
    calls = []
    model.hook_dict["hook_embed"].add_hook(lambda x, hook: calls.append(x.shape[0]))
    return model, calls


def test_encode_all_streamed_equals_unstreamed_with_bounded_batches():
    model, calls = _counting_model()
    tokens = torch.randint(0, 10, (7, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(7, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    features = [neurons(SITES[0], 32), neurons("blocks.1.attn.hook_z", 32)]
    whole = encode_all(model, features, tokens, mask)
    assert calls == [7]  # one batch under the default budget
    assert whole.shape == (int(mask.sum()), 64)

    n_kept, per_sequence = int(mask.sum()), 4 * 12 * (64 + 64)
    budget = (4 * n_kept * 64 + 2 * per_sequence) / 2**20  # the result and two sequences
    assert encode_batch_size(n_kept, 12, 64, 64, budget) == 2
    calls.clear()
    streamed = encode_all(model, features, tokens, mask, memory_budget_mb=budget)
    assert calls == [2, 2, 2, 1]  # never more than two sequences at a time
    torch.testing.assert_close(streamed, whole, rtol=0, atol=0)

    half = encode_all(model, features, tokens, mask, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), whole, rtol=1e-3, atol=1e-3)
    model.hook_dict["hook_embed"].remove_hooks()


def test_encode_all_refuses_a_budget_it_cannot_keep():
    model, _ = _counting_model()
    tokens = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="over memory_budget_mb"):
        encode_all(model, [neurons(SITES[0], 32)], tokens, mask, memory_budget_mb=0.001)
    with pytest.raises(ValueError, match="no features"):
        encode_all(model, [], tokens, mask)
    with pytest.raises(ValueError, match="bool mask"):
        encode_all(model, [neurons(SITES[0], 32)], tokens, mask.long())
    model.hook_dict["hook_embed"].remove_hooks()
