"""The training loop: fine-tune or train from scratch with codebooks, resumable, data-parallel.

Loss = next-token cross-entropy + ``recon_weight`` x codebook reconstruction MSE.
Runs as a single process or under ``torchrun --nproc_per_node=N`` (DistributedDataParallel,
or FSDP2 with ``parallel: fsdp``; gloo on CPU, nccl on GPU): every rank takes its rows of
the same global batch, so N processes follow the same trajectory as one. Only rank 0
writes files. `train` runs its steps as named functions: `_prepare`, then per step
`_forward_backward`, `_optimizer_step`, `_replace_dead`, `_evaluate`, `_save_checkpoint`,
and `_finish`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from codelens import checkpoint
from codelens.config import CodebookConfig
from codelens.data.fsm import FSMConfig, TokFSM
from codelens.model import HookedCodebookTransformer
from codelens.training import parallel
from codelens.training import state as train_state
from codelens.training.batches import BlockBatches, FSMBatches, StreamingBatches
from codelens.training.config import TrainConfig, bf16_error
from codelens.training.init import init_codebooks, revived_codes
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
    reused: bool = False  # loaded from an earlier run of the same stage (`train_stage`)


# ---------------------------------------------------------------------------- set-up


def build_data(config: TrainConfig, tokenizer: Any = None, n_ctx: int | None = None):
    """The batch source, the tokenizer, and the FSM when the data is synthetic.

    Text is tokenised once into a memory-mapped token file in the cache
    (`codelens.data.token_cache`): the first process of each machine builds it, the
    other ranks and every later start read it. A from-scratch tokenizer is trained once
    into ``run_dir/tokenizer`` and loaded from there by the other ranks and on resume.
    """
    data = config.data
    if "fsm" in data:
        fsm = TokFSM(FSMConfig(**data["fsm"]))
        return FSMBatches(fsm, config.batch_size, config.seed), fsm.tokenizer(), fsm
    from codelens.data import text, token_cache

    split, column = data.get("split", "train"), data.get("text_column", "text")
    block_len = data.get("block_len", 128)
    if n_ctx is not None and block_len > n_ctx:  # before any tokenising
        raise ValueError(f"block_len {block_len} exceeds the model's context {n_ctx}")
    texts = text.load_text_dataset(
        data["source"],
        split=split,
        text_column=column,
        streaming=bool(data.get("streaming", False)),
        config_name=data.get("config_name"),
    )
    source_id = token_cache.source_identity(
        data["source"],
        split=split,
        text_column=column,
        config_name=data.get("config_name"),
        cache_dir=data.get("cache_dir"),
    )
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if tokenizer is None:
        if config.tokenizer:
            tokenizer = text.load_tokenizer(config.tokenizer)
        else:
            tokenizer = token_cache.trained_tokenizer(
                texts,
                data.get("vocab_size", 4096),
                Path(config.run_dir) / "tokenizer",
                source_id=source_id,
                builder=builder,
            )
    tokens = token_cache.cached_tokens(
        texts,
        tokenizer,
        block_len,
        source_id=source_id,
        cache_dir=data.get("cache_dir"),
        max_blocks=data.get("max_blocks"),
        vocab_size=len(tokenizer),
        builder=builder,
    )
    eval_blocks = data.get("eval_blocks", 16)
    if data.get("streaming"):
        return StreamingBatches(tokens.blocks, config.batch_size, eval_blocks), tokenizer, None
    source = BlockBatches(tokens.blocks, config.batch_size, config.seed, eval_blocks)
    return source, tokenizer, None


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


def _add_codebook_hooks(
    model: HookedCodebookTransformer, wanted: dict[str, dict[str, Any]]
) -> list[str]:
    """Add the codebooks of ``config.codebook_hooks`` the model lacks; returns their sites.

    A site that already has a codebook (a saved model's) must have the asked-for settings.
    """
    added = []
    for hook, kwargs in wanted.items():
        if hook not in model.codebooks:
            model.add_codebook(hook, **kwargs)
            added.append(hook)
            continue
        have = model.codebook(hook).settings()
        differs = {k: (v, have[k]) for k, v in kwargs.items() if k != "groups" and have[k] != v}
        if kwargs.get("groups", 1) != have["n_groups"]:
            differs["groups"] = (kwargs.get("groups", 1), have["n_groups"])
        if differs:
            raise ValueError(
                f"codebook_hooks.{hook} differs from the model's codebook there "
                f"(asked, found): {differs}"
            )
    return added


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
    "codebook_hooks",
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


def _set_trainable(model: HookedCodebookTransformer, config: TrainConfig) -> None:
    """Freeze the base model for ``train='codebooks'`` (before DDP or sharding see it)."""
    if config.train != "codebooks":
        return
    if not model.codebook_parameters():
        raise ValueError("train='codebooks' but the model has no codebooks")
    for p in model.base_parameters():
        p.requires_grad_(False)


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
    model: HookedCodebookTransformer,
    batches: list[Tensor],
    micro_batch: int = 0,
    ranks: parallel.Ranks | None = None,
) -> dict[str, float]:
    """LM loss and accuracy with and without codebooks, and per-site reconstruction quality.

    Each batch runs in forwards of ``micro_batch`` rows (0: the whole batch at once),
    so memory is bounded by the micro-batch (its logits and cached site activations);
    the figures are those of whole batches, averaged over batches. Under several
    processes (``ranks``) each rank runs only its share of every batch's rows and the
    sums the figures are made of are added over ranks (one all-reduce at the end), so
    every rank returns the figures of one process on the whole batches.
    """
    ranks = ranks or parallel.Ranks()
    was_training = model.training
    model.eval()
    sites = list(model.codebooks)
    names = set(sites) | {f"{s}.hook_quantized" for s in sites}
    device = next(model.parameters()).device
    per_batch = []
    for tokens in batches:
        if len(tokens) % ranks.world:
            raise ValueError(
                f"an evaluation batch of {len(tokens)} rows does not split evenly over "
                f"{ranks.world} processes; use a multiple of {ranks.world} rows"
            )
        own = tokens.tensor_split(ranks.world)[ranks.rank].to(device)
        lm = torch.zeros(4, dtype=torch.float64, device=device)  # _lm_sums, bypassed loss
        recon = {}
        for site in sites:
            cb = model.codebook(site)
            recon[site] = ReconstructionTotals(cb.n_groups, cb.d, device)
        for micro in own.split(micro_batch or len(own)):
            logits, cache = model.run_with_cache(micro, names_filter=lambda n: n in names)
            lm[:3] += _lm_sums(logits, micro)
            del logits
            for site in sites:
                cb = model.codebook(site)
                x = cache[site].reshape(-1, cb.n_groups, cb.d)
                q = cache[f"{site}.hook_quantized"].reshape(-1, cb.n_groups, cb.d)
                recon[site].add(q, x)
            del cache
            if sites:
                with model.codebooks_bypassed():
                    lm[3] += _lm_sums(model(micro), micro)[1]
        per_batch.append(torch.cat([lm, *(recon[site].sums for site in sites)]))
    model.train(was_training)
    if not per_batch:
        return {}
    summed = parallel.sum_over_ranks(torch.stack(per_batch), ranks).cpu()
    totals: dict[str, float] = {}
    for row in summed:
        predictions, loss, correct, loss_bypassed = row[:4].tolist()
        figures = {"lm_loss": loss / predictions, "accuracy": correct / predictions}
        if sites:
            figures["lm_loss_bypassed"] = loss_bypassed / predictions
        at = 4
        for site, part in recon.items():
            part.sums = row[at : at + len(part.sums)]
            at += len(part.sums)
            figures |= {f"{site}/{key}": value for key, value in part.metrics().items()}
        for key, value in figures.items():
            totals[key] = totals.get(key, 0.0) + value / len(batches)
    if sites:
        totals["bottleneck_cost"] = totals["lm_loss"] - totals["lm_loss_bypassed"]
    return totals


def _autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on ``device`` when the config asks for it (a no-op context otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)


def _lm_sums(logits: Tensor, tokens: Tensor) -> Float[Tensor, "3"]:
    """(predictions, summed next-token cross-entropy, correct predictions), in float64
    on the device; the loss is computed in at least float32 (bf16 logits are upcast)."""
    pred, target = logits[:, :-1], tokens[:, 1:]
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    loss = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="sum")
    correct = (pred.argmax(-1) == target).sum()
    loss = loss.double()
    return torch.stack([loss.new_tensor(target.numel()), loss, correct.double()])


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


@dataclass
class _Run:
    """What one training run holds from set-up to its last step."""

    config: TrainConfig
    ranks: parallel.Ranks
    device: torch.device
    model: HookedCodebookTransformer
    trainable: torch.nn.Module  # what the step calls: the model, DDP around it, or it sharded
    source: Any
    optimizer: torch.optim.AdamW
    monitor: CodebookMonitor
    start: int
    logger: _Logger
    eval_batches: list[Tensor]
    final_eval: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def cuda_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def train(
    config: TrainConfig,
    *,
    model: HookedCodebookTransformer | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train per ``config``, resuming from the newest checkpoint in ``run_dir`` if any."""
    started = time.perf_counter()
    world, local_rank = parallel.launch_world()
    device = parallel.resolve_device(config.device, world=world, local_rank=local_rank)
    if config.bf16 and device.type not in ("cuda", "cpu"):
        raise ValueError(bf16_error(device))
    ranks = parallel.start(device, config.batch_size, world)
    try:
        run = _prepare(config, model, ranks, device)
        try:
            _loop(run, on_step, progress)
            _finish(run)
        finally:
            run.logger.close()
            # drop DDP (its reducer holds the process group) while the group is still up:
            # freed after `parallel.stop`, e.g. with an error's traceback, gloo's teardown
            # could wait forever for a rank that has already exited
            run.trainable = run.model
        result = TrainResult(run.model, run.run_dir, config.steps, run.final_eval)
        del run  # a sharded model and its optimizer state hold the process group
    finally:
        parallel.stop(ranks)
    result.seconds = time.perf_counter() - started
    return result


def _prepare(
    config: TrainConfig,
    model: HookedCodebookTransformer | None,
    ranks: parallel.Ranks,
    device: torch.device,
) -> _Run:
    """Model, data, optimiser and counters, restored from the newest checkpoint or fresh."""
    run_dir = Path(config.run_dir)
    newest = _checkpoint_to_resume(run_dir, ranks, device)
    changes = _resume_changes(newest, config) if newest else {}
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, source, added = _model_and_data(config, model)
    model.to(device)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
    _freeze_unused(model, source.eval_batch(0)[:2].to(device))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _set_trainable(model, config)
    monitor = CodebookMonitor(model)
    if newest:
        train_state.load_model_state(newest, model)
    elif fresh := (added if config.model and not config.codebook else list(model.codebooks)):
        # initialise new codebooks from training data; never overwrite those a saved model brought
        init_codebooks(
            model,
            [b.to(device) for b in _init_batches(source, config, model)],
            sites=fresh,
            method=config.init,
            samples=config.init_samples,
            generator=torch.Generator().manual_seed(config.seed),
            ranks=ranks,  # each rank runs its share of the samples
        )
    trainable = parallel.wrap(model, config.parallel, ranks)  # after init: every rank starts equal
    optimizer = _optimizer(model, config)  # after sharding: it holds the sharded parameters
    start = 0
    if newest:
        settings = [{k: g[k] for k in _GROUP_SETTINGS} for g in optimizer.param_groups]
        cuda_device = device if device.type == "cuda" else None
        start, extra = train_state.load_trainer_state(newest, optimizer, cuda_device=cuda_device)
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)  # this config's learning rates and decay, not the checkpoint's
        # the saved counts are the sum over ranks: one rank takes them, the others start at 0
        monitor.load_state({k: v.to(device) for k, v in extra.items()}, holds_counts=ranks.main)
        if changes and ranks.main:
            _record_changes(run_dir, start, changes)
    logger = _Logger(run_dir, config, start, ranks.main)
    eval_batches = [source.eval_batch(i).to(device) for i in range(config.eval_batches)]
    return _Run(
        config,
        ranks,
        device,
        model,
        trainable,
        source,
        optimizer,
        monitor,
        start,
        logger,
        eval_batches,
    )


