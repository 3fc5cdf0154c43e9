"""HookedCodebookTransformer on GPT-NeoX, GPT-2 and Llama: hooks, patching, generation, errors."""

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig, HookedCodebookTransformer

SITES = (
    "blocks.0.attn.hook_z",
    "blocks.1.attn.hook_z",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_mlp_out",
)


def all_hooks_removed(model) -> bool:
    return not any(hp.has_hooks(including_permanent=True) for hp in model.hook_dict.values())


def test_hook_names_and_shapes(arch, tokens):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=2, mlp_groups=2))
    assert list(model.codebooks) == [
        "blocks.0.attn.hook_z",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_mlp_out",
    ]
    _, cache = model.run_with_cache(tokens)
    b, p = tokens.shape
    codes = cache["blocks.0.attn.hook_z.hook_codes"]
    assert codes.dtype == torch.int64 and codes.shape == (b, p, 4, 2)
    assert cache["blocks.1.hook_mlp_out.hook_codes"].shape == (b, p, 2, 2)
    assert cache["blocks.0.attn.hook_z.hook_quantized"].shape == (b, p, 4, 8)
    assert cache["blocks.0.hook_mlp_out.hook_quantized"].shape == (b, p, 2, 16)
    assert cache["blocks.0.attn.hook_z"].shape == (b, p, 4, 8)
    assert (
        model.hook_dict["blocks.1.hook_mlp_out.hook_codes"].name
        == "blocks.1.hook_mlp_out.hook_codes"
    )


def test_site_hooks_show_the_activation_before_quantisation(arch, tokens):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=1))
    _, cache = model.run_with_cache(tokens)
    with model.codebooks_bypassed():
        _, plain = model.run_with_cache(tokens)
    # Layer 0's attention input is untouched by codebooks, so hook_z must match the plain model.
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"])
    quantized = cache["blocks.0.attn.hook_z.hook_quantized"]
    assert not torch.allclose(cache["blocks.0.attn.hook_z"], quantized)


def test_codebook_free_model_matches_plain_bridge(arch, tokens):
    with_cb = tiny_model(arch, CodebookConfig(n_codes=20, k=1), seed=3)
    plain = tiny_model(arch, None, seed=3)
    with with_cb.codebooks_bypassed():
        torch.testing.assert_close(with_cb(tokens), plain(tokens), rtol=0, atol=0)
    with_cb.remove_codebooks()
    assert with_cb.codebooks == {} and "blocks.0.attn.hook_z.hook_codes" not in with_cb.hook_dict
    torch.testing.assert_close(with_cb(tokens), plain(tokens), rtol=0, atol=0)


def test_gradients_reach_codebooks_and_base_weights(arch, tokens):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=1))
    loss = model(tokens, return_type="loss") + model.reconstruction_loss()
    loss.backward()
    for site, cb in model.codebooks.items():
        assert cb.codes.grad is not None and cb.codes.grad.abs().sum() > 0, site
    embed = model.original_model.get_input_embeddings().weight
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    names = {id(p): n for n, p in model.named_parameters()}
    no_grad = [names[id(p)] for p in model.base_parameters() if p.grad is None or not p.grad.any()]
    # Only a fused QKV weight, which the bridge runs as split q, k and v, gets no gradient.
    assert all(
        ".attention.qkv._original_component." in n or ".attn.qkv._original_component." in n
        for n in no_grad
    ), no_grad
    assert len(no_grad) <= 2 * model.cfg.n_layers  # its weight and bias per layer


@pytest.mark.parametrize("site", ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"])
def test_patching_ids_gives_exactly_the_patched_codes(arch, tokens, site):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=1))
    codes = model.codebook(site).codes.detach()

    def to_code_5(ids, hook):
        return torch.full_like(ids, 5)

    def quantized_as_code_5(q, hook):
        return codes[torch.arange(q.shape[-2]), 5].expand_as(q)

    patched = model.run_with_hooks(tokens, fwd_hooks=[(f"{site}.hook_codes", to_code_5)])
    direct = model.run_with_hooks(
        tokens, fwd_hooks=[(f"{site}.hook_quantized", quantized_as_code_5)]
    )
    torch.testing.assert_close(patched, direct, rtol=0, atol=0)
    assert not torch.allclose(patched, model(tokens))
    assert all_hooks_removed(model)


