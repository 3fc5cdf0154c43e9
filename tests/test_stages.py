"""Pipeline training stages: a finished stage is reused only when nothing it was
trained from has changed."""

import json

import torch

from codelens.experiments.stages import STAGE_FILE, train_stage
from codelens.experiments.tokfsm import _gpt2

FSM = {"fsm": {"n_states": 6, "n_successors": 2, "seq_len": 9, "seed": 0}}
MODEL = _gpt2(16, 1, 2, 32, 16)
BASE = {"steps": 3, "batch_size": 4, "lr": 1e-3, "eval_batches": 1}
CODEBOOKS = {**BASE, "codebook": {"n_codes": 8, "k": 1, "sites": ["attn"]}, "init_samples": 64}


def stage(run_dir, settings, base=None):
    return train_stage(run_dir, FSM, settings, base=base, model_config=MODEL, seed=0)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_finished_stage_is_reused_until_an_input_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    base_dir, coded_dir = tmp_path / "baseline", tmp_path / "codebooks"
    base = stage(base_dir, BASE)
    coded = stage(coded_dir, CODEBOOKS, base=str(base_dir / "final"))
    assert not base.reused and not coded.reused
    assert json.loads((coded_dir / STAGE_FILE).read_text())["files"]  # the base model's files

    metrics = (coded_dir / "metrics.jsonl").read_text()
    again = stage(coded_dir, CODEBOOKS, base=str(base_dir / "final"))
    assert again.reused and same_weights(again.model, coded.model)
    assert again.final_eval == coded.final_eval
    assert (coded_dir / "metrics.jsonl").read_text() == metrics  # not trained again

    assert not stage(coded_dir, {**CODEBOOKS, "lr": 2e-3}, base=str(base_dir / "final")).reused
    assert stage(coded_dir, {**CODEBOOKS, "lr": 2e-3}, base=str(base_dir / "final")).reused

    assert not stage(base_dir, {**BASE, "steps": 4}).reused  # the base model's bytes change
    rerun = stage(coded_dir, {**CODEBOOKS, "lr": 2e-3}, base=str(base_dir / "final"))
    assert not rerun.reused


def test_a_stage_without_its_record_trains_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    stage(tmp_path, BASE)
    (tmp_path / STAGE_FILE).unlink()  # e.g. a run dir from before stages were recorded
    assert not stage(tmp_path, BASE).reused
    assert stage(tmp_path, BASE).reused
