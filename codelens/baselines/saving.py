"""Load feature dictionaries saved by `LinearFeatures.save` (safetensors + JSON, never
pickle): the format, the tensors' hash and their shapes are checked before use."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from codelens.baselines.features import (
    FORMAT,
    META_FILE,
    TENSOR_FILE,
    LinearFeatures,
    ProjectionFeatures,
)
from codelens.baselines.sae import SparseAutoencoder
from codelens.files import sha256_file


def load_features(path: str | Path) -> LinearFeatures:
    """Load features saved by `LinearFeatures.save`, verifying format, hash and shapes."""
    path = Path(path)
    meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"{path} holds no saved features ({META_FILE}, {TENSOR_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a codelens features file")
    if sha256_file(tensor_path) != meta.get("sha256"):
        raise ValueError(f"{tensor_path} does not match its recorded hash: corrupted or replaced")
    tensors = load_file(str(tensor_path))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != meta.get("shapes"):
        raise ValueError(
            f"{tensor_path} holds tensors {shapes}, the metadata says {meta['shapes']}"
        )
    kinds = {cls.kind: cls for cls in (SparseAutoencoder, ProjectionFeatures)}
    if meta.get("kind") not in kinds:
        raise ValueError(f"unknown feature kind {meta.get('kind')!r}; known: {list(kinds)}")
    return kinds[meta["kind"]].from_saved(meta, tensors)
