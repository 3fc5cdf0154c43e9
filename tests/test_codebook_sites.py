"""Codebooks at any hook (`add_codebook`): forward, training, saving, patching, circuits."""

import json

import pytest
import torch
from conftest import TRAIN_FSM, TRAIN_NEOX, tiny_model

from codelens import CodebookConfig, HookedCodebookTransformer
from codelens.checkpoint import MANIFEST, _digest
from codelens.circuits import Patcher, active_codes, attribution_graph, build_graph
from codelens.interventions import CodeIntervention
from codelens.training.config import TrainConfig
from codelens.training.trainer import train
from codelens.vocab import codes_hook, mlp_post, mlp_site, resid_pre

RESID = resid_pre(1)


def test_codebook_at_the_residual_stream_quantises_it(arch, tokens):
    model = tiny_model(arch)
    with torch.no_grad():
        plain = model(tokens)
    layer = model.add_codebook(RESID, n_codes=8, k=2, groups=4)
    assert (layer.n_groups, layer.d, layer.n_codes, layer.k) == (4, 8, 8, 2)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        with model.codebooks_bypassed():
            bypassed = model(tokens)
    assert cache[codes_hook(RESID)].shape == (*tokens.shape, 4, 2)
    assert not torch.allclose(logits, plain)  # the codebook is in the forward
    torch.testing.assert_close(bypassed, plain)
    # the hook still shows the residual before quantisation, as at the attn/mlp sites
    torch.testing.assert_close(cache[RESID], cache["blocks.0.hook_resid_post"])
    model.remove_codebook(RESID)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain)


def test_each_site_has_its_own_size_next_to_the_shortcut():
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=1, sites=("mlp",)))
    model.add_codebook(RESID, n_codes=32, k=3)
    model.add_codebook(mlp_post(0), n_codes=12, k=1, groups=2)
    sizes = {s: (cb.n_groups, cb.d, cb.n_codes, cb.k) for s, cb in model.codebooks.items()}
    assert sizes == {
        mlp_site(0): (1, 32, 16, 1),
        mlp_site(1): (1, 32, 16, 1),
        RESID: (1, 32, 32, 3),
        mlp_post(0): (2, 32, 12, 1),
    }


def test_bad_hooks_are_refused_by_name():
    model = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="no hook point named 'blocks.9.hook_resid_pre'"):
        model.add_codebook(resid_pre(9), n_codes=8)
    with pytest.raises(ValueError, match="carries no activation"):
        model.add_codebook("blocks.0.hook_mlp_in", n_codes=8)  # fires only in compat mode
    with pytest.raises(ValueError, match="4-d tensor"):
        model.add_codebook("blocks.0.attn.hook_pattern", n_codes=8)
    with pytest.raises(ValueError, match="groups=3 does not divide the width 32"):
        model.add_codebook(RESID, n_codes=8, groups=3)
    with pytest.raises(ValueError, match="k must be between 1 and n_codes=4"):
        model.add_codebook(RESID, n_codes=4, k=5)
    model.add_codebook(RESID, n_codes=8)
    with pytest.raises(ValueError, match="already a codebook at"):
        model.add_codebook(RESID, n_codes=8)
    with pytest.raises(ValueError, match="codebook's own hook"):
        model.add_codebook(codes_hook(RESID), n_codes=8)
    assert list(model.codebooks) == [RESID]


def test_saves_and_loads_bit_exact_with_per_site_settings(tmp_path, tokens):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=1, sites=("attn",)))
    model.add_codebook(RESID, n_codes=24, k=2, groups=2, similarity="dot", combine="mean")
    model.add_codebook(mlp_post(1), n_codes=8, layer_norm=True, layer_norm_affine=True)
    out = model.save_pretrained(tmp_path / "m")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sites"][RESID] == model.codebook(RESID).settings()
    assert manifest["sites"][RESID]["similarity"] == "dot"
    loaded = HookedCodebookTransformer.from_pretrained(out)
    assert list(loaded.codebooks) == list(model.codebooks)
    assert loaded.codebook_config == model.codebook_config
    for site, cb in model.codebooks.items():
        assert loaded.codebook(site).settings() == cb.settings()
        assert torch.equal(loaded.codebook(site).codes, cb.codes)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="already has codebooks"):
        HookedCodebookTransformer.from_pretrained(out, CodebookConfig(n_codes=4))
    base = HookedCodebookTransformer.from_pretrained(out, None)
    assert base.codebooks == {}


