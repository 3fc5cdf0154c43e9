"""The TokFSM experiment: its measures on known cases, and the quick pipeline end to end."""

import json
from importlib.metadata import version

import pytest
import torch

from codelens.data.fsm import FSMConfig, TokFSM
from codelens.experiments.tokfsm import QUICK, _jsd, _successor_digit_dist, run_experiment


def test_jsd_bounds():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    torch.testing.assert_close(_jsd(p, q), torch.tensor([1.0, 0.0]))


def test_successor_digit_distribution():
    fsm = TokFSM(FSMConfig(n_states=20, n_successors=4, seq_len=25, seed=1))
    dist = _successor_digit_dist(fsm)
    torch.testing.assert_close(dist.sum(-1), torch.ones(20))
    first_digits = fsm.transitions // 10
    for s in range(20):
        assert set(torch.nonzero(dist[s]).flatten().tolist()) == set(first_digits[s].tolist())


def test_quick_pipeline_meets_its_thresholds(tmp_path, monkeypatch):
    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    report = run_experiment(QUICK.with_run_dir(str(tmp_path)))
    for name in ("report.md", "report.json", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert (
        json.loads((tmp_path / "report.json").read_text())["models"].keys()
        == report["models"].keys()
    )
    assert report["environment"]["transformers"] == version("transformers")
    base, coded = (report["models"][n] for n in ("no codebook", "attn+mlp k=1 C=200/800"))
    assert base["table1"]["transition_accuracy"] >= 0.9
    assert coded["table1"]["transition_accuracy"] >= 0.85
    assert coded["table1"]["loss"] - base["table1"]["loss"] <= 0.1
    codes = coded["state_codes"]
    assert codes["mean_best_code_precision"] >= 0.85
    assert codes["states_with_code"] == 20
    swaps = {row["intervention"]: row for row in coded["interventions"]}
    assert swaps["MLP, all layers"]["success_rate"] >= 0.7
    assert swaps["clean"]["success_rate"] <= 0.4  # without a swap the model stays with s
    assert swaps["MLP, all layers"]["trials"] == QUICK.transitions == 500
    rows = {row["method"]: row for row in report["baselines"]["rows"]}
    names = list(rows)
    assert names[0] == "codes: attn+mlp k=1 C=200/800"
    assert [n.split(" ")[0] for n in names[1:5]] == ["SAE", "SAE", "PCA", "ICA"]
    for row in rows.values():
        assert 0 <= row.get("state_precision", 0) <= 1 and 0 <= row.get("swap_success", 0) <= 1
    assert rows[names[0]]["state_precision"] == pytest.approx(
        sum(r["precision"] for r in codes["per_state"]) / len(codes["per_state"])
    )
    assert abs(rows["PCA (full basis)"]["loss_cost"]) < 1e-3  # a full basis loses nothing
    assert rows["activation patching at the sites (upper bound)"]["swap_success"] >= 0.9
    assert "Codes against baselines" in (tmp_path / "report.md").read_text()
    sweep = report["baselines"]["sae_sweep"]
    assert [p["k"] for p in sweep["points"]] == [4, 16] and sweep["best_k"] in (4, 16)
    assert names[1:3] == ["SAE matched L0", "SAE best L0 (sweep)"]
    assert rows[names[2]]["latents_per_token"] == 2 * 2 * sweep["best_k"]  # 2 layers x 2 sites
    assert "### SAE L0 sweep" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("n_states, n_successors, seed", [(12, 3, 7)])
def test_pipeline_holds_on_another_fsm(tmp_path, monkeypatch, n_states, n_successors, seed):
    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    exp = QUICK.with_run_dir(str(tmp_path))
    exp.fsm = dict(exp.fsm, n_states=n_states, n_successors=n_successors, seed=seed)
    exp.codebook_models = {"k1": dict(QUICK.codebook_models["attn+mlp k=1 C=200/800"])}
    exp.baselines = None  # measured by the test above
    report = run_experiment(exp)
    assert report["models"]["no codebook"]["table1"]["transition_accuracy"] >= 0.9
    assert report["models"]["k1"]["table1"]["transition_accuracy"] >= 0.85
