"""One training stage of an experiment pipeline, with the settings the pipelines share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from codelens.checkpoint import is_checkpoint, read_json
from codelens.files import atomic_write_json, sha256_file
from codelens.model import HookedCodebookTransformer
from codelens.training.config import TrainConfig
from codelens.training.parallel import resolve_device
from codelens.training.trainer import TrainResult, train

STAGE_FILE = "stage.json"  # what a finished stage was trained from (`stage_inputs`)


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

    A stage already finished in ``run_dir`` from the same inputs (`stage_inputs`: the
    settings and the bytes of its data, tokenizer and base model) is loaded instead of
    trained again (``reused`` is then True), so a pipeline rerun with other analysis
    settings does not retrain; any change of input trains it anew.
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
    run_dir = Path(run_dir)
    inputs = stage_inputs(config)
    done = run_dir / STAGE_FILE
    if done.is_file() and is_checkpoint(run_dir / "final") and read_json(done) == inputs:
        device = resolve_device(config.device, world=1, local_rank=0)
        model = HookedCodebookTransformer.from_pretrained(run_dir / "final", device=device)
        evaluation = run_dir / "final_eval.json"
        final_eval = read_json(evaluation) if evaluation.is_file() else {}
        return TrainResult(model, run_dir, config.steps, final_eval, reused=True)
    done.unlink(missing_ok=True)  # written by codelens below; stale once training starts
    result = train(config, progress=os.environ.get("CODELENS_PROGRESS", "1") == "1")
    atomic_write_json(done, inputs)
    return result


def stage_inputs(config: TrainConfig) -> dict[str, Any]:
    """What a stage's result depends on: its config and the sha256 of every file of its
    data source, tokenizer and base model that exists on disk (a hub name stays a name)."""
    files: dict[str, str] = {}
    sources = [config.data.get("source"), config.tokenizer, config.model]
    for source in (Path(s) for s in sources if isinstance(s, str) and s):
        if source.is_dir():
            paths = sorted(p for p in source.rglob("*") if p.is_file())
        else:
            paths = [source] if source.is_file() else []
        files |= {str(path): sha256_file(path) for path in paths}
    return {"config": config.to_dict(), "files": files}
