"""Checkpoints: safetensors + JSON, written atomically, verified on load.

Layout of a saved directory::

    codelens.json          manifest: format version, codebook config, sites, file hashes
    hf_config/config.json  the HuggingFace config of the base model
    tokenizer/             the tokenizer (save_pretrained)
    model.safetensors      the bridge's live base parameters and buffers, by name
    codebooks.safetensors  "{site}.codes" and "{site}.disabled" per codebook

Nothing is unpickled. A directory is written next to its destination and renamed
into place, so an interrupted save never leaves a half-written checkpoint, and an
existing directory is replaced only if it is itself a codelens checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from codelens.config import CodebookConfig

if TYPE_CHECKING:
    from codelens.model import HookedCodebookTransformer

MANIFEST = "codelens.json"
FORMAT = "codelens-checkpoint"
VERSION = 1
BASE_FILE = "model.safetensors"
CODEBOOK_FILE = "codebooks.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, truncated or does not match the model."""


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file()


# ------------------------------------------------------------------------ saving


def save(model: HookedCodebookTransformer, out_dir: Path) -> Path:
    """Write ``model`` to ``out_dir`` atomically; returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_checkpoint(out_dir) and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not a codelens checkpoint; refusing to overwrite it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files = {
            BASE_FILE: base_state(model),
            CODEBOOK_FILE: codebook_state(model),
        }
        hashes = {}
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
            hashes[name] = _sha256(tmp / name)
        model.original_model.config.save_pretrained(tmp / "hf_config")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "codebook": None if model.codebook_config is None else model.codebook_config.to_dict(),
            "sites": site_shapes(model),
            "files": hashes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_dir(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def base_state(model: HookedCodebookTransformer) -> dict[str, Tensor]:
    """A copy of the bridge's live parameters and buffers by name, codebooks excluded."""
    return {n: t.detach().clone().contiguous().cpu() for n, t in base_state_refs(model).items()}


def codebook_state(model: HookedCodebookTransformer) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for site, cb in model.codebooks.items():
        state[f"{site}.codes"] = cb.codes.detach().clone().contiguous().cpu()
        state[f"{site}.disabled"] = cb.disabled.clone().contiguous().cpu()
    return state


def site_shapes(model: HookedCodebookTransformer) -> dict[str, dict[str, int]]:
    return {
        site: {"n_groups": cb.n_groups, "d": cb.d, "n_codes": cb.n_codes, "k": cb.k}
        for site, cb in model.codebooks.items()
    }


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------ loading


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check ``codelens.json`` and the hashes of the weight files."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / MANIFEST} is unreadable or corrupted: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not a codelens checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint format version {manifest.get('version')} is not {VERSION}"
        )
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted or truncated (hash mismatch)"
            )
    return manifest


def read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err


def load(
    cls: type[HookedCodebookTransformer],
    path: Path,
    *,
    codebook: CodebookConfig | str | None = "auto",
    device: str | torch.device | None = None,
) -> HookedCodebookTransformer:
    """Rebuild a saved model with bit-identical logits (see ``from_pretrained``)."""
    manifest = read_manifest(path)
    if isinstance(codebook, CodebookConfig) and manifest["codebook"] is not None:
        raise ValueError(
            f"{path} already has codebooks; pass codebook='auto' to load them "
            "or None for the base model"
        )
    config = AutoConfig.from_pretrained(path / "hf_config")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = cls.from_hf_model(hf, tokenizer, name=str(path))
    load_base_state(model, read_tensors(path / BASE_FILE), source=path / BASE_FILE)
    if codebook == "auto" and manifest["codebook"] is not None:
        model.add_codebooks(CodebookConfig.from_dict(manifest["codebook"]))
        load_codebook_state(model, read_tensors(path / CODEBOOK_FILE), source=path / CODEBOOK_FILE)
    elif isinstance(codebook, CodebookConfig):
        model.add_codebooks(codebook)
    if device is not None:
        model.to(device)
    return model


def load_base_state(
    model: HookedCodebookTransformer, state: dict[str, Tensor], *, source: Any
) -> None:
    """Copy saved base tensors into ``model``, refusing any name, shape or dtype mismatch."""
    own = base_state_refs(model)
    _check_match(own, state, source)
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def load_codebook_state(
    model: HookedCodebookTransformer, state: dict[str, Tensor], *, source: Any
) -> None:
    """Copy saved codebooks into ``model``'s codebooks (same sites and shapes)."""
    own: dict[str, Tensor] = {}
    for site, cb in model.codebooks.items():
        own[f"{site}.codes"], own[f"{site}.disabled"] = cb.codes, cb.disabled
    _check_match(own, state, source)
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def base_state_refs(model: HookedCodebookTransformer) -> dict[str, Tensor]:
    """The live base tensors by name (the bridge's, which the forward really uses)."""
    skip = {id(t) for cb in model.codebooks.values() for t in (cb.codes, cb.disabled)}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t for n, t in named if id(t) not in skip}


def _check_match(own: dict[str, Tensor], saved: dict[str, Tensor], source: Any) -> None:
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in own.items():
        got = saved[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)} {got.dtype}, "
                f"the model expects {tuple(tensor.shape)} {tensor.dtype}"
            )
