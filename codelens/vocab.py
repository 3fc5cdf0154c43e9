"""The words every part of codelens shares: hook names, a `Code`, and one way to collect codes.

- **Hook names.** Every TransformerLens hook name codelens spells is built here
  (`block_hook`, `attn_site`, `mlp_site`, `resid_pre`, ...), so the rest of the package
  never writes ``"blocks.…"`` by hand. A *site* is the hook name of a codebook's input
  (``"blocks.1.attn.hook_z"``); the codebook adds ``{site}.hook_codes`` and
  ``{site}.hook_quantized`` (`codes_hook`, `quantized_hook`).
- **A code** is `Code(site, group, id)`: code ``id`` of group ``group``'s codebook at
  ``site``. It is frozen, hashable and ordered, and its string (``a1.h2:64``) is for
  display only; JSON stores `Code.as_dict`.
- **Token ids.** `check_token_ids` (a clear error, reading the ids on the host) where
  tokens enter; `assert_token_ids_on_device` in every forward on an accelerator (no read).
- **Collecting.** `cached_batches` runs ``model.run_with_cache`` over token batches with
  hooks attached; `collect_codes` gathers the code ids of every site on the CPU. Every
  caller that needs codes or activations of many sequences goes through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.progress import bar

CODES_HOOK = "hook_codes"
QUANTIZED_HOOK = "hook_quantized"

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- hook names


def block_hook(layer: int, name: str) -> str:
    """The hook ``name`` (e.g. ``"mlp.hook_post"``) inside block ``layer``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    return f"blocks.{layer}.{name}"


def every_layer(n_layers: int, name: str) -> list[str]:
    """The hook ``name`` in every block, in layer order."""
    return [block_hook(layer, name) for layer in range(n_layers)]


def attn_site(layer: int) -> str:
    """Per-head attention outputs (``[batch, pos, head, d_head]``): an attention codebook site."""
    return block_hook(layer, "attn.hook_z")


def mlp_site(layer: int) -> str:
    """The MLP's output (``[batch, pos, d_model]``): an MLP codebook site."""
    return block_hook(layer, "hook_mlp_out")


def mlp_in(layer: int) -> str:
    return block_hook(layer, "hook_mlp_in")


def mlp_post(layer: int) -> str:
    """The MLP's hidden units after the nonlinearity (its neurons)."""
    return block_hook(layer, "mlp.hook_post")


def attn_input(layer: int, kind: str) -> str:
    """The input of an attention layer's ``kind`` projection (``"q"``, ``"k"`` or ``"v"``)."""
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    return block_hook(layer, f"attn.hook_{kind}_input")


def attn_pattern(layer: int) -> str:
    return block_hook(layer, "attn.hook_pattern")


def resid_pre(layer: int) -> str:
    return block_hook(layer, "hook_resid_pre")


def resid_mid(layer: int) -> str:
    return block_hook(layer, "hook_resid_mid")


def resid_post(layer: int) -> str:
    return block_hook(layer, "hook_resid_post")


def codes_hook(site: str) -> str:
    """The hook that carries a site's chosen code ids (int64 ``[batch, pos, G, k]``)."""
    return f"{site}.{CODES_HOOK}"


def quantized_hook(site: str) -> str:
    """The hook that carries a site's quantised output."""
    return f"{site}.{QUANTIZED_HOOK}"


def site_of(hook_name: str) -> str:
    """The site a hook name belongs to: strips ``.hook_codes`` / ``.hook_quantized``."""
    for suffix in (CODES_HOOK, QUANTIZED_HOOK):
        hook_name = hook_name.removesuffix(f".{suffix}")
    return hook_name


def layer_of(hook_name: str) -> int:
    """The block index of a ``blocks.{layer}.…`` hook name."""
    match = _BLOCK.match(hook_name)
    if match is None:
        raise ValueError(f"{hook_name!r} is not a hook inside a block ('blocks.<layer>.<name>')")
    return int(match.group(1))


def is_block_hook(hook_name: str) -> bool:
    """Whether ``hook_name`` is a full ``blocks.{layer}.…`` hook name."""
    return _BLOCK.match(hook_name) is not None


def hook_in_block(hook_name: str) -> str:
    """The part of a ``blocks.{layer}.…`` hook name after the layer (``"attn.hook_z"``)."""
    match = _BLOCK.match(hook_name)
    if match is None:
        raise ValueError(f"{hook_name!r} is not a hook inside a block ('blocks.<layer>.<name>')")
    return match.group(2)


