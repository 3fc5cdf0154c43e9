"""Save/load: bit-exact round trips, atomic writes, and clear errors for bad checkpoints."""

import json

import pytest
import torch
from conftest import ARCHS, VOCAB, digit_tokenizer, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from codelens import CodebookConfig, HookedCodebookTransformer, checkpoint
from codelens.checkpoint import CheckpointError


def test_round_trip_is_bit_exact(arch, tokens, tmp_path):
    model = tiny_model(arch, CodebookConfig(n_codes=20, k=2, mlp_groups=2))
    model.codebook("blocks.1.hook_mlp_out").disable_codes([3, 4])
    with torch.no_grad():  # move weights away from their init so the test sees them
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ck")
    loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "ck")
    assert loaded.codebook_config == model.codebook_config
    assert torch.equal(loaded(tokens), model(tokens))
    assert torch.equal(
        loaded.codebook("blocks.1.hook_mlp_out").disabled,
        model.codebook("blocks.1.hook_mlp_out").disabled,
    )
    base = HookedCodebookTransformer.from_pretrained(tmp_path / "ck", codebook=None)
    assert base.codebooks == {}
    with model.codebooks_bypassed():
        assert torch.equal(base(tokens), model(tokens))


def test_plain_hf_directory_and_fresh_codebooks(tmp_path, tokens):
    # a plain HF checkpoint directory, as a user would have from the hub
    hf_dir = tmp_path / "hf"
    cfg = dict(ARCHS["gpt_neox"], vocab_size=VOCAB)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    hf.save_pretrained(hf_dir)
    digit_tokenizer().save_pretrained(hf_dir)
    loaded = HookedCodebookTransformer.from_pretrained(hf_dir, CodebookConfig(n_codes=10, k=1))
    assert len(loaded.codebooks) == 4
    plain = HookedCodebookTransformer.from_pretrained(hf_dir)
    assert plain.codebooks == {}
    assert plain(tokens).shape == (*tokens.shape, VOCAB)


def test_refuses_to_clobber_a_non_checkpoint_directory(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a codelens checkpoint"):
        tiny_model().save_pretrained(precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, tokens, monkeypatch):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=10, k=1))
    model.save_pretrained(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").glob("*.safetensors")}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ck")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ck").glob("*.safetensors")}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directories left
    monkeypatch.undo()
    assert torch.equal(
        HookedCodebookTransformer.from_pretrained(tmp_path / "ck")(tokens), model(tokens)
    )


@pytest.fixture
def saved(tmp_path):
    tiny_model("gpt_neox", CodebookConfig(n_codes=10, k=1)).save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def test_truncated_weights(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        HookedCodebookTransformer.from_pretrained(saved)


def test_corrupted_codebooks(saved):
    f = saved / "codebooks.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="codebooks.safetensors is corrupted"):
        HookedCodebookTransformer.from_pretrained(saved)


def test_corrupted_manifest(saved):
    (saved / "codelens.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable or corrupted"):
        HookedCodebookTransformer.from_pretrained(saved)
    (saved / "codelens.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a codelens checkpoint"):
        HookedCodebookTransformer.from_pretrained(saved)


def test_missing_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        HookedCodebookTransformer.from_pretrained(saved)


def test_mismatched_checkpoints(saved, tmp_path):
    other = tiny_model("gpt_neox", CodebookConfig(n_codes=12, k=1))
    state = checkpoint.read_tensors(saved / "codebooks.safetensors")
    with pytest.raises(CheckpointError, match=r"has shape \(4, 10, 8\).*expects \(4, 12, 8\)"):
        checkpoint.load_codebook_state(other, state, source="codebooks")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(CheckpointError, match="does not match this model: missing"):
        checkpoint.load_base_state(
            gpt2, checkpoint.read_tensors(saved / "model.safetensors"), source="base"
        )
    with pytest.raises(ValueError, match="already has codebooks"):
        HookedCodebookTransformer.from_pretrained(saved, CodebookConfig(n_codes=3))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="neither a codelens checkpoint nor a HuggingFace"):
        HookedCodebookTransformer.from_pretrained(not_a_model)