def test_checkpoints_that_saved_only_shapes_still_load(tmp_path, tokens):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=2, mlp_n_codes=24))
    out = model.save_pretrained(tmp_path / "old")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["sites"] = {  # what codelens wrote before per-site settings
        site: {key: s[key] for key in ("n_groups", "d", "n_codes", "k")}
        for site, s in manifest["sites"].items()
    }
    manifest["digest"] = _digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    loaded = HookedCodebookTransformer.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_force_and_swap_at_a_residual_codebook(tokens):
    model = tiny_model("gpt2")
    model.add_codebook(RESID, n_codes=8, k=2)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    chosen = cache[codes_hook(RESID)]
    force = CodeIntervention.force(RESID, [5, 6], positions=3)
    with torch.no_grad(), model.hooks(fwd_hooks=force.hooks(model)):
        _, forced = model.run_with_cache(tokens)
    ids = forced[codes_hook(RESID)]
    assert sorted(ids[:, 3, 0].flatten().tolist()) == [5, 5, 6, 6]
    assert torch.equal(ids[:, :3], chosen[:, :3])
    first = int(chosen[0, 0, 0, 0])
    other = (first + 1) % 8
    swap = CodeIntervention.swap(RESID, {first: other})
    with torch.no_grad(), model.hooks(fwd_hooks=swap.hooks(model)):
        _, swapped = model.run_with_cache(tokens)
    assert int(swapped[codes_hook(RESID)][0, 0, 0, 0]) == other


def test_trains_from_the_config_and_resumes_its_sites(tmp_path):
    fsm, neox = TRAIN_FSM, TRAIN_NEOX
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        data={"fsm": fsm},
        model_config=neox,
        codebook={"n_codes": 16, "k": 1, "sites": ["mlp"]},
        codebook_hooks={RESID: {"n_codes": 24, "k": 2, "groups": 2}},
        steps=4,
        batch_size=8,
        eval_every=0,
        eval_batches=1,
        log_every=2,
        checkpoint_every=0,
        init_samples=64,
    )
    result = train(config, progress=False)
    cb = result.model.codebook(RESID)
    assert (cb.n_groups, cb.n_codes, cb.k) == (2, 24, 2)
    loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "run" / "final")
    assert torch.equal(loaded.codebook(RESID).codes, cb.codes.cpu())
    # continuing from the saved model keeps the codebook; asking for another size is refused
    again = dict(config.__dict__, model=str(tmp_path / "run" / "final"), model_config=None)
    again.update(codebook=None, run_dir=str(tmp_path / "again"), steps=1)
    resumed = train(TrainConfig(**again), progress=False)
    assert list(resumed.model.codebooks) == list(loaded.codebooks)
    again.update(codebook_hooks={RESID: {"n_codes": 8}}, run_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="differs from the model's codebook"):
        train(TrainConfig(**again), progress=False)
    with pytest.raises(ValueError, match="needs n_codes"):
        TrainConfig(**dict(again, codebook_hooks={RESID: {"k": 2}}))


def test_circuits_refuse_a_residual_codebook_and_keep_one_inside_an_mlp():
    model = tiny_model("gpt2", CodebookConfig(n_codes=16, k=1))
    model.add_codebook(RESID, n_codes=8)
    with pytest.raises(ValueError, match=r"cannot express the codebooks at \['blocks.1.hook_resid"):
        build_graph(model)
    with pytest.raises(ValueError, match=r"also has codebooks at \['blocks.1.hook_resid_pre'\]"):
        attribution_graph(model, torch.arange(6))
    model.remove_codebook(RESID)
    model.add_codebook(mlp_post(0), n_codes=8, groups=2)
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 10, (2, 4, 6), generator=gen)
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    graph = build_graph(model, "codes", active_codes(model, clean, corrupted))
    assert mlp_post(0) not in graph.code_sites  # part of MLP 0, whose codes are senders
    patcher = Patcher(model, graph, clean, corrupted=corrupted)
    with torch.no_grad():
        torch.testing.assert_close(patcher.run(patcher.empty_mask()), clean_logits)
        torch.testing.assert_close(patcher.run(patcher.full_mask()), corrupted_logits)
