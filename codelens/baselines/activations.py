"""Activations at codebook sites, cached in batches through the model's own hooks.

A site is a hook name: ``blocks.{l}.attn.hook_z`` (the heads' outputs before W_O, seen by
hooks as ``[batch, pos, heads, d_head]``), ``blocks.{l}.hook_mlp_out`` or any other hook
whose activation is one vector per token (``mlp.hook_post`` neurons, ``hook_resid_post``).
``group`` picks one group (head) of a ``hook_z`` site; without it they are concatenated into
one ``heads * d_head`` vector, the layout W_O reads.

With codebooks installed the site hooks still see the activation before quantisation, so
the same code caches a plain model and a codebook model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.files import atomic_path, atomic_write_json
from codelens.vocab import attn_site, cached_batches, check_tokens, mlp_site


def site_view(x: Tensor, group: int | None = None) -> Float[Tensor, "... d"]:
    """A site activation as one vector per token: groups (heads) concatenated, or one
    ``group`` (a head of ``hook_z``)."""
    if group is not None:
        if x.ndim < 4:
            raise ValueError(
                f"group={group} needs a per-group activation, got shape {tuple(x.shape)}"
            )
        if not 0 <= group < x.shape[-2]:
            raise ValueError(f"group must be in [0, {x.shape[-2]}), got {group}")
        return x[..., group, :]
    if x.ndim >= 4:
        return rearrange(x, "... h d -> ... (h d)")
    return x


def site_width(model: Any, site: str, group: int | None = None) -> int:
    """Width of one token's vector at ``site`` (runs the model on one token to see it)."""
    check_sites(model, [site])
    seen: dict[str, int] = {}

    def look(x: Tensor, hook: Any) -> None:
        seen["d"] = site_view(x, group).shape[-1]

    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else 0
    with torch.no_grad(), model.hooks(fwd_hooks=[(site, look)]):
        model(torch.tensor([[bos or 0]], device=_device(model)))
    return seen["d"]


def check_sites(model: Any, sites: Sequence[str]) -> None:
    """Raise a clear error for a hook name the model does not have."""
    if isinstance(sites, str):
        raise ValueError("sites must be a list of hook names, not one string")
    if not sites:
        raise ValueError("no sites given")
    missing = [s for s in sites if s not in model.hook_dict]
    if missing:
        raise ValueError(
            f"the model has no hook points {missing}; e.g. {attn_site(0)}, {mlp_site(0)}"
        )


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def iter_activations(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[str],
    *,
    groups: dict[str, int] | None = None,
    batch_size: int = 32,
    token_mask: Bool[Tensor, "batch pos"] | None = None,
) -> Iterator[dict[str, Float[Tensor, "n d"]]]:
    """Per batch of sequences, ``{site: [kept tokens, d]}`` on the CPU, float32.

    Capture hooks go on with ``model.hooks`` and come off after every batch, also when
    the forward pass or the consumer raises. ``token_mask`` keeps only the tokens marked
    true (drop BOS, padding); ``groups`` picks one group (head) per ``hook_z`` site.
    """
    tokens = check_tokens(tokens)
    check_sites(model, sites)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if token_mask is not None:
        token_mask = torch.as_tensor(token_mask)
        if token_mask.shape != tokens.shape or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be a bool tensor of the tokens' shape {tuple(tokens.shape)}, "
                f"got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
    groups = groups or {}
    for rows, cache in cached_batches(model, tokens, sites, batch_size=batch_size):
        out: dict[str, Tensor] = {}
        for site in sites:
            value = site_view(cache[site], groups.get(site))
            if value.shape[:2] != tokens[rows].shape:
                raise ValueError(
                    f"{site} has shape {tuple(cache[site].shape)}: not one vector per token"
                )
            value = value.float().cpu()
            if token_mask is not None:
                out[site] = value[token_mask[rows]]
            else:
                out[site] = value.reshape(-1, value.shape[-1])
        del cache
        yield out


