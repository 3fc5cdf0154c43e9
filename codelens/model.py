"""`HookedCodebookTransformer`: a TransformerLens 4 bridge with codebooks at its hook points."""

from __future__ import annotations

import contextlib
import difflib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from codelens import _bridge, checkpoint, original
from codelens.codebook import CodebookLayer
from codelens.config import CodebookConfig, Combine, Similarity
from codelens.vocab import (
    assert_token_ids_on_device,
    attn_site,
    check_token_ids,
    mlp_site,
    site_of,
)

AUTO = "auto"


class HookedCodebookTransformer(_bridge.SiteAwareBridge):
    """A TransformerLens 4 `TransformerBridge` whose attention heads and MLPs are quantised.

    Codebooks sit at ``blocks.{l}.attn.hook_z`` (one per head) and
    ``blocks.{l}.hook_mlp_out`` (``mlp_groups`` per MLP). Those hook points still show
    the activation before quantisation; each codebook adds ``{site}.hook_codes``
    (int64 ``[batch, pos, groups, k]``) and ``{site}.hook_quantized``. Everything a
    bridge does (``run_with_cache``, ``run_with_hooks``, ``hooks()``, ``generate``)
    runs with the codebooks active. Weight processing (folded LayerNorm, centred
    weights) is refused: codebooks are trained on raw activations.

    Build with `from_pretrained` (hub name, local HF directory or a saved codelens
    directory) or `from_config` (random weights, for training from scratch). Every
    constructor returns the model in eval mode (no dropout); trainers call ``train()``.
    """

    codebook_config: CodebookConfig | None
    validate_tokens: bool

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        codebook: CodebookConfig | Literal["auto"] | None = AUTO,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        base_model: str | Path | PretrainedConfig | dict[str, Any] | None = None,
    ) -> HookedCodebookTransformer:
        """Load a model, with codebooks.

        ``name_or_dir`` is a saved codelens directory, a directory or hub id in the
        paper authors' released format (`codelens.original`; converted on load), or a
        plain HuggingFace hub id or directory.

        ``codebook``: ``"auto"`` loads the saved codebooks (none for a plain HF model);
        a `CodebookConfig` adds fresh codebooks to a model saved without any; ``None``
        gives the model without codebooks. ``tokenizer`` replaces the saved one;
        ``dtype`` is the precision of the returned model's floating tensors.
        ``base_model`` (authors' format only): the base architecture, when neither the
        directory nor `codelens.original.KNOWN_BASES` gives it.
        """
        check_device(device)
        if not (codebook is None or codebook == AUTO or isinstance(codebook, CodebookConfig)):
            raise ValueError(f"codebook must be 'auto', None or a CodebookConfig, got {codebook!r}")
        path = Path(name_or_dir)
        checkpoint.restore_interrupted_legacy_save(path)
        check_model_path(name_or_dir)
        source = None if checkpoint.is_checkpoint(path) else original.locate(name_or_dir)
        if base_model is not None and source is None:
            raise ValueError(
                f"base_model= is for models in the paper authors' format; {name_or_dir} is not one"
            )
        if checkpoint.is_checkpoint(path):
            model = cls._from_checkpoint(path, codebook, tokenizer)
        elif source is not None:
            model = cls._from_original(source, str(name_or_dir), codebook, tokenizer, base_model)
        else:
            if path.exists() and not (path / "config.json").is_file():
                raise ValueError(
                    f"{path} is neither a codelens checkpoint nor a HuggingFace model directory "
                    f"(it has no {checkpoint.MANIFEST} and no config.json)"
                )
            try:
                bridge = _bridge.boot(
                    str(name_or_dir), tokenizer=tokenizer, device=device, dtype=dtype
                )
            except OSError as err:
                if path.exists():
                    raise
                raise OSError(
                    f"{name_or_dir} is not a local directory (nothing at {path.absolute()}) and "
                    f"was not found on the HuggingFace hub or in its cache: {err}"
                ) from err
            model = cls._wrap(bridge)
            if isinstance(codebook, CodebookConfig):
                model.add_codebooks(codebook)
        placement = {"dtype": dtype} if device is None else {"dtype": dtype, "device": device}
        return model.to(**placement, print_details=False)

    @classmethod
    def _from_checkpoint(
        cls, path: Path, codebook: CodebookConfig | str | None, tokenizer: Any
    ) -> HookedCodebookTransformer:
        """Rebuild a saved codelens model with bit-identical logits (files verified first)."""
        with checkpoint.reading(path):
            return cls._read_checkpoint(path, codebook, tokenizer)

    @classmethod
    def _read_checkpoint(
        cls, path: Path, codebook: CodebookConfig | str | None, tokenizer: Any
    ) -> HookedCodebookTransformer:
        manifest = checkpoint.read_manifest(path)
        saved = checkpoint.read_codebook_config(path, manifest)
        settings = checkpoint.read_site_settings(path, manifest)
        sites = manifest.get("sites") or {}
        if isinstance(codebook, CodebookConfig) and (saved is not None or sites):
            raise ValueError(
                f"{path} already has codebooks; pass codebook='auto' to load them "
                "or None for the base model"
            )
        config = checkpoint.read_hf_config(path)
        if tokenizer is None:
            tokenizer = checkpoint.read_tokenizer(path)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model = cls.from_hf_model(hf, tokenizer, name=str(path))
        base_file, codebook_file = path / checkpoint.BASE_FILE, path / checkpoint.CODEBOOK_FILE
        checkpoint.load_base_state(model, checkpoint.read_tensors(base_file), source=base_file)
        if codebook == AUTO and (saved is not None or sites):
            if settings is None:  # written before per-site settings were saved
                model.add_codebooks(saved)
                checkpoint.check_sites(sites, checkpoint.site_shapes(model), source=path)
            else:
                if saved is not None:  # the config's sites must be the saved ones
                    expected = model._config_settings(saved)
                    listed = {site: settings.get(site) for site in expected}
                    checkpoint.check_sites(listed, expected, source=path)
                for site, kwargs in settings.items():
                    model._attach(site, CodebookLayer(**kwargs))
                model.codebook_config = saved
            state = checkpoint.read_tensors(codebook_file)
            checkpoint.load_codebook_state(model, state, source=codebook_file)
        elif isinstance(codebook, CodebookConfig):
            model.add_codebooks(codebook)
        return model

    @classmethod
    def _from_original(
        cls,
        source: Path,
        name: str,
        codebook: CodebookConfig | str | None,
        tokenizer: Any,
        base_model: Any,
    ) -> HookedCodebookTransformer:
        """Convert a model in the authors' format (see `codelens.original`)."""
        if isinstance(codebook, CodebookConfig):
            raise ValueError(
                f"{name} already has codebooks; pass codebook='auto' to load them "
                "or None for the base model"
            )
        converted = original.convert(source, name=name, base_model=base_model, tokenizer=tokenizer)
        model = cls.from_hf_model(converted.hf_model, converted.tokenizer, name=str(source))
        if codebook == AUTO:
            model.add_codebooks(converted.codebook)
            checkpoint.load_codebook_state(
                model, converted.codebook_state, source=converted.weights_file
            )
        return model

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig | dict[str, Any],
        tokenizer: Any,
        codebook: CodebookConfig | None = None,
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> HookedCodebookTransformer:
        """A randomly initialised model from a HuggingFace config (dict needs ``model_type``)."""
        check_device(device)
        if isinstance(config, dict):
            config = dict(config)
            if "model_type" not in config:
                raise ValueError("a model config dict needs a 'model_type' key, e.g. 'gpt_neox'")
            config = AutoConfig.for_model(config.pop("model_type"), **config)
        if seed is not None:
            torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return cls.from_hf_model(hf, tokenizer, codebook, device=device)

    @classmethod
    def from_hf_model(
        cls,
        hf_model: nn.Module,
        tokenizer: Any,
        codebook: CodebookConfig | None = None,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
    ) -> HookedCodebookTransformer:
        """Wrap an in-memory HuggingFace causal LM (modified in place by the bridge)."""
        check_device(device)
        if tokenizer is None:
            raise ValueError("from_hf_model needs the model's tokenizer")
        label = name or f"codelens-local-{hf_model.config.model_type}"
        special_tokens_from(tokenizer, hf_model)
        model = cls._wrap(
            _bridge.boot(label, hf_model=hf_model, tokenizer=tokenizer, device=device)
        )
        if tokenizer.bos_token_id is not None:
            # codelens training starts every sequence with BOS (TokFSM and packed text)
            model.cfg.default_prepend_bos = True
        if codebook is not None:
            model.add_codebooks(codebook)
        return model

    @classmethod
    def _wrap(cls, bridge: Any) -> HookedCodebookTransformer:
        model = _bridge.specialise(bridge, cls)
        model.codebook_config = None
        model.validate_tokens = True
        return model.eval()

    # ---------------------------------------------------------------- codebooks

    def add_codebooks(self, config: CodebookConfig) -> None:
        """Attach codebooks at the sites and layers ``config`` names (all or none)."""
        if self.codebook_config is not None:
            raise ValueError("this model already has codebooks; call remove_codebooks() first")
        settings = self._config_settings(config)
        with self._undone_on_error():
            for site, kwargs in settings.items():
                self._attach(site, CodebookLayer(**kwargs))
            self.codebook_config = config

    def _config_settings(self, config: CodebookConfig) -> dict[str, dict[str, Any]]:
        """The `CodebookLayer` settings of each site ``config`` puts on this model."""
        n_layers = self.cfg.n_layers
        layers = range(n_layers) if config.layers is None else config.layers
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
        if "mlp" in config.sites and self.cfg.d_model % config.mlp_groups:
            raise ValueError(
                f"mlp_groups={config.mlp_groups} does not divide d_model={self.cfg.d_model}"
            )
        shared = {
            "k": config.k,
            "similarity": config.similarity,
            "combine": config.combine,
            "layer_norm": config.layer_norm,
            "layer_norm_affine": config.layer_norm_affine,
            "memory_budget_mb": config.memory_budget_mb,
        }
        attn = {"n_groups": self.cfg.n_heads, "d": self.cfg.d_head}
        mlp = {"n_groups": config.mlp_groups, "d": self.cfg.d_model // config.mlp_groups}
        settings = {}
        for layer in layers:
            if "attn" in config.sites:
                n_codes = config.site_n_codes("attn")
                settings[attn_site(layer)] = {**attn, "n_codes": n_codes, **shared}
            if "mlp" in config.sites:
                settings[mlp_site(layer)] = {**mlp, "n_codes": config.site_n_codes("mlp"), **shared}
        return settings

    @contextlib.contextmanager
    def _undone_on_error(self) -> Iterator[None]:
        """Uninstall every codebook the block installed if it raises, so a failed
        `add_codebooks` leaves the model as it was (and a retry works)."""
        before, config = dict(self._codebook_sites), self.codebook_config
        try:
            yield
        except BaseException:
            for name, site in list(self._codebook_sites.items()):
                if before.get(name) is not site:
                    _bridge.uninstall_site(self, site)
            self._codebook_sites, self.codebook_config = before, config
            self.refresh_hooks()
            raise

    def add_codebook(
        self,
        hook_name: str,
        *,
        n_codes: int,
        k: int = 1,
        groups: int = 1,
        similarity: Similarity = "cosine",
        combine: Combine = "sum",
        layer_norm: bool = False,
        layer_norm_affine: bool = False,
        memory_budget_mb: float = 1024.0,
    ) -> CodebookLayer:
        """Attach one codebook at any hook that carries ``[batch, pos, features]`` activations.

        ``groups`` independent codebooks of ``n_codes`` codes each quantise ``features /
        groups`` wide slices (at ``hook_z``, ``groups=n_heads`` gives one per head). The
        hook keeps showing the activation before quantisation and gains
        ``{hook_name}.hook_codes`` / ``.hook_quantized``, as at the `add_codebooks` sites.
        Each site keeps its own settings (saved per site by `save_pretrained`).
        """
        if hook_name in self._codebook_sites:
            raise ValueError(f"there is already a codebook at {hook_name}")
        if site_of(hook_name) != hook_name:
            raise ValueError(f"{hook_name} is a codebook's own hook, not an activation")
        width = _bridge.activation_width(self, hook_name)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        if width % groups:
            raise ValueError(f"groups={groups} does not divide the width {width} of {hook_name}")
        layer = CodebookLayer(
            groups,
            width // groups,
            n_codes,
            k,
            similarity=similarity,
            combine=combine,
            layer_norm=layer_norm,
            layer_norm_affine=layer_norm_affine,
            memory_budget_mb=memory_budget_mb,
        )
        self._attach(hook_name, layer)
        return layer

    def _attach(self, site: str, layer: CodebookLayer) -> None:
        layer = layer.to(next(self.parameters()).device)
        self._codebook_sites[site] = _bridge.install_site(self, site, layer)
        self.refresh_hooks()

    def remove_codebook(self, site: str) -> None:
        """Detach the codebook at ``site``; the other codebooks stay."""
        if site not in self._codebook_sites:
            raise KeyError(f"no codebook at {site!r}; sites: {list(self._codebook_sites)}")
        _bridge.uninstall_site(self, self._codebook_sites.pop(site))
        self.refresh_hooks()

    def remove_codebooks(self) -> None:
        """Detach every codebook, giving back the plain model."""
        for site in self._codebook_sites.values():
            _bridge.uninstall_site(self, site)
        self._codebook_sites = {}
        self.codebook_config = None
        self.refresh_hooks()

    @property
    def codebooks(self) -> dict[str, CodebookLayer]:
        """Site hook name -> its `CodebookLayer`, in the order they were added."""
        return {name: site.codebook for name, site in self._codebook_sites.items()}

    def codebook(self, site: str) -> CodebookLayer:
        """The codebook at ``site`` (e.g. ``codelens.vocab.mlp_site(0)``)."""
        if site not in self._codebook_sites:
            raise KeyError(f"no codebook at {site!r}; sites: {list(self._codebook_sites)}")
        return self._codebook_sites[site].codebook

    def codebook_parameters(self) -> list[nn.Parameter]:
        """The code vectors of every codebook (trained without weight decay)."""
        return [cb.codes for cb in self.codebooks.values()]

    def base_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the underlying model, codebooks excluded."""
        skip = {id(p) for p in self.codebook_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def reconstruction_loss(self) -> Tensor:
        """Mean over sites of each codebook's reconstruction MSE from the last forward."""
        return self._mean_loss("reconstruction_loss")

    def commitment_loss(self) -> Tensor:
        """Mean over sites of each input's MSE to its (detached) codes, from the last forward."""
        return self._mean_loss("commitment_loss")

    def _mean_loss(self, attr: str) -> Tensor:
        losses = [getattr(cb, attr) for cb in self.codebooks.values() if not cb.bypass]
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            return torch.zeros((), device=next(self.parameters()).device)
        return torch.stack(losses).mean()

    def check_finite(self) -> None:
        """Raise if NaN or inf reached a codebook's input since the last check (see
        `nonfinite_sites`)."""
        bad = self.nonfinite_sites()
        if bad:
            raise ValueError(f"NaN or inf in the input of the codebooks at {', '.join(bad)}")

    def nonfinite_sites(self) -> list[str]:
        """The sites whose codebook saw NaN or inf since the last call; clears the record.

        CPU inference raises at once; training and accelerators only record the finding
        on the device, so that no forward waits for the host. Reading it is one host sync.
        """
        flags = {name: cb.nonfinite_input for name, cb in self.codebooks.items()}
        for cb in self.codebooks.values():
            cb.nonfinite_input = None
        return [name for name, flag in flags.items() if flag is not None and bool(flag)]

    @contextlib.contextmanager
    def codebooks_bypassed(self) -> Iterator[None]:
        """Run the same model with every codebook as the identity (the baseline)."""
        layers = list(self.codebooks.values())
        previous = [cb.bypass for cb in layers]
        try:
            for cb in layers:
                cb.bypass = True
            yield
        finally:
            for cb, was in zip(layers, previous, strict=True):
                cb.bypass = was

    # ---------------------------------------------------------------- checks

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        if input == "" or (isinstance(input, list) and all(t == "" for t in input)):
            raise ValueError(f"the input is empty ({input!r}): pass text or token ids")
        if isinstance(input, Tensor) and not input.is_floating_point() and input.ndim not in (1, 2):
            raise ValueError(
                f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}"
            )
        if isinstance(input, Tensor) and input.dtype in (torch.int16, torch.uint8):
            input = input.long()  # the embedding takes int32 and int64 only
        if self.validate_tokens and isinstance(input, Tensor):
            if input.device.type == "cpu":  # host memory: reading it syncs nothing
                check_token_ids(input, self.cfg.d_vocab)
            else:  # checked where they entered (to_tokens, generate, collect_codes, CLI)
                assert_token_ids_on_device(input, self.cfg.d_vocab)
            self._check_length(input.shape[-1], text=False)
        elif self.validate_tokens and isinstance(input, str | list):
            options = {k: kwargs[k] for k in ("prepend_bos", "padding_side") if k in kwargs}
            tokens = self.to_tokens(input, **options, move_to_device=False, truncate=False)
            self._check_length(tokens.shape[-1], text=True)
        return super().forward(input, *args, **kwargs)

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise (BOS first by default where the model was trained with it), with the ids
        checked against the model's vocabulary before they go to the model's device."""
        tokens = super().to_tokens(input, prepend_bos, padding_side, False, truncate)
        check_token_ids(tokens, self.cfg.d_vocab, what="the tokenizer's ids for this text")
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def generate(self, input: Any = "", *args: Any, **kwargs: Any) -> Any:
        """The bridge's ``generate``, with token ids checked once rather than at every step."""
        if isinstance(input, Tensor):
            check_token_ids(input, self.cfg.d_vocab)
        was = self.validate_tokens
        self.validate_tokens = False  # the model only adds ids from its own vocabulary
        try:
            with warnings.catch_warnings():
                # The bridge hands the KV cache to transformers as ``past_key_values``, which
                # transformers >= 5.24 renamed; `_bridge.route_kv_cache` makes it work.
                warnings.filterwarnings(
                    "ignore", message="`past_key_values` is deprecated", category=FutureWarning
                )
                return super().generate(input, *args, **kwargs)
        finally:
            self.validate_tokens = was

    def to(self, *args: Any, **kwargs: Any) -> HookedCodebookTransformer:
        """``nn.Module.to``, without the bridge's "Moving model to device" print."""
        kwargs.setdefault("print_details", False)
        return super().to(*args, **kwargs)

    def _check_length(self, length: int, *, text: bool) -> None:
        """Refuse input past the model's positions where it would fail or be cut: learned
        position embeddings have ``n_ctx`` rows, and TransformerLens silently truncates
        text to ``n_ctx`` tokens (token ids of rotary models may be longer)."""
        learned = getattr(self.cfg, "positional_embedding_type", None) == "standard"
        if length > self.cfg.n_ctx and (learned or text):
            raise ValueError(
                f"the input is {length} tokens long, but the model has {self.cfg.n_ctx} "
                "positions (n_ctx); split it into shorter sequences"
            )

    def enable_compatibility_mode(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "codelens models never process weights (folded LayerNorm, centred weights): "
            "codebooks are trained on raw activations and are wrong on processed ones"
        )

    def process_weights(self, *args: Any, **kwargs: Any) -> None:
        self.enable_compatibility_mode()

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Save base weights, codebooks, configs and tokenizer atomically to ``out_dir``.

        Other files in ``out_dir`` are kept; a non-empty ``out_dir`` that is not a
        complete codelens checkpoint needs ``overwrite=True`` (see `codelens.checkpoint`).
        """
        return checkpoint.save(self, Path(out_dir), overwrite=overwrite)


def check_model_path(name_or_dir: str | Path) -> None:
    """Refuse, naming what is there and what was expected, a path that cannot be a model.

    A training run's directory holds its model in ``final/``; a path that is clearly local
    (``./x``, ``/x``, ``~/x``, ``a/b/c``, or under an existing directory) but missing is a
    typo, not a hub id to download.
    """
    path = Path(name_or_dir)
    final = path / "final"
    if path.is_dir() and (checkpoint.is_checkpoint(final) or _is_run_config(path / "config.json")):
        unfinished = "" if final.exists() else " (not written yet: the run has not finished)"
        raise ValueError(
            f"{path} is a codelens training run, not a model; its trained model is "
            f"{final}{unfinished}"
        )
    if path.exists():
        return
    text = str(name_or_dir)
    parent = path.parent
    local = text.startswith((".", "/", "~")) or text.count("/") > 1
    if not (local or (str(parent) != "." and parent.is_dir())):
        return  # a hub id, e.g. "EleutherAI/pythia-70m"
    hint = ""
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        hint = f"; did you mean {parent / close[0]}?" if close else ""
    raise FileNotFoundError(f"no model directory at {path.absolute()}{hint}")


def _is_run_config(file: Path) -> bool:
    """Whether ``file`` is the `TrainConfig` a training run writes (not a model config)."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "run_dir" in config and "model_type" not in config


def special_tokens_from(tokenizer: Any, hf_model: nn.Module) -> None:
    """Make the model's BOS/EOS ids the tokenizer's.

    A config built from scratch keeps its class defaults (GPT-NeoX: ``eos_token_id=2``),
    which for a codelens tokenizer is an ordinary token (the digit "2" in TokFSM), so
    ``generate`` stopped there. Lists of stop ids (chat models) are left alone.
    """
    configs = [hf_model.config, getattr(hf_model, "generation_config", None)]
    for name in ("bos_token_id", "eos_token_id"):
        wanted = getattr(tokenizer, name, None)
        for config in configs:
            if None not in (wanted, config) and not isinstance(getattr(config, name, None), list):
                setattr(config, name, wanted)


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this torch cannot use, before anything is built there."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from err
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(kind, True)
    if not available:
        raise ValueError(
            f"device={device!r}, but this torch build has no usable {kind} device "
            f"(torch {torch.__version__}); use device='cpu' or install a {kind} build"
        )
