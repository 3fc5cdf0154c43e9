"""Feature dictionaries at one site, read out linearly: ``x ~ offset + encode(x) @ decoder``.

Every baseline is one of these, so the analysis, steering and swaps that measure codes
measure them with the same code:

- `SparseAutoencoder` (`codelens.baselines.sae`): TopK or ReLU latents;
- `ProjectionFeatures`: PCA components or ICA sources (`codelens.baselines.directions`),
  and `neurons`, the identity (each activation dimension is a feature).

Interventions are hook lists for ``model.hooks`` / `codelens.interventions.intervene`:
`splice_hooks` replaces the site by the reconstruction (the SAE in the forward pass),
`steer_feature_hooks` clamps or adds features, `swap_feature_hooks` pastes another token's features.
`save` writes safetensors + JSON; `codelens.baselines.saving.load_features` reads them.
Each changes only the part of the activation the features read out, and leaves the
residual (what they do not explain) as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import rearrange
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from codelens.baselines.activations import site_view
from codelens.files import atomic_write_json, sha256_file
from codelens.interventions import HookList, Positions, position_selector

FORMAT = "codelens-features"
TENSOR_FILE = "features.safetensors"
META_FILE = "features.json"


class LinearFeatures(nn.Module):
    """Features of the activation at ``site`` (one ``group``, i.e. head, of a ``hook_z``
    site, or all of them concatenated) with a linear read-out ``decoder`` ``[F, d]`` and
    ``offset`` ``[d]``."""

    kind: ClassVar[str] = ""
    decoder: Tensor
    offset: Tensor

    def __init__(self, site: str, group: int | None = None) -> None:
        super().__init__()
        self.site = site
        self.group = group

    @property
    def d_in(self) -> int:
        return self.decoder.shape[1]

    @property
    def n_features(self) -> int:
        return self.decoder.shape[0]

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... F"]:
        raise NotImplementedError

    def explained(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """The part of ``x`` the features read out, without the offset."""
        return self.encode(x) @ self.decoder

    def reconstruct(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.offset + self.explained(x)

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"{self.kind} features of {self.site} read {self.d_in}-dim vectors, "
                f"got shape {tuple(x.shape)}"
            )

    # ------------------------------------------------------------ saving

    def meta(self) -> dict[str, Any]:
        return {"site": self.site, "group": self.group}

    def save(self, out_dir: str | Path) -> Path:
        """Write safetensors + JSON into ``out_dir`` atomically (a new directory renamed
        into place; an existing one is replaced only if it holds saved features)."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not (out_dir / META_FILE).is_file() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and holds no saved features; not replacing it")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / TENSOR_FILE))
            meta = {
                "format": FORMAT,
                "kind": self.kind,
                **self.meta(),
                "shapes": {k: list(v.shape) for k, v in tensors.items()},
                "sha256": sha256_file(tmp / TENSOR_FILE),
            }
            atomic_write_json(tmp / META_FILE, meta)
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.rmdir(old)
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir


class ProjectionFeatures(LinearFeatures):
    """Linear features ``(x - offset) @ encoder`` read out by ``decoder``: PCA components,
    ICA sources, or the identity (`neurons`). ``method`` names which."""

    kind = "projection"

    def __init__(
        self,
        site: str,
        encoder: Float[Tensor, "d F"],
        decoder: Float[Tensor, "F d"],
        offset: Float[Tensor, " d"],
        *,
        method: str,
        group: int | None = None,
    ) -> None:
        super().__init__(site, group)
        d, f = encoder.shape
        if decoder.shape != (f, d) or offset.shape != (d,):
            raise ValueError(
                f"encoder {tuple(encoder.shape)}, decoder {tuple(decoder.shape)} and offset "
                f"{tuple(offset.shape)} do not fit: need [d, F], [F, d], [d]"
            )
        self.method = method
        self.register_buffer("encoder", encoder.float().contiguous())
        self.register_buffer("decoder", decoder.float().contiguous())
        self.register_buffer("offset", offset.float().contiguous())

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... F"]:
        self.check_input(x)
        return (x - self.offset) @ self.encoder

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "method": self.method}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> ProjectionFeatures:
        return cls(
            meta["site"],
            tensors["encoder"],
            tensors["decoder"],
            tensors["offset"],
            method=meta["method"],
            group=_saved_group(meta),
        )


