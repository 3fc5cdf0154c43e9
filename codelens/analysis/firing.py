"""Which codes fire at which tokens, indexed once for every statistic.

- code: ``(site, group, id)``, code ``id`` of codebook group ``group`` (an attention head or
  an MLP group) at hook site ``site``. It *fires* at a token when ``id`` is among the k ids
  that group chose there (``{site}.hook_codes``). A repeated id counts once; ``EMPTY_SLOT``
  (-1) never fires.
- code index: one integer per code of every site, sites in the order given, then
  ``group * n_codes + id`` inside a site (`CodeFiring.code_index`, `CodeFiring.describe`).

Memory: `CodeFiring` holds int64 ``[N, slots]`` (slots = sum over sites of groups * k);
statistics are accumulated over token chunks with ``scatter_add_``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Bool, Int
from torch import Tensor

from codelens.vocab import Code

__all__ = ["CodeFiring", "code_firing"]

_EVENTS_PER_CHUNK = 1 << 22
"""Firing events gathered at once when counting (bounds the temporary index tensors)."""


@dataclass(frozen=True)
class CodeFiring:
    """Which codes fire at each of N tokens, as global code indices.

    ``ids[n]`` lists the codes firing at token n, one slot per (site, group, k slot), -1 for
    an empty or repeated slot: a fixed-width sparse matrix. `pairs` gives the same as
    (token, code index) pairs. Tokens are the caller's tokens flattened row-major;
    ``token_shape`` remembers their shape so labels of that shape are accepted.
    """

    ids: Int[Tensor, "N slots"]
    sites: tuple[str, ...]
    groups: tuple[int, ...]
    codes_per_group: tuple[int, ...]
    token_shape: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def offsets(self) -> tuple[int, ...]:
        """First code index of every site, then the total."""
        out = [0]
        for g, c in zip(self.groups, self.codes_per_group, strict=True):
            out.append(out[-1] + g * c)
        return tuple(out)

    @property
    def n_codes_total(self) -> int:
        return self.offsets[-1]

    def code_index(self, code: Code) -> int:
        """The global index of ``code`` (the inverse of `code`)."""
        site, group, code = code.site, code.group, code.id
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; sites: {list(self.sites)}")
        s = self.sites.index(site)
        if not 0 <= group < self.groups[s]:
            raise ValueError(f"group must be in [0, {self.groups[s]}) at {site}, got {group}")
        if not 0 <= code < self.codes_per_group[s]:
            raise ValueError(
                f"code must be in [0, {self.codes_per_group[s]}) at {site}, got {code}"
            )
        return self.offsets[s] + group * self.codes_per_group[s] + code

    def decode(
        self, index: Int[Tensor, " M"]
    ) -> tuple[Int[Tensor, " M"], Int[Tensor, " M"], Int[Tensor, " M"]]:
        """(site position in ``sites``, group, code id) of many code indices at once."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.numel() and (index.min() < 0 or index.max() >= self.n_codes_total):
            raise ValueError(f"code indices must be in [0, {self.n_codes_total})")
        offsets = torch.tensor(self.offsets)
        site = torch.searchsorted(offsets, index, right=True) - 1
        local = index - offsets[site]
        per_group = torch.tensor(self.codes_per_group)[site]
        return site, local // per_group, local % per_group

    def code(self, index: int) -> Code:
        """The `Code` of one code index."""
        site, group, code = (int(v) for v in self.decode(torch.tensor([int(index)])))
        return Code(self.sites[site], group, code)

    def pairs(self) -> tuple[Int[Tensor, " E"], Int[Tensor, " E"]]:
        """Every firing as (token, code index) pairs, sorted by token."""
        token, slot = (self.ids >= 0).nonzero(as_tuple=True)
        return token, self.ids[token, slot]

    def fires(self, index: int) -> Bool[Tensor, " N"]:
        """Where one code fires."""
        return (self.ids == int(index)).any(dim=1)

    def counts(self) -> Int[Tensor, " C"]:
        """Tokens at which each code fires."""
        none = torch.zeros(self.n_tokens, dtype=torch.long, device=self.ids.device)
        return _cooccurrence(self, none, 1)[:, 0]

    def select(self, mask: Bool[Tensor, " N"]) -> CodeFiring:
        """Only the tokens where ``mask`` is true (e.g. to drop BOS or padding)."""
        mask = _token_tensor(mask, self, "mask")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        ids = self.ids[mask.to(self.ids.device)]
        return CodeFiring(ids, self.sites, self.groups, self.codes_per_group, (ids.shape[0],))


