"""Baselines: activation caching, SAE training and metrics, PCA/ICA, feature hooks."""

import json

import pytest
import torch
from conftest import tiny_model

from codelens.baselines import (
    SAEConfig,
    SparseAutoencoder,
    auxk_loss,
    cache_activations,
    ce_loss_score,
    encode_all,
    ica_features,
    iter_activations,
    load_features,
    neurons,
    pca_features,
    sae_metrics,
    splice_loss_cost,
    spliced,
    steer_feature_hooks,
    swap_feature_hooks,
    train_sae,
)
from codelens.interventions import intervene

Z0, MLP1 = "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"
Z_SITES = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def _no_hooks(model) -> bool:
    return not any(hp.has_hooks() for hp in model.hook_dict.values())


def _planted(n=4000, d=16, n_dict=32, active=3, seed=0):
    """Sparse non-negative combinations of a unit-norm planted dictionary, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_dict, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_dict, generator=gen).argsort(dim=1)[:, :active]
    z = torch.zeros(n, n_dict).scatter(1, idx, 1 + torch.rand(n, active, generator=gen))
    return z @ dictionary + 0.5


@pytest.fixture(scope="module")
def trained_toy():
    """A tiny GPT-NeoX trained on ``a b a b ...``: predicting a token needs attention to
    the one two back, so erasing ``hook_z`` costs loss."""
    torch.manual_seed(0)
    model = tiny_model("gpt_neox")
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        return torch.randint(0, 10, (n, 2), generator=gen).repeat(1, 8)

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(batch(32), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, batch(64)


# ---------------------------------------------------------------- caching


def test_cache_shapes_heads_and_mask(tokens):
    model = tiny_model("gpt2")
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    acts = cache_activations(model, tokens, [Z0, MLP1], token_mask=mask, batch_size=1)
    assert acts[Z0].shape == (tokens.numel() - 2, 32)  # 4 heads x 8 dims, concatenated
    assert acts[MLP1].shape == (tokens.numel() - 2, 32)
    head = cache_activations(model, tokens, [Z0], groups={Z0: 2})[Z0]
    assert head.shape == (tokens.numel(), 8)
    full = cache_activations(model, tokens, [Z0])[Z0]
    torch.testing.assert_close(head, full[:, 16:24])
    torch.testing.assert_close(acts[Z0], full.reshape(2, 12, 32)[:, 1:].reshape(-1, 32))
    assert _no_hooks(model)


def test_cache_errors_and_hooks_removed_when_consumer_raises(tokens):
    model = tiny_model()
    with pytest.raises(ValueError, match="no hook points"):
        cache_activations(model, tokens, ["blocks.0.hook_nope"])
    with pytest.raises(ValueError, match="memory_budget_mb"):
        cache_activations(model, tokens, [Z0], memory_budget_mb=1e-6)
    with pytest.raises(ValueError, match="group must be"):
        cache_activations(model, tokens, [Z0], groups={Z0: 4})
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in iter_activations(model, tokens, [Z0], batch_size=1):
            raise RuntimeError("consumer failed")
    assert _no_hooks(model)


# ---------------------------------------------------------------- SAE


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_sae_lowers_reconstruction_error(kind):
    acts = _planted()
    config = SAEConfig(n_latents=64, kind=kind, k=3, l1_coefficient=1e-3, steps=800, batch_size=256)
    untrained = SparseAutoencoder("site", 16, config)
    untrained.offset.data = acts.mean(0)
    sae, stats = train_sae(acts, "site", config)
    before, after = sae_metrics(untrained, acts), sae_metrics(sae, acts)
    assert after["mse"] < 0.2 * before["mse"]
    assert after["explained_variance"] > 0.85
    if kind == "topk":
        assert after["l0"] <= 3
    torch.testing.assert_close(sae.decoder.norm(dim=1), torch.ones(64))
    assert stats.steps == 800 and 0 <= stats.dead_fraction <= 1


def test_auxk_trains_only_dead_latents():
    acts = _planted(n=256)
    sae = SparseAutoencoder("s", 16, SAEConfig(n_latents=32, k=2))
    pre = sae.pre_activations(acts)
    error = acts - sae(acts).detach()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:8] = True
    loss = auxk_loss(sae, pre, error, dead, aux_k=4)
    loss.backward()
    row_grad = sae.decoder.grad.norm(dim=1)
    assert loss > 0 and bool((row_grad[:8] > 0).any())
    assert torch.all(row_grad[8:] == 0)  # live latents get nothing from AuxK
    assert auxk_loss(sae, pre, error, torch.zeros(32, dtype=torch.bool), 4) == 0


def test_sae_config_and_input_errors():
    with pytest.raises(ValueError, match="k=9 exceeds"):
        SAEConfig(n_latents=8, k=9)
    with pytest.raises(ValueError, match="kind"):
        SAEConfig(n_latents=8, kind="gated")
    sae = SparseAutoencoder("s", 4, SAEConfig(n_latents=8, k=2))
    with pytest.raises(ValueError, match="4-dim"):
        sae.encode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        train_sae(torch.full((4, 4), float("nan")), "s", SAEConfig(n_latents=8, k=2))


def test_save_load_roundtrip_and_corruption(tmp_path):
    acts = _planted(n=500)
    sae, _ = train_sae(acts, Z0, SAEConfig(n_latents=32, k=2, steps=20), group=1)
    sae.save(tmp_path / "sae")
    loaded = load_features(tmp_path / "sae")
    assert isinstance(loaded, SparseAutoencoder) and loaded.group == 1 and loaded.site == Z0
    torch.testing.assert_close(loaded.encode(acts), sae.encode(acts))
    meta_file = tmp_path / "sae" / "features.json"  # saved before the rename: "head"
    meta = json.loads(meta_file.read_text())
    meta["head"] = meta.pop("group")
    meta_file.write_text(json.dumps(meta))
    assert load_features(tmp_path / "sae").group == 1
    pca = pca_features(acts, MLP1, 4)
    pca.save(tmp_path / "pca")
    torch.testing.assert_close(load_features(tmp_path / "pca").encode(acts), pca.encode(acts))
    data = (tmp_path / "sae" / "features.safetensors").read_bytes()
    (tmp_path / "sae" / "features.safetensors").write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="hash"):
        load_features(tmp_path / "sae")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        sae.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_ce_loss_score_on_trained_toy(trained_toy):
    model, toks = trained_toy
    acts = cache_activations(model, toks, Z_SITES)
    config = SAEConfig(n_latents=64, k=8, steps=400, batch_size=256)
    saes = [train_sae(acts[s], s, config)[0] for s in Z_SITES]
    score = ce_loss_score(model, toks, saes)
    assert score["ce_zero"] > score["ce_orig"] + 0.5  # the task needs attention
    assert 0.0 <= score["ce_loss_score"] <= 1.0
    assert score["ce_loss_score"] > 0.8
    untrained = [SparseAutoencoder(s, 32, config) for s in Z_SITES]
    assert ce_loss_score(model, toks, untrained)["ce_loss_score"] < score["ce_loss_score"]
    assert _no_hooks(model)


def test_splice_hook_removed_after_use_and_on_error(trained_toy):
    model, toks = trained_toy
    sae = SparseAutoencoder(Z0, 32, SAEConfig(n_latents=8, k=1))
    clean = model(toks)
    with spliced(model, sae):
        assert model.hook_dict[Z0].has_hooks()
        assert not torch.allclose(model(toks), clean)
    assert _no_hooks(model)
    with pytest.raises(KeyError), spliced(model, sae):
        raise KeyError("user code failed")
    assert _no_hooks(model)
    torch.testing.assert_close(model(toks), clean)


# ---------------------------------------------------------------- PCA / ICA


def test_pca_recovers_planted_directions():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    scales = torch.tensor([8.0, 4.0, 2.0] + [0.1] * 9)
    acts = (torch.randn(3000, 12, generator=gen) * scales) @ basis.T + 3.0
    pca = pca_features(acts, "s", 3)
    cos = (pca.decoder @ basis[:, :3]).abs()
    assert torch.all(cos.diagonal() > 0.99)
    torch.testing.assert_close(pca.offset, torch.full((12,), 3.0), atol=0.3, rtol=0)


def test_ica_recovers_planted_directions():
    gen = torch.Generator().manual_seed(0)
    sources = torch.rand(5000, 4, generator=gen) * 2 - 1  # uniform: non-Gaussian
    mixing = torch.randn(4, 6, generator=gen)
    ica = ica_features(sources @ mixing, "s", 4)
    unit = ica.decoder / ica.decoder.norm(dim=1, keepdim=True)
    planted = mixing / mixing.norm(dim=1, keepdim=True)
    best = (unit @ planted.T).abs().max(dim=0).values  # every planted direction is found
    assert torch.all(best > 0.99)


def test_direction_errors():
    with pytest.raises(ValueError, match="n_components"):
        pca_features(torch.randn(10, 4), "s", 5)
    with pytest.raises(ValueError, match="float"):
        ica_features(torch.ones(10, 4, dtype=torch.long), "s")


# ---------------------------------------------------------------- steering and swaps


def _capture(store, key):
    def hook(x, hook):
        store[key] = x.detach().clone()
        return x

    return hook


def test_clamp_sets_feature_and_swap_pastes_reference():
    model = tiny_model("gpt2")
    tokens = torch.randint(0, 10, (8, 12), generator=torch.Generator().manual_seed(0))
    acts = cache_activations(model, tokens, [MLP1])[MLP1]
    pca = pca_features(acts, MLP1)  # full basis
    seen = {}
    hooks = steer_feature_hooks(model, pca, clamp={2: 5.0}, positions=[3])
    with model.hooks(fwd_hooks=[*hooks, (MLP1, _capture(seen, "x"))]):
        model(tokens)
    features = pca.encode(seen["x"])
    torch.testing.assert_close(features[:, 3, 2], torch.full((8,), 5.0))
    torch.testing.assert_close(features[:, 4], pca.encode(acts.reshape(8, 12, -1)[:, 4]))

    z = cache_activations(model, tokens, [Z0])[Z0].reshape(8, 12, 32)
    reference = z.flip(0)[:, -1]
    with model.hooks(
        fwd_hooks=[*swap_feature_hooks(neurons(Z0, 32), reference), (Z0, _capture(seen, "z"))]
    ):
        model(tokens)
    torch.testing.assert_close(seen["z"][:, -1].reshape(8, 32), reference)
    torch.testing.assert_close(seen["z"][:, :-1].reshape(8, 11, 32), z[:, :-1])
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="out of range"):
        steer_feature_hooks(model, pca, add={99: 1.0})


def test_feature_steering_positions_follow_the_code_intervention_rules():
    model = tiny_model("gpt2")
    fit = torch.randint(0, 10, (8, 12), generator=torch.Generator().manual_seed(0))
    pca = pca_features(cache_activations(model, fit, [MLP1])[MLP1], MLP1)
    tokens = fit[:2, :6]
    seen = {}
    last = steer_feature_hooks(model, pca, clamp={0: 7.0}, positions=-1)
    with model.hooks(fwd_hooks=[*last, (MLP1, _capture(seen, "x"))]):
        model(tokens)
    features = pca.encode(seen["x"])
    torch.testing.assert_close(features[:, -1, 0], torch.full((2,), 7.0))
    assert not torch.isclose(features[:, :-1, 0], torch.tensor(7.0)).any()
    # a position past the sequence is an error, not a silent no-op
    outside = steer_feature_hooks(model, pca, clamp={0: 7.0}, positions=[3, 6])
    with pytest.raises(ValueError, match=r"positions \[6\] are outside the 6-token"):
        with model.hooks(fwd_hooks=outside):
            model(tokens)
    # under `intervene` a position may come later (generation), but must be reached
    with pytest.raises(ValueError, match="matched no token"):
        with intervene(model, outside):
            model(tokens)
    with intervene(model, outside):
        model.generate(tokens, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False)
    assert _no_hooks(model)


# ---------------------------------------------------------------- experiment glue


def test_fit_baselines_and_feature_swaps_on_a_codebook_model(tokens):
    from codelens import CodebookConfig
    from codelens.experiments import baselines as bl

    coded = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2), seed=0)
    base = tiny_model("gpt2", seed=0)
    assert bl.matched_k(coded, Z0) == 8 and bl.matched_k(coded, MLP1) == 2
    train = torch.randint(0, 10, (16, 12), generator=torch.Generator().manual_seed(1))
    sites = list(coded.codebooks)
    heldout = cache_activations(base, tokens, sites)
    settings = {
        "sweep_ks": [2, 4],
        "sweep_steps": 10,
        "steps": 20,
        "batch_size": 64,
        "ica_tokens": 200,
    }
    scored = []

    def score(features):  # prefers k=4: the sweep must pick it and retrain it
        scored.append([f.config.k for f in features])
        return float(features[0].config.k == 4)

    methods, sweep = bl.fit_baselines(
        base, coded, train, None, heldout, settings, seed=0, score=score, ce_tokens=tokens
    )
    assert scored == [[2] * 4, [4] * 4]  # one SAE per site per k, sites in order
    assert sweep.best_k == 4 and [p.k for p in sweep.points] == [2, 4]
    assert all(0 <= p.summary["explained_variance"] <= 1 for p in sweep.points)
    assert all("ce_loss_score" in p.summary for p in sweep.points)
    names = [m.name for m in methods]
    assert names == [
        "SAE matched L0",
        "SAE best L0 (sweep)",
        "PCA (full basis)",
        "ICA (full basis)",
    ]
    assert methods[0].row()["latents_per_token"] == 20  # 2 layers x (8 + 2)
    assert (
        methods[1].row()["latents_per_token"] == 16 and "latents_per_token" not in methods[2].row()
    )
    assert bl.best_sae(sweep, settings) == "k=4 per site, the best of k in [2, 4]"
    assert [f.config.steps for f in methods[1].features] == [20] * 4  # retrained in full
    assert [f.config.k for f in methods[1].features] == [4] * 4
    section = {"settings": bl.check_settings(settings), "sweep_score": "state precision"}
    lines = bl.sweep_lines(section | {"sae_sweep": sweep.as_dict()})
    assert lines[1] == "### SAE L0 sweep" and "10 steps each" in lines[3]
    assert lines[-2].startswith("| 2 | 8.0 | 0.0 |") and lines[-1].startswith("| 4 (best) | 16.0 |")
    for m in methods:
        assert [f.site for f in m.features] == sites and m.seconds > 0
        assert set(m.metrics) == set(sites)
    values = encode_all(base, methods[1].features, tokens, torch.ones_like(tokens, dtype=bool))
    assert values.shape == (tokens.numel(), sum(f.n_features for f in methods[1].features))
    cost = splice_loss_cost(base, methods[2].features, tokens)
    assert abs(cost["loss_cost"]) < 1e-4  # PCA with a full basis reconstructs exactly
    assert _no_hooks(base)
    lines = bl.table_markdown([{"method": "x", "state_precision": 0.5}, {"method": "y"}])
    assert lines[2] == "| x | 50.0 |" and lines[3] == "| y | n/a |"
    lines = bl.table_markdown([{"method": "x", "latents_per_token": 8, "loss_cost": 0.5}])
    assert lines[0] == "| method | SAE latents/token | loss cost (nats) |"
    assert lines[2] == "| x | 8 | 0.500 |"


def test_seed_summary_mean_and_range():
    from types import SimpleNamespace

    from codelens.experiments.seeds import markdown, summarise

    def report(acc, prec):
        return {
            "timings": {"total s": 10.0 * acc},
            "baselines": {"rows": [{"method": "SAE", "state_precision": prec, "seconds": None}]},
            "acc": acc,
        }

    module = SimpleNamespace(headline=lambda r: {"accuracy": r["acc"]})
    summary = summarise(module, {0: report(1.0, 0.5), 1: report(3.0, 0.7)})
    assert summary["headline"]["accuracy"] == {"mean": 2.0, "min": 1.0, "max": 3.0}
    spread = summary["baselines"]["SAE"]["state_precision"]
    assert spread["min"] == 0.5 and spread["max"] == 0.7
    assert spread["mean"] == pytest.approx(0.6)
    assert "| SAE | 60 (50 to 70) |" in markdown(summary)


def test_run_seeds_runs_each_seed_in_its_own_directory(tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from codelens.experiments.seeds import run_seeds

    @dataclasses.dataclass
    class Exp:
        run_dir: str
        seed: int = 0

    seen = []

    def run_experiment(exp):
        seen.append((exp.seed, exp.run_dir))
        return {"timings": {"total s": 1.0}, "value": float(exp.seed)}

    module = SimpleNamespace(run_experiment=run_experiment, headline=lambda r: {"v": r["value"]})
    summary = run_seeds(module, Exp(str(tmp_path)), [3, 5])
    assert seen == [(3, str(tmp_path / "seed-3")), (5, str(tmp_path / "seed-5"))]
    assert summary["headline"]["v"] == {"mean": 4.0, "min": 3.0, "max": 5.0}
    assert "| v | 4 (3 to 5) |" in (tmp_path / "seeds.md").read_text()
    with pytest.raises(ValueError, match="distinct"):
        run_seeds(module, Exp(str(tmp_path)), [1, 1])


def test_run_seeds_reuses_a_finished_seed_and_refuses_another_experiment(tmp_path):
    import dataclasses
    import json
    from types import SimpleNamespace

    from codelens.experiments.seeds import run_seeds

    @dataclasses.dataclass
    class Exp:
        run_dir: str
        seed: int = 0
        steps: int = 10

    seen = []

    def run_experiment(exp):
        seen.append(exp.seed)
        return {"timings": {"total s": 1.0}, "value": float(exp.seed)}

    module = SimpleNamespace(run_experiment=run_experiment, headline=lambda r: {"v": r["value"]})
    done = tmp_path / "seed-3"
    done.mkdir()
    finished = {
        "experiment": {"run_dir": "/elsewhere", "seed": 3, "steps": 10},
        "environment": {"codelens commit": "abc1234"},
        "timings": {"total s": 2.0},
        "value": 30.0,
    }
    (done / "report.json").write_text(json.dumps(finished))
    summary = run_seeds(module, Exp(str(tmp_path)), [3, 5])
    assert seen == [5]  # seed 3 was read back, not rerun
    assert summary["headline"]["v"] == {"mean": 17.5, "min": 5.0, "max": 30.0}
    summary_md = (tmp_path / "seeds.md").read_text()
    assert "3: abc1234" in summary_md and "different commits" in summary_md
    with pytest.raises(ValueError, match="settings differ: steps"):
        run_seeds(module, Exp(str(tmp_path), steps=20), [3])
    assert seen == [5]


def test_steered_and_feature_columns():
    from codelens.experiments import baselines as bl

    assert bl.steered({"before": 0.1, "after": 0.8, "perplexity_ratio": 2.0})
    assert not bl.steered({"before": 0.2, "after": 0.9, "perplexity_ratio": 1.0})
    assert not bl.steered({"before": 0.1})  # no fluent option: not steered
    # another corpus: >= 70% and 10 points over the unsteered share
    assert bl.steered({"before": 0.3, "after": 0.7, "perplexity_ratio": 1.0}, "fortunes")
    assert not bl.steered({"before": 0.65, "after": 0.7, "perplexity_ratio": 1.0}, "fortunes")
    assert not bl.steered({"before": 0.0, "after": 0.9, "perplexity_ratio": 2.5}, "fortunes")
    feats = [neurons("a", 3), neurons("b", 5)]
    assert bl._split(feats, 4) == (feats[1], 1)
    with pytest.raises(ValueError, match="out of range"):
        bl._split(feats, 8)
