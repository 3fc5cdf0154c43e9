"""`HookedCodebookTransformer`: a TransformerLens 4 bridge with codebooks at its hook points."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from codelens import _bridge, checkpoint, original
from codelens.codebook import CodebookLayer
from codelens.config import CodebookConfig
from codelens.vocab import attn_site, mlp_site

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
        if not (codebook is None or codebook == AUTO or isinstance(codebook, CodebookConfig)):
            raise ValueError(f"codebook must be 'auto', None or a CodebookConfig, got {codebook!r}")
        path = Path(name_or_dir)
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
                    f"{path} is neither a codelens checkpoint nor a HuggingFace model directory"
                )
            bridge = _bridge.boot(str(name_or_dir), tokenizer=tokenizer, device=device, dtype=dtype)
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
        manifest = checkpoint.read_manifest(path)
        saved = checkpoint.read_codebook_config(path, manifest)
        if isinstance(codebook, CodebookConfig) and saved is not None:
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
        if codebook == AUTO and saved is not None:
            model.add_codebooks(saved)
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
        if tokenizer is None:
            raise ValueError("from_hf_model needs the model's tokenizer")
        label = name or f"codelens-local-{hf_model.config.model_type}"
        model = cls._wrap(
            _bridge.boot(label, hf_model=hf_model, tokenizer=tokenizer, device=device)
        )
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
        """Attach codebooks at the sites and layers ``config`` names."""
        if self.codebook_config is not None:
            raise ValueError("this model already has codebooks; call remove_codebooks() first")
        n_layers = self.cfg.n_layers
        layers = range(n_layers) if config.layers is None else config.layers
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
        if "mlp" in config.sites and self.cfg.d_model % config.mlp_groups:
            raise ValueError(
                f"mlp_groups={config.mlp_groups} does not divide d_model={self.cfg.d_model}"
            )
        device = next(self.parameters()).device
        for layer in layers:
            if "attn" in config.sites:
                self._install(
                    attn_site(layer), self.cfg.n_heads, self.cfg.d_head, "attn", config, device
                )
            if "mlp" in config.sites:
                groups = config.mlp_groups
                d = self.cfg.d_model // groups
                self._install(mlp_site(layer), groups, d, "mlp", config, device)
        self.codebook_config = config
        self.refresh_hooks()

    def _install(
        self, site: str, groups: int, d: int, kind: str, config: CodebookConfig, device
    ) -> None:
        layer = CodebookLayer(
            groups,
            d,
            config.site_n_codes(kind),
            config.k,
            similarity=config.similarity,
            combine=config.combine,
            layer_norm=config.layer_norm,
            layer_norm_affine=config.layer_norm_affine,
            memory_budget_mb=config.memory_budget_mb,
        ).to(device)
        self._codebook_sites[site] = _bridge.install_site(self, site, layer)

    def remove_codebooks(self) -> None:
        """Detach every codebook, giving back the plain model."""
        for site in self._codebook_sites.values():
            _bridge.uninstall_site(self, site)
        self._codebook_sites = {}
        self.codebook_config = None
        self.refresh_hooks()

    @property
    def codebooks(self) -> dict[str, CodebookLayer]:
        """Site hook name -> its `CodebookLayer`, in layer order."""
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
        if self.validate_tokens and isinstance(input, Tensor):
            check_token_ids(input, self.cfg.d_vocab)
        return super().forward(input, *args, **kwargs)

    def enable_compatibility_mode(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "codelens models never process weights (folded LayerNorm, centred weights): "
            "codebooks are trained on raw activations and are wrong on processed ones"
        )

    def process_weights(self, *args: Any, **kwargs: Any) -> None:
        self.enable_compatibility_mode()

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Save base weights, codebooks, configs and tokenizer atomically to ``out_dir``."""
        return checkpoint.save(self, Path(out_dir))


def check_token_ids(tokens: Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids outside ``[0, vocab_size)``."""
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {low}, max {high}")
