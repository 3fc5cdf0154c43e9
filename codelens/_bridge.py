"""Every use of TransformerLens 4 bridge internals lives here.

TransformerLens 4 has no HookedTransformer; `TransformerBridge` wraps a HuggingFace
model. codelens relies on these bridge facts, each covered by `tests/test_bridge.py`
so that an upgrade that changes them fails loudly:

- `boot_transformers(label, hf_model=..., tokenizer=...)` boots an in-memory model
  offline, provided the tokenizer's `init_kwargs` name a path and ask for BOS
  (otherwise the bridge re-downloads a tokenizer by name).
- `blocks.{l}.attn.hook_z` and `blocks.{l}.hook_mlp_out` are aliases, resolved
  through the hook registry, of HookPoints held by bridge components; replacing
  the HookPoint object in the module tree and rebuilding the registry re-routes them.
- The HookPoint behind `hook_z` sees the flat ``[..., n_heads * d_head]`` input of
  W_O; its `hook_conversion` reshapes it to heads for hook functions.
- The bridge's live parameters are `bridge.named_parameters()`; for GPT-2 and
  GPT-NeoX the fused QKV weight of the HF model is replaced by split copies, so
  checkpoints store the bridge's parameters, not the HF state dict.
- An attention bridge that recomputes attention (always, once a hook on ``hook_z``
  replaces its output) extends the KV cache only when it is handed as
  ``past_key_values`` or ``layer_past``. transformers 5.24 renamed the argument its
  decoder layers pass to ``cache`` (GPT-2, Llama, ...), so cached generation silently
  attended to the new token alone; `route_kv_cache` hands it on under the old name.
- The bridge recomputes attention eagerly (``q @ k^T``, mask, softmax, ``@ v``) so that
  ``hook_attn_scores`` and ``hook_pattern`` fire, which stores a ``[batch, heads, query,
  key]`` score and pattern tensor per layer for the backward pass. `use_sdpa` computes the
  same attention with `scaled_dot_product_attention` whenever neither hook has a hook on it
  (GPT-2 and GPT-NeoX/Pythia attention; other attention keeps the bridge's own path).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
    JointQKVAttentionBridge,
)
from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (  # noqa: E501
    JointQKVPositionEmbeddingsAttentionBridge,
)

from codelens.codebook import CodebookLayer
from codelens.vocab import CODES_HOOK, QUANTIZED_HOOK

CODEBOOK_HOOKS = (CODES_HOOK, QUANTIZED_HOOK)


def prepare_tokenizer(tokenizer: Any, name: str) -> Any:
    """Make an in-memory tokenizer bootable offline (see module docstring)."""
    tokenizer.init_kwargs.setdefault("name_or_path", name)
    tokenizer.init_kwargs["add_bos_token"] = True
    return tokenizer


def boot(
    name_or_dir: str,
    *,
    hf_model: nn.Module | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Boot a bridge from a hub name, a local HF directory or an in-memory HF model."""
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, name_or_dir)
    kwargs: dict[str, Any] = {"dtype": dtype, "tokenizer": tokenizer}
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    if device is not None:
        kwargs["device"] = device
    bridge = TransformerBridge.boot_transformers(name_or_dir, **kwargs)
    route_kv_cache(bridge)
    use_sdpa(bridge)
    return bridge


def route_kv_cache(bridge: TransformerBridge) -> None:
    """Let every attention bridge find the KV cache that transformers >= 5.24 passes as ``cache``.

    Without it, an attention bridge that recomputes attention leaves the cache empty, and
    each cached decoding step attends only to itself (see the module docstring).
    """
    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and "_update_kv_cache" not in vars(module):
            module._update_kv_cache = _cache_aware(module._update_kv_cache)