def is_attn_site(site: str) -> bool:
    return _BLOCK.match(site) is not None and hook_in_block(site) == "attn.hook_z"


def is_mlp_site(site: str) -> bool:
    return _BLOCK.match(site) is not None and hook_in_block(site) == "hook_mlp_out"


def short_site(site: str) -> str:
    """A compact display label: ``a1`` (attention, layer 1), ``m1`` (MLP), else the name."""
    if is_attn_site(site):
        return f"a{layer_of(site)}"
    if is_mlp_site(site):
        return f"m{layer_of(site)}"
    return site


# ---------------------------------------------------------------- a code


@dataclass(frozen=True, order=True)
class Code:
    """Code ``id`` of group ``group``'s codebook at ``site`` (a group is a head for ``hook_z``)."""

    site: str
    group: int
    id: int

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"site must be a hook name string, got {self.site!r}")
        object.__setattr__(self, "site", site_of(self.site))
        for name in ("group", "id"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Code {name} must be an int >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))

    def __str__(self) -> str:
        group = "h" if is_attn_site(self.site) else "g"
        return f"{short_site(self.site)}.{group}{self.group}:{self.id}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"site", "group", "id"}``."""
        return {"site": self.site, "group": self.group, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Code:
        missing = {"site", "group", "id"} - set(d)
        if missing:
            raise ValueError(f"a code needs 'site', 'group' and 'id'; missing {sorted(missing)}")
        return cls(d["site"], d["group"], d["id"])


# ---------------------------------------------------------------- token ids


def assert_token_ids_on_device(tokens: Tensor, vocab_size: int) -> None:
    """Fail the device's queue on out-of-range ids, without reading anything to the host."""
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    in_range = ((tokens >= 0) & (tokens < vocab_size)).all()
    torch._assert_async(in_range, f"token ids must be in [0, {vocab_size})")


def check_token_ids(tokens: Tensor, vocab_size: int, *, what: str = "token ids") -> None:
    """Raise a clear error for token ids outside ``[0, vocab_size)`` (reads them on the host)."""
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{what} must be in [0, {vocab_size}) (the model's vocabulary), got min {low}, "
            f"max {high}"
        )


# ---------------------------------------------------------------- collecting


def check_tokens(tokens: Any) -> Int[Tensor, "batch pos"]:
    """Token ids as a non-empty integer ``[batch, pos]`` tensor (one sequence may be 1-D)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(
            f"tokens must be a non-empty [batch, pos] tensor, got {tuple(tokens.shape)}"
        )
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    return tokens


def cached_batches(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    names: Sequence[str],
    *,
    batch_size: int = 32,
    hooks: Sequence[tuple[str, Any]] = (),
) -> Iterator[tuple[slice, dict[str, Tensor]]]:
    """Run ``model`` over ``tokens`` in batches (no grad, ``hooks`` attached), yielding
    each batch's rows and its cache of ``names`` (on the model's device)."""
    tokens = check_tokens(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"the model has no hook {unknown}")
    check_token_ids(tokens, model.cfg.d_vocab)  # once here, not once per batch's forward
    device = next(model.parameters()).device
    for start in bar(range(0, tokens.shape[0], batch_size), desc=f"batches of {batch_size}"):
        rows = slice(start, min(start + batch_size, tokens.shape[0]))
        batch = tokens[rows].to(device)
        # hooks and no-grad mode end before the yield: the caller's code runs as it would
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            _, cache = model.run_with_cache(batch, names_filter=list(names))
        yield rows, {name: cache[name] for name in names}


def collect_codes(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    sites: Sequence[str] | None = None,
    batch_size: int = 32,
    hooks: Sequence[tuple[str, Any]] = (),
) -> dict[str, Int[Tensor, "batch pos G k"]]:
    """Code ids at every codebook site (or ``sites``) for ``tokens``, gathered on the CPU."""
    sites = list(model.codebooks) if sites is None else [site_of(s) for s in sites]
    if not sites:
        raise ValueError("the model has no codebooks")
    missing = [s for s in sites if s not in model.codebooks]
    if missing:
        raise ValueError(f"no codebook at {missing}; sites: {list(model.codebooks)}")
    parts: dict[str, list[Tensor]] = {s: [] for s in sites}
    names = [codes_hook(s) for s in sites]
    for _, cache in cached_batches(model, tokens, names, batch_size=batch_size, hooks=hooks):
        for site in sites:
            parts[site].append(cache[codes_hook(site)].cpu())
    return {s: torch.cat(p) for s, p in parts.items()}
