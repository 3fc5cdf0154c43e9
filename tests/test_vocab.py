"""The shared vocabulary: hook names, `Code`, the collecting loop, atomic files."""

import json
import os

import pytest
import torch
from conftest import tiny_model

from codelens import Code, CodebookConfig
from codelens.files import atomic_write_json, atomic_write_text, sha256_file
from codelens.vocab import (
    attn_site,
    block_hook,
    cached_batches,
    codes_hook,
    collect_codes,
    layer_of,
    mlp_site,
    site_of,
)


def test_hook_names_are_the_bridge_hook_points(arch):
    model = tiny_model(arch, CodebookConfig(n_codes=8, k=2))
    for layer in range(model.cfg.n_layers):
        for site in (attn_site(layer), mlp_site(layer)):
            assert site in model.codebooks and codes_hook(site) in model.hook_dict
            assert layer_of(site) == layer and site_of(codes_hook(site)) == site
    with pytest.raises(ValueError, match="layer must be an int"):
        block_hook(-1, "hook_resid_pre")
    with pytest.raises(ValueError, match="not a hook inside a block"):
        layer_of("hook_embed")


def test_code_is_a_value_with_a_display_string_and_json_form():
    code = Code("blocks.1.attn.hook_z.hook_codes", 2, torch.tensor(64))
    assert code == Code(attn_site(1), 2, 64) and hash(code) == hash(Code(attn_site(1), 2, 64))
    assert str(code) == "a1.h2:64" and str(Code(mlp_site(0), 0, 3)) == "m0.g0:3"
    assert Code.from_dict(json.loads(json.dumps(code.as_dict()))) == code
    assert sorted([Code(mlp_site(0), 0, 5), Code(mlp_site(0), 0, 2)])[0].id == 2
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="id must be an int"):
            Code(mlp_site(0), 0, bad)
    with pytest.raises(ValueError, match="missing"):
        Code.from_dict({"site": mlp_site(0), "group": 0})


def test_collect_codes_matches_one_forward_and_removes_its_hooks(tokens):
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2))
    _, cache = model.run_with_cache(tokens)
    codes = collect_codes(model, tokens, batch_size=1)
    assert list(codes) == list(model.codebooks)
    for site, ids in codes.items():
        assert torch.equal(ids, cache[codes_hook(site)])

    site = mlp_site(0)
    seen = []
    hook = (codes_hook(site), lambda ids, hook: seen.append(1) or torch.zeros_like(ids))
    forced = collect_codes(model, tokens, sites=[site], hooks=[hook], batch_size=1)
    assert len(seen) == 2 and int(forced[site].abs().sum()) == 0
    assert all(not h.fwd_hooks for h in model.hook_dict.values())
    with pytest.raises(ValueError, match="no codebook"):
        collect_codes(model, tokens, sites=["blocks.9.hook_mlp_out"])
    with pytest.raises(ValueError, match="batch_size"):
        next(cached_batches(model, tokens, [site], batch_size=0))


def test_cached_batches_leave_grad_mode_and_hooks_to_the_caller(tokens):
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2))
    hook = (codes_hook(mlp_site(0)), lambda ids, hook: ids)
    for _, cache in cached_batches(model, tokens, [mlp_site(0)], batch_size=1, hooks=[hook]):
        assert torch.is_grad_enabled(), "the caller's loop body may train"
        assert not cache[mlp_site(0)].requires_grad
        assert all(not h.fwd_hooks for h in model.hook_dict.values())


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert path.read_text() == "hello" and os.listdir(path.parent) == ["b.txt"]
    atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})
    assert json.loads(path.read_text()) == {"x": 1} and os.listdir(path.parent) == ["b.txt"]
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path / "a", "no")
    assert len(sha256_file(path)) == 64
