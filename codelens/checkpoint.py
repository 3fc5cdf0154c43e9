"""Checkpoints: safetensors + JSON, written atomically, verified before anything is parsed.

Layout of a saved directory::

    codelens.json          manifest: format version, codebook config, sites, the sha256
                           of every other file, and a digest of the manifest itself
    hf_config/config.json  the HuggingFace config of the base model
    tokenizer/             the tokenizer (save_pretrained)
    model.safetensors      the bridge's live base parameters and buffers, by name
    codebooks.safetensors  "{site}.codes", "{site}.disabled" (and "{site}.ln_weight",
                           "{site}.ln_bias" for affine LayerNorm codebooks)

Nothing is unpickled. Loading first checks the manifest's digest and the hash of
every file in the directory (a file missing, unlisted, or listed without a hash is
an error), so no config, tokenizer or tensor file is parsed unless it is exactly what
was saved; every failure is a `CheckpointError` naming the file. A directory is
written next to its destination and renamed into place, so an interrupted save never
leaves a half-written checkpoint, and an existing directory is replaced only if it
is itself a codelens checkpoint.

This module knows files, not model classes: `codelens.model` builds models from
what it reads here (one import direction).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from codelens.config import CodebookConfig

MANIFEST = "codelens.json"
FORMAT = "codelens-checkpoint"
VERSION = 2
BASE_FILE = "model.safetensors"
CODEBOOK_FILE = "codebooks.safetensors"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_DIR = "tokenizer"
REQUIRED = (BASE_FILE, CODEBOOK_FILE, f"{HF_CONFIG_DIR}/config.json", f"{TOKENIZER_DIR}/")
CODEBOOK_TENSORS = ("codes", "disabled", "ln_weight", "ln_bias")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, truncated or does not match the model."""


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is (or, its manifest lost, was) a codelens checkpoint directory."""
    path = Path(path)
    return any((path / name).exists() for name in (MANIFEST, CODEBOOK_FILE, HF_CONFIG_DIR))


# ------------------------------------------------------------------------ saving


def save(
    model: nn.Module,
    out_dir: Path,
    *,
    tensors: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
) -> Path:
    """Write a `HookedCodebookTransformer` to ``out_dir`` atomically; returns ``out_dir``.

    ``tensors``: the (base, codebook) tensors to write instead of the model's own, e.g. the
    full values of a model sharded over several processes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_checkpoint(out_dir) and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not a codelens checkpoint; refusing to overwrite it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        base, codebooks = tensors or (base_state(model), codebook_state(model))
        save_file(base, str(tmp / BASE_FILE))
        save_file(codebooks, str(tmp / CODEBOOK_FILE))
        model.original_model.config.save_pretrained(tmp / HF_CONFIG_DIR)
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        config = model.codebook_config
        fields = {
            "format": FORMAT,
            "version": VERSION,
            "codebook": None if config is None else config.to_dict(),
            "sites": site_shapes(model),
        }
        write_manifest(tmp, MANIFEST, fields)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the bridge's live parameters and buffers by name, codebooks excluded."""
    return {n: t.detach().clone().contiguous().cpu() for n, t in base_state_refs(model).items()}


def codebook_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone().contiguous().cpu() for n, t in codebook_refs(model).items()}


def site_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    return {
        site: {"n_groups": cb.n_groups, "d": cb.d, "n_codes": cb.n_codes, "k": cb.k}
        for site, cb in model.codebooks.items()
    }


def write_manifest(
    directory: Path, name: str, fields: dict[str, Any], *, skip: Iterable[str] = ()
) -> None:
    """Write ``directory/name``: ``fields``, the sha256 of every other file (outside the
    sub-directories in ``skip``) and a digest of the manifest itself."""
    directory = Path(directory)
    files = {rel: _sha256(directory / rel) for rel in _files(directory, skip) if rel != name}
    manifest = {**fields, "files": files}
    manifest["digest"] = _digest(manifest)
    (directory / name).write_text(json.dumps(manifest, indent=2))


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