def _checkpoint_to_resume(
    run_dir: Path, ranks: parallel.Ranks, device: torch.device
) -> Path | None:
    """The newest checkpoint in ``run_dir``, as rank 0 sees it; every rank follows its word.

    Ranks that listed ``run_dir`` on their own could disagree (a disk that is not shared, a
    stale network mount), and would then train from different states without an error.
    """
    found = train_state.checkpoint_dirs(run_dir) if ranks.main else []
    name = parallel.rank0_says(found[-1].name if found else None, ranks)
    if name is None:
        return None
    newest = run_dir / "checkpoints" / name
    unseen = not newest.is_dir()
    if parallel.any_rank(unseen, ranks, device):
        who = f"this process (rank {ranks.rank})" if unseen else "another process"
        raise FileNotFoundError(
            f"rank 0 resumes from {newest}, which {who} cannot see: run_dir must be on a "
            "filesystem every process shares"
        )
    return newest


def _model_and_data(
    config: TrainConfig, model: HookedCodebookTransformer | None
) -> tuple[HookedCodebookTransformer, Any, list[str]]:
    """The model to train (built, or the caller's with the config's codebooks), its data,
    and the sites of the codebooks `TrainConfig.codebook_hooks` added."""
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
    added = _add_codebook_hooks(model, config.codebook_hooks or {})
    _check_context(source, model)
    return model, source, added


