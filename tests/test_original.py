"""Loading the paper authors' released format (`codelens.original`) against their own logits."""

import fnmatch
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from codelens import CodebookConfig, HookedCodebookTransformer, cli, original
from codelens.checkpoint import CheckpointError

# A tiny model saved by the original codebook-features 0.1.2 code, with its logits
# (tests/fixtures/original-format/README.md).
FIXTURE = Path(__file__).parent / "fixtures" / "original-format"


def fsm_tokenizer() -> PreTrainedTokenizerFast:
    """The fixture's vocabulary: digits 0-9 and BOS/EOS 10."""
    vocab = {str(i): i for i in range(10)} | {"<|endoftext|>": 10}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected_logits.safetensors"))


@pytest.fixture(scope="module")
def converted():
    return HookedCodebookTransformer.from_pretrained(FIXTURE, tokenizer=fsm_tokenizer())


@pytest.fixture
def copy(tmp_path) -> Path:
    """A writable copy of the fixture with a tokenizer, as a released model ships one."""
    out = tmp_path / "orig"
    shutil.copytree(FIXTURE, out)
    fsm_tokenizer().save_pretrained(out)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_logits_match_the_original_implementation(converted, expected):
    ids, want = expected["input_ids"], expected["logits"]
    got = logits(converted, ids)
    assert (got - want).abs().max() < 1e-4
    with converted.codebooks_bypassed():  # the codebooks really are doing the work
        assert (logits(converted, ids) - want).abs().max() > 1e-2
    cfg = converted.codebook_config
    assert (cfg.sites, cfg.layers, cfg.k, cfg.n_codes) == (("attn", "mlp"), (0, 1), 2, 32)
    assert (cfg.combine, cfg.similarity, cfg.layer_norm_affine) == ("mean", "cosine", True)
    assert converted.codebook("blocks.1.attn.hook_z").codes.shape == (4, 32, 16)
    assert converted.codebook("blocks.1.hook_mlp_out").codes.shape == (1, 32, 64)


@pytest.mark.parametrize("variant", ["no_affine", "sum"])
def test_each_codebook_option_is_needed(converted, expected, variant):
    """Without the affine LayerNorm or the mean, the logits are not the original's."""
    cbs = list(converted.codebooks.values())
    saved = [(cb.ln_weight.clone(), cb.ln_bias.clone(), cb.combine) for cb in cbs]
    try:
        for cb in cbs:
            if variant == "no_affine":
                cb.ln_weight.fill_(1.0)
                cb.ln_bias.zero_()
            else:
                cb.combine = "sum"
        assert (logits(converted, expected["input_ids"]) - expected["logits"]).abs().max() > 1e-3
    finally:
        for cb, (weight, bias, combine) in zip(cbs, saved, strict=True):
            cb.ln_weight.copy_(weight)
            cb.ln_bias.copy_(bias)
            cb.combine = combine


