"""Save/load: bit-exact round trips, atomic writes, and clear errors for bad checkpoints."""

import json
import random
import shutil

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
    with pytest.raises(FileExistsError, match="not a complete codelens checkpoint"):
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


# ------------------------------------------------------------------ integrity


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A saved tiny GPT-NeoX checkpoint and a second one of the same shapes."""
    root = tmp_path_factory.mktemp("pristine")
    tiny_model("gpt_neox", CodebookConfig(n_codes=10, k=1), seed=0).save_pretrained(root / "a")
    tiny_model("gpt_neox", CodebookConfig(n_codes=10, k=1), seed=1).save_pretrained(root / "b")
    return root / "a", root / "b"


def _change_a_field(value, rng):
    """The same JSON with one seeded leaf changed (recursing into objects and lists)."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        return {**value, key: _change_a_field(value[key], rng)}
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        return value[:i] + [_change_a_field(value[i], rng)] + value[i + 1 :]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + rng.choice([1, -1, 0.5])
    if isinstance(value, str):
        return value + "x" if value else "x"
    return 0 if value is None else None


def _corruptions(root, other, rng):
    """(what, file the error must cite, damage(case_dir)) for every file of ``root``."""
    files = checkpoint._files(root)
    for rel in files:
        size = (root / rel).stat().st_size
        partner = rng.choice([f for f in files if f != rel])
        pos, bit, keep = rng.randrange(size), rng.randrange(8), rng.randrange(size)

        def flip(case, rel=rel, pos=pos, bit=bit):
            data = bytearray((case / rel).read_bytes())
            data[pos] ^= 1 << bit
            (case / rel).write_bytes(bytes(data))

        def truncate(case, rel=rel, keep=keep):
            (case / rel).write_bytes((case / rel).read_bytes()[:keep])

        def delete(case, rel=rel):
            (case / rel).unlink()

        def swap(case, rel=rel, partner=partner):
            a, b = (case / rel).read_bytes(), (case / partner).read_bytes()
            (case / rel).write_bytes(b)
            (case / partner).write_bytes(a)

        def foreign(case, rel=rel):
            shutil.copy(other / rel, case / rel)

        yield f"flip a bit of {rel}", rel, flip
        yield f"truncate {rel}", rel, truncate
        yield f"delete {rel}", rel, delete
        yield f"swap {rel} and {partner}", (rel, partner), swap
        if (other / rel).read_bytes() != (root / rel).read_bytes():
            yield f"{rel} from another checkpoint", rel, foreign
        if rel.endswith(".json"):
            data = json.loads((root / rel).read_text())
            changed = _change_a_field(data, rng)
            if changed != data:

                def edit(case, rel=rel, changed=changed):
                    (case / rel).write_text(json.dumps(changed, indent=2))

                yield f"change a field of {rel}", rel, edit


@pytest.mark.parametrize("seed", range(3))
def test_seeded_corruption_sweep_names_the_file(pristine, tmp_path, seed):
    """Every damage to every file is a CheckpointError naming a damaged file."""
    source, other = pristine
    cases = list(_corruptions(source, other, random.Random(seed)))
    assert len(cases) > 30 and any("tokenizer/" in what for what, _, _ in cases)
    for i, (what, cited, damage) in enumerate(cases):
        case = tmp_path / str(i)
        shutil.copytree(source, case)
        damage(case)
        with pytest.raises(CheckpointError) as err:
            HookedCodebookTransformer.from_pretrained(case)
        names = (cited,) if isinstance(cited, str) else cited
        assert any(f"{case}/{name}" in str(err.value) for name in names), f"{what}: {err.value}"
        shutil.rmtree(case)
    HookedCodebookTransformer.from_pretrained(source)  # the undamaged original still loads