def _digest(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _files(directory: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every file under ``directory`` as a relative POSIX path, outside ``skip`` sub-dirs."""
    skipped = tuple(f"{s}/" for s in skip)
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(rel for rel in found if not rel.startswith(skipped))


# ------------------------------------------------------------------------ verifying


def verify(
    directory: Path, name: str, *, required: Iterable[str], skip: Iterable[str] = ()
) -> dict[str, Any]:
    """Check a manifest written by `write_manifest` against ``directory``; returns it.

    The manifest's digest must match its content; every file in the directory must be
    listed with a non-empty hash and match it; every listed file must exist; every
    ``required`` entry (a file, or a ``dir/`` prefix meaning at least one file there)
    must be listed. Raises `CheckpointError` naming the file otherwise.
    """
    directory = Path(directory)
    manifest_file = directory / name
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict) or manifest.get("digest") != _digest(manifest):
        raise CheckpointError(
            f"{manifest_file} is corrupted or was edited (its digest does not match)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_file} lists no file hashes")
    for entry in required:
        if not any(rel.startswith(entry) if entry.endswith("/") else rel == entry for rel in files):
            raise CheckpointError(f"{manifest_file} has no entry for {entry}")
    present = set(_files(directory, skip)) - {name}
    for rel in sorted(set(files) | present):
        file = directory / rel
        expected = files.get(rel)
        if rel not in files:
            raise CheckpointError(f"{file} is not listed in {manifest_file}")
        if not isinstance(expected, str) or not expected:
            raise CheckpointError(f"{manifest_file} has an empty hash for {rel}")
        if rel not in present:
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted or truncated: its sha256 is not the one "
                f"in {manifest_file} (or that manifest belongs to another checkpoint)"
            )
    return manifest


def read_json(file: Path) -> Any:
    """Parse a JSON file, any failure a `CheckpointError` naming it."""
    try:
        return json.loads(Path(file).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is missing, unreadable or corrupted: {err}") from err


# ------------------------------------------------------------------------ loading


def read_manifest(path: Path) -> dict[str, Any]:
    """Verify a codelens checkpoint directory (see `verify`) and return its manifest."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not a codelens checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path / MANIFEST}: checkpoint format version {manifest.get('version')!r} is not "
            f"{VERSION} (version 1 did not hash its config and tokenizer; load it with the "
            "codelens that wrote it and save it again)"
        )
    return verify(path, MANIFEST, required=REQUIRED)


def read_codebook_config(path: Path, manifest: dict[str, Any]) -> CodebookConfig | None:
    """The saved `CodebookConfig` (``None`` for a model without codebooks)."""
    saved = manifest.get("codebook")
    if saved is None:
        return None
    try:
        return CodebookConfig.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(path) / MANIFEST}: invalid codebook config: {err}") from err


def read_hf_config(path: Path) -> PretrainedConfig:
    """The base model's HuggingFace config (after `read_manifest` verified it)."""
    directory = Path(path) / HF_CONFIG_DIR
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as err:  # transformers raises many types for a bad config
        raise CheckpointError(f"{directory / 'config.json'} is not a valid config: {err}") from err


def read_tokenizer(path: Path) -> Any:
    """The saved tokenizer (after `read_manifest` verified it)."""
    directory = Path(path) / TOKENIZER_DIR
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # tokenizers raises bare Exceptions for bad files
        raise CheckpointError(f"the tokenizer in {directory} cannot be loaded: {err}") from err


def read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err


def load_base_state(model: nn.Module, state: dict[str, Tensor], *, source: Any) -> None:
    """Copy saved base tensors into ``model``, refusing any name or shape mismatch."""
    _copy_into(base_state_refs(model), state, source)


def load_codebook_state(model: nn.Module, state: dict[str, Tensor], *, source: Any) -> None:
    """Copy saved codebooks into ``model``'s codebooks (same sites and shapes)."""
    _copy_into(codebook_refs(model), state, source)


def codebook_refs(model: nn.Module) -> dict[str, Tensor]:
    """The live codebook tensors by checkpoint name (``{site}.codes`` etc.)."""
    refs: dict[str, Tensor] = {}
    for site, cb in model.codebooks.items():
        for attr in CODEBOOK_TENSORS:
            if getattr(cb, attr, None) is not None:
                refs[f"{site}.{attr}"] = getattr(cb, attr)
    return refs


def base_state_refs(model: nn.Module) -> dict[str, Tensor]:
    """The live base tensors by name (the bridge's, which the forward really uses)."""
    skip = {id(t) for t in codebook_refs(model).values()}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t for n, t in named if id(t) not in skip}


def _copy_into(own: dict[str, Tensor], saved: dict[str, Tensor], source: Any) -> None:
    """Check names, shapes and dtype kinds, then copy (floating tensors may change precision)."""
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in own.items():
        got = saved[name]
        same_kind = got.dtype == tensor.dtype or (
            got.is_floating_point() and tensor.is_floating_point()
        )
        if got.shape != tensor.shape or not same_kind:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)} {got.dtype}, "
                f"the model expects {tuple(tensor.shape)} {tensor.dtype}"
            )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