def _loop(
    run: _Run, on_step: Callable[[int, dict[str, float]], None] | None, progress: bool
) -> None:
    config, model, monitor = run.config, run.model, run.monitor
    bar = tqdm(total=config.steps, initial=run.start, disable=not (progress and run.ranks.main))
    running: dict[str, Tensor] = {}
    validate_tokens = model.validate_tokens
    model.validate_tokens = False  # the batch sources produce in-range ids; no sync per step
    float32_precision = torch.get_float32_matmul_precision()
    if config.tf32 and run.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for float32 matmuls
    try:
        with model.hooks(fwd_hooks=monitor.hooks()):
            for step in range(run.start, config.steps):
                rows = run.source.batch(step, run.ranks.rank, run.ranks.world)
                losses = _forward_backward(run, rows, step)
                for key, value in zip(("loss", "lm_loss", "recon"), losses, strict=True):
                    running[key] = running.get(key, 0) + value
                monitor.add_tokens(rows.numel() * run.ranks.world)  # the global batch
                factor = _optimizer_step(run, step)
                done = step + 1
                if config.dead_code_window and monitor.window_tokens >= config.dead_code_window:
                    _replace_dead(run, done)
                metrics: dict[str, float] = {}
                if done % config.log_every == 0 or done == config.steps:
                    metrics = _train_metrics(running, done, config, factor, monitor, model)
                    running = {}
                    run.logger.log(done, "train", metrics)
                    bar.set_postfix_str(summarise(metrics), refresh=False)
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    run.final_eval = _evaluate(run)
                    run.logger.log(done, "eval", run.final_eval)
                if config.checkpoint_every and (
                    done % config.checkpoint_every == 0 or done == config.steps
                ):
                    _save_checkpoint(run, done)
                bar.update(1)
                if on_step is not None:
                    on_step(done, metrics)
    finally:
        model.validate_tokens = validate_tokens
        torch.set_float32_matmul_precision(float32_precision)
        bar.close()