def test_generate_with_forced_codes_and_kv_cache(arch):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=1)).eval()
    prompt = torch.tensor([[10, 1, 2, 3]])
    site = "blocks.1.hook_mlp_out.hook_codes"
    forced = []

    def force(ids, hook):
        forced.append(ids.shape[1])
        return torch.full_like(ids, 3)

    with model.hooks(fwd_hooks=[(site, force)]):
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
        full = model(out)
    assert forced[:5] == [4, 1, 1, 1, 1]  # the KV cache fed one token at a time
    # Greedy generation with the cache equals argmax of a full forward under the same hook.
    assert torch.equal(out[0, 4:], full[0, 3:-1].argmax(-1))
    plain = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
    assert torch.equal(plain[0, 4:], model(plain)[0, 3:-1].argmax(-1))
    assert all_hooks_removed(model)


def test_no_hook_left_behind_when_a_user_hook_raises(tokens):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=20, k=1))

    def boom(x, hook):
        raise RuntimeError("user bug")

    for name in ("blocks.0.hook_mlp_out.hook_codes", "blocks.0.attn.hook_z"):
        with pytest.raises(RuntimeError, match="user bug"):
            model.run_with_hooks(tokens, fwd_hooks=[(name, boom)])
        assert all_hooks_removed(model)
        with pytest.raises(RuntimeError, match="user bug"):
            with model.hooks(fwd_hooks=[(name, boom)]):
                model(tokens)
        assert all_hooks_removed(model)
    with pytest.raises(RuntimeError, match="user bug"), model.codebooks_bypassed():
        raise RuntimeError("user bug")
    assert not any(cb.bypass for cb in model.codebooks.values())


def test_bad_inputs_give_clear_errors(tokens):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=20, k=1))
    with pytest.raises(KeyError, match="blocks.0.hook_nonsense"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_nonsense", lambda x, hook: x)])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 13\)"):
        model(torch.tensor([[1, 13]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="never process weights"):
        model.enable_compatibility_mode()
    with pytest.raises(ValueError, match="never process weights"):
        model.process_weights()
    with pytest.raises(ValueError, match="already has codebooks"):
        model.add_codebooks(CodebookConfig(n_codes=5))
    with pytest.raises(KeyError, match="no codebook at"):
        model.codebook("blocks.0.hook_resid_post")
    plain = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="layers \\[5\\] out of range"):
        plain.add_codebooks(CodebookConfig(layers=(5,)))
    with pytest.raises(ValueError, match="does not divide d_model"):
        plain.add_codebooks(CodebookConfig(mlp_groups=3))
    with pytest.raises(ValueError, match="model_type"):
        type(plain).from_config({"hidden_size": 8}, None)


def test_layers_and_sites_selection(tokens):
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, k=1, sites=("mlp",), layers=(1,)))
    assert list(model.codebooks) == ["blocks.1.hook_mlp_out"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    assert list(cache.keys()) == ["blocks.1.hook_mlp_out.hook_codes"]


def test_mlp_codebooks_can_be_larger_than_head_codebooks(tokens, tmp_path):
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2, mlp_n_codes=24))
    sizes = {site: cb.n_codes for site, cb in model.codebooks.items()}
    assert sizes == {s: 24 if "mlp" in s else 8 for s in model.codebooks}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    assert int(cache["blocks.0.hook_mlp_out.hook_codes"].max()) < 24
    model.save_pretrained(tmp_path / "m")
    loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "m")
    assert {s: cb.n_codes for s, cb in loaded.codebooks.items()} == sizes
    with pytest.raises(ValueError, match="mlp_n_codes must be >= k"):
        CodebookConfig(n_codes=8, k=4, mlp_n_codes=2)