def _cache_aware(update_kv_cache: Any) -> Any:
    def update(k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            kwargs["past_key_values"] = kwargs.get("cache")
        return update_kv_cache(k, v, **kwargs)

    return update


SDPA_ATTENTION = (JointQKVAttentionBridge, JointQKVPositionEmbeddingsAttentionBridge)
"""Attention bridges whose recomputation `use_sdpa` knows step by step (exact types)."""


def use_sdpa(bridge: TransformerBridge) -> None:
    """Give every attention bridge of a type in `SDPA_ATTENTION` a fused-attention path.

    The result equals the bridge's eager attention up to float rounding; the eager path
    runs whenever a hook sits on ``hook_attn_scores`` or ``hook_pattern`` (a cache of the
    patterns, a pattern patch), in compatibility mode (its -inf masks zero fully masked
    rows), with attention dropout active in training, or with GPT-2's upcast option.
    """
    for module in bridge.modules():
        if type(module) in SDPA_ATTENTION and "_reconstruct_attention" not in vars(module):
            module._reconstruct_attention = _fused(module, module._reconstruct_attention)


def _hooked(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks)


def _eager_only(attn: AttentionBridge) -> bool:
    dropout = getattr(attn.original_component, "attn_dropout", None) or getattr(
        attn.original_component, "attention_dropout", None
    )
    return (
        _hooked(attn.hook_attn_scores)
        or _hooked(attn.hook_pattern)
        or attn.compatibility_mode
        or not attn.is_causal
        or getattr(attn, "_reorder_and_upcast_attn", False)
        or (attn.training and isinstance(dropout, nn.Dropout) and dropout.p > 0)
    )


def _fused(attn: AttentionBridge, eager: Any) -> Any:
    rotary = isinstance(attn, JointQKVPositionEmbeddingsAttentionBridge)

    def reconstruct(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, None]:
        if _eager_only(attn):
            return eager(q, k, v, **kwargs)
        cfg = attn.config
        n_heads = cfg.n_heads
        n_kv_heads = getattr(cfg, "n_key_value_heads", None) or n_heads
        q, k, v, batch, q_len, d_head = attn._reshape_qkv_to_heads(q, k, v, n_heads, n_kv_heads)
        position_embeddings = kwargs.get("position_embeddings")
        if rotary and isinstance(position_embeddings, tuple):
            cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
            q, k = attn._apply_rotary_pos_emb(q, k, cos, sin)
        k, v = attn._update_kv_cache(k, v, **kwargs)
        if n_kv_heads != n_heads:
            k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
            v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
        scale = d_head**-0.5
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and attn._layer_idx is not None:
            scale /= float(attn._layer_idx + 1)
        mask = _additive_mask(kwargs.get("attention_mask"), q, k_len=k.shape[-2])
        z = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q_len == k.shape[-2], scale=scale
        )
        z = attn._reshape_attn_output(z, batch, q_len, n_heads, d_head)
        if getattr(cfg, "use_attn_result", False) and attn.o.original_component is not None:
            z = attn.o.hook_in(z)
            out = attn._compute_per_head_result(
                z.view(batch, q_len, n_heads, d_head), n_heads, d_head
            )
        else:
            out = attn._apply_output_projection(z)
        return out, None

    return reconstruct


def _additive_mask(mask: Tensor | None, q: Tensor, k_len: int) -> Tensor | None:
    """The bridge's mask rules as an additive ``[batch, 1, query, key]`` mask, or None for
    plain causal attention. A 4-D mask from HuggingFace already holds the causal part;
    a lower-rank one is a padding mask and gets the causal triangle added."""
    q_len = q.shape[-2]
    if mask is None and q_len == k_len:
        return None
    low = torch.finfo(q.dtype).min
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is None or mask.ndim < 4:
        additive = torch.zeros(q_len, k_len, dtype=q.dtype, device=q.device)
        additive = additive.masked_fill(~causal, low)
        if mask is None:
            return additive
    else:
        additive = torch.zeros((), dtype=q.dtype, device=q.device)
    mask = mask[..., :k_len]
    if mask.ndim >= 3 and mask.shape[-2] != q_len:
        mask = mask[..., -q_len:, :]
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, low)
    return additive + mask.to(q.dtype)


def hf_model(bridge: TransformerBridge) -> nn.Module:
    """The wrapped HuggingFace model."""
    return bridge.original_model


class CodebookSite(HookPoint):
    """Stands in for the bridge's HookPoint at a codebook site.

    User hooks on the site (``hook_z`` / ``hook_mlp_out``) run first and see the
    activation before quantisation; the codebook then quantises what they return.
    """

    def __init__(self, replaced: HookPoint, codebook: CodebookLayer) -> None:
        super().__init__()
        self.name = replaced.name
        self.hook_conversion = replaced.hook_conversion
        self.backward_scale = replaced.backward_scale
        self.pos_dim = replaced.pos_dim
        self.codebook = codebook

    def __call__(self, x: Tensor) -> Tensor:
        x = super().__call__(x)
        groups = self.codebook.n_groups
        # Sites see [batch, pos, features] (or [batch, pos, groups, d]); by the shape alone, a
        # one-token flat input with one group would pass for a grouped one.
        if x.ndim == 4 and x.shape[-2:] == (groups, self.codebook.d):
            return self.codebook(x)
        grouped = rearrange(x, "... (g d) -> ... g d", g=groups)
        return rearrange(self.codebook(grouped), "... g d -> ... (g d)")