def _forward_backward(run: _Run, rows: Tensor, step: int) -> Tensor:
    """This rank's rows of the step's batch, forward and backward in micro-batches.

    Returns the step's (loss, lm_loss, recon), averaged over ranks; a NaN or inf on any
    rank stops every rank at the same step.
    """
    config, model = run.config, run.model
    model.train()
    rows = rows.to(run.device)
    micro_batches = rows.chunk(config.grad_accum)
    autocast = _autocast(config, run.device)
    losses = torch.zeros(3, device=run.device)
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with parallel.gradient_sync(run.trainable, enabled=last), autocast:
            lm_loss = run.trainable(micro, return_type="loss")
            recon = model.reconstruction_loss()
            loss = lm_loss + config.recon_weight * recon
            if config.commitment_weight:
                loss = loss + config.commitment_weight * model.commitment_loss()
            (loss * len(micro) / len(rows)).backward()
        losses += torch.stack([loss, lm_loss, recon]).detach().float() * len(micro) / len(rows)
    losses = parallel.mean_over_ranks(losses, run.ranks)
    if not torch.isfinite(losses[0]):
        sites = model.nonfinite_sites()
        where = f" (NaN or inf reached the codebooks at {', '.join(sites)})" if sites else ""
        raise NonFiniteLossError(
            f"loss became {float(losses[0])} at step {step}{where}; stopping. The newest "
            f"checkpoint in {run.run_dir / 'checkpoints'} predates it and is untouched."
        )
    return losses