def code_firing(
    codes_by_site: Mapping[str, Int[Tensor, "... G k"]], n_codes: Mapping[str, int] | int
) -> CodeFiring:
    """Index which codes fire at each token, from ``{site}.hook_codes`` ids of every site.

    All sites must share the same leading (token) shape. ``n_codes`` is the codebook size,
    one for all sites or per site. Ids must be in ``[-1, n_codes)``.
    """
    if not codes_by_site:
        raise ValueError("codes_by_site is empty: give the code ids of at least one site")
    lead: tuple[int, ...] | None = None
    device = None
    blocks, groups, sizes = [], [], []
    offset = 0
    for site, ids in codes_by_site.items():
        ids = torch.as_tensor(ids)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"code ids of {site} must be an integer tensor, got {ids.dtype}")
        if ids.ndim < 3:
            raise ValueError(
                f"code ids of {site} must be [..., G, k] with token dims first, "
                f"got shape {tuple(ids.shape)}"
            )
        if lead is None:
            lead, device = tuple(ids.shape[:-2]), ids.device
        elif tuple(ids.shape[:-2]) != lead:
            raise ValueError(
                f"code ids of {site} cover tokens {tuple(ids.shape[:-2])}, other sites {lead}"
            )
        if isinstance(n_codes, Mapping):
            if site not in n_codes:
                raise ValueError(f"n_codes has no entry for site {site!r}")
            size = int(n_codes[site])
        else:
            size = int(n_codes)
        if size < 1:
            raise ValueError(f"n_codes must be >= 1, got {size} for {site}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= size):
            raise ValueError(
                f"code ids of {site} must be in [-1, {size}), "
                f"got min {int(ids.min())}, max {int(ids.max())}"
            )
        g, k = ids.shape[-2:]
        flat = _drop_repeats(ids.to(device=device, dtype=torch.long).reshape(-1, g, k))
        group_base = offset + torch.arange(g, device=device)[:, None] * size
        glob = torch.where(flat >= 0, flat + group_base, -1)
        blocks.append(rearrange(glob, "n g k -> n (g k)"))
        groups.append(g)
        sizes.append(size)
        offset += g * size
    assert lead is not None
    if math.prod(lead) == 0:
        raise ValueError("code ids cover no tokens")
    return CodeFiring(
        torch.cat(blocks, dim=1), tuple(codes_by_site), tuple(groups), tuple(sizes), lead
    )


def _drop_repeats(ids: Int[Tensor, "n g k"]) -> Int[Tensor, "n g k"]:
    """Sort each group's k ids and blank repeats, so that a code fires once per token."""
    if ids.shape[-1] == 1:
        return ids
    ids = ids.sort(dim=-1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
    return ids.masked_fill(repeat, -1)


def _token_tensor(values: Any, firing: CodeFiring, name: str) -> Tensor:
    """``values`` per token as a flat tensor; shape must be [N] or the firing's token shape."""
    values = torch.as_tensor(values)
    shape = tuple(values.shape)
    if values.numel() == 0:
        raise ValueError(f"{name} is empty")
    if shape not in ((firing.n_tokens,), firing.token_shape):
        raise ValueError(
            f"{name} has shape {shape} but the codes cover {firing.n_tokens} tokens "
            f"(shape {firing.token_shape})"
        )
    return values.reshape(-1)


def _cooccurrence(
    firing: CodeFiring, classes: Int[Tensor, " N"], n_classes: int
) -> Int[Tensor, "C K"]:
    """Tokens where each code fires and the token's class is c (class -1 counts nowhere)."""
    ids = firing.ids
    classes = classes.to(ids.device)
    out = torch.zeros(firing.n_codes_total * n_classes, dtype=torch.long, device=ids.device)
    step = max(1, _EVENTS_PER_CHUNK // max(1, ids.shape[1]))
    for start in range(0, firing.n_tokens, step):
        chunk = ids[start : start + step]
        cls = classes[start : start + step, None].expand_as(chunk)
        keep = (chunk >= 0) & (cls >= 0)
        index = chunk[keep] * n_classes + cls[keep]
        out.scatter_add_(0, index, torch.ones_like(index))
    return out.view(firing.n_codes_total, n_classes)
