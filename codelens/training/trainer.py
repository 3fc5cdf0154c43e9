"""The training loop: fine-tune or train from scratch with codebooks, resumable, data-parallel.

Loss = next-token cross-entropy + ``recon_weight`` x codebook reconstruction MSE.
Runs as a single process or under ``torchrun --nproc_per_node=N`` (DistributedDataParallel,
gloo on CPU, nccl on GPU): every rank takes its rows of the same global batch, so N
processes follow the same trajectory as one. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from codelens.config import CodebookConfig
from codelens.data.fsm import FSMConfig, TokFSM
from codelens.model import HookedCodebookTransformer
from codelens.training import state as train_state
from codelens.training.batches import BlockBatches, FSMBatches, StreamingBatches
from codelens.training.config import TrainConfig, bf16_error
from codelens.training.init import init_codebooks, replace_dead_codes
from codelens.training.usage import (
    CodebookMonitor,
    ReconstructionTotals,
    checkpoint_contexts,
    summarise,
    usage_metrics,
)

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    model: HookedCodebookTransformer
    run_dir: Path
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- set-up


def _setup_distributed(device: torch.device, batch_size: int) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {world} processes "
            f"(WORLD_SIZE={world}): ranks with fewer rows would weigh as much as the others, "
            f"so the run would not match one process; use a multiple of {world}"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return _Dist(dist.get_rank(), dist.get_world_size(), owns_group=True)
    return _Dist(dist.get_rank(), dist.get_world_size())


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local}")
    return torch.device("cpu")


def build_data(config: TrainConfig, tokenizer: Any = None, n_ctx: int | None = None):
    """The batch source, the tokenizer, and the FSM when the data is synthetic."""
    data = config.data
    if "fsm" in data:
        fsm = TokFSM(FSMConfig(**data["fsm"]))
        return FSMBatches(fsm, config.batch_size, config.seed), fsm.tokenizer(), fsm
    from codelens.data import text

    texts = text.load_text_dataset(
        data["source"],
        split=data.get("split", "train"),
        text_column=data.get("text_column", "text"),
        streaming=bool(data.get("streaming", False)),
        config_name=data.get("config_name"),
    )
    if tokenizer is None:
        if config.tokenizer:
            tokenizer = text.load_tokenizer(config.tokenizer)
        else:
            tokenizer = text.train_bpe_tokenizer(
                texts, data.get("vocab_size", 4096), save_dir=Path(config.run_dir) / "tokenizer"
            )
    block_len = data.get("block_len", 128)
    vocab = len(tokenizer)
    eval_blocks = data.get("eval_blocks", 16)
    if data.get("streaming"):
        blocks = text.PackedBlocks(texts, tokenizer, block_len, n_ctx=n_ctx, vocab_size=vocab)
        return StreamingBatches(iter(blocks), config.batch_size, eval_blocks), tokenizer, None
    packed = text.pack_to_tensor(
        texts, tokenizer, block_len, data.get("max_blocks"), n_ctx=n_ctx, vocab_size=vocab
    )
    return BlockBatches(packed, config.batch_size, config.seed, eval_blocks), tokenizer, None


def build_model(
    config: TrainConfig, tokenizer: Any, fsm: TokFSM | None
) -> HookedCodebookTransformer:
    """The model a config names: pretrained (``model``) or new (``model_config``)."""
    codebook = CodebookConfig.from_dict(config.codebook) if config.codebook else None
    if config.model:
        if tokenizer is None and config.tokenizer:
            from codelens.data.text import load_tokenizer

            tokenizer = load_tokenizer(config.tokenizer)
        return HookedCodebookTransformer.from_pretrained(
            config.model, codebook if codebook else "auto", tokenizer=tokenizer
        )
    model_config = dict(config.model_config or {})
    model_config.setdefault("vocab_size", fsm.vocab_size if fsm else len(tokenizer))
    return HookedCodebookTransformer.from_config(
        model_config, tokenizer, codebook, seed=config.seed
    )


def _check_context(source: Any, model: HookedCodebookTransformer) -> None:
    """Training blocks must fit the model's context (rotary models would run past it quietly)."""
    length, n_ctx = source.eval_batch(0).shape[-1], model.cfg.n_ctx
    if length > n_ctx:
        raise ValueError(
            f"training sequences have {length} tokens but the model's context is {n_ctx}; "
            f"set data.block_len (text) or data.fsm.seq_len (FSM) to at most {n_ctx}"
        )


