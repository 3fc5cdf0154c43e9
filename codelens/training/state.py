"""Resumable training state: model, codebooks, optimiser, RNG and usage counters.

Each checkpoint is a directory ``run_dir/checkpoints/step-00001234/`` holding the
model (`codelens.checkpoint` format) plus ``trainer.safetensors``,
``trainer.json`` and ``state.json`` (the sha256 of both, checked before either is
parsed). It is assembled in a temporary directory and renamed into place,
so a run killed at any moment leaves only complete checkpoints; the newest
``keep`` are kept. Nothing is pickled.

Checkpoints always hold full tensors, so one written by a sharded (FSDP) run loads into a
single process and the reverse: saving gathers the shards (every rank calls `save_state`,
one writes), and loading cuts each rank's part out of the full tensors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codelens import checkpoint
from codelens.files import atomic_write_text
from codelens.model import HookedCodebookTransformer
from codelens.training import parallel

PREFIX = "step-"
STATE_MANIFEST = "state.json"
STATE_FILES = ("trainer.safetensors", "trainer.json")
TEMPORARY = ".tmp-"  # + pid: a checkpoint being written


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_state(
    run_dir: Path,
    step: int,
    model: HookedCodebookTransformer,
    optimizer: torch.optim.Optimizer,
    extra_tensors: dict[str, Tensor],
    keep: int,
    config: dict[str, Any] | None = None,
    *,
    cuda_device: torch.device | None = None,
    write: bool = True,
) -> Path | None:
    """Write the checkpoint for ``step`` atomically and prune to the newest ``keep``.

    ``config`` (the run's training config) is stored with it, so a resume can tell
    whether it runs under the settings that produced this state. A sharded model's
    tensors are gathered first, a collective: every rank calls this, and only the one
    with ``write`` writes (it returns None elsewhere). ``cuda_device``: the GPU whose
    random state is saved (this rank's training device).
    """
    if not (write or parallel.is_sharded(model)):
        return None
    model_tensors = full_model_state(model, keep=write)
    tensors, meta = _optimizer_state(optimizer, keep=write)
    if not write:
        return None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    _remove_stale_temporaries(root)
    tmp = root / f"{TEMPORARY}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # the user's umask (mkdtemp would make it 0700)
    try:
        checkpoint.save(model, tmp / "model", tensors=model_tensors)
        tensors |= {f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()}
        tensors |= _rng_tensors(cuda_device)
        checkpoint.save_tensors(tensors, tmp / "trainer.safetensors")
        meta |= {"step": step, "python_random": _python_random_state(), "config": config}
        atomic_write_text(tmp / "trainer.json", json.dumps(meta))
        fields = {"format": "codelens-trainer-state", "version": 1}
        checkpoint.write_manifest(tmp, STATE_MANIFEST, fields, skip=("model",))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_state(path: Path) -> None:
    """Verify a training checkpoint's files; a damaged one names the newest intact one
    before it, so that a resume can fall back to it (nothing is moved or deleted)."""
    path = Path(path)
    try:
        checkpoint.verify(path, STATE_MANIFEST, required=STATE_FILES, skip=("model",))
        checkpoint.read_manifest(path / "model")
    except checkpoint.CheckpointError as err:
        older = [p for p in checkpoint_dirs(path.parent.parent) if p.name < path.name]
        hint = "there is no earlier checkpoint to resume from"
        for candidate in reversed(older):
            try:
                checkpoint.verify(candidate, STATE_MANIFEST, required=STATE_FILES, skip=("model",))
                checkpoint.read_manifest(candidate / "model", warn=False)
            except checkpoint.CheckpointError:
                continue
            hint = (
                f"the previous checkpoint {candidate} is intact: move {path} out of "
                f"{path.parent} to resume from it"
            )
            break
        raise checkpoint.CheckpointError(f"{err}; {hint}") from err


def _remove_stale_temporaries(root: Path) -> None:
    """Delete the half-written checkpoints of runs that were killed (named by their pid)."""
    for stale in root.glob(f"{TEMPORARY}*"):
        pid = stale.name[len(TEMPORARY) :].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def full_model_state(
    model: HookedCodebookTransformer, *, keep: bool = True
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(base, codebook) tensors on the CPU, whole even when the model is sharded (then a
    collective on every rank: a rank with ``keep=False`` only lends its shards, and gets
    empty dicts, holding one gathered tensor at a time)."""

    def gathered(refs: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, tensor in refs.items():
            whole = parallel.full(tensor.detach())
            if keep:
                out[name] = whole.clone().contiguous().cpu()
        return out

    return gathered(checkpoint.base_state_refs(model)), gathered(checkpoint.codebook_refs(model))


def load_state(
    path: Path,
    model: HookedCodebookTransformer,
    optimizer: torch.optim.Optimizer,
    *,
    cuda_device: torch.device | None = None,
) -> tuple[int, dict[str, Tensor]]:
    """Restore a checkpoint into ``model`` and ``optimizer``; returns (step, extra tensors)."""
    load_model_state(path, model)
    return load_trainer_state(path, optimizer, cuda_device=cuda_device)


def load_model_state(path: Path, model: HookedCodebookTransformer) -> None:
    """Restore a checkpoint's base weights and codebooks into an unsharded ``model``."""
    path = Path(path)
    verify_state(path)
    checkpoint.load_base_state(
        model, checkpoint.read_tensors(path / "model" / checkpoint.BASE_FILE), source=path
    )
    checkpoint.load_codebook_state(
        model, checkpoint.read_tensors(path / "model" / checkpoint.CODEBOOK_FILE), source=path
    )


def load_trainer_state(
    path: Path, optimizer: torch.optim.Optimizer, *, cuda_device: torch.device | None = None
) -> tuple[int, dict[str, Tensor]]:
    """Restore the optimiser (each rank its shards) and the random states; returns
    (step, extra tensors). ``cuda_device``: the GPU that takes the saved CUDA random state."""
    path = Path(path)
    checkpoint.verify(path, STATE_MANIFEST, required=STATE_FILES, skip=("model",))
    tensors = checkpoint.read_tensors(path / "trainer.safetensors")
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise checkpoint.CheckpointError(f"{path / 'trainer.json'} is unreadable: {err}") from err
    _load_optimizer_state(optimizer, tensors, meta)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"], cuda_device or "cuda")
    random.setstate(_tuples(meta["python_random"]))
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return int(meta["step"]), extra


def saved_config(path: Path) -> dict[str, Any] | None:
    """The training config a checkpoint was written under (None if it predates recording it)."""
    verify_state(path)
    path = Path(path) / "trainer.json"
    try:
        return json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError) as err:
        raise checkpoint.CheckpointError(f"{path} is unreadable: {err}") from err


def _optimizer_state(
    optimizer: torch.optim.Optimizer, *, keep: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimiser's tensors (whole: sharded moments are gathered, a collective) and the
    rest; ``keep=False`` only lends this rank's shards."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, Tensor):
                whole = parallel.full(value.detach())
                if keep:
                    tensors[f"optim.{idx}.{key}"] = whole.cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"optimizer_groups": state["param_groups"], "optimizer_scalars": scalars}


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            slots.setdefault(int(idx), {})[key] = value
    for idx, values in meta["optimizer_scalars"].items():
        slots.setdefault(int(idx), {}).update(values)
    groups = meta["optimizer_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise checkpoint.CheckpointError("checkpoint optimiser has a different parameter layout")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, values in slots.items():
        if idx < len(params):  # a sharded parameter takes this rank's part of its moments
            for key, value in values.items():
                if isinstance(value, Tensor) and value.shape == params[idx].shape:
                    values[key] = parallel.local_part(value, params[idx])
    optimizer.load_state_dict({"state": slots, "param_groups": groups})


def _rng_tensors(cuda_device: torch.device | None) -> dict[str, Tensor]:
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state(cuda_device or "cuda")
    return rng


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _tuples(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
