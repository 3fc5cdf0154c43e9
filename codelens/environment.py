"""The software stack a result was produced on, and a check that it generates correctly.

A figure is only as good as the stack that produced it: a transformers minor release once
made cached generation attend to the newest token alone, and the TokFSM report said 21%
where 98% was right, without an error. `stack` records the versions in every report, and
`check_cached_generation` stops a run whose stack generates wrongly before it reports.
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

PACKAGES = (
    "codelens",
    "torch",
    "transformers",
    "transformer-lens",
    "tokenizers",
    "datasets",
    "huggingface-hub",
    "numpy",
    "scikit-learn",
)


class StackError(RuntimeError):
    """The installed packages make the model compute something wrong."""


def stack() -> dict[str, str]:
    """Python, the packages codelens' results depend on, and the codelens commit if known."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    commit = _git_commit()
    if commit:
        versions["codelens commit"] = commit
    return versions


def describe(versions: dict[str, str] | None = None) -> str:
    """One line naming the stack, e.g. for error messages and ``codelens --version``."""
    return ", ".join(f"{name} {v}" for name, v in (versions or stack()).items())


def _git_commit() -> str | None:
    """The commit of a codelens source checkout (with ``+changes`` if edited), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "codelens"], **run).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty.strip() else "")


@torch.no_grad()
def check_cached_generation(
    model: Any,
    prompts: Int[Tensor, "batch pos"],
    max_new_tokens: int = 16,
    tolerance: float = 1e-3,
) -> None:
    """Raise `StackError` unless greedy generation with the KV cache follows a full forward.

    Every token that greedy, cached generation picks must be one the full forward over the
    generated text ranks first (within ``tolerance`` in logits, so exact ties may go either
    way). Hooks active on ``model`` apply to both, so it also checks them under the cache.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )
        start = prompts.shape[1]
        logits = model(out)[:, start - 1 : -1].float()
    finally:
        model.train(was_training)
    picked = logits.gather(-1, out[:, start:, None]).squeeze(-1)
    gap = logits.max(-1).values - picked
    wrong = int((gap > tolerance).sum())
    if wrong:
        raise StackError(
            f"cached generation disagrees with a full forward at {wrong} of {gap.numel()} "
            f"greedy tokens (largest logit gap {gap.max().item():.3g}), so sampled-text figures "
            f"would be wrong on this stack: {describe()}. Install the tested versions: "
            "pip install -c constraints.txt -e . (see the README)."
        )
