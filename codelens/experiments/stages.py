"""One training stage of an experiment pipeline, with the settings the pipelines share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from codelens.training.config import TrainConfig
from codelens.training.trainer import TrainResult, train


def train_stage(
    run_dir: str | Path,
    data: dict[str, Any],
    settings: dict[str, Any],
    *,
    base: str | None,
    model_config: dict[str, Any],
    seed: int,
    tokenizer: str | None = None,
) -> TrainResult:
    """Train from scratch (``model_config``) or from the saved model ``base``.

    ``settings`` holds the stage's own `TrainConfig` fields (steps, learning rate, a
    ``codebook`` to add, ...) and overrides the shared defaults: cosine schedule, no
    periodic evaluation or checkpoints, one kept checkpoint. Progress bars show unless
    ``CODELENS_PROGRESS=0``.
    """
    fields: dict[str, Any] = {
        "schedule": "cosine",
        "eval_every": 0,
        "eval_batches": 4,
        "log_every": 50,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "init_samples": 16384,
        **settings,
    }
    config = TrainConfig(
        run_dir=str(run_dir),
        data=data,
        tokenizer=tokenizer,
        model=base or "",
        model_config=None if base else model_config,
        seed=seed,
        **fields,
    )
    return train(config, progress=os.environ.get("CODELENS_PROGRESS", "1") == "1")