def test_convert_command_writes_a_codelens_checkpoint(copy, tmp_path, expected, converted):
    cli.main(["convert", str(copy), str(tmp_path / "ck")])
    loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "ck")
    assert loaded.codebook_config == converted.codebook_config
    ids = expected["input_ids"]
    assert torch.equal(logits(loaded, ids), logits(converted, ids))


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_bin_weights_are_read_weights_only_and_other_pickles_never(copy, tmp_path, expected):
    state = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    torch.save(state, copy / "pytorch_model.bin")
    tripped = tmp_path / "tripped"
    (copy / "training_args.bin").write_bytes(pickle.dumps(_Tripwire(tripped)))
    model = HookedCodebookTransformer.from_pretrained(copy)
    assert (logits(model, expected["input_ids"]) - expected["logits"]).abs().max() < 1e-4
    assert not tripped.exists()
    # a weights file holding code is refused, not run
    torch.save({"model.embed_out.weight": _Tripwire(tripped)}, copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only"):
        HookedCodebookTransformer.from_pretrained(copy)
    assert not tripped.exists()


def test_a_hub_id_goes_through_the_same_path(copy, tmp_path, monkeypatch, expected):
    """Served by a stand-in hub: only the config, tokenizer and one weights file are fetched."""
    repo = copy
    torch.save(load_file(str(repo / "model.safetensors")), repo / "pytorch_model.bin")
    (repo / "training_args.bin").write_bytes(pickle.dumps(_Tripwire(tmp_path / "tripped")))
    (repo / "trainer_state.json").write_text("{}")
    fetched: list[str] = []

    def hf_hub_download(repo_id, filename):
        assert repo_id == "someone/codebook-model"
        return str(repo / filename)

    def snapshot_download(repo_id, allow_patterns):
        local = tmp_path / "cache"
        for file in repo.rglob("*"):
            rel = file.relative_to(repo).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, local / rel)
                fetched.append(rel)
        return str(local)

    monkeypatch.setattr(original, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(original, "snapshot_download", snapshot_download)
    model = HookedCodebookTransformer.from_pretrained("someone/codebook-model")
    assert (logits(model, expected["input_ids"]) - expected["logits"]).abs().max() < 1e-4
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched
    assert not {"pytorch_model.bin", "training_args.bin", "trainer_state.json"} & set(fetched)


def test_released_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot download taufeeque/TokFSM_k1_codebook_model"):
        HookedCodebookTransformer.from_pretrained("taufeeque/TokFSM_k1_codebook_model")


def test_known_bases_are_valid_configs():
    from transformers import AutoConfig

    spec = dict(original.KNOWN_BASES["taufeeque/TokFSM_k1_codebook_model"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    assert (config.hidden_size, config.num_attention_heads, config.vocab_size) == (128, 4, 11)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def _edit_weights(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


CB = "model.gpt_neox.layers.1.attention.codebook_layer.codebook.2.codebook.weight"


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda p: _edit_config(p, num_codes=[30, 32]),
            r"model\.safetensors: layer 0 attn .*\(30, 16\)",
        ),
        (lambda p: _edit_config(p, k_codebook=[1, 2]), r"config\.json: k_codebook differs"),
        (lambda p: _edit_config(p, codebook_at=["qkv", "mlp"]), r"config\.json: codebook_at 'qkv'"),
        (lambda p: _edit_config(p, num_codebooks=[2, 1]), r"config\.json: attn_preproj with 2"),
        (lambda p: _edit_config(p, layers_to_snap=[0]), r"model\.safetensors has codebooks config"),
        (lambda p: _edit_config(p, layers_to_snap=[5]), r"config\.json: layers_to_snap \[5\]"),
        (lambda p: _edit_config(p, similarity_metric="manhattan"), r"config\.json: unknown simil"),
        (lambda p: _edit_config(p, k_codebook=["two", 2]), r"config\.json is malformed"),
        (lambda p: _edit_config(p, num_codes=None), r"config\.json is malformed"),
        (lambda p: _edit_weights(p, lambda s: s.pop(CB)), r"model\.safetensors lacks the layer 1"),
        (
            lambda p: _edit_weights(p, lambda s: s.pop("model.gpt_neox.embed_in.weight")),
            r"model\.safetensors does not match the base model config: missing",
        ),
        (
            lambda p: (p / "base_model/config.json").write_text(
                (p / "base_model/config.json")
                .read_text()
                .replace('"intermediate_size": 256', '"intermediate_size": 128')
            ),
            r"model\.safetensors does not match the base model config: weights of other shapes",
        ),
        (lambda p: shutil.rmtree(p / "base_model"), "pass base_model="),
        (
            lambda p: (p / "model.safetensors").write_bytes(
                (p / "model.safetensors").read_bytes()[:5000]
            ),
            r"cannot read .*model\.safetensors",
        ),
    ],
)
def test_files_that_do_not_match_give_a_clear_error(copy, break_it, message):
    break_it(copy)
    with pytest.raises(CheckpointError, match=message):
        HookedCodebookTransformer.from_pretrained(copy)


def test_missing_tokenizer_and_fresh_codebooks_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="pass tokenizer="):
        HookedCodebookTransformer.from_pretrained(FIXTURE)
    with pytest.raises(ValueError, match="already has codebooks"):
        HookedCodebookTransformer.from_pretrained(
            FIXTURE, CodebookConfig(n_codes=4), tokenizer=fsm_tokenizer()
        )


