"""The TransformerLens 4 bridge facts codelens relies on (see codelens/_bridge.py).

If a TransformerLens upgrade changes one of them, these fail first and say which.
"""

from importlib.metadata import version

import torch
import transformer_lens
from conftest import tiny_model
from transformer_lens.hook_points import HookPoint

from codelens import CodebookConfig, _bridge


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
