"""Training configuration: a validated dataclass read from YAML/JSON with ``key=value`` overrides.

Example YAML::

    run_dir: runs/tiny
    model_config: {model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4}
    tokenizer: runs/tok
    codebook: {n_codes: 1000, k: 1, sites: [attn, mlp]}
    data: {source: corpus.txt, block_len: 128}
    steps: 10000
    batch_size: 32

and on the command line: ``TrainConfig.from_file("cfg.yaml", ["lr=3e-4", "codebook.k=4"])``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codelens.files import atomic_write_text
from codelens.vocab import is_block_hook

__all__ = ["ConfigFileNotFoundError", "TrainConfig", "apply_overrides"]

# Keys of the ``data`` section: a text corpus, or synthetic FSM data.
_TEXT_DATA_KEYS = (
    "source",
    "split",
    "text_column",
    "config_name",
    "streaming",
    "block_len",
    "eval_blocks",
    "max_blocks",
    "vocab_size",
    "cache_dir",
)
_FSM_DATA_KEYS = ("fsm",)
# YAML 1.1 (PyYAML) reads "1e-3" and "1e5" as strings; numeric fields accept these literals.
_SCI_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|xpu)(:\d+)?$")


class ConfigFileNotFoundError(FileNotFoundError, ValueError):
    """A config file does not exist (also a ValueError, like every other bad config)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything the training loop needs; validated on construction.

    Give exactly one of ``model`` (hub name, local HF dir or saved codelens dir) and
    ``model_config`` (HF config kwargs incl. ``"model_type"``, to train from scratch).
    ``codebook`` holds kwargs for ``codelens.CodebookConfig`` (None: train a plain model).
    ``codebook_hooks`` maps more hook names to ``add_codebook`` kwargs, one codebook each
    (in YAML, e.g. ``codebook_hooks: {blocks.1.hook_resid_pre: {n_codes: 64, k: 2}}``).
    ``data`` holds either ``"source"`` (+ ``block_len``, ``text_column``, ...) for text, or
    ``"fsm"`` for synthetic FSM data. Periodic actions with ``*_every = 0`` are disabled.
    """

    run_dir: str
    data: dict[str, Any]
    steps: int
    batch_size: int
    model: str = ""
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    codebook: dict[str, Any] | None = None
    codebook_hooks: dict[str, dict[str, Any]] | None = None
    grad_accum: int = 1
    lr: float = 1e-3
    codebook_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01  # never applied to codebooks
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # None: no clipping
    recon_weight: float = 1.0  # weight of the codebook reconstruction loss
    commitment_weight: float = 0.0  # weight of the loss pulling activations to their codes
    train: Literal["all", "codebooks"] = "all"
    init: Literal["random", "kmeans", "kmeans++"] = "kmeans"
    init_samples: int = 8192  # activations used to initialise codebooks
    dead_code_window: int | None = None  # tokens without a hit before a code counts as dead
    seed: int = 0
    eval_every: int = 500  # steps; 0 disables evaluation
    eval_batches: int = 20
    log_every: int = 50  # steps
    checkpoint_every: int = 1000  # steps; 0 disables periodic checkpoints
    keep_checkpoints: int = 3
    bf16: bool = False  # bf16 autocast on CUDA or CPU; codebook scores and codes stay fp32
    tf32: bool = False  # CUDA only: let float32 matmuls use TF32 tensor cores
    gradient_checkpointing: bool = False  # recompute each block in the backward pass
    eval_micro_batch: int = 0  # rows per evaluation forward; 0: the whole eval batch
    device: str = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # how several processes (torchrun) share the model
    wandb: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------------------------------
    # Validation
    # ---------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check types (normalising lossless cases) and values; raise ValueError naming the problem.

        Runs on construction; call it again after changing fields by hand.
        """
        if self.model is None:  # `model: null` in YAML means "no pretrained model"
            self.model = ""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _hints()[f.name]))
        if not self.run_dir.strip():
            raise ValueError("run_dir must be a non-empty path")
        if bool(self.model) == (self.model_config is not None):
            raise ValueError(
                "give exactly one of model (a hub name or directory) and model_config "
                f"(to train from scratch); got model={self.model!r}, "
                f"model_config={self.model_config!r}"
            )
        if self.model_config is not None:
            model_type = self.model_config.get("model_type")
            if not isinstance(model_type, str) or not model_type:
                raise ValueError(
                    "model_config must contain a 'model_type' string (e.g. 'gpt2'), "
                    f"got {model_type!r}"
                )
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ValueError("tokenizer must be a non-empty name or path, or None")
        self._validate_data()
        if self.codebook is not None:
            self._validate_codebook()
        if self.codebook_hooks is not None:
            self._validate_codebook_hooks()

        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _positive("lr", self.lr)
        if self.codebook_lr is not None:
            _positive("codebook_lr", self.codebook_lr)
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("warmup_steps", self.warmup_steps)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be less than steps ({self.steps})"
            )
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        _non_negative("recon_weight", self.recon_weight)
        _non_negative("commitment_weight", self.commitment_weight)
        if self.train == "codebooks" and not (self.codebook or self.codebook_hooks or self.model):
            raise ValueError(
                "train='codebooks' needs a codebook config (or a saved model that has codebooks)"
            )
        _positive("init_samples", self.init_samples)
        if self.dead_code_window is not None:
            _positive("dead_code_window", self.dead_code_window)
        _non_negative("seed", self.seed)
        _non_negative("eval_every", self.eval_every)
        _positive("eval_batches", self.eval_batches)
        _positive("log_every", self.log_every)
        _non_negative("checkpoint_every", self.checkpoint_every)
        _positive("keep_checkpoints", self.keep_checkpoints)
        if not _DEVICE.match(self.device):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', "
                f"got {self.device!r}"
            )
        if self.bf16 and self.device.split(":")[0] not in ("auto", "cuda", "cpu"):
            raise ValueError(bf16_error(self.device))
        if self.tf32 and self.device.split(":")[0] not in ("auto", "cuda"):
            raise ValueError(
                f"tf32=true speeds up float32 matmuls on a CUDA GPU only, but the device is "
                f"{self.device}; set tf32=false"
            )
        _non_negative("eval_micro_batch", self.eval_micro_batch)

    def _validate_data(self) -> None:
        """``data`` must pick exactly one of a text source and an FSM spec, and no unknown keys."""
        has_source, has_fsm = "source" in self.data, "fsm" in self.data
        if has_source == has_fsm:
            raise ValueError(
                "data must contain exactly one of 'source' (text corpus: file or hub dataset) "
                f"and 'fsm' (synthetic FSM data); got keys {sorted(self.data)}"
            )
        valid = list(_TEXT_DATA_KEYS if has_source else _FSM_DATA_KEYS)
        unknown = [k for k in self.data if k not in valid]
        if unknown:
            kind = "text" if has_source else "FSM"
            raise ValueError(
                f"{_unknown_keys_message(unknown, valid, prefix='data.')} (for {kind} data)"
            )
        if has_source:
            source = self.data["source"]
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"data.source must be a non-empty string, got {source!r}")
            for key in ("text_column", "split", "config_name", "cache_dir"):
                value = self.data.get(key)
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"data.{key} must be a non-empty string, got {value!r}")
        elif not isinstance(self.data["fsm"], dict):
            raise ValueError(f"data.fsm must be a dict, got {self.data['fsm']!r}")
        else:
            from codelens.data.fsm import FSMConfig

            valid = [f.name for f in dataclasses.fields(FSMConfig)]
            unknown = [k for k in self.data["fsm"] if k not in valid]
            if unknown:
                raise ValueError(_unknown_keys_message(unknown, valid, prefix="data.fsm."))
        for key in ("block_len", "eval_blocks", "max_blocks", "vocab_size"):
            if key in self.data and self.data[key] is not None:
                _positive(f"data.{key}", self.data[key], integer=True)
        if "streaming" in self.data and not isinstance(self.data["streaming"], bool):
            raise ValueError(f"data.streaming must be a bool, got {self.data['streaming']!r}")

    def _validate_codebook(self) -> None:
        """Check the codebook kwargs now, by building a ``codelens.CodebookConfig`` from them."""
        cb = self.codebook
        assert cb is not None
        cls = _codebook_config_cls()
        if cls is not None:
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in cb if k not in valid]
            if unknown:
                raise ValueError(_unknown_keys_message(unknown, valid, prefix="codebook."))
        for key in ("n_codes", "k", "mlp_groups", "mlp_n_codes"):
            if cb.get(key) is not None:
                _positive(f"codebook.{key}", cb[key], integer=True)
        sites = cb.get("sites")
        if sites is not None and (
            not isinstance(sites, (list, tuple))
            or not sites
            or not all(isinstance(s, str) and s for s in sites)
        ):
            raise ValueError(
                f"codebook.sites must be a non-empty list of site names, got {sites!r}"
            )
        if cls is not None:
            try:
                built = cls(**cb)
            except (TypeError, ValueError) as e:
                raise ValueError(f"invalid codebook config {cb!r}: {e}") from e
            n_codes = max(built.n_codes, built.mlp_n_codes or 0)
            if self.init != "random" and self.init_samples < n_codes:
                raise ValueError(
                    f"init_samples ({self.init_samples}) must be at least the largest codebook "
                    f"size ({n_codes}) for init={self.init!r}: k-means needs a sample per code"
                )

    def _validate_codebook_hooks(self) -> None:
        """Each entry names a hook and gives ``add_codebook`` keyword arguments with n_codes."""
        hooks = self.codebook_hooks
        assert hooks is not None
        valid = sorted(_CODEBOOK_HOOK_KEYS)
        for hook, kwargs in hooks.items():
            if not is_block_hook(hook) and not hook.startswith("hook_"):
                raise ValueError(f"codebook_hooks: {hook!r} is not a hook name")
            if not isinstance(kwargs, dict):
                raise ValueError(f"codebook_hooks.{hook} must be a dict, got {kwargs!r}")
            unknown = [k for k in kwargs if k not in _CODEBOOK_HOOK_KEYS]
            if unknown:
                raise ValueError(_unknown_keys_message(unknown, valid, prefix=f"{hook}."))
            if "n_codes" not in kwargs:
                raise ValueError(f"codebook_hooks.{hook} needs n_codes")
            for key in ("n_codes", "k", "groups"):
                if key in kwargs:
                    _positive(f"codebook_hooks.{hook}.{key}", kwargs[key], integer=True)

    # ---------------------------------------------------------------------------------------
    # Conversion and I/O
    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain mapping, rejecting unknown and missing keys by name."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config must be a mapping of field names to values, got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(_unknown_keys_message(unknown, valid))
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing required config keys: {', '.join(missing)}")
        return cls(**{k: _copy(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-serialisable) dict of all fields; round-trips through ``from_dict``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> TrainConfig:
        """Read a YAML (.yaml/.yml) or JSON config and apply ``key=value`` overrides.

        Override values are parsed as YAML scalars (``lr=3e-4``, ``wandb=true``,
        ``tokenizer=null``); dotted keys reach into dict fields (``data.block_len=64``).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(
                f"config file {str(path)!r} must end in .yaml, .yml or .json, "
                f"got {suffix or 'no extension'!r}"
            )
        if not path.is_file():
            raise ConfigFileNotFoundError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if suffix == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as e:  # re-raised with the file named
            raise ValueError(f"could not parse config file {str(path)!r}: {e}") from e
        if raw is None:
            raise ValueError(f"config file {str(path)!r} is empty")
        if not isinstance(raw, dict):
            raise ValueError(
                f"config file {str(path)!r} must hold a mapping of field names to values, "
                f"got {type(raw).__name__}"
            )
        return cls.from_dict(apply_overrides(raw, overrides))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON, atomically (temp file in the same dir, then rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def bf16_error(device: object) -> str:
    """Why ``bf16=true`` cannot run on ``device`` (not CUDA or CPU), and what to do instead."""
    return (
        f"bf16=true trains with bf16 autocast on a CUDA GPU or the CPU only, but the device is "
        f"{device}; set bf16=false to train in float32 there"
    )


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with ``key=value`` overrides applied.

    Values are parsed as YAML scalars (falling back to the raw string). A dotted key such as
    ``data.block_len`` sets a key inside a dict field, creating the dict (or nested dicts)
    when absent. Unknown top-level keys are rejected with close matches.
    """
    if isinstance(overrides, str):
        raise ValueError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    out = _copy(dict(config))
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    dict_fields = {name for name, hint in _hints().items() if _allows_dict(hint)}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key part in {key!r}")
        if parts[0] not in valid:
            raise ValueError(_unknown_keys_message([parts[0]], valid))
        value = _parse_scalar(text)
        if len(parts) == 1:
            out[key] = value
            continue
        if parts[0] not in dict_fields:
            raise ValueError(
                f"override {item!r}: {parts[0]} is not a dict field, so {key} cannot be set"
            )
        target = out
        for i, part in enumerate(parts[:-1]):
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(
                    f"override {item!r}: {where} is {target[part]!r}, not a dict, "
                    f"so {key} cannot be set"
                )
            target = target[part]
        target[parts[-1]] = value
    return out


def _parse_scalar(text: str) -> Any:
    """Parse an override value as YAML (``3`` -> int, ``true`` -> bool, ``null`` -> None)."""
    import yaml

    text = text.strip()
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


# ---------------------------------------------------------------------------------------------
# Type coercion and helpers
# ---------------------------------------------------------------------------------------------


@functools.cache
def _hints() -> dict[str, Any]:
    """Resolved field annotations of TrainConfig."""
    return typing.get_type_hints(TrainConfig)


def _allows_dict(hint: Any) -> bool:
    """True when the annotation is a dict (or an optional dict)."""
    if typing.get_origin(hint) is dict:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and any(
        typing.get_origin(a) is dict for a in typing.get_args(hint)
    )


_KIND_NAMES = {int: "an int", float: "a float", str: "a string", bool: "a bool", dict: "a dict"}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field annotation, converting only lossless cases.

    ints are accepted for floats, integral floats for ints, and scientific-notation strings
    (which YAML 1.1 leaves unparsed, e.g. ``1e-3``) for either.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        choices = ", ".join(repr(a) for a in args)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}{hint_text}")
    kind = origin or hint
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, str) and _SCI_NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, str) and _SCI_NUMBER.match(value.strip()):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif kind is dict:
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{name} keys must be strings, got {bad[0]!r}")
            return dict(value)
    else:  # pragma: no cover - guards new field types
        raise TypeError(f"unsupported annotation {hint!r} for field {name}")
    raise ValueError(f"{name} must be {_KIND_NAMES[kind]}, got {value!r}")


_CODEBOOK_HOOK_KEYS = {
    "n_codes",
    "k",
    "groups",
    "similarity",
    "combine",
    "layer_norm",
    "layer_norm_affine",
    "memory_budget_mb",
}
"""The keyword arguments of ``HookedCodebookTransformer.add_codebook``."""


def _positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Raise unless ``value`` > 0 (and an int when ``integer``)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    """Raise unless ``value`` >= 0."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _unknown_keys_message(unknown: list[str], valid: list[str], prefix: str = "") -> str:
    """'unknown config keys: 'stpes' (did you mean 'steps'?); valid keys: ...'."""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
        suggestion = f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)"
        parts.append(repr(prefix + str(key)) + (suggestion if close else ""))
    return (
        f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(parts)}; "
        f"valid keys: {', '.join(prefix + v for v in valid)}"
    )


def _codebook_config_cls() -> type | None:
    """``codelens.CodebookConfig`` when it is an importable dataclass, else None."""
    try:
        from codelens import CodebookConfig
    except ImportError:
        return None
    return CodebookConfig if dataclasses.is_dataclass(CodebookConfig) else None


def _copy(value: Any) -> Any:
    """Deep copy of nested dicts/lists, so configs never share mutable state with callers."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value