def _optimizer_step(run: _Run, step: int) -> float:
    """Clip, set the scheduled learning rates, step; returns the schedule's factor."""
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    factor = lr_factor(step, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return factor


def _evaluate(run: _Run) -> dict[str, float]:
    """Held-out metrics, not counted as code usage, the same on every rank: each rank
    evaluates its share of the rows (with a sharded model every rank must run forwards
    anyway) and the sums are added over ranks."""
    with run.monitor.paused(), parallel.root_gathered(run.model):
        with _autocast(run.config, run.device):  # the run's precision and micro-batches
            return evaluate(run.model, run.eval_batches, run.config.eval_micro_batch, run.ranks)


def _save_checkpoint(run: _Run, done: int) -> None:
    """A resumable checkpoint of step ``done``, written by rank 0 (every rank takes part:
    the usage counts are summed, and a sharded model's tensors gathered)."""
    train_state.save_state(
        run.run_dir,
        done,
        run.model,
        run.optimizer,
        run.monitor.state(),
        run.config.keep_checkpoints,
        config=run.config.to_dict(),
        cuda_device=run.cuda_device,
        write=run.ranks.main,
    )
    if run.ranks.several:
        dist.barrier()


def _finish(run: _Run) -> None:
    """The final model and evaluation, written by rank 0.

    A sharded model whose process group this run started is returned whole on every
    rank: its shards would be of no use once the group ends with the run.
    """
    tensors = None
    sharded = parallel.is_sharded(run.model)
    whole_on_every_rank = sharded and run.ranks.owns_group
    if sharded:
        keep = run.ranks.main or whole_on_every_rank
        tensors = train_state.full_model_state(run.model, keep=keep)
    if run.ranks.main:
        checkpoint.save(run.model, run.run_dir / "final", tensors=tensors)
    if not run.final_eval and run.config.eval_batches:
        run.final_eval = _evaluate(run)
    if run.ranks.main:
        (run.run_dir / "final_eval.json").write_text(json.dumps(run.final_eval, indent=2))
    if whole_on_every_rank:
        run.model = _whole_copy(run, tensors)


def _whole_copy(
    run: _Run, tensors: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> HookedCodebookTransformer:
    """The model with the gathered ``tensors``, unsharded and on the CPU (a model trained
    sharded may not fit whole on one accelerator), loaded from the final checkpoint: rank 0
    has just written it, the others write their own in a temporary directory (ranks may
    not share a disk)."""
    dtype = next(iter(tensors[0].values())).dtype
    if run.ranks.main:
        return HookedCodebookTransformer.from_pretrained(
            run.run_dir / "final", device="cpu", dtype=dtype
        )
    with tempfile.TemporaryDirectory(prefix="codelens-whole-") as tmp:
        saved = checkpoint.save(run.model, Path(tmp) / "model", tensors=tensors)
        return HookedCodebookTransformer.from_pretrained(saved, device="cpu", dtype=dtype)


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


def _replace_dead(run: _Run, step: int) -> None:
    """Re-initialise codes unused for the window; rank 0 draws them, every rank applies.

    The window counts are summed and the input pool gathered over ranks first, so the
    codes drawn are the ones a single process would draw.
    """
    model, monitor, ranks = run.model, run.monitor, run.ranks
    monitor.all_reduce_window()
    pools = monitor.pooled_inputs()
    generator = torch.Generator().manual_seed(run.config.seed + step)
    for site, counts in monitor.window_counts.items():
        dead = counts == 0  # the same on every rank: the counts are summed
        if not bool(dead.any()):
            continue
        cb = model.codebook(site)
        codes = parallel.full(cb.codes.detach())
        if ranks.main:
            codes = revived_codes(cb, codes, dead, pools.get(site), generator=generator)
        if ranks.several:
            codes = codes.contiguous()
            dist.broadcast(codes, src=0)
        parallel.assign(cb.codes, codes)
        own_rows = parallel.local(parallel.local_part(dead, cb.codes))
        slots = run.optimizer.state.get(cb.codes, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in slots:
                parallel.local(slots[key])[own_rows] = 0.0
    monitor.reset_window()