def cache_activations(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[str],
    *,
    groups: dict[str, int] | None = None,
    batch_size: int = 32,
    token_mask: Bool[Tensor, "batch pos"] | None = None,
    memory_budget_mb: float = 2048.0,
) -> dict[str, Float[Tensor, "N d"]]:
    """``{site: [N, d]}`` for all (kept) tokens, written into preallocated tensors.

    Raises before running the model if the result would exceed ``memory_budget_mb``;
    stream with `iter_activations` for more.
    """
    tokens = check_tokens(tokens)
    n = int(token_mask.sum()) if token_mask is not None else tokens.numel()
    widths = {s: site_width(model, s, (groups or {}).get(s)) for s in sites}
    needed = 4 * n * sum(widths.values()) / 2**20
    if needed > memory_budget_mb:
        raise ValueError(
            f"caching {n} tokens x {sum(widths.values())} dims needs {needed:.0f} MB, over "
            f"memory_budget_mb={memory_budget_mb}: use fewer tokens or iter_activations"
        )
    out = {s: torch.empty(n, d) for s, d in widths.items()}
    row = 0
    for block in iter_activations(
        model, tokens, sites, groups=groups, batch_size=batch_size, token_mask=token_mask
    ):
        rows = next(iter(block.values())).shape[0]
        for site, value in block.items():
            out[site][row : row + rows] = value
        row += rows
    return out


STORE_HEADER = "activation_store.json"


class ActivationStore:
    """Activations per site on disk: one raw float32 ``[N, d]`` shard per site, mapped
    into memory read-only, so fitting reads pages as it goes instead of holding them.

    ``store[site]`` is a ``numpy.memmap`` that `train_sae`, `fast_ica`, `pca_features`
    and `ica_features` take in place of a tensor. `store_activations` writes one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        header = self.path / STORE_HEADER
        if not header.is_file():
            raise FileNotFoundError(f"no activation store at {self.path} (no {STORE_HEADER})")
        self.header = json.loads(header.read_text())
        self.n_tokens = int(self.header["n_tokens"])
        for site, entry in self.header["sites"].items():
            expected = self.n_tokens * entry["width"] * 4
            if (self.path / entry["file"]).stat().st_size != expected:
                raise ValueError(f"the shard of {site} in {self.path} is not {expected} bytes")

    @property
    def sites(self) -> list[str]:
        return list(self.header["sites"])

    def __getitem__(self, site: str) -> np.ndarray:
        entry = self.header["sites"].get(site)
        if entry is None:
            raise KeyError(f"the store at {self.path} has no site {site!r}; it has {self.sites}")
        return np.memmap(
            self.path / entry["file"],
            dtype=np.float32,
            mode="r",
            shape=(self.n_tokens, entry["width"]),
        )

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, n_tokens={self.n_tokens}, sites={self.sites})"


def store_activations(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    sites: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    groups: dict[str, int] | None = None,
    batch_size: int = 32,
    token_mask: Bool[Tensor, "batch pos"] | None = None,
) -> ActivationStore:
    """Run ``tokens`` through the model and write ``{site: [kept tokens, d]}`` into an
    `ActivationStore` at ``out_dir``: memory holds one batch, never the whole set.

    Each shard is filled in a temporary file and renamed into place; the header is
    written last, so a store with a header is complete.
    """
    tokens = check_tokens(tokens)
    n = int(token_mask.sum()) if token_mask is not None else tokens.numel()
    widths = {s: site_width(model, s, (groups or {}).get(s)) for s in sites}
    out_dir = Path(out_dir)
    files = {s: f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', s)}.f32" for i, s in enumerate(sites)}
    with contextlib.ExitStack() as stack:
        temps = {s: stack.enter_context(atomic_path(out_dir / files[s])) for s in sites}
        maps = {
            s: np.memmap(temps[s], dtype=np.float32, mode="w+", shape=(n, widths[s])) for s in sites
        }
        row = 0
        for block in iter_activations(
            model, tokens, sites, groups=groups, batch_size=batch_size, token_mask=token_mask
        ):
            rows = next(iter(block.values())).shape[0]
            for site, value in block.items():
                maps[site][row : row + rows] = value.numpy()
            row += rows
        for m in maps.values():
            m.flush()
        del maps
    header = {
        "n_tokens": n,
        "sites": {
            s: {"file": files[s], "width": widths[s], "group": (groups or {}).get(s)} for s in sites
        },
    }
    atomic_write_json(out_dir / STORE_HEADER, header)
    return ActivationStore(out_dir)
