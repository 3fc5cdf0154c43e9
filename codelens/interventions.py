"""Code interventions: force, swap and ablate the codes a codebook site writes.

Each codebook site chooses k codes per group: ``{site}.hook_codes`` holds int64 ids
``[batch, pos, G, k]``, sorted by score (slot 0 the best code, slot k-1 the
lowest-scoring one). With ``combine="sum"`` (the default) the site output is exactly
the sum of the code vectors in the k slots, so editing ids edits the output exactly:

- **force** ``slots="lowest"``: the forced code replaces slot k-1 only, so the output
  gains exactly that code's vector in place of the lowest-scoring code's vector and
  the k-1 better codes stay (m forced codes replace the m lowest slots). A forced code
  that already sits in a kept slot then counts twice. ``slots="all"``: the output is
  exactly the sum of the forced codes (slots beyond them are left empty).
- **swap** ``{a: b}``: every slot holding ``a`` gets ``b`` instead, so the output
  changes only where ``a`` was active, by exactly ``b - a``. Swaps apply together
  (``{a: b, b: a}`` exchanges them); a target of ``EMPTY_SLOT`` empties the slot.
- **ablate** ``mode="zero"``: slots holding the codes become ``EMPTY_SLOT``, so the
  output loses exactly their vectors and nothing replaces them. ``mode="disable"``
  sets the layer's disable mask for the duration, so top-k never picks the codes and
  the next-best code fills the slot: the output is what the codebook would write if
  the codes did not exist. A hook only sees ids, not scores, so "disable" is not a
  hook: it is applied by `intervene` only, and acts on all positions.

With ``combine="mean"`` every slot contributes its vector divided by k instead.
Codes are ids within one group's codebook; ``group=None`` edits every group.

**Positions** are absolute column indices of the full token sequence (left padding
included); negative ones count from the end of the sequence seen so far. `intervene`
tracks the KV-cache length, so under ``model.generate`` (one new token a forward)
position 5 is edited in the forward that processes token 5, exactly as a full forward
under the same intervention would; ``-1`` then means the newest token at each step.
Bare hook lists (`force_codes`, ...) count positions from the start of each forward:
exact for full forwards (``run_with_hooks``, ``run_with_cache``), while explicit
positions under KV-cache generation need `intervene`. ``positions=None`` works
everywhere.

A position outside the sequence is an error, never a silent no-op. Outside `intervene`
a forward raises at once. Inside `intervene` a position may lie ahead of the tokens
seen so far (generation reaches it later), so the check runs when the block exits:
every explicit position must have matched a token, and a slice at least one.

Hooks build their index tensors once per device and never copy from device to host.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from codelens import _bridge
from codelens.codebook import EMPTY_SLOT, CodebookLayer
from codelens.vocab import CODES_HOOK

Kind = Literal["force", "swap", "ablate"]
Slots = Literal["lowest", "all"]
AblateMode = Literal["zero", "disable"]
Positions = int | slice | Sequence[int] | None
Hook = Callable[[Tensor, Any], Tensor]
HookList = list[tuple[str, Hook]]
SiteKey = str | tuple[str, int]
CodeIds = Sequence[int] | Tensor

_KINDS = ("force", "swap", "ablate")
_SLOTS = ("lowest", "all")
_MODES = ("zero", "disable")


# ---------------------------------------------------------------- the intervention


@dataclass(frozen=True)
class CodeIntervention:
    """One edit of the codes at one codebook site (see the module docstring).

    Build with `force`, `swap` or `ablate`. ``codes`` are the forced codes (force),
    the source codes (swap) or the removed codes (ablate); ``targets`` are the swap
    targets, parallel to ``codes``. Checks that need no model run here; `validate`
    checks the rest against a model.
    """

    site: str
    kind: Kind
    codes: tuple[int, ...]
    targets: tuple[int, ...] = ()
    group: int | None = None
    positions: Positions = None
    slots: Slots = "lowest"
    mode: AblateMode = "zero"

    def __post_init__(self) -> None:
        if not isinstance(self.site, str):
            raise ValueError(f"site must be a hook name string, got {self.site!r}")
        site = self.site.removesuffix(f".{CODES_HOOK}")
        object.__setattr__(self, "site", site)
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.slots not in _SLOTS:
            raise ValueError(f"slots must be one of {_SLOTS}, got {self.slots!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.kind != "force" and self.slots != "lowest":
            raise ValueError(f"slots applies to force only, not to {self.kind}")
        if self.kind != "ablate" and self.mode != "zero":
            raise ValueError(f"mode applies to ablate only, not to {self.kind}")
        codes = _as_ids(self.codes, "codes")
        if not codes:
            raise ValueError(f"{self.kind} at {site} got no codes")
        targets = _as_ids(self.targets, "targets")
        if self.kind == "swap":
            if len(targets) != len(codes):
                raise ValueError(
                    f"swap needs one target per source code, got {len(codes)} sources "
                    f"and {len(targets)} targets"
                )
            if len(set(codes)) != len(codes):
                raise ValueError(f"swap source codes must be distinct, got {list(codes)}")
        elif targets:
            raise ValueError(f"targets applies to swap only, not to {self.kind}")
        if self.kind == "ablate":
            codes = tuple(dict.fromkeys(codes))
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "targets", targets)
        if self.group is not None and (not _is_int(self.group) or self.group < 0):
            raise ValueError(f"group must be None or an int >= 0, got {self.group!r}")
        positions = _normalise_positions(self.positions)
        object.__setattr__(self, "positions", positions)
        if self.mode == "disable" and positions is not None:
            raise ValueError(
                "ablate mode='disable' changes which codes top-k can choose, at every "
                "position; positions must be None (use mode='zero' for chosen positions)"
            )

    def __hash__(self) -> int:
        positions = self.positions
        if isinstance(positions, slice):  # slices are unhashable before Python 3.12
            positions = ("slice", positions.start, positions.stop, positions.step)
        fields = (self.site, self.kind, self.codes, self.targets, self.group, self.slots)
        return hash((*fields, positions, self.mode))

    @classmethod
    def force(
        cls,
        site: str,
        codes: int | CodeIds,
        *,
        group: int | None = None,
        positions: Positions = None,
        slots: Slots = "lowest",
    ) -> CodeIntervention:
        """Put ``codes`` on: in the lowest-scoring slot(s), or as all k slots."""
        ids = (codes,) if _is_int(codes) else codes
        return cls(site, "force", ids, group=group, positions=positions, slots=slots)

    @classmethod
    def swap(
        cls,
        site: str,
        mapping: Mapping[int, int] | tuple[CodeIds, CodeIds],
        *,
        group: int | None = None,
        positions: Positions = None,
    ) -> CodeIntervention:
        """Where code ``a`` is active put ``b``: ``{a: b}`` or ``(sources, targets)``."""
        if isinstance(mapping, Mapping):
            sources, targets = tuple(mapping), tuple(mapping.values())
        elif isinstance(mapping, tuple) and len(mapping) == 2:
            sources, targets = mapping
        else:
            raise ValueError(
                f"swap mapping must be a dict {{a: b}} or a (sources, targets) pair, "
                f"got {mapping!r}"
            )
        return cls(site, "swap", sources, targets, group=group, positions=positions)

    @classmethod
    def ablate(
        cls,
        site: str,
        codes: int | CodeIds,
        *,
        group: int | None = None,
        positions: Positions = None,
        mode: AblateMode = "zero",
    ) -> CodeIntervention:
        """Remove ``codes``: empty their slots ("zero") or never choose them ("disable")."""
        ids = (codes,) if _is_int(codes) else codes
        return cls(site, "ablate", ids, group=group, positions=positions, mode=mode)

    def validate(self, model: nn.Module) -> CodebookLayer:
        """Check site, group, ids and slot count against ``model``; return the codebook."""
        sites = getattr(model, "codebooks", {})
        if self.site not in sites:
            raise ValueError(f"no codebook at site {self.site!r}; valid sites: {list(sites)}")
        layer = sites[self.site]
        if layer.bypass:
            raise RuntimeError(
                f"the codebook at {self.site} is bypassed (codebooks_bypassed()): an "
                "intervention on its codes would have no effect"
            )
        if self.group is not None and self.group >= layer.n_groups:
            raise ValueError(
                f"group {self.group} out of range: {self.site} has {layer.n_groups} groups"
            )
        _check_range(self.codes, 0, layer.n_codes, f"{self.kind} codes at {self.site}")
        _check_range(self.targets, EMPTY_SLOT, layer.n_codes, f"swap targets at {self.site}")
        if self.mode == "disable" and layer.n_codes - len(self.codes) < layer.k:
            raise ValueError(
                f"disabling {len(self.codes)} of {layer.n_codes} codes at {self.site} leaves "
                f"fewer than k={layer.k} codes to choose"
            )
        if self.kind == "force" and len(self.codes) > layer.k:
            raise ValueError(
                f"force got {len(self.codes)} codes but {self.site} has only k={layer.k} slots"
            )
        return layer

    def hooks(self, model: nn.Module) -> HookList:
        """``[(hook name, hook)]`` for ``run_with_hooks`` / ``model.hooks``."""
        layer = self.validate(model)
        if self.mode == "disable":
            raise ValueError(
                "ablate mode='disable' edits the codebook's disable mask, which a hook "
                "cannot do; apply it with `with intervene(model, intervention): ...`"
            )
        hook = _CodesHook(self, layer.n_groups, layer.k, _tracker(model))
        return [(f"{self.site}.{CODES_HOOK}", hook)]


# ---------------------------------------------------------------- hook-list functions


def force_codes(
    model: nn.Module,
    site: str,
    codes: int | CodeIds,
    *,
    group: int | None = None,
    positions: Positions = None,
    slots: Slots = "lowest",
) -> HookList:
    """Hooks that force ``codes`` on at ``site`` (lowest slot(s), or all k slots)."""
    iv = CodeIntervention.force(site, codes, group=group, positions=positions, slots=slots)
    return iv.hooks(model)


def swap_codes(
    model: nn.Module,
    site: str,
    mapping: Mapping[int, int] | tuple[CodeIds, CodeIds],
    *,
    group: int | None = None,
    positions: Positions = None,
) -> HookList:
    """Hooks that put code ``b`` wherever code ``a`` is active, for each ``a: b``."""
    return CodeIntervention.swap(site, mapping, group=group, positions=positions).hooks(model)


def ablate_codes(
    model: nn.Module,
    site: str,
    codes: int | CodeIds,
    *,
    group: int | None = None,
    positions: Positions = None,
    mode: AblateMode = "zero",
) -> HookList:
    """Hooks that empty the slots of ``codes`` where active (mode "zero" only).

    ``mode="disable"`` raises: it needs the codebook's disable mask, which only
    `intervene` sets and restores.
    """
    iv = CodeIntervention.ablate(site, codes, group=group, positions=positions, mode=mode)
    return iv.hooks(model)


def swap_code_sets(
    model: nn.Module,
    source: Mapping[SiteKey, CodeIds],
    target: Mapping[SiteKey, CodeIds],
    *,
    positions: Positions = None,
) -> HookList:
    """Hooks replacing each site's source codes by its target codes (e.g. state s -> t).

    Keys are a site (every group) or ``(site, group)``; ``source[key][i]`` becomes
    ``target[key][i]`` wherever it is active, so both need the same keys and lengths.
    """
    if set(source) != set(target):
        raise ValueError(
            f"source and target must name the same sites; only in source: "
            f"{sorted(map(str, set(source) - set(target)))}, only in target: "
            f"{sorted(map(str, set(target) - set(source)))}"
        )
    if not source:
        raise ValueError("swap_code_sets got no sites")
    hooks: HookList = []
    for key, src in source.items():
        if isinstance(key, str):
            site, group = key, None
        elif isinstance(key, tuple) and len(key) == 2:
            site, group = key
        else:
            raise ValueError(f"swap_code_sets keys must be a site or (site, group), got {key!r}")
        ids = (src, target[key])
        hooks += CodeIntervention.swap(site, ids, group=group, positions=positions).hooks(model)
    return hooks


def paste_codes_hooks(
    reference: Mapping[str, Int[Tensor, "batch pos G k"]], *, position: int = -1
) -> HookList:
    """Hooks that put a reference run's codes at ``position`` (site -> its ids, e.g. from
    `codelens.vocab.collect_codes`), row by row: activation patching, in codes.

    Positions count from the start of each forward, as for the other hook lists.
    """
    if not reference:
        raise ValueError("paste_codes_hooks got no sites")
    hooks: HookList = []
    for site, ids in reference.items():
        if ids.ndim != 4:
            raise ValueError(
                f"reference codes at {site} must be [batch, pos, G, k], got {ids.shape}"
            )
        hooks.append((f"{site}.{CODES_HOOK}", _paste(ids, position)))
    return hooks


def _paste(reference: Tensor, position: int) -> Hook:
    def paste(ids: Int[Tensor, "batch pos G k"], hook: Any) -> Tensor:
        if ids.shape[0] != reference.shape[0] or ids.shape[2:] != reference.shape[2:]:
            raise ValueError(
                f"pasted codes {tuple(reference.shape)} do not fit {tuple(ids.shape)} "
                f"at {hook.name}"
            )
        pos = position + ids.shape[1] if position < 0 else position
        ref_pos = position + reference.shape[1] if position < 0 else position
        if not (0 <= pos < ids.shape[1] and 0 <= ref_pos < reference.shape[1]):
            raise ValueError(f"position {position} is outside the sequence at {hook.name}")
        ids = ids.clone()
        ids[:, pos] = reference[:, ref_pos].to(ids.device)
        return ids

    return paste


# ---------------------------------------------------------------- context manager


@contextlib.contextmanager
def intervene(
    model: nn.Module, *items: CodeIntervention | HookList | tuple[str, Hook]
) -> Iterator[nn.Module]:
    """Apply interventions (or hook lists) for the body; undo all of it on exit.

    Everything is validated before the model is touched. Adds the hooks with
    ``model.hooks``, sets disable masks for ``mode="disable"`` ablations, and tracks
    the KV-cache length so positions stay absolute under ``model.generate``. On exit,
    also after an exception, hooks, masks and position tracking are removed.
    """
    hooks: HookList = []
    disables: list[tuple[CodebookLayer, CodeIntervention]] = []
    for item in _flatten(items):
        if isinstance(item, CodeIntervention):
            if item.mode == "disable":
                disables.append((item.validate(model), item))
            else:
                hooks += item.hooks(model)
        else:
            hooks.append(item)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_tracker(model).tracking(model))
        for layer, item in disables:
            stack.callback(_restore_mask, layer, layer.disabled.clone())
            layer.disable_codes(list(item.codes), item.group)
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        yield model


def _restore_mask(layer: CodebookLayer, saved: Tensor) -> None:
    layer.disabled.copy_(saved)


def _flatten(items: Iterable[Any]) -> Iterator[CodeIntervention | tuple[str, Hook]]:
    """Interventions and ``(name, hook)`` pairs, from items that may be lists of them."""
    for item in items:
        if isinstance(item, CodeIntervention) or _is_hook_pair(item):
            yield item
        elif isinstance(item, (list, tuple)):
            for inner in item:
                if not (isinstance(inner, CodeIntervention) or _is_hook_pair(inner)):
                    raise ValueError(
                        f"intervene takes CodeInterventions and (name, hook) pairs, got {inner!r}"
                    )
                yield inner
        else:
            raise ValueError(
                f"intervene takes CodeInterventions and hook lists, got {type(item).__name__}"
            )


def _is_hook_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and (isinstance(item[0], str) or callable(item[0]))
        and callable(item[1])
    )


# ---------------------------------------------------------------- position tracking


class _PositionTracker:
    """The absolute position of a forward's first token: the KV-cache length.

    While some `intervene` is active, a forward pre-hook on the HuggingFace model
    reads ``past_key_values``; otherwise the offset is 0 (full forwards).
    """

    def __init__(self) -> None:
        self.offset = 0
        self._users = 0
        self._handle: Any = None
        self.pending: dict[int, PositionSelector] = {}  # checks that wait for the exit

    @property
    def active(self) -> bool:
        return self._users > 0

    @contextlib.contextmanager
    def tracking(self, model: nn.Module) -> Iterator[None]:
        """Track offsets for the body. When the outermost body exits without an error,
        check that the positions of every hook that ran matched a token."""
        if self._users == 0:
            hf = _bridge.hf_model(model)
            self._handle = hf.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._users += 1
        pending: dict[int, PositionSelector] = {}
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0:
                self._handle.remove()
                self._handle, self.offset = None, 0
                pending, self.pending = self.pending, {}
        for selector in pending.values():  # reached only when the body did not raise
            selector.check_reached()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.offset = _cache_length(kwargs.get("past_key_values"))


def _cache_length(cache: Any) -> int:
    """Tokens already in a HuggingFace KV cache (a Python int for `DynamicCache`)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        length = cache.get_seq_length()
        return int(length)  # a tensor only for static caches: one sync per forward
    if isinstance(cache, (tuple, list)) and cache:  # legacy ((key, value), ...) layers
        return int(cache[0][0].shape[-2])
    return 0


