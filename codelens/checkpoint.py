"""Checkpoints: safetensors + JSON, written atomically, verified before anything is parsed.

Layout of a saved directory::

    codelens.json          manifest: format version, codebook config, each site's
                           settings (`CodebookLayer.settings`), the sha256
                           of every other file, and a digest of the manifest itself
    hf_config/config.json  the HuggingFace config of the base model
    tokenizer/             the tokenizer (save_pretrained)
    model.safetensors      the bridge's live base parameters and buffers, by name
    codebooks.safetensors  "{site}.codes", "{site}.disabled" (and "{site}.ln_weight",
                           "{site}.ln_bias" for affine LayerNorm codebooks)

Nothing is unpickled. Loading first checks the manifest's digest and the hash of
every file of these entries (a file missing, unlisted, or listed without a hash is
an error), so no config, tokenizer or tensor file is parsed unless it is exactly what
was saved; every failure is a `CheckpointError` naming the file. Other files in the
directory (notes, ``.ipynb_checkpoints/``) are the user's: loading ignores them (with
a warning) and saving keeps them.

A save stages the entries in a hidden sub-directory, then moves them into place
under an exclusive ``flock`` on the directory (loads take it shared); a save killed
at any moment is finished or undone by the next save or load, so the directory holds
the old checkpoint or the new one, never a mix. A non-empty directory that is not a
complete checkpoint is only written into with ``overwrite=True``.

This module knows files, not model classes: `codelens.model` builds models from
what it reads here (one import direction).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from codelens.config import CodebookConfig
from codelens.files import atomic_write_text, sha256_file, sha256_json

MANIFEST = "codelens.json"
FORMAT = "codelens-checkpoint"
VERSION = 2
BASE_FILE = "model.safetensors"
CODEBOOK_FILE = "codebooks.safetensors"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_DIR = "tokenizer"
REQUIRED = (BASE_FILE, CODEBOOK_FILE, f"{HF_CONFIG_DIR}/config.json", f"{TOKENIZER_DIR}/")
CODEBOOK_TENSORS = ("codes", "disabled", "ln_weight", "ln_bias")
# The entries of a checkpoint directory that codelens writes; anything else there is the user's.
OWNED = (MANIFEST, BASE_FILE, CODEBOOK_FILE, HF_CONFIG_DIR, TOKENIZER_DIR)
# Hidden sub-directories of a save in progress: the new entries, and the ones they replace.
STAGING = ".codelens-new-"
RETIRED = ".codelens-old-"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, truncated or does not match the model."""


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is meant as a codelens checkpoint (it may be damaged: loading then
    names what is wrong). Saving never relies on this: it verifies the whole directory."""
    path = Path(path)
    markers = (MANIFEST, CODEBOOK_FILE, HF_CONFIG_DIR)
    return any((path / name).exists() for name in markers) or bool(_leftovers(path, STAGING))


# ------------------------------------------------------------------------ saving


def save(
    model: nn.Module,
    out_dir: Path,
    *,
    overwrite: bool = False,
    tensors: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
) -> Path:
    """Write a `HookedCodebookTransformer` to ``out_dir``; returns ``out_dir``.

    Only codelens's own entries (`OWNED`) are written or replaced; any other file in
    ``out_dir`` is kept. A non-empty ``out_dir`` that is not a complete codelens
    checkpoint is refused unless ``overwrite=True``. The new files are staged in a
    hidden sub-directory and moved into place under an exclusive lock on ``out_dir``;
    a save killed at any point is finished or undone by the next save or load, so the
    directory always holds the old checkpoint or the new one. ``tensors``: the (base,
    codebook) tensors to write instead of the model's own, e.g. the full values of a
    model sharded over several processes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {out_dir}: it is a file")
    restore_interrupted_legacy_save(out_dir)
    created = not out_dir.exists()
    with _locked(out_dir, exclusive=True, create=True):
        try:
            _recover(out_dir)
            _check_replaceable(out_dir, overwrite)
            stage = out_dir / f"{STAGING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.mkdir(stage)  # the user's umask, like any directory they create
            try:
                _write(model, stage, tensors)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            _roll_forward(stage, out_dir)
        except BaseException:
            with contextlib.suppress(OSError):  # else the next save or load does it
                _recover(out_dir)
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
    return out_dir


def _write(
    model: nn.Module, stage: Path, tensors: tuple[dict[str, Tensor], dict[str, Tensor]] | None
) -> None:
    """Every owned entry of a checkpoint into the empty directory ``stage``, manifest last."""
    base, codebooks = tensors or (base_state(model), codebook_state(model))
    save_tensors(base, stage / BASE_FILE)
    save_tensors(codebooks, stage / CODEBOOK_FILE)
    model.original_model.config.save_pretrained(stage / HF_CONFIG_DIR)
    model.tokenizer.save_pretrained(stage / TOKENIZER_DIR)
    config = model.codebook_config
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "codebook": None if config is None else config.to_dict(),
        "sites": site_settings(model),
    }
    _fsync_tree(stage)
    write_manifest(stage, MANIFEST, fields)
    _fsync_dir(stage)


