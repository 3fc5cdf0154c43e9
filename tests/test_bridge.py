"""The TransformerLens 4 bridge facts codelens relies on (see codelens/_bridge.py).

If a TransformerLens upgrade changes one of them, these fail first and say which.
"""

from importlib.metadata import version

import pytest
import torch
import transformer_lens
from conftest import tiny_model
from transformer_lens.hook_points import HookPoint

from codelens import CodebookConfig, _bridge
from codelens.vocab import every_layer


def test_transformer_lens_version_is_the_pinned_one():
    assert version("transformer-lens").startswith("4.3."), (
        "codelens is pinned to transformer-lens 4.3"
    )
    assert hasattr(transformer_lens, "HookedRootModule")


def test_site_aliases_resolve_through_the_registry(arch):
    model = tiny_model(arch)
    for name in ("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"):
        hp = model.hook_dict[name]
        assert isinstance(hp, HookPoint), f"{name} is no longer a HookPoint"
        assert any(hp is child for m in model.modules() for child in m._modules.values()), (
            f"{name} is not held by a module any more: install_site cannot replace it"
        )
    assert model.hook_dict["blocks.0.attn.hook_z"].hook_conversion is not None


def test_installed_sites_are_what_the_aliases_point_to(arch, tokens):
    model = tiny_model(arch, CodebookConfig(n_codes=8, k=1))
    for site in model.codebooks:
        assert isinstance(model.hook_dict[site], _bridge.CodebookSite)
    seen = {}
    model.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.0.attn.hook_z.hook_codes", lambda x, hook: seen.setdefault("z", x))],
    )
    assert seen["z"].shape == (*tokens.shape, model.cfg.n_heads, 1)


def test_live_parameters_are_the_bridge_parameters(tokens):
    model = tiny_model("gpt_neox")
    model(tokens, return_type="loss").backward()
    stale = [n for n, p in model.original_model.named_parameters() if p.grad is None]
    # The fused QKV weight is replaced by split copies: checkpoints must store bridge parameters.
    assert stale and all(".qkv." in n for n in stale)


def test_kv_cache_fills_when_attention_is_recomputed(arch):
    # A replacing hook on hook_z makes the bridge recompute attention; transformers >= 5.24
    # hands that code the cache as `cache=`, which TL 4.3 alone ignores (route_kv_cache).
    model = tiny_model(arch)
    prompt = torch.tensor([[10, 1, 2, 3, 4]])
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z * 1.0)]):
        _, cache = model(prompt, return_type="logits_and_cache", use_cache=True)
        assert cache is not None and cache.get_seq_length() == prompt.shape[1]


def test_cached_generation_equals_full_forward_argmax(arch):
    torch.manual_seed(0)
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=1))
    prompts = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    prompts[:, 0] = 10
    out = model.generate(
        prompts, max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False
    )
    assert out.shape == (4, 23)
    assert torch.equal(out[:, 3:], model(out)[:, 2:-1].argmax(-1))


def test_code_shapes_keep_their_group_axis_for_one_token_forwards(arch):
    # Cached generation runs one-token forwards: [1, 1, d_model] must not pass for grouped.
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=2))
    shapes = []
    hooks = [
        (f"{site}.hook_codes", lambda ids, hook: shapes.append(ids.shape))
        for site in model.codebooks
    ]
    with model.hooks(fwd_hooks=hooks):
        model.generate(torch.tensor([[10, 1]]), max_new_tokens=2, do_sample=False, verbose=False)
    assert shapes and all(len(shape) == 4 and shape[-1] == 2 for shape in shapes)


def _pattern_hooks(model):
    """A no-op hook on every ``hook_pattern``: it makes the bridge attend eagerly."""
    return [(n, lambda x, hook: x) for n in every_layer(model.cfg.n_layers, "attn.hook_pattern")]


def _fused_calls(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_attention_runs_when_no_pattern_hook_is_attached(arch, tokens, monkeypatch):
    model = tiny_model(arch, CodebookConfig(n_codes=8, k=2))
    calls = _fused_calls(monkeypatch)
    model(tokens)
    assert len(calls) == model.cfg.n_layers
    calls.clear()
    _, cache = model.run_with_cache(tokens)  # caches every pattern: eager attention
    assert calls == []
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_attention_equals_eager_in_logits_hook_z_and_gradients(arch, tokens):
    model = tiny_model(arch, CodebookConfig(n_codes=8, k=2))
    z = every_layer(model.cfg.n_layers, "attn.hook_z")

    def run(hooks):
        model.zero_grad()
        with model.hooks(fwd_hooks=hooks):
            logits, cache = model.run_with_cache(tokens, names_filter=z)
            logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits, cache, grads

    fused, eager = run([]), run(_pattern_hooks(model))
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=1e-6)
    for name in z:
        torch.testing.assert_close(fused[1][name], eager[1][name], rtol=1e-5, atol=1e-6)
    assert fused[2].keys() == eager[2].keys() and fused[2]
    for name, grad in fused[2].items():
        torch.testing.assert_close(grad, eager[2][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_attention_generates_as_eager_with_the_kv_cache(arch, tokens, monkeypatch):
    model = tiny_model(arch)
    calls = _fused_calls(monkeypatch)
    fused = model.generate(tokens[:, :4], max_new_tokens=6, do_sample=False, verbose=False)
    assert calls, "cached decoding did not use fused attention"
    with model.hooks(fwd_hooks=_pattern_hooks(model)):
        eager = model.generate(tokens[:, :4], max_new_tokens=6, do_sample=False, verbose=False)
    assert torch.equal(fused, eager)