def _init_batches(
    source: Any, config: TrainConfig, model: HookedCodebookTransformer
) -> list[Tensor]:
    """Training data for k-means: ``init_samples`` distinct tokens, at least one per code."""
    if config.init == "random":
        return []
    n_codes = max(cb.n_codes for cb in model.codebooks.values())
    if config.init_samples < n_codes:
        raise ValueError(
            f"init_samples ({config.init_samples}) must be at least the largest codebook size "
            f"({n_codes}) for init={config.init!r}: k-means needs a sample per code"
        )
    batches = source.init_batches(config.init_samples)
    have = sum(b.numel() for b in batches)
    if have < n_codes:
        raise ValueError(
            f"init={config.init!r} needs at least {n_codes} training tokens (one per code), "
            f"but the training data holds only {have}; use more data or init=random"
        )
    return batches


# Keys a resumed run cannot change: they say what is trained, on which data, in which
# order; the saved weights, optimiser layout and data position belong to them.
_FIXED_ON_RESUME = (
    "model",
    "model_config",
    "tokenizer",
    "codebook",
    "data",
    "seed",
    "batch_size",
    "train",
)
CONFIG_CHANGES_FILE = "config_changes.jsonl"


def _resume_changes(newest: Path, config: TrainConfig) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for settings that differ from the checkpoint's config.

    Raises, naming the keys, when one of them is fixed for the run; every other change
    (learning rates, schedule, ``steps``, logging, ...) is applied by the resumed run.
    """
    saved = train_state.saved_config(newest)
    if saved is None:  # a checkpoint from before configs were stored with it
        old_file = Path(config.run_dir) / "config.json"
        if not old_file.is_file():
            return {}
        saved = json.loads(old_file.read_text())
    fields = dataclasses.fields(TrainConfig)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    old = json.loads(json.dumps(saved))
    new = json.loads(json.dumps(config.to_dict()))
    changes = {
        key: [old.get(key, defaults.get(key)), value]
        for key, value in new.items()
        if key != "run_dir" and old.get(key, defaults.get(key)) != value
    }
    fixed = [
        f"{k}: {json.dumps(changes[k][0])} -> {json.dumps(changes[k][1])}"
        for k in _FIXED_ON_RESUME
        if k in changes
    ]
    if fixed:
        raise ValueError(
            f"{config.run_dir} holds a checkpoint ({newest.name}) of a run with other "
            f"settings that a resumed run cannot change: {'; '.join(fixed)}. Resume with "
            f"the saved values, or start a new run_dir with model={newest / 'model'} to go on "
            "from its weights."
        )
    return changes


_GROUP_SETTINGS = ("lr", "base_lr", "weight_decay")


def _record_changes(run_dir: Path, step: int, changes: dict[str, list[Any]]) -> None:
    """Say which settings a resumed run changed, and log them next to config.json."""
    with open(run_dir / CONFIG_CHANGES_FILE, "a") as f:
        f.write(json.dumps({"step": step, "changes": changes}) + "\n")
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
    tqdm.write(f"resuming at step {step} with changed settings: {listed}")


def _freeze_unused(model: HookedCodebookTransformer, tokens: Tensor) -> None:
    """Stop training parameters the forward never uses (e.g. a fused QKV the bridge split).

    DistributedDataParallel requires every trainable parameter to get a gradient.
    """
    rng = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    (model(tokens, return_type="loss") + model.reconstruction_loss()).backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)


def enable_gradient_checkpointing(model: HookedCodebookTransformer) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them
    (HuggingFace's activation checkpointing, non-reentrant). Code usage is still counted
    once per forward: the recomputation runs inside `usage.recomputation`."""
    hf = model.original_model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing=true: {type(hf).__name__} does not support activation "
            "checkpointing; set gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def _optimizer(model: HookedCodebookTransformer, config: TrainConfig) -> torch.optim.AdamW:
    codebooks = model.codebook_parameters()
    base = [p for p in model.base_parameters() if p.requires_grad]
    if config.train == "codebooks":
        if not codebooks:
            raise ValueError("train='codebooks' but the model has no codebooks")
        for p in base:
            p.requires_grad_(False)
        base = []
    decay = [p for p in base if p.ndim >= 2]
    no_decay = [p for p in base if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": codebooks, "weight_decay": 0.0, "lr": config.codebook_lr or config.lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the model has no trainable parameters")
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Warm-up, then constant, linear or cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: HookedCodebookTransformer, batches: list[Tensor], micro_batch: int = 0
) -> dict[str, float]:
    """LM loss and accuracy with and without codebooks, and per-site reconstruction quality.

    Each batch runs in forwards of ``micro_batch`` rows (0: the whole batch at once),
    so memory is bounded by the micro-batch (its logits and cached site activations);
    the figures are those of whole batches, averaged over batches.
    """
    was_training = model.training
    model.eval()
    sites = list(model.codebooks)
    names = set(sites) | {f"{s}.hook_quantized" for s in sites}
    totals: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        totals[key] = totals.get(key, 0.0) + value / len(batches)

    for tokens in batches:
        sums = {key: 0.0 for key in ("lm_loss", "accuracy", "lm_loss_bypassed")}
        recon = {site: ReconstructionTotals() for site in sites}
        for micro in tokens.split(micro_batch or len(tokens)):
            share = len(micro) / len(tokens)  # every row has as many predictions
            logits, cache = model.run_with_cache(micro, names_filter=lambda n: n in names)
            loss, acc = _lm_metrics(logits, micro)
            del logits
            sums["lm_loss"] += loss * share
            sums["accuracy"] += acc * share
            for site in sites:
                cb = model.codebook(site)
                x = cache[site].reshape(-1, cb.n_groups, cb.d)
                q = cache[f"{site}.hook_quantized"].reshape(-1, cb.n_groups, cb.d)
                recon[site].add(q, x)
            del cache
            if sites:
                with model.codebooks_bypassed():
                    sums["lm_loss_bypassed"] += _lm_metrics(model(micro), micro)[0] * share
        add("lm_loss", sums["lm_loss"])
        add("accuracy", sums["accuracy"])
        for site in sites:
            for key, value in recon[site].metrics().items():
                add(f"{site}/{key}", value)
        if sites:
            add("lm_loss_bypassed", sums["lm_loss_bypassed"])
    if sites:
        totals["bottleneck_cost"] = totals["lm_loss"] - totals["lm_loss_bypassed"]
    model.train(was_training)
    return totals