def save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    """safetensors' ``save_file``, with the mode any file the user creates gets (it uses 0600)."""
    save_file(tensors, str(file))
    os.chmod(file, 0o666 & ~_umask())


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if overwrite or not any(out_dir.iterdir()):
        return
    try:
        read_manifest(out_dir, warn=False, hashes=False)  # complete; damage may be replaced
    except CheckpointError as err:
        raise FileExistsError(
            f"{out_dir} is not empty and is not a complete codelens checkpoint ({err}); "
            f"refusing to replace anything in it. Pass overwrite=True to save there anyway: "
            f"codelens then replaces only its own entries ({', '.join(OWNED)}) and keeps "
            "every other file"
        ) from err


def _roll_forward(stage: Path, out_dir: Path) -> None:
    """Move a complete staged checkpoint into ``out_dir``, one entry at a time, manifest last.

    Each entry already there is first moved to a retired directory beside the stage.
    While the stage still holds its manifest, the move is unfinished and running this
    again completes it (that is how `_recover` finishes a killed save); once the manifest
    has moved, ``out_dir`` is the new checkpoint and both helper directories are dropped.
    """
    retired = out_dir / f"{RETIRED}{stage.name[len(STAGING) :]}"
    retired.mkdir(exist_ok=True)
    for name in sorted(OWNED, key=lambda n: n == MANIFEST):
        staged, current = stage / name, out_dir / name
        if not os.path.lexists(staged):
            continue
        if os.path.lexists(current):
            os.replace(current, retired / name)
        os.replace(staged, current)
    _fsync_dir(out_dir)
    shutil.rmtree(retired)
    shutil.rmtree(stage)


def _recover(out_dir: Path) -> None:
    """Finish or undo saves into ``out_dir`` that were killed (call with the lock held).

    A stage that holds its manifest was complete: its move into place is finished.
    Any other stage was still being written and is deleted, as is every retired
    directory left after that. Both kinds are codelens's own, named by it.
    """
    for stage in _leftovers(out_dir, STAGING):
        if (stage / MANIFEST).is_file():
            _roll_forward(stage, out_dir)
        else:
            shutil.rmtree(stage)
    for retired in _leftovers(out_dir, RETIRED):
        shutil.rmtree(retired)


def restore_interrupted_legacy_save(out_dir: Path) -> None:
    """Put back a checkpoint that an older codelens left hidden beside ``out_dir``.

    Earlier codelens versions saved by renaming the old checkpoint to ``.{name}.old-*`` and then the
    new one from ``.{name}.tmp-*`` into place; a crash between the two left nothing at
    ``out_dir``. If ``out_dir`` is missing, the newest complete one of those is renamed
    back (the new one first). Nothing is deleted.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() or not out_dir.parent.is_dir():
        return
    for kind in (".tmp-", ".old-"):
        for candidate in sorted(out_dir.parent.glob(f".{out_dir.name}{kind}*")):
            try:
                read_manifest(candidate, warn=False)
            except CheckpointError:
                continue
            with contextlib.suppress(OSError):  # another process restored it first
                os.rename(candidate, out_dir)
            warnings.warn(
                f"restored {out_dir} from {candidate.name}, left by a save that was interrupted",
                stacklevel=3,
            )
            return


def _leftovers(out_dir: Path, prefix: str) -> list[Path]:
    if not Path(out_dir).is_dir():
        return []
    return sorted(p for p in Path(out_dir).iterdir() if p.name.startswith(prefix) and p.is_dir())


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Hold a shared lock on a checkpoint directory while it is read, after finishing or
    undoing any save into it that was killed (see `save`)."""
    path = Path(path)
    with _locked(path, exclusive=False, create=False) as fd:
        if _leftovers(path, STAGING) or _leftovers(path, RETIRED):
            fcntl.flock(fd, fcntl.LOCK_EX)
            _finish_interrupted(path)
        yield


def _finish_interrupted(path: Path) -> None:
    try:
        _recover(path)
    except OSError as err:
        raise CheckpointError(
            f"{path} holds a save that was interrupted, and finishing it failed: {err}"
        ) from err


@contextlib.contextmanager
def _locked(directory: Path, *, exclusive: bool, create: bool) -> Iterator[int]:
    """An ``fcntl.flock`` on ``directory`` itself, created if asked; yields the locked fd.

    Saves take it exclusively and loads shared, so a load never sees a save half-done
    and two saves never interleave. A directory removed while we waited is made again.
    """
    while True:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink > 0 or not create:
                yield fd
                return
        finally:
            os.close(fd)


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the bridge's live parameters and buffers by name, codebooks excluded."""
    return {n: t.detach().clone().contiguous().cpu() for n, t in base_state_refs(model).items()}


def codebook_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone().contiguous().cpu() for n, t in codebook_refs(model).items()}


def site_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each codebook site's own settings (`CodebookLayer.settings`), enough to rebuild it."""
    return {site: cb.settings() for site, cb in model.codebooks.items()}


def site_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Each site's shape: what manifests recorded before per-site settings were saved."""
    keys = ("n_groups", "d", "n_codes", "k")
    return {site: {key: s[key] for key in keys} for site, s in site_settings(model).items()}


