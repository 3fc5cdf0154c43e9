"""Read the paper authors' released codebook models (the ``codebook-features`` format).

Their checkpoints are HuggingFace ``save_pretrained`` directories of a
``CodebookModel`` wrapping a GPT-NeoX, GPT-Neo or GPT-2 model: ``config.json`` has
``model_type: "codebook"`` and the codebook settings (older configs hold one value
where newer hold one per ``codebook_at`` entry); the weights (``model.safetensors``
or ``pytorch_model.bin``) hold the base model under ``model.`` with each codebook at
``...{attention|attn[.attention]|mlp}.codebook_layer.[codebook.{g}.]{codebook.weight,
ln.weight, ln.bias}`` and a wrapped MLP's own weights under ``mlp.module_layer.``.

Their forward, per codebook: LayerNorm the activation with the codebook's own gain
and bias (eps 1e-5), score codes by ``x_hat . c / |c|`` (or by distance), take the
top k, and output the *mean* of the k raw code vectors. That is a `CodebookLayer`
with ``layer_norm=True, layer_norm_affine=True, similarity="cosine", combine="mean"``,
so a converted model is an ordinary codelens model.

The base model's architecture is not in their checkpoint: it comes from
``base_model=`` (hub id, directory or config), a ``base_model/config.json`` next to
the weights, or, for the released hub models, `KNOWN_BASES`.

Safety: safetensors are read directly; a ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``; no other file (``training_args.bin``,
``trainer_state.json``, optimiser state) is read or downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
)

from codelens.checkpoint import CheckpointError, read_json
from codelens.config import CodebookConfig
from codelens.vocab import attn_site, mlp_site

MODEL_TYPE = "codebook"
SAFETENSORS, PICKLE = "model.safetensors", "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# What a hub download fetches; the weights file is chosen separately (never both).
HUB_FILES = ["config.json", "base_model/config.json", *TOKENIZER_FILES]

KNOWN_BASES: dict[str, str | dict[str, Any]] = {
    # The authors' TokFSM base model, as their train_fsm_model.load_model builds it.
    "taufeeque/TokFSM_k1_codebook_model": dict(
        model_type="gpt_neox",
        vocab_size=11,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        rotary_emb_base=10000,
        bos_token_id=10,
        eos_token_id=10,
        max_position_embeddings=128,
    ),
    "taufeeque/pythia410m_wikitext_attn_codebook_model": "EleutherAI/pythia-410m-deduped",
    "taufeeque/TinyStories-1Layer-21M-Codebook": "roneneldan/TinyStories-1Layer-21M",
}
"""Base model (hub id or config dict) of each released hub model."""

ORIGINAL_SITES = {"attn_preproj": "attn", "mlp": "mlp"}
"""The original code's codebook site names, as `CodebookConfig.sites` kinds."""
SIMILARITY = {"inner_product": "cosine", "euclidean": "euclidean"}
ATTN_MODULES = ("attention", "attn.attention", "attn")
_CODEBOOK_KEY = re.compile(
    r"^model\.(?P<layers>.+?)\.(?P<layer>\d+)\.(?P<module>.+?)\.codebook_layer\.(?P<rest>.+)$"
)
_CODEBOOK_PART = re.compile(
    r"^(?:codebook\.(?P<group>\d+)\.)?(?P<part>codebook\.weight|ln\.weight|ln\.bias)$"
)
# Causal-mask and rotary buffers that older transformers saved and newer ones rebuild.
_LEGACY_BUFFER = re.compile(r"\.(attention|attn|attn\.attention)\.(bias|masked_bias)$|\.inv_freq$")


@dataclass
class Converted:
    """An original-format model in codelens terms (see `convert`)."""

    hf_model: nn.Module
    """The base HuggingFace model with its trained weights loaded."""
    tokenizer: Any
    codebook: CodebookConfig
    codebook_state: dict[str, Tensor]
    """``{site}.codes`` / ``.disabled`` / ``.ln_weight`` / ``.ln_bias`` by codelens site."""
    weights_file: Path