def _rewrite_manifest(path, edit):
    """Edit codelens.json and re-seal its digest, as a buggy writer would have."""
    manifest = json.loads((path / "codelens.json").read_text())
    edit(manifest)
    manifest["digest"] = checkpoint._digest(manifest)
    (path / "codelens.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["files"].pop("codebooks.safetensors"),
            "has no entry for codebooks.safetensors",
        ),
        (lambda m: m["files"].update({"codebooks.safetensors": ""}), "empty hash for codebooks"),
        (
            lambda m: m["files"].pop("hf_config/config.json"),
            "has no entry for hf_config/config.json",
        ),
        (
            lambda m: [m["files"].pop(k) for k in list(m["files"]) if k.startswith("tokenizer/")],
            "has no entry for tokenizer/",
        ),
        (lambda m: m.pop("files"), "lists no file hashes"),
    ],
)
def test_a_missing_or_empty_manifest_entry_is_an_error(saved, edit, message):
    """A flipped bit in a file the manifest does not hash must not load (issue 19.1)."""
    f = saved / "codebooks.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    _rewrite_manifest(saved, edit)
    with pytest.raises(CheckpointError, match=message):
        HookedCodebookTransformer.from_pretrained(saved)


def test_unlisted_files_and_old_versions_are_refused(saved):
    (saved / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"added_tokens\.json is not listed in"):
        HookedCodebookTransformer.from_pretrained(saved)
    (saved / "tokenizer" / "added_tokens.json").unlink()
    _rewrite_manifest(saved, lambda m: m.update(version=1))
    with pytest.raises(CheckpointError, match="format version 1 is not 2"):
        HookedCodebookTransformer.from_pretrained(saved)


def test_dtype_and_tokenizer_are_honoured(saved, tokens):
    """Both used to be ignored for a codelens directory (issue 19.6)."""
    fp32 = HookedCodebookTransformer.from_pretrained(saved)
    bf16 = HookedCodebookTransformer.from_pretrained(saved, dtype=torch.bfloat16)
    floats = [t for t in [*bf16.parameters(), *bf16.buffers()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert bf16.codebook("blocks.0.attn.hook_z").codes.dtype == torch.bfloat16
    with torch.no_grad():
        low, high = bf16(tokens), fp32(tokens)
    assert low.dtype == torch.bfloat16 and (low.float() - high).abs().max() < 0.1
    mine = digit_tokenizer()
    assert HookedCodebookTransformer.from_pretrained(saved, tokenizer=mine).tokenizer is mine


def test_base_model_is_only_for_the_authors_format(saved):
    with pytest.raises(ValueError, match="base_model= is for models in the paper authors"):
        HookedCodebookTransformer.from_pretrained(saved, base_model="EleutherAI/pythia-70m")


@pytest.mark.parametrize("codebook", ["Auto", "AUTO", "yes", 1])
def test_codebook_argument_is_checked(saved, codebook):
    """'Auto' used to load no codebooks without a word (issue 19.6)."""
    with pytest.raises(ValueError, match="codebook must be 'auto', None or a CodebookConfig"):
        HookedCodebookTransformer.from_pretrained(saved, codebook=codebook)


def test_trainer_state_files_are_verified(tmp_path):
    """trainer.json / trainer.safetensors are hashed like the model (issue 19.1)."""
    from codelens.training import state as train_state

    model = tiny_model("gpt_neox", CodebookConfig(n_codes=10, k=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = train_state.save_state(tmp_path, 7, model, optimizer, {"counts": torch.ones(3)}, keep=1)
    pristine = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    assert train_state.load_state(path, model, optimizer)[0] == 7
    meta = json.loads(pristine["trainer.json"])
    damages = {
        "trainer.json": json.dumps(meta | {"step": 8}).encode(),  # parses fine, wrong step
        "trainer.safetensors": pristine["trainer.safetensors"][:-7],
    }
    for name, damaged in damages.items():
        (path / name).write_bytes(damaged)
        with pytest.raises(CheckpointError, match=f"{path / name} is corrupted"):
            train_state.load_state(path, model, optimizer)
        (path / name).write_bytes(pristine[name])
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        train_state.load_state(path, model, optimizer)
