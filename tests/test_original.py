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