def _evaluate(
    model: HookedCodebookTransformer, batches: list[Tensor], config: TrainConfig, device
) -> dict[str, float]:
    """`evaluate` in the training run's precision and micro-batches."""
    with _autocast(config, device):
        return evaluate(model, batches, config.eval_micro_batch)


def _autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on ``device`` when the config asks for it (a no-op context otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)


def _lm_metrics(logits: Tensor, tokens: Tensor) -> tuple[float, float]:
    pred, target = logits[:, :-1], tokens[:, 1:]
    loss = F.cross_entropy(pred.flatten(0, 1).float(), target.flatten())
    return float(loss), float((pred.argmax(-1) == target).float().mean())


# ---------------------------------------------------------------------------- logging


class _Logger:
    """JSON-lines metrics (always) plus TensorBoard / W&B when asked for and installed."""

    def __init__(self, run_dir: Path, config: TrainConfig, start: int, active: bool) -> None:
        self.active = active
        self.path = run_dir / METRICS_FILE
        self.tb = self.wandb = None
        if not active:
            return
        _truncate_after(self.path, start)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("tensorboard=true needs the tensorboard package") from err
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("wandb=true needs the wandb package") from err
            self.wandb = wandb.init(config=config.to_dict(), dir=str(run_dir), resume="allow")

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop logged lines from steps the resumed run will redo."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _line_step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run