def _saved_group(meta: dict[str, Any]) -> int | None:
    """The group of saved features (files written before the rename call it ``head``)."""
    return meta["group"] if "group" in meta else meta.get("head")


def neurons(site: str, d: int, group: int | None = None) -> ProjectionFeatures:
    """Every activation dimension of ``site`` as a feature (the identity read-out)."""
    eye = torch.eye(d)
    return ProjectionFeatures(site, eye, eye, torch.zeros(d), method="neurons", group=group)


# ---------------------------------------------------------------- hooks


def _edit(features: LinearFeatures, edit: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """A hook that applies ``edit`` to the site's per-token vector and writes it back in the
    site's own layout (per-head ``hook_z`` included)."""

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        view = site_view(x, features.group)
        features.check_input(view)
        new = edit(view.to(features.decoder.dtype)).to(x.dtype)
        if features.group is not None:
            x = x.clone()
            x[..., features.group, :] = new
            return x
        if x.ndim >= 4:
            return rearrange(new, "... (h d) -> ... h d", h=x.shape[-2])
        return new

    return hook


def splice_hooks(features: Sequence[LinearFeatures] | LinearFeatures) -> HookList:
    """Replace each site's activation by its features' reconstruction (error dropped)."""
    items = [features] if isinstance(features, LinearFeatures) else list(features)
    return [(f.site, _edit(f, f.reconstruct)) for f in items]


def zero_hooks(features: Sequence[LinearFeatures] | LinearFeatures) -> HookList:
    """Zero-ablate each site (the CE loss score's floor)."""
    items = [features] if isinstance(features, LinearFeatures) else list(features)
    return [(f.site, _edit(f, torch.zeros_like)) for f in items]


def steer_feature_hooks(
    model: nn.Module,
    features: LinearFeatures,
    *,
    clamp: Mapping[int, float] | None = None,
    add: Mapping[int, float] | None = None,
    positions: Positions = None,
) -> HookList:
    """Clamp features to values (``x + (v - f_i(x)) d_i``) and/or add ``a * d_i``, at
    ``positions`` of the site (default all). Positions follow the rules of code
    interventions (`codelens.interventions.PositionSelector`): absolute, negative from
    the end, following the KV cache under `intervene`, and an error when out of range."""
    clamp, add = dict(clamp or {}), dict(add or {})
    if not clamp and not add:
        raise ValueError("give features to clamp or add")
    bad = [i for i in [*clamp, *add] if not 0 <= int(i) < features.n_features]
    if bad:
        raise ValueError(f"features {bad} out of range [0, {features.n_features})")
    ids = torch.tensor([int(i) for i in clamp], dtype=torch.long)
    values = torch.tensor(list(clamp.values()), dtype=torch.float32)
    push = torch.zeros(features.d_in)
    for i, a in add.items():
        push = push + float(a) * features.decoder[int(i)].detach().cpu()
    where = position_selector(model, positions, features.site)

    def edit(x: Tensor) -> Tensor:
        delta = push.to(x.device).expand_as(x)
        if len(ids):
            current = features.encode(x)[..., ids.to(x.device)]
            change = values.to(x.device) - current
            delta = delta + change @ features.decoder[ids.to(x.device)]
        keep = where.mask(x.shape[-2], x.device)
        if keep is not None:
            delta = delta * keep[:, None].to(x.dtype)
        return x + delta

    return [(features.site, _edit(features, edit))]


def swap_feature_hooks(
    features: LinearFeatures, reference: Float[Tensor, "batch d"], position: int = -1
) -> HookList:
    """At ``position`` of every row, replace the features by those of ``reference`` (the
    same site's vector from another sequence): ``x + (f(ref) - f(x)) @ decoder``."""

    def edit(x: Tensor) -> Tensor:
        ref = reference.to(x.device, x.dtype)
        if ref.shape != (x.shape[0], x.shape[-1]):
            raise ValueError(
                f"reference must be [batch={x.shape[0]}, d={x.shape[-1]}], got {tuple(ref.shape)}"
            )
        x = x.clone()
        x[:, position] = (
            x[:, position] + features.explained(ref) - features.explained(x[:, position])
        )
        return x

    return [(features.site, _edit(features, edit))]
