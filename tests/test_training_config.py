"""Tests for codelens.training.config.TrainConfig: parsing, overrides, validation, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codelens.training.config import ConfigFileNotFoundError, TrainConfig, apply_overrides

YAML = """\
run_dir: runs/tiny
model_config:
  model_type: gpt2
  n_layer: 2
  n_embd: 64
tokenizer: runs/tok
codebook: {n_codes: 100, k: 2, sites: [attn, mlp]}
data:
  source: corpus.txt
  block_len: 128
  text_column: text
steps: 1e4
batch_size: 8
lr: 3e-4
schedule: linear
warmup_steps: 100
"""


def base(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "run_dir": "runs/x",
        "model": "gpt2",
        "data": {"source": "corpus.txt", "block_len": 32},
        "steps": 100,
        "batch_size": 4,
    }
    d.update(kw)
    return d


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- reading --------------------------------------------------------------------------------


def test_from_yaml(tmp_path: Path):
    cfg = TrainConfig.from_file(write(tmp_path, "c.yaml", YAML))
    assert cfg.model == ""
    assert cfg.model_config == {"model_type": "gpt2", "n_layer": 2, "n_embd": 64}
    assert cfg.steps == 10_000 and isinstance(cfg.steps, int)  # YAML 1.1 leaves 1e4 a string
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.codebook == {"n_codes": 100, "k": 2, "sites": ["attn", "mlp"]}
    assert cfg.schedule == "linear" and cfg.warmup_steps == 100
    # defaults
    assert cfg.grad_accum == 1 and cfg.codebook_lr is None and cfg.weight_decay == 0.01
    assert cfg.train == "all" and cfg.init == "kmeans" and cfg.keep_checkpoints == 3
    assert cfg.device == "auto" and cfg.bf16 is False and cfg.grad_clip == 1.0


def test_from_yml_and_json(tmp_path: Path):
    cfg = TrainConfig.from_file(write(tmp_path, "c.yml", YAML))
    path = write(tmp_path, "c.json", json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(path) == cfg


def test_file_errors(tmp_path: Path):
    with pytest.raises(ConfigFileNotFoundError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        TrainConfig.from_file(write(tmp_path, "c.toml", "steps = 1"))
    with pytest.raises(ValueError, match="is empty"):
        TrainConfig.from_file(write(tmp_path, "empty.yaml", ""))
    with pytest.raises(ValueError, match="must hold a mapping"):
        TrainConfig.from_file(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="could not parse config file"):
        TrainConfig.from_file(write(tmp_path, "bad.json", "{not json"))
    with pytest.raises(ValueError, match="could not parse config file"):
        TrainConfig.from_file(write(tmp_path, "bad.yaml", "a: [1, 2\n"))


def test_unknown_keys_suggest_closest(tmp_path: Path):
    text = YAML + "stpes: 10\nlearning_rate: 0.1\nbacth_size: 3\n"
    with pytest.raises(ValueError) as err:
        TrainConfig.from_file(write(tmp_path, "c.yaml", text))
    msg = str(err.value)
    assert "unknown config keys" in msg
    assert "'stpes' (did you mean 'steps'?)" in msg
    assert "'bacth_size' (did you mean 'batch_size'?)" in msg
    assert "'learning_rate'" in msg and "valid keys:" in msg


def test_missing_required_keys():
    with pytest.raises(ValueError, match="missing required config keys: data, steps"):
        TrainConfig.from_dict({"run_dir": "r", "model": "gpt2", "batch_size": 2})
    with pytest.raises(ValueError, match="must be a mapping"):
        TrainConfig.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("steps", "abc", "steps must be an int, got 'abc'"),
        ("steps", 2.5, "steps must be an int, got 2.5"),
        ("batch_size", True, "batch_size must be an int, got True"),
        ("lr", "fast", "lr must be a float, got 'fast'"),
        ("lr", float("nan"), "lr must be finite"),
        ("bf16", "yes", "bf16 must be a bool, got 'yes'"),
        ("run_dir", 3, "run_dir must be a string, got 3"),
        ("data", [1], r"data must be a dict, got \[1\]"),
        ("codebook", "big", "codebook must be a dict, got 'big'"),
        ("grad_clip", "x", "grad_clip must be a float, got 'x'"),
        ("schedule", "cosin", r"schedule must be one of .*got 'cosin' \(did you mean 'cosine'\?\)"),
        ("train", "codebook", "train must be one of 'all', 'codebooks'"),
        ("init", 1, "init must be one of"),
    ],
)
def test_wrong_types_name_the_field(key: str, value: Any, message: str):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(base(**{key: value}))


def test_lenient_numbers():
    cfg = TrainConfig.from_dict(base(lr=1, steps=200.0, grad_clip=None, checkpoint_every="1e3"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.steps == 200 and isinstance(cfg.steps, int)
    assert cfg.grad_clip is None and cfg.checkpoint_every == 1000
    assert TrainConfig.from_dict(base(model=None, model_config={"model_type": "gpt2"})).model == ""


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "steps must be > 0, got 0"),
        ({"batch_size": -1}, "batch_size must be > 0"),
        ({"grad_accum": 0}, "grad_accum must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"codebook_lr": -1e-3}, "codebook_lr must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"warmup_steps": 100}, r"warmup_steps \(100\) must be less than steps \(100\)"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),
        ({"recon_weight": -1.0}, "recon_weight must be >= 0"),
        ({"init_samples": 0}, "init_samples must be > 0"),
        ({"dead_code_window": 0}, "dead_code_window must be > 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"eval_batches": 0}, "eval_batches must be > 0"),
        ({"log_every": 0}, "log_every must be > 0"),
        ({"checkpoint_every": -5}, "checkpoint_every must be >= 0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be > 0"),
        ({"device": "gpu"}, "device must be 'auto', 'cpu'"),
        ({"run_dir": " "}, "run_dir must be a non-empty path"),
        ({"tokenizer": ""}, "tokenizer must be a non-empty name or path"),
        ({"model": ""}, "give exactly one of model"),
        ({"model_config": {"model_type": "gpt2"}}, "give exactly one of model"),
        ({"model": "", "model_config": {"n_layer": 2}}, "model_config must contain a 'model_type'"),
        (
            {"train": "codebooks", "model": "", "model_config": {"model_type": "gpt2"}},
            "train='codebooks' needs a codebook config",
        ),
        ({"data": {}}, "data must contain exactly one of 'source'"),
        ({"data": {"source": "a.txt", "fsm": {}}}, "data must contain exactly one of 'source'"),
        ({"data": {"source": ""}}, "data.source must be a non-empty string"),
        ({"data": {"source": "a.txt", "block_len": 0}}, "data.block_len must be > 0"),
        ({"data": {"source": "a.txt", "block_len": "64"}}, "data.block_len must be an int"),
        ({"data": {"source": "a.txt", "text_column": 3}}, "data.text_column must be a non-empty"),
        ({"data": {"fsm": "abc"}}, "data.fsm must be a dict"),
        (
            {"data": {"source": "a.txt", "blok_len": 64}},
            r"unknown config key: 'data.blok_len' \(did you mean 'data.block_len'\?\)",
        ),
        (
            {"data": {"fsm": {}, "block_len": 64}},
            r"'data.block_len'; valid keys: data.fsm \(for FSM",
        ),
        (
            {"data": {"fsm": {"n_state": 5}}},
            r"'data.fsm.n_state' \(did you mean 'data.fsm.n_states'",
        ),
        ({"data": {"source": "a.txt", "vocab_size": 0}}, "data.vocab_size must be > 0"),
        (
            {"codebook": {"n_codes": 100, "mlp_n_codes": 400}, "init_samples": 300},
            r"init_samples \(300\) must be at least the largest codebook size \(400\)",
        ),
        ({"bf16": True, "device": "mps"}, "bf16=true trains with bf16 autocast on a CUDA GPU or"),
        ({"tf32": True, "device": "cpu"}, "tf32=true speeds up float32 matmuls on a CUDA GPU only"),
        ({"eval_micro_batch": -1}, "eval_micro_batch must be >= 0"),
        ({"codebook": {"n_codes": 0}}, "codebook.n_codes must be > 0"),
        ({"codebook": {"n_codes": 10, "k": 11}}, "k must be between 1 and n_codes=10"),
        ({"codebook": {"sites": []}}, "codebook.sites must be a non-empty list"),
        ({"codebook": {"sites": ["attn", "resid"]}}, "invalid codebook config.*sites"),
        ({"codebook": {"n_code": 10}}, r"'codebook.n_code' \(did you mean 'codebook.n_codes'"),
    ],
)
def test_validation(changes: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(base(**changes))


def test_valid_variants():
    cfg = TrainConfig.from_dict(
        base(
            data={"fsm": {"n_states": 5}},
            codebook={"n_codes": 16, "k": 1},
            train="codebooks",
            codebook_lr=1e-2,
            device="cuda:1",
            dead_code_window=10_000,
            eval_every=0,
            checkpoint_every=0,
        )
    )
    assert cfg.train == "codebooks" and cfg.data == {"fsm": {"n_states": 5}}


# --- overrides ------------------------------------------------------------------------------


def test_overrides(tmp_path: Path):
    path = write(tmp_path, "c.yaml", YAML)
    cfg = TrainConfig.from_file(
        path,
        [
            "data.block_len=64",
            "codebook.k=4",
            "lr=1e-3",
            "steps=500",
            "wandb=true",
            "tokenizer=null",
            "schedule=cosine",
            "codebook.sites=[mlp]",
            "run_dir=runs/other",
            "model_config.n_layer=4",
        ],
    )
    assert cfg.data["block_len"] == 64 and cfg.data["source"] == "corpus.txt"
    assert cfg.codebook == {"n_codes": 100, "k": 4, "sites": ["mlp"]}
    assert cfg.lr == pytest.approx(1e-3) and cfg.steps == 500 and cfg.wandb is True
    assert cfg.tokenizer is None and cfg.schedule == "cosine" and cfg.run_dir == "runs/other"
    assert cfg.model_config is not None and cfg.model_config["n_layer"] == 4


def test_override_creates_missing_dicts():
    d = apply_overrides(base(), ["codebook.n_codes=8", "data.fsm.n_states=3"])
    assert d["codebook"] == {"n_codes": 8}
    assert d["data"]["fsm"] == {"n_states": 3}


def test_override_does_not_mutate_input():
    original = base()
    apply_overrides(original, ["data.block_len=8"])
    assert original["data"]["block_len"] == 32


def test_override_errors(tmp_path: Path):
    path = write(tmp_path, "c.yaml", YAML)
    with pytest.raises(ValueError, match=r"'setps' \(did you mean 'steps'\?\)"):
        TrainConfig.from_file(path, ["setps=3"])
    with pytest.raises(ValueError, match=r"must look like key=value"):
        TrainConfig.from_file(path, ["steps"])
    with pytest.raises(ValueError, match="steps is not a dict field"):
        TrainConfig.from_file(path, ["steps.x=1"])
    with pytest.raises(ValueError, match="data.source is 'corpus.txt', not a dict"):
        TrainConfig.from_file(path, ["data.source.x=1"])
    with pytest.raises(ValueError, match="empty key part"):
        TrainConfig.from_file(path, ["data..x=1"])
    with pytest.raises(ValueError, match="steps must be an int, got 'abc'"):
        TrainConfig.from_file(path, ["steps=abc"])
    with pytest.raises(ValueError, match="list of 'key=value' strings"):
        apply_overrides(base(), "steps=3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data.block_len must be > 0"):
        TrainConfig.from_file(path, ["data.block_len=0"])


# --- round trips ----------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    cfg = TrainConfig.from_dict(base(codebook={"n_codes": 10, "k": 2}, lr=2e-3))
    d = cfg.to_dict()
    assert d["lr"] == 2e-3 and d["codebook"] == {"n_codes": 10, "k": 2}
    assert TrainConfig.from_dict(d) == cfg
    d["data"]["block_len"] = 1  # to_dict returns a copy
    assert cfg.data["block_len"] == 32


def test_save_is_atomic_json(tmp_path: Path):
    cfg = TrainConfig.from_dict(base())
    path = tmp_path / "run" / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert TrainConfig.from_file(path) == cfg
    cfg.save(path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]  # no temp files


def test_validate_after_manual_change():
    cfg = TrainConfig.from_dict(base())
    cfg.steps = "abc"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="steps must be an int, got 'abc'"):
        cfg.validate()
    cfg.steps = 50
    cfg.lr = 1  # normalised to float
    cfg.validate()
    assert isinstance(cfg.lr, float)