def write_manifest(
    directory: Path, name: str, fields: dict[str, Any], *, skip: Iterable[str] = ()
) -> None:
    """Write ``directory/name``: ``fields``, the sha256 of every other file (outside the
    sub-directories in ``skip``) and a digest of the manifest itself."""
    directory = Path(directory)
    files = {rel: sha256_file(directory / rel) for rel in _files(directory, skip) if rel != name}
    manifest = {**fields, "files": files}
    manifest["digest"] = _digest(manifest)
    atomic_write_text(directory / name, json.dumps(manifest, indent=2))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _digest(manifest: dict[str, Any]) -> str:
    return sha256_json({key: value for key, value in manifest.items() if key != "digest"})


def _files(directory: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every file under ``directory`` as a relative POSIX path, outside ``skip`` sub-dirs."""
    skipped = tuple(f"{s}/" for s in skip)
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(rel for rel in found if not rel.startswith(skipped))


# ------------------------------------------------------------------------ verifying


def verify(
    directory: Path,
    name: str,
    *,
    required: Iterable[str],
    skip: Iterable[str] = (),
    owned: Iterable[str] | None = None,
    warn: bool = True,
    hashes: bool = True,
) -> dict[str, Any]:
    """Check a manifest written by `write_manifest` against ``directory``; returns it.

    The manifest's digest must match its content; every file in the directory must be
    listed with a non-empty hash and match it; every listed file must exist; every
    ``required`` entry (a file, or a ``dir/`` prefix meaning at least one file there)
    must be listed. Raises `CheckpointError` naming the file otherwise. With ``owned``
    (top-level names), files outside those entries are not the checkpoint's: they are
    ignored, with one warning naming them (unless ``warn=False``). ``hashes=False``
    checks only that the checkpoint is complete (every file listed and present).
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
    if owned is not None:
        owned = set(owned)
        stray = sorted(rel for rel in present if rel.split("/", 1)[0] not in owned)
        present -= set(stray)
        if stray and warn:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            warnings.warn(
                f"{directory}: ignoring {len(stray)} file(s) that are not part of the codelens "
                f"checkpoint: {shown}",
                stacklevel=3,
            )
    for rel in sorted(set(files) | present):
        file = directory / rel
        expected = files.get(rel)
        if rel not in files:
            raise CheckpointError(f"{file} is not listed in {manifest_file}")
        if not isinstance(expected, str) or not expected:
            raise CheckpointError(f"{manifest_file} has an empty hash for {rel}")
        if rel not in present:
            raise CheckpointError(f"checkpoint file {file} is missing")
        if hashes and sha256_file(file) != expected:
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


def read_manifest(path: Path, *, warn: bool = True, hashes: bool = True) -> dict[str, Any]:
    """Verify a codelens checkpoint directory (see `verify`) and return its manifest.

    Files the user keeps beside the checkpoint (notes, ``.ipynb_checkpoints/``) are
    ignored, with one warning unless ``warn=False``.
    """
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
    return verify(path, MANIFEST, required=REQUIRED, owned=OWNED, warn=warn, hashes=hashes)


def read_codebook_config(path: Path, manifest: dict[str, Any]) -> CodebookConfig | None:
    """The saved `CodebookConfig` (``None`` for a model without codebooks)."""
    saved = manifest.get("codebook")
    if saved is None:
        return None
    try:
        return CodebookConfig.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(path) / MANIFEST}: invalid codebook config: {err}") from err


SITE_SETTINGS = (
    "n_groups",
    "d",
    "n_codes",
    "k",
    "similarity",
    "combine",
    "layer_norm",
    "layer_norm_affine",
    "memory_budget_mb",
)


def read_site_settings(path: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Each saved site's `CodebookLayer` arguments, in saved order; ``None`` for checkpoints
    that recorded only shapes (rebuilt from their `CodebookConfig` instead)."""
    sites = manifest.get("sites") or {}
    where = Path(path) / MANIFEST
    if not isinstance(sites, dict):
        raise CheckpointError(f"{where}: 'sites' must map hook names to settings")
    if not sites or all(set(s) == {"n_groups", "d", "n_codes", "k"} for s in sites.values()):
        return None
    for site, saved in sites.items():
        if not isinstance(saved, dict) or set(saved) != set(SITE_SETTINGS):
            raise CheckpointError(
                f"{where}: the settings of site {site!r} must have exactly the keys "
                f"{list(SITE_SETTINGS)}, got {saved!r}"
            )
    return sites


def check_sites(listed: Any, built: dict[str, Any], *, source: Any) -> None:
    """Refuse a manifest whose ``sites`` differ from the codebooks its config builds.

    The two are written together, so a difference means an edited or inconsistent
    manifest: loading it would quietly run codebooks unlike the saved ones.
    """
    if listed != built:
        raise CheckpointError(
            f"{Path(source) / MANIFEST}: its 'sites' entry {listed} does not match the "
            f"codebooks its codebook config builds {built}; the manifest was edited or "
            "is inconsistent"
        )


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