def is_original(path: Path) -> bool:
    """Whether ``path`` is a directory in the authors' format."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = read_json(config)
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def locate(name_or_dir: str | Path) -> Path | None:
    """The local directory of an original-format model, downloading a hub id; else ``None``.

    A hub id is checked by its ``config.json`` only; then only the files in
    `HUB_FILES` and one weights file are downloaded (``model.safetensors`` when the
    repository has it, else ``pytorch_model.bin``).
    """
    path = Path(name_or_dir)
    if path.exists():
        return path if is_original(path) else None
    name = str(name_or_dir)
    if name.count("/") != 1:
        return None
    try:
        config = read_json(Path(hf_hub_download(name, "config.json")))
    except Exception as err:  # offline, unknown repo, no config: not ours to handle
        if name in KNOWN_BASES:
            raise CheckpointError(f"cannot download {name} from the hub: {err}") from err
        return None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        return None
    local = Path(snapshot_download(name, allow_patterns=[*HUB_FILES, SAFETENSORS]))
    if not (local / SAFETENSORS).is_file():
        local = Path(snapshot_download(name, allow_patterns=[*HUB_FILES, PICKLE]))
    return local


def convert(
    path: Path,
    *,
    name: str | None = None,
    base_model: str | Path | PretrainedConfig | dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Converted:
    """Read an original-format directory into a HuggingFace model plus codebooks.

    ``name`` is the hub id it came from (to find its base in `KNOWN_BASES`);
    ``base_model`` overrides where the base architecture comes from; ``tokenizer``
    overrides the tokenizer (else the directory's, else the base model's).
    """
    path = Path(path)
    raw = read_json(path / "config.json")
    base_config, base_source = _base_config(path, name, base_model)
    weights_file, state = _read_weights(path)
    try:
        codebook = codebook_config(raw, base_config, source=path / "config.json")
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError) as err:  # a value of the wrong type
        raise CheckpointError(f"{path / 'config.json'} is malformed: {err}") from err
    base, codebooks = _split(state, weights_file)
    hf_model = _load_base(base_config, base, weights_file)
    codebook_state = _codebook_state(codebooks, codebook, base_config, weights_file)
    if tokenizer is None:
        tokenizer = _tokenizer(path, base_source)
    return Converted(hf_model.eval(), tokenizer, codebook, codebook_state, weights_file)


# ------------------------------------------------------------------------ config


def codebook_config(raw: Any, base: PretrainedConfig, *, source: Path) -> CodebookConfig:
    """The `CodebookConfig` equivalent to an original ``config.json`` (``raw``)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} is not a JSON object")

    def field(key: str) -> Any:
        if key not in raw:
            raise CheckpointError(f"{source} has no {key!r}")
        return raw[key]

    where = field("codebook_at")
    where = [where] if isinstance(where, str) else list(where)
    per_site = {}
    for key in ("codebook_type", "num_codebooks", "k_codebook", "num_codes"):
        value = field(key)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(where)
        if len(values) != len(where):
            raise CheckpointError(
                f"{source}: {key} has {len(values)} entries, codebook_at has {len(where)}"
            )
        per_site[key] = values
    n_heads, n_layers = base.num_attention_heads, base.num_hidden_layers
    sites, n_codes, ks, mlp_groups = [], {}, set(), 1
    for i, at in enumerate(where):
        if at not in ORIGINAL_SITES:
            raise CheckpointError(
                f"{source}: codebook_at {at!r} is not supported; codelens quantises "
                f"attention heads ('attn_preproj') and MLP outputs ('mlp')"
            )
        kind, kind_of = ORIGINAL_SITES[at], per_site["codebook_type"][i]
        groups = per_site["num_codebooks"][i]
        groups = n_heads if groups == -1 else groups
        if kind_of not in ("vanilla", "group") or (kind_of == "vanilla" and groups != 1):
            raise CheckpointError(f"{source}: codebook_type {kind_of!r} with {groups} codebooks")
        if kind == "attn" and groups != n_heads:
            raise CheckpointError(
                f"{source}: attn_preproj with {groups} codebooks; codelens needs one per head "
                f"({n_heads})"
            )
        if kind == "mlp":
            mlp_groups = groups
        sites.append(kind)
        n_codes[kind] = int(per_site["num_codes"][i])
        ks.add(int(per_site["k_codebook"][i]))
    if len(ks) != 1:
        raise CheckpointError(f"{source}: k_codebook differs between sites ({sorted(ks)})")
    similarity = SIMILARITY.get(field("similarity_metric"))
    if similarity is None:
        raise CheckpointError(f"{source}: unknown similarity_metric {raw['similarity_metric']!r}")
    layers = field("layers_to_snap")
    layers = range(n_layers) if layers == "all" else [int(x) for x in layers]
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad:
        raise CheckpointError(f"{source}: layers_to_snap {bad} outside a {n_layers}-layer model")
    first = sites[0]
    try:
        return CodebookConfig(
            n_codes=n_codes[first],
            mlp_n_codes=n_codes["mlp"] if "mlp" in n_codes and first != "mlp" else None,
            k=ks.pop(),
            sites=tuple(sites),
            layers=tuple(sorted({x % n_layers for x in layers})),
            similarity=similarity,
            combine="mean",
            layer_norm=True,
            layer_norm_affine=True,
            mlp_groups=mlp_groups,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _base_config(
    path: Path, name: str | None, base_model: Any
) -> tuple[PretrainedConfig, str | None]:
    """The base architecture, and where its tokenizer could come from (hub id or dir)."""
    if base_model is None and (path / "base_model" / "config.json").is_file():
        base_model = path / "base_model"
    if base_model is None and name in KNOWN_BASES:
        base_model = KNOWN_BASES[name]
    if base_model is None:
        raise CheckpointError(
            f"{path} holds codebooks in the original format but not the base model's "
            "architecture: pass base_model= (the HuggingFace id, directory or config the "
            "codebooks were trained on)"
        )
    if isinstance(base_model, PretrainedConfig):
        return base_model, None
    if isinstance(base_model, dict):
        spec = dict(base_model)
        return AutoConfig.for_model(spec.pop("model_type"), **spec), None
    try:
        return AutoConfig.from_pretrained(str(base_model)), str(base_model)
    except Exception as err:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read the base model config {base_model}: {err}") from err


def _tokenizer(path: Path, base_source: str | None) -> Any:
    """The directory's tokenizer, else the base model's (a hub id, or a directory with one)."""
    for source in (str(path), base_source):
        if source is None:
            continue
        local = Path(source)
        if local.exists() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as err:  # tokenizers raises bare Exceptions for bad files
            raise CheckpointError(f"the tokenizer in {source} cannot be loaded: {err}") from err
    raise CheckpointError(f"{path} has no tokenizer and its base model names none: pass tokenizer=")


# ------------------------------------------------------------------------ weights


def _read_weights(path: Path) -> tuple[Path, dict[str, Tensor]]:
    """The state dict: safetensors when present, else a weights-only unpickle of the .bin."""
    if (path / SAFETENSORS).is_file():
        file = path / SAFETENSORS
        try:
            return file, load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from err
    file = path / PICKLE
    if not file.is_file():
        raise CheckpointError(f"{path} has neither {SAFETENSORS} nor {PICKLE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"cannot read {file} as plain tensors (weights_only=True): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file} is not a state dict of tensors")
    return file, state


def _split(state: dict[str, Tensor], file: Path) -> tuple[dict[str, Tensor], dict[tuple, Tensor]]:
    """Base weights under their HF names, and codebook tensors by (layer, kind, group, part)."""
    base: dict[str, Tensor] = {}
    codebooks: dict[tuple, Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith("model."):
            raise CheckpointError(f"{file}: key {key!r} is not under 'model.'")
        match = _CODEBOOK_KEY.match(key)
        if match is None:
            base[key[len("model.") :].replace(".module_layer.", ".")] = tensor
            continue
        module = match["module"]
        kind = "attn" if module in ATTN_MODULES else "mlp" if module == "mlp" else None
        part = _CODEBOOK_PART.match(match["rest"])
        if kind is None or part is None:
            raise CheckpointError(f"{file}: codebook key {key!r} is not a supported codebook")
        group = int(part["group"] or 0)
        codebooks[(int(match["layer"]), kind, group, part["part"])] = tensor
    return base, codebooks


def _load_base(config: PretrainedConfig, base: dict[str, Tensor], file: Path) -> nn.Module:
    """The base model with ``base`` loaded by transformers (which knows its key renames)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise CheckpointError(f"{file}: no causal LM class for model_type {config.model_type!r}")
    base = {k: v for k, v in base.items() if not _LEGACY_BUFFER.search(k)}
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=base,
        attn_implementation="eager",
        ignore_mismatched_sizes=True,
        output_loading_info=True,
    )
    problems = {
        "weights of other shapes": sorted(info["mismatched_keys"]),
        "unexpected weights": sorted(info["unexpected_keys"]),
        "missing weights": sorted(info["missing_keys"]),
        "errors": info["error_msgs"],
    }
    problems = {what: found for what, found in problems.items() if found}
    if problems:
        detail = "; ".join(f"{what}: {found[:5]}" for what, found in problems.items())
        raise CheckpointError(f"{file} does not match the base model config: {detail}")
    return model


def _codebook_state(
    codebooks: dict[tuple, Tensor], config: CodebookConfig, base: PretrainedConfig, file: Path
) -> dict[str, Tensor]:
    """Stack each site's per-group tensors into `CodebookLayer` layout, checking shapes."""
    d_model, n_heads = base.hidden_size, base.num_attention_heads
    shapes = {
        "attn": (n_heads, d_model // n_heads, config.site_n_codes("attn")),
        "mlp": (config.mlp_groups, d_model // config.mlp_groups, config.site_n_codes("mlp")),
    }
    site_of_kind = {"attn": attn_site, "mlp": mlp_site}
    state: dict[str, Tensor] = {}
    used: set[tuple] = set()
    for layer in config.layers:
        for kind in config.sites:
            groups, d, n_codes = shapes[kind]
            parts = {}
            for part, shape in (
                ("codebook.weight", (n_codes, d)),
                ("ln.weight", (d,)),
                ("ln.bias", (d,)),
            ):
                stack = []
                for group in range(groups):
                    key = (layer, kind, group, part)
                    where = f"layer {layer} {kind} codebook {group} {part}"
                    if key not in codebooks:
                        raise CheckpointError(f"{file} lacks the {where} that config.json implies")
                    if tuple(codebooks[key].shape) != shape:
                        raise CheckpointError(
                            f"{file}: {where} has shape {tuple(codebooks[key].shape)}, "
                            f"config.json implies {shape}"
                        )
                    stack.append(codebooks[key])
                    used.add(key)
                parts[part] = torch.stack(stack)
            site = site_of_kind[kind](layer)
            state[f"{site}.codes"] = parts["codebook.weight"]
            state[f"{site}.ln_weight"] = parts["ln.weight"]
            state[f"{site}.ln_bias"] = parts["ln.bias"]
            state[f"{site}.disabled"] = torch.zeros(groups, n_codes, dtype=torch.bool)
    extra = sorted(set(codebooks) - used)
    if extra:
        raise CheckpointError(
            f"{file} has codebooks config.json does not describe: {extra[:3]} "
            "(layer, site, group, tensor)"
        )
    return state