def install_site(
    bridge: TransformerBridge, hook_name: str, codebook: CodebookLayer
) -> CodebookSite:
    """Replace the HookPoint behind ``hook_name`` by a `CodebookSite` everywhere it is held."""
    old = bridge.hook_dict.get(hook_name)
    if old is None:
        raise ValueError(f"the model has no hook point named {hook_name!r}")
    if isinstance(old, CodebookSite):
        raise ValueError(
            f"{hook_name} is the hook point {old.name}, which already has a codebook; "
            "remove that one first"
        )
    if old.has_hooks():
        raise RuntimeError(f"remove the hooks on {hook_name} before installing a codebook there")
    site = CodebookSite(old, codebook)
    replaced = 0
    for module in bridge.modules():
        for attr, value in list(module._modules.items()):
            if value is old:
                module._modules[attr] = site
                replaced += 1
        for attr, value in list(vars(module).items()):
            if value is old:
                object.__setattr__(module, attr, site)
    if replaced == 0:
        raise RuntimeError(f"could not find the module holding {hook_name}; bridge layout changed")
    return site


def activation_width(bridge: TransformerBridge, hook_name: str) -> int:
    """The feature width a codebook at ``hook_name`` would see, read from a one-token forward.

    The HookPoint's own input is what a `CodebookSite` quantises (before any
    ``hook_conversion``), so its last dimension is the width; a hook point that no
    forward reaches (TransformerLens fires some only with compatibility flags) is refused.
    """
    point = bridge.hook_dict.get(hook_name)
    if point is None:
        raise ValueError(f"the model has no hook point named {hook_name!r}")
    seen: list[torch.Size] = []
    handle = point.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    device = next(bridge.parameters()).device
    try:
        with torch.no_grad():
            bridge(torch.zeros(1, 1, dtype=torch.long, device=device), return_type=None)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(
            f"{hook_name} carries no activation in a forward pass of this model, so a codebook "
            "there would never run; pick a hook that fires (e.g. blocks.0.hook_resid_pre)"
        )
    if len(seen[0]) != 3:
        raise ValueError(
            f"{hook_name} carries a {len(seen[0])}-d tensor {tuple(seen[0])}; codebooks go at "
            "hooks of shape [batch, pos, features]"
        )
    return int(seen[0][-1])


def uninstall_site(bridge: TransformerBridge, site: CodebookSite) -> None:
    """Put a plain HookPoint back where a `CodebookSite` was."""
    plain = HookPoint()
    plain.name, plain.hook_conversion = site.name, site.hook_conversion
    plain.backward_scale, plain.pos_dim = site.backward_scale, site.pos_dim
    for module in bridge.modules():
        for attr, value in list(module._modules.items()):
            if value is site:
                module._modules[attr] = plain
        for attr, value in list(vars(module).items()):
            if value is site:
                object.__setattr__(module, attr, plain)


class SiteAwareBridge(TransformerBridge):
    """A bridge whose hook registry names codebook hooks ``{site}.hook_codes``.

    Built by re-classing a booted bridge (the bridge has no constructor to call
    for an already-wrapped model); it adds no state of its own here.
    """

    _codebook_sites: dict[str, CodebookSite]

    def _scan_existing_hooks(self, module: nn.Module, prefix: str = "") -> None:
        super()._scan_existing_hooks(module, prefix)
        sites = getattr(self, "_codebook_sites", {})
        ids = {id(getattr(s.codebook, h)) for s in sites.values() for h in CODEBOOK_HOOKS}
        for key in [k for k, hp in self._hook_registry.items() if id(hp) in ids]:
            del self._hook_registry[key]
        for site_name, site in sites.items():
            for hook in CODEBOOK_HOOKS:
                hp = getattr(site.codebook, hook)
                hp.name = f"{site_name}.{hook}"
                self._hook_registry[hp.name] = hp

    def refresh_hooks(self) -> None:
        """Rebuild the hook registry after sites were installed or removed."""
        self.clear_hook_registry()
        self._initialize_hook_registry()


def specialise(bridge: TransformerBridge, cls: type) -> Any:
    """Turn a booted bridge into an instance of ``cls`` (a `SiteAwareBridge` subclass)."""
    if not issubclass(cls, SiteAwareBridge):
        raise TypeError(f"{cls.__name__} must subclass SiteAwareBridge")
    bridge.__class__ = cls
    bridge._codebook_sites = {}
    return bridge
