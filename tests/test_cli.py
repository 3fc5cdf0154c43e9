"""The command line, and the example configs it ships."""

import json
import re
from pathlib import Path

import pytest

from codelens.cli import main
from codelens.training.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    TrainConfig.from_file(path)


def test_train_an_example_config_end_to_end(tmp_path, capsys):
    config = Path(__file__).parent.parent / "examples" / "configs" / "tokfsm.yaml"
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "steps=6",
        "batch_size=8",
        "eval_every=3",
        "checkpoint_every=3",
        "model_config.n_layer=1",
        "warmup_steps=2",
    ]
    main(["train", str(config), *overrides])
    assert "trained 6 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "codelens.json").is_file()
    codebooks = Path(__file__).parent.parent / "examples" / "configs" / "tokfsm_codebooks.yaml"
    main(
        [
            "train",
            str(codebooks),
            f"run_dir={tmp_path / 'cb'}",
            f"model={tmp_path / 'run' / 'final'}",
            "steps=3",
            "warmup_steps=1",
            "batch_size=8",
            "codebook.n_codes=32",
            "codebook.mlp_n_codes=128",
            "eval_every=3",
            "init_samples=256",
        ]
    )
    out = capsys.readouterr().out
    assert "bottleneck_cost" in out
    main(["browse", str(tmp_path / "cb"), "-o", str(tmp_path / "codes.html"), "--sequences", "4"])
    page = (tmp_path / "codes.html").read_text()
    blob = re.search(r'<script type="application/json" id="codelens-data">(.*?)</script>', page)
    data = json.loads(blob.group(1))
    sites = {s["name"]: s for s in data["sites"]}
    assert set(sites) == {"blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"}
    assert data["n_tokens"] == 4 * 33  # 4 held-out sequences of the FSM's 33 tokens
    for name, site in sites.items():
        for group, dropped in zip(site["groups"], site["dropped"], strict=True):
            # k=1: every token picked one code of every group, and no code was left out
            assert dropped == 0 and sum(row[1] for row in group) == data["n_tokens"], name


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nstpes: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(bad)])
    assert exit_info.value.code == 2
    assert "did you mean 'steps'" in capsys.readouterr().err


@pytest.mark.parametrize("command, module", [("fsm", "tokfsm"), ("steer", "steering")])
def test_experiment_commands_pass_their_options(tmp_path, capsys, monkeypatch, command, module):
    import importlib

    experiment = importlib.import_module(f"codelens.experiments.{module}")
    seen = {}

    def fake_run(exp):
        seen["exp"] = exp
        return {"models": {}}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    monkeypatch.setattr(experiment, "summary_line", lambda report: "summary")
    main([command, "--quick", "--run-dir", str(tmp_path), "--seed", "5"])
    assert seen["exp"].run_dir == str(tmp_path) and seen["exp"].seed == 5
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out


def test_fsm_command_builds_another_fsm(tmp_path, monkeypatch, capsys):
    from codelens.experiments import tokfsm

    seen = {}

    def fake_run(exp):
        seen["exp"] = exp
        return {}

    monkeypatch.setattr(tokfsm, "run_experiment", fake_run)
    monkeypatch.setattr(tokfsm, "summary_line", lambda report: "summary")
    main(["fsm", "--run-dir", str(tmp_path), "--states", "60", "--successors", "6"])
    assert seen["exp"].fsm == {**tokfsm.FULL.fsm, "n_states": 60, "n_successors": 6}
    main(["fsm", "--quick", "--run-dir", str(tmp_path), "--fsm-seed", "7"])
    assert seen["exp"].fsm == {**tokfsm.QUICK.fsm, "seed": 7}


def test_circuit_command_finds_circuits_at_a_target_faithfulness(tmp_path, capsys):
    from conftest import tiny_model

    from codelens import CodebookConfig
    from codelens.circuits import Circuit

    run = tmp_path / "run"
    tiny_model("gpt2", CodebookConfig(n_codes=16, k=2)).save_pretrained(run / "final")
    (run / "config.json").write_text(json.dumps({"data": {"fsm": {}}}))  # the default FSM
    out = tmp_path / "out"
    args = ["circuit", str(run), "--pairs", "4", "-o", str(out), "--faithfulness"]
    main([*args, "0.8", "--methods", "eap,eap-ig", "--steps", "2"])
    printed = capsys.readouterr().out
    for level in ("components", "codes"):
        for method in ("eap", "eap-ig"):
            circuit = Circuit.load(out / "circuits" / f"{level}-{method}-f0.8.json")
            reached = circuit.settings["faithfulness"]
            assert circuit.method == method and circuit.level == level and reached >= 0.8
            assert f"| {level} | {method} | {len(circuit.edges)} |" in printed
    assert not (out / "report.json").exists()  # the tau study did not run
    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, bad])
        assert exit_info.value.code == 2
        assert "--faithfulness" in capsys.readouterr().err
    for extra, message in (
        (["--tau", "0.1"], "drop --tau"),
        (["--methods", "acdc"], "select by --tau"),
    ):
        with pytest.raises(SystemExit):
            main([*args, "0.8", *extra])
        assert message in capsys.readouterr().err