# ---------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    *,
    model: HookedCodebookTransformer | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train per ``config``, resuming from the newest checkpoint in ``run_dir`` if any."""
    import time

    started = time.perf_counter()
    device = _device(config.device)
    if config.bf16 and device.type not in ("cuda", "cpu"):
        raise ValueError(bf16_error(device))
    run_dir = Path(config.run_dir)
    found = train_state.checkpoint_dirs(run_dir)
    changes = _resume_changes(found[-1], config) if found else {}
    ranks = _setup_distributed(device, config.batch_size)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model is None and config.model:
        model = build_model(config, None, None)  # a pretrained model brings its tokenizer
    source, tokenizer, fsm = build_data(
        config,
        model.tokenizer if model is not None else None,
        n_ctx=model.cfg.n_ctx if model is not None else None,
    )
    if model is None:
        model = build_model(config, tokenizer, fsm)
    elif config.codebook:
        wanted = CodebookConfig.from_dict(config.codebook)
        if model.codebook_config is None:
            model.add_codebooks(wanted)
        elif model.codebook_config != wanted:
            raise ValueError(
                f"config.codebook {wanted} differs from the model's codebooks "
                f"{model.codebook_config}; drop config.codebook or pass a matching one"
            )
    _check_context(source, model)
    model.to(device)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
    _freeze_unused(model, source.eval_batch(0)[:2].to(device))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = _optimizer(model, config)
    monitor = CodebookMonitor(model)
    start = 0
    if found:
        settings = [{k: g[k] for k in _GROUP_SETTINGS} for g in optimizer.param_groups]
        start, extra = train_state.load_state(found[-1], model, optimizer)
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)  # this config's learning rates and decay, not the checkpoint's
        monitor.load_state({k: v.to(device) for k, v in extra.items()})
        if changes and ranks.main:
            _record_changes(run_dir, start, changes)
    elif model.codebooks and not (config.model and not config.codebook):
        # initialise new codebooks from training data; never overwrite those a saved model brought
        init_codebooks(
            model,
            [b.to(device) for b in _init_batches(source, config, model)],
            method=config.init,
            samples=config.init_samples,
            generator=torch.Generator().manual_seed(config.seed),
        )
    trainable = model
    if ranks.world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(model)
    logger = _Logger(run_dir, config, start, ranks.main)
    eval_batches = [source.eval_batch(i).to(device) for i in range(config.eval_batches)]
    autocast = _autocast(config, device)
    bar = tqdm(total=config.steps, initial=start, disable=not (progress and ranks.main))
    running: dict[str, Tensor] = {}
    final_eval: dict[str, float] = {}
    validate_tokens = model.validate_tokens
    model.validate_tokens = False  # the batch sources produce in-range ids; no sync per step
    float32_precision = torch.get_float32_matmul_precision()
    if config.tf32 and device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for float32 matmuls
    try:
        with model.hooks(fwd_hooks=monitor.hooks()):
            for step in range(start, config.steps):
                model.train()
                tokens = source.batch(step)
                rows = tokens[ranks.rank :: ranks.world].to(device)
                micro_batches = rows.chunk(config.grad_accum)
                for i, micro in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    sync = contextlib.nullcontext()
                    if ranks.world > 1 and not last:
                        sync = trainable.no_sync()
                    with sync, autocast:
                        lm_loss = trainable(micro, return_type="loss")
                        recon = model.reconstruction_loss()
                        loss = lm_loss + config.recon_weight * recon
                        if config.commitment_weight:
                            loss = loss + config.commitment_weight * model.commitment_loss()
                        (loss * len(micro) / len(rows)).backward()
                    for key, value in (("loss", loss), ("lm_loss", lm_loss), ("recon", recon)):
                        running[key] = running.get(key, 0) + value.detach() * len(micro) / len(rows)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLossError(
                        f"loss became {float(loss.detach())} at step {step}; stopping. The newest "
                        f"checkpoint in {run_dir / 'checkpoints'} predates it and is untouched."
                    )
                monitor.add_tokens(tokens.numel())
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                factor = lr_factor(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if config.dead_code_window and monitor.window_tokens >= config.dead_code_window:
                    _replace_dead(model, monitor, optimizer, ranks, config.seed, done)
                metrics: dict[str, float] = {}
                if done % config.log_every == 0 or done == config.steps:
                    metrics = _train_metrics(running, done, config, factor, monitor, model)
                    running = {}
                    logger.log(done, "train", metrics)
                    bar.set_postfix_str(summarise(metrics), refresh=False)
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    if ranks.main:
                        final_eval = _evaluate(model, eval_batches, config, device)
                        logger.log(done, "eval", final_eval)
                if config.checkpoint_every and (
                    done % config.checkpoint_every == 0 or done == config.steps
                ):
                    if ranks.main:
                        train_state.save_state(
                            run_dir,
                            done,
                            model,
                            optimizer,
                            monitor.state(),
                            config.keep_checkpoints,
                            config=config.to_dict(),
                        )
                    if ranks.world > 1:
                        dist.barrier()
                bar.update(1)
                if on_step is not None:
                    on_step(done, metrics)
        if ranks.main:
            model.save_pretrained(run_dir / "final")
            if not final_eval and config.eval_batches:
                final_eval = _evaluate(model, eval_batches, config, device)
            (run_dir / "final_eval.json").write_text(json.dumps(final_eval, indent=2))
    finally:
        model.validate_tokens = validate_tokens
        torch.set_float32_matmul_precision(float32_precision)
        bar.close()
        logger.close()
        if ranks.owns_group:
            dist.destroy_process_group()
    return TrainResult(model, run_dir, config.steps, final_eval, time.perf_counter() - started)


def _train_metrics(
    running: dict[str, Tensor],
    done: int,
    config: TrainConfig,
    factor: float,
    monitor: CodebookMonitor,
    model: HookedCodebookTransformer,
) -> dict[str, float]:
    n = config.log_every if done % config.log_every == 0 else done % config.log_every
    metrics = {key: float(value) / n for key, value in running.items()}
    metrics["lr"] = config.lr * factor
    monitor.all_reduce_metrics()
    dead = []
    for site, counts in monitor.metric_counts.items():
        usage = usage_metrics(counts)
        dead.append(usage["dead_fraction"])
        metrics |= {f"{site}/{key}": value for key, value in usage.items()}
    if dead:
        metrics["dead"] = sum(dead) / len(dead)
    monitor.reset_metrics()
    return metrics


def _replace_dead(model, monitor: CodebookMonitor, optimizer, ranks: _Dist, seed: int, step: int):
    """Re-initialise codes unused for the window; rank 0 decides, every rank applies."""
    monitor.all_reduce_window()
    dead = {site: counts == 0 for site, counts in monitor.window_counts.items()}
    if ranks.main:
        replace_dead_codes(
            model, dead, monitor.inputs, generator=torch.Generator().manual_seed(seed + step)
        )
    for site, mask in dead.items():
        cb = model.codebook(site)
        if ranks.world > 1:
            dist.broadcast(cb.codes.data, src=0)
        slots = optimizer.state.get(cb.codes, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in slots:
                slots[key][mask] = 0.0
    monitor.reset_window()