_TRACKERS: weakref.WeakKeyDictionary[nn.Module, _PositionTracker] = weakref.WeakKeyDictionary()


def _tracker(model: nn.Module) -> _PositionTracker:
    if model not in _TRACKERS:
        _TRACKERS[model] = _PositionTracker()
    return _TRACKERS[model]


# ---------------------------------------------------------------- the hook


class _CodesHook:
    """Rewrites ``hook_codes`` ids for one intervention, without device-to-host copies."""

    edits_codes = True  # a bypassed codebook refuses to run with it (it would do nothing)

    def __init__(
        self, iv: CodeIntervention, n_groups: int, k: int, tracker: _PositionTracker
    ) -> None:
        self.iv, self.n_groups, self.k = iv, n_groups, k
        self.positions = PositionSelector(iv.positions, iv.site, tracker)
        self._constants: dict[torch.device, dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        return f"_CodesHook({self.iv!r})"

    def __call__(self, ids: Int[Tensor, "*batch pos G k"], hook: Any) -> Tensor:
        consts = self._on(ids.device)
        select = self._selection(ids.shape[-3], ids.device, consts)
        kind, iv = self.iv.kind, self.iv
        if kind == "force" and iv.slots == "all":
            new = consts["codes"].expand_as(ids)
            return new.contiguous() if select is None else torch.where(select, new, ids)
        if kind == "force":
            new = ids.clone()
            new[..., self.k - len(iv.codes) :] = consts["codes"]
            return new if select is None else torch.where(select, new, ids)
        # swap and ablate-zero: each slot holding a source code takes its target.
        match = ids.unsqueeze(-1) == consts["codes"]  # [..., k, m]; sources are distinct
        hit = match.any(-1)
        new = (match.long() * consts["targets"]).sum(-1)
        return torch.where(hit if select is None else hit & select, new, ids)

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """This hook's constant tensors on ``device``, built on first use there."""
        if device not in self._constants:
            iv = self.iv

            def ids(values: Sequence[int]) -> Tensor:
                return torch.tensor(values, dtype=torch.long, device=device)

            consts: dict[str, Tensor] = {}
            if iv.kind == "force" and iv.slots == "all":
                consts["codes"] = ids([*iv.codes, *[EMPTY_SLOT] * (self.k - len(iv.codes))])
            else:
                consts["codes"] = ids(iv.codes)
            if iv.kind == "swap":
                consts["targets"] = ids(iv.targets)
            elif iv.kind == "ablate":
                consts["targets"] = ids([EMPTY_SLOT] * len(iv.codes))
            if iv.group is not None:
                consts["groups"] = torch.zeros(self.n_groups, dtype=torch.bool, device=device)
                consts["groups"][iv.group] = True
            self._constants[device] = consts
        return self._constants[device]

    def _selection(
        self, n: int, device: torch.device, consts: dict[str, Tensor]
    ) -> Bool[Tensor, "pos G 1"] | None:
        """Which (position, group) cells to edit, broadcastable to ids; None = all."""
        at = self.positions.mask(n, device)
        groups = consts.get("groups")
        if at is None and groups is None:
            return None
        if at is None:
            return groups[:, None]
        if groups is None:
            return at[:, None, None]
        return (at[:, None] & groups)[..., None]


# ---------------------------------------------------------------- positions


def position_selector(model: nn.Module, positions: Positions, site: str) -> PositionSelector:
    """The `PositionSelector` of an edit at ``site`` of ``model`` (follows its KV cache)."""
    return PositionSelector(positions, site, _tracker(model))


class PositionSelector:
    """Which tokens of a forward an edit at ``site`` applies to, for code and feature hooks.

    ``positions`` are absolute (``None`` = all, an int, ints, or a slice; negative ones
    count from the end of the sequence seen so far). Under `intervene` the KV-cache length
    (``tracker.offset``) shifts each forward's tokens, and a position may lie ahead of
    them, so the check that every position matched a token waits for the block's exit;
    outside it, a position outside the sequence raises at once. No device-to-host copies.
    """

    def __init__(self, positions: Positions, site: str, tracker: _PositionTracker) -> None:
        self.positions = _normalise_positions(positions)
        self.site, self.tracker = site, tracker
        self._wanted: dict[torch.device, Tensor] = {}
        self._reached: set[int] = set()  # explicit positions matched inside `intervene`
        self._slice_hit = False
        self._longest = 0

    def mask(self, n: int, device: torch.device) -> Bool[Tensor, " pos"] | None:
        """The positions of this forward's ``n`` tokens that are named; None = all."""
        positions = self.positions
        if positions is None:
            return None
        offset = self.tracker.offset
        total = offset + n
        self._check_positions(offset, total)
        absolute = torch.arange(offset, total, device=device)
        if isinstance(positions, slice):
            chosen = range(*positions.indices(total))
            if not chosen:
                return torch.zeros(n, dtype=torch.bool, device=device)
            low, high = min(chosen[0], chosen[-1]), max(chosen[0], chosen[-1]) + 1
            step = abs(chosen.step)
            return (absolute >= low) & (absolute < high) & ((absolute - low) % step == 0)
        if device not in self._wanted:
            self._wanted[device] = torch.tensor(positions, dtype=torch.long, device=device)
        wanted = self._wanted[device]
        wanted = torch.where(wanted < 0, wanted + total, wanted)
        return (absolute[:, None] == wanted).any(-1)

    def _check_positions(self, offset: int, total: int) -> None:
        """Outside `intervene`, raise for positions outside this forward's sequence; inside,
        note which positions its tokens ``[offset, total)`` matched (host ints, no sync)."""
        positions, site = self.positions, self.site
        if isinstance(positions, slice):
            chosen = range(*positions.indices(total))
            hit = bool(chosen) and _meets(chosen, offset, total)
        else:
            hit = {p for p in positions if offset <= (p + total if p < 0 else p) < total}
        if self.tracker.active:
            self.tracker.pending[id(self)] = self
            self._longest = max(self._longest, total)
            if isinstance(hit, set):
                self._reached |= hit
            else:
                self._slice_hit |= hit
        elif isinstance(hit, set) and len(hit) < len(positions):
            raise ValueError(
                f"positions {[p for p in positions if p not in hit]} are outside the "
                f"{total}-token sequence at {site} (valid: 0 to {total - 1}, or -{total} to -1)"
            )
        elif not hit:
            raise ValueError(
                f"positions {positions} select no token of the {total}-token sequence at {site}"
            )

    def check_reached(self) -> None:
        """Raise if, over an `intervene` block, a position never matched a token."""
        positions = self.positions
        if isinstance(positions, slice):
            missed = [] if self._slice_hit else [positions]
        else:
            missed = [p for p in positions if p not in self._reached]
        longest = self._longest
        self._reached, self._slice_hit, self._longest = set(), False, 0
        if missed:
            raise ValueError(
                f"positions {missed} at {self.site} matched no token: the longest "
                f"sequence in the `intervene` block had {longest} tokens"
            )


def _meets(chosen: range, low: int, high: int) -> bool:
    """Whether the non-empty range ``chosen`` holds a value in ``[low, high)``."""
    first, last, step = min(chosen[0], chosen[-1]), max(chosen[0], chosen[-1]), abs(chosen.step)
    start = max(first, low)
    value = first + -(-(start - first) // step) * step  # the first member >= start
    return value <= last and value < high


# ---------------------------------------------------------------- validation helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_ids(values: Any, what: str) -> tuple[int, ...]:
    """A tuple of Python ints from a sequence or tensor of ids (at build time only)."""
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"{what} must be integers, got a {values.dtype} tensor")
        values = values.flatten().tolist()
    if _is_int(values) or not isinstance(values, Iterable) or isinstance(values, str):
        raise ValueError(f"{what} must be a sequence of integers, got {values!r}")
    values = tuple(values)
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise ValueError(f"{what} must be integers, got {bad}")
    return values


def _check_range(values: tuple[int, ...], low: int, high: int, what: str) -> None:
    bad = [v for v in values if not low <= v < high]
    if bad:
        raise ValueError(f"{what} must be in [{low}, {high}), got {bad}")


def _normalise_positions(positions: Any) -> int | slice | tuple[int, ...] | None:
    """None, a slice of ints, or a non-empty tuple of ints (an int becomes a 1-tuple)."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        parts = (positions.start, positions.stop, positions.step)
        if any(p is not None and not _is_int(p) for p in parts):
            raise ValueError(f"positions slice must have int bounds, got {positions}")
        if positions.step == 0:
            raise ValueError("positions slice step must not be zero")
        return positions
    if _is_int(positions):
        return (positions,)
    values = _as_ids(positions, "positions")
    if not values:
        raise ValueError("positions is empty; use None for all positions")
    return values


__all__ = [
    "CodeIntervention",
    "Hook",
    "HookList",
    "PositionSelector",
    "Positions",
    "ablate_codes",
    "force_codes",
    "intervene",
    "paste_codes_hooks",
    "position_selector",
    "swap_code_sets",
    "swap_codes",
]