def _snap(x, codes, gain, bias, k):
    """The original codebook forward, written out: own-affine LayerNorm, x_hat . c/|c|, mean."""
    x_hat = torch.nn.functional.layer_norm(x, (x.shape[-1],), gain, bias, 1e-5)
    ids = (x_hat @ codes.T / codes.norm(dim=-1)).topk(k, dim=-1).indices
    return torch.nn.functional.embedding(ids, codes).mean(-2)


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_gpt_neo_and_gpt2_layouts_match_the_original_forward(arch, tmp_path):
    """Other architectures' keys, against the original forward re-done with hooks on HF.

    The reference quantises the input of the attention output projection per head and
    the MLP output, on the plain HuggingFace model; codelens converts the same tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if arch == "gpt_neo":
        config = AutoConfig.for_model(
            "gpt_neo", vocab_size=13, hidden_size=32, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=8,
            max_position_embeddings=64, intermediate_size=64,
        )  # fmt: skip
        attn_key, proj = "attn.attention", "out_proj"
    else:
        config = AutoConfig.for_model("gpt2", vocab_size=13, n_embd=32, n_layer=2, n_head=4)
        attn_key, proj = "attn", "c_proj"
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    heads, d, n_codes, k = 4, 8, 16, 2
    state = {
        f"model.{key.replace('.mlp.', '.mlp.module_layer.')}": v
        for key, v in hf.state_dict().items()
    }
    books = {}
    for layer in range(2):
        prefix = f"model.transformer.h.{layer}"
        state[f"{prefix}.{attn_key}.bias"] = torch.ones(
            1, 1, 64, 64, dtype=torch.bool
        )  # legacy mask
        for h in range(heads):
            books[layer, h] = (
                torch.randn(n_codes, d),
                1 + 0.3 * torch.randn(d),
                0.3 * torch.randn(d),
            )
            key = f"{prefix}.{attn_key}.codebook_layer.codebook.{h}"
            for part, tensor in zip(
                ("codebook.weight", "ln.weight", "ln.bias"), books[layer, h], strict=True
            ):
                state[f"{key}.{part}"] = tensor
        books[layer, "mlp"] = (
            torch.randn(n_codes, 4 * d),
            1 + 0.3 * torch.randn(4 * d),
            0.3 * torch.randn(4 * d),
        )
        for part, tensor in zip(
            ("codebook.weight", "ln.weight", "ln.bias"), books[layer, "mlp"], strict=True
        ):
            state[f"{prefix}.mlp.codebook_layer.{part}"] = tensor
    out = tmp_path / arch
    out.mkdir()
    save_file({key: v.clone() for key, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(
        model_type="codebook", codebook_at=["attn_preproj", "mlp"],
        codebook_type=["group", "vanilla"], num_codebooks=[-1, 1], k_codebook=k,
        num_codes=n_codes, layers_to_snap=[0, 1], similarity_metric="inner_product",
    )))  # fmt: skip
    model = HookedCodebookTransformer.from_pretrained(
        out, tokenizer=fsm_tokenizer(), base_model=config
    )

    for layer, block in enumerate(hf.transformer.h):
        attn = block.attn.attention if arch == "gpt_neo" else block.attn

        def per_head(module, args, layer=layer):
            x = args[0]
            parts = [_snap(x[..., h * d : (h + 1) * d], *books[layer, h], k) for h in range(heads)]
            return (torch.cat(parts, -1), *args[1:])

        getattr(attn, proj).register_forward_pre_hook(per_head)
        block.mlp.register_forward_hook(
            lambda m, a, o, layer=layer: _snap(o, *books[layer, "mlp"], k)
        )
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert (logits(model, ids) - want).abs().max() < 1e-4
    with model.codebooks_bypassed():
        assert (logits(model, ids) - want).abs().max() > 1e-2
