"""The training loop: learning, exact resume after SIGKILL, codebook upkeep (several
processes: test_distributed.py)."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_FSM, TRAIN_NEOX, tiny_model, word_corpus

from codelens import CodebookConfig
from codelens.checkpoint import read_tensors
from codelens.data.fsm import FSMConfig, TokFSM
from codelens.training import state as train_state
from codelens.training.batches import StreamingBatches
from codelens.training.config import TrainConfig
from codelens.training.init import init_codebooks, kmeans
from codelens.training.trainer import NonFiniteLossError, lr_factor, train

SCRIPT = Path(__file__).parent / "scripts" / "train_run.py"
FSM, NEOX = TRAIN_FSM, TRAIN_NEOX


def config(run_dir, **overrides) -> TrainConfig:
    base = dict(
        run_dir=str(run_dir),
        data={"fsm": FSM},
        model_config=NEOX,
        codebook={"n_codes": 32, "k": 1},
        steps=30,
        batch_size=16,
        lr=3e-3,
        warmup_steps=3,
        eval_every=0,
        eval_batches=2,
        log_every=5,
        checkpoint_every=0,
        init_samples=512,
        seed=1,
    )
    return TrainConfig(**(base | overrides))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = Path(run_dir) / "final"
    return read_tensors(final / "model.safetensors") | read_tensors(final / "codebooks.safetensors")


def test_loss_falls_and_metrics_are_logged(tmp_path):
    result = train(config(tmp_path / "run", steps=60, eval_every=30), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert train_lines[-1]["lm_loss"] < train_lines[0]["lm_loss"] - 0.3
    usage = train_lines[-1]
    for key in ("dead_fraction", "entropy", "perplexity", "tokens"):
        assert f"blocks.0.hook_mlp_out/{key}" in usage
    assert usage["blocks.0.hook_mlp_out/tokens"] == 5 * 16 * 24  # token-level counts
    ev = result.final_eval
    assert {"lm_loss", "accuracy", "lm_loss_bypassed", "bottleneck_cost"} <= set(ev)
    # Trained through its codebooks, the model does worse without them.
    assert ev["lm_loss"] < ev["lm_loss_bypassed"] - 0.3
    assert ev["bottleneck_cost"] == pytest.approx(ev["lm_loss"] - ev["lm_loss_bypassed"])
    for site in result.model.codebooks:
        assert math.isfinite(ev[f"{site}/explained_variance"]), site
    assert (tmp_path / "run" / "final" / "codelens.json").is_file()


def test_killed_run_resumes_to_identical_weights(tmp_path):
    kwargs = dict(steps=40, checkpoint_every=4, keep_checkpoints=2, dead_code_window=1000)
    cfg_file = tmp_path / "cfg.json"
    reference = config(tmp_path / "reference", **kwargs)
    train(reference, progress=False)

    interrupted = config(tmp_path / "interrupted", **kwargs)
    cfg_file.write_text(json.dumps(interrupted.to_dict()))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(cfg_file), "0.15"])
    deadline = time.time() + 120
    while time.time() < deadline:
        done = train_state.checkpoint_dirs(tmp_path / "interrupted")
        if done and int(done[-1].name.split("-")[1]) >= 8:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # land somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = train_state.checkpoint_dirs(tmp_path / "interrupted")
    assert kept and int(kept[-1].name.split("-")[1]) < 40, "the run finished before it was killed"
    assert len(kept) <= 2
    subprocess.run([sys.executable, str(SCRIPT), str(cfg_file)], check=True, timeout=300)
    a, b = final_weights(tmp_path / "reference"), final_weights(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "interrupted" / "metrics.jsonl").open()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicate log lines


def test_dead_code_replacement_revives_dead_codes(tmp_path):
    def dead_after(window):
        model = tiny_model("gpt_neox", CodebookConfig(n_codes=64, k=1))
        with torch.no_grad():  # start with most codes far away from every activation
            for cb in model.codebooks.values():
                cb.codes[:, 8:] += 50.0
        cfg = config(
            tmp_path / f"w{window}",
            steps=20,
            init="random",
            dead_code_window=window,
            log_every=20,
            codebook=None,
            data={"fsm": dict(FSM, n_states=10)},
        )
        train(cfg, model=model, progress=False)
        last = [json.loads(x) for x in (tmp_path / f"w{window}" / "metrics.jsonl").open()][-1]
        return last["dead"]

    without, with_replacement = dead_after(None), dead_after(400)
    assert without > 0.6
    assert with_replacement < 0.25 * without


def test_kmeans_init_beats_random_init():
    fsm = TokFSM(FSMConfig(**FSM))
    batches = [fsm.sample(16, torch.Generator().manual_seed(i))[0] for i in range(2)]

    def recon(method):
        model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=1))
        init_codebooks(model, batches, method=method, generator=torch.Generator().manual_seed(0))
        model(batches[0])
        return float(model.reconstruction_loss().detach())

    random_error = recon("random")
    assert recon("kmeans") < 0.5 * random_error
    assert recon("kmeans++") < 0.5 * random_error


def test_kmeans_plus_plus_recovers_separated_clusters():
    centers = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    x = (centers[torch.arange(300) % 3] + 0.1 * torch.randn(300, 2))[None]
    found = kmeans(x, 3, plus_plus=True, generator=torch.Generator().manual_seed(0))[0]
    assert torch.cdist(found, centers).min(0).values.max() < 0.5


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=32, k=1))

    def poison(step, metrics):
        if step == 6:
            with torch.no_grad():
                model.original_model.get_input_embeddings().weight.fill_(float("nan"))

    cfg = config(tmp_path / "run", steps=20, checkpoint_every=5, codebook=None)
    with pytest.raises(NonFiniteLossError, match="step 6"):
        train(cfg, model=model, on_step=poison, progress=False)
    kept = train_state.checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000005"]
    weights = read_tensors(kept[0] / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_codebooks_only_training_leaves_base_weights(tmp_path):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=32, k=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "codebook" not in n}
    train(config(tmp_path / "run", steps=5, train="codebooks"), model=model, progress=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_schedules():
    cfg = config("x", steps=100, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == pytest.approx(0.0)
    assert lr_factor(55, config("x", steps=100, warmup_steps=10, schedule="linear")) == 0.5
    assert lr_factor(90, config("x", steps=100, schedule="constant")) == 1.0


def test_bad_data_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = config(
        tmp_path / "run",
        data={"source": str(empty), "block_len": 8},
        codebook=None,
        model_config=dict(NEOX, model_type="gpt_neox"),
    )
    with pytest.raises(ValueError, match="no non-empty documents"):
        train(cfg, progress=False)


def test_model_and_config_codebooks_must_agree(tmp_path):
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=1))
    with pytest.raises(ValueError, match="differs from the model's codebooks"):
        train(config(tmp_path / "run", steps=5), model=model, progress=False)


def test_continuing_from_a_saved_codebook_model_keeps_its_codebooks(tmp_path):
    first = train(config(tmp_path / "first", steps=5), progress=False)
    saved = {s: cb.codes.detach().clone() for s, cb in first.model.codebooks.items()}
    again = config(
        tmp_path / "again",
        steps=1,
        lr=1e-12,
        warmup_steps=0,
        codebook=None,
        model=str(tmp_path / "first" / "final"),
        model_config=None,
    )
    result = train(again, progress=False)
    for site, codes in saved.items():
        torch.testing.assert_close(
            result.model.codebook(site).codes.detach(), codes, atol=1e-6, rtol=0
        )


def test_codebooks_only_training_needs_codebooks(tmp_path):
    plain = train(config(tmp_path / "plain", steps=5, codebook=None), progress=False)
    assert plain.model.codebooks == {}
    again = config(
        tmp_path / "again",
        steps=5,
        train="codebooks",
        codebook=None,
        model=str(tmp_path / "plain" / "final"),
        model_config=None,
    )
    with pytest.raises(ValueError, match="the model has no codebooks"):
        train(again, progress=False)


@pytest.mark.parametrize("streaming", [False, True])
def test_trains_on_a_local_text_corpus(tmp_path, streaming):
    corpus = tmp_path / "corpus.txt"
    words = "the cat sat on the mat and the dog ran to the park with a red ball".split()
    docs = [" ".join(words[i % 7 :] + words[: i % 7]) for i in range(200)]
    corpus.write_text("\n\n".join(docs))
    cfg = config(
        tmp_path / "run",
        steps=12,
        log_every=3,
        codebook={"n_codes": 16, "k": 1},
        init_samples=256,
        data={
            "source": str(corpus),
            "block_len": 16,
            "vocab_size": 300,
            "eval_blocks": 4,
            "streaming": streaming,
        },
        model_config=dict(NEOX, max_position_embeddings=16),
    )
    result = train(cfg, progress=False)
    assert (tmp_path / "run" / "tokenizer").is_dir()
    assert len(result.model.tokenizer) == 293  # the BPE tokenizer trained on the corpus
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["lm_loss"] for x in lines if x["split"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    # The corpus is rotations of one sentence: a model that learned it predicts most tokens.
    assert result.final_eval["lm_loss"] < math.log(293) - 0.5
    assert result.final_eval["accuracy"] > 0.5


# ---------------------------------------------------------------- silent wrong results (issue 19)


def test_kmeans_refills_empty_clusters_with_new_samples():
    # Three points repeated 60, 20 and 20 times; B and C are close. Two seeds on copies of
    # A leave a cluster empty while another sits exactly on A, so re-seeding it with its
    # old sample keeps it empty for good: only a new sample can move it to B or C.
    a, b, c = torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([12.0, 0.0])
    x = torch.stack([a] * 60 + [b] * 20 + [c] * 20)[None]
    for seed in range(8):
        found = kmeans(x, 3, generator=torch.Generator().manual_seed(seed))[0]
        assert torch.cdist(torch.stack([a, b, c]), found).min(1).values.max() == 0, (seed, found)


def _varied_corpus(path: Path, n_docs: int = 300) -> Path:
    return word_corpus(path, n_docs, words_per_doc=12)


@pytest.mark.parametrize("streaming", [False, True])
def test_codebooks_initialise_from_enough_training_data(tmp_path, monkeypatch, streaming):
    from codelens.training import trainer

    seen = {}
    build_data, init_codebooks_ = trainer.build_data, trainer.init_codebooks

    def spy_data(*args, **kwargs):
        seen["source"] = build_data(*args, **kwargs)[0]
        return (seen["source"], *build_data(*args, **kwargs)[1:])

    def spy_init(model, batches, **kwargs):
        seen["init"] = torch.cat(list(batches))
        return init_codebooks_(model, seen["init"].split(8), **kwargs)

    monkeypatch.setattr(trainer, "build_data", spy_data)
    monkeypatch.setattr(trainer, "init_codebooks", spy_init)
    corpus = _varied_corpus(tmp_path / "corpus.txt")
    data = {"source": str(corpus), "block_len": 16, "vocab_size": 300, "eval_blocks": 4}
    cfg = config(
        tmp_path / "run",
        steps=4,
        codebook={"n_codes": 64, "k": 1},
        init_samples=400,
        data=data | {"streaming": streaming},
        model_config=dict(NEOX, max_position_embeddings=16),
    )
    train(cfg, progress=False)
    rows, held_out = seen["init"], seen["source"].held_out
    assert rows.numel() >= 400
    assert len({tuple(r) for r in rows.tolist()}) == len(rows), "every block once"
    assert not any(torch.equal(r, h) for r in rows for h in held_out), "no held-out block"

    small = dict(data, max_blocks=6)  # 2 training blocks: 32 tokens for 64 codes
    with pytest.raises(ValueError, match="needs at least 64 training tokens.*holds only 32"):
        train(dataclasses.replace(cfg, run_dir=str(tmp_path / "small"), data=small))


def test_streaming_initialisation_keeps_its_blocks_for_training():
    blocks = [torch.full((4,), i) for i in range(20)]
    plain = StreamingBatches(torch.stack(blocks), batch_size=2, eval_blocks=2)
    peeked = StreamingBatches(torch.stack(blocks), batch_size=2, eval_blocks=2)
    init = peeked.init_batches(12)
    assert torch.cat(init)[:, 0].tolist() == [2, 3, 4]
    for step in range(8):
        assert torch.equal(plain.batch(step), peeked.batch(step))


def test_returned_model_checks_token_ids_again(tmp_path):
    result = train(config(tmp_path / "run", steps=4), progress=False)
    assert result.model.validate_tokens
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 12\)"):
        result.model(torch.tensor([[1, 2, 12]]))


def test_sequences_longer_than_the_context_are_an_error(tmp_path):
    short = config(tmp_path / "fsm", model_config=dict(NEOX, max_position_embeddings=16))
    with pytest.raises(ValueError, match="sequences have 24 tokens but the model's context is 16"):
        train(short, progress=False)
    corpus = _varied_corpus(tmp_path / "corpus.txt", 50)
    text = config(
        tmp_path / "text",
        codebook=None,
        data={"source": str(corpus), "block_len": 80, "eval_blocks": 1},
    )
    model = tiny_model("gpt_neox")  # a context of 64 tokens
    with pytest.raises(ValueError, match="block_len 80 exceeds the model's context 64"):
        train(text, model=model, progress=False)


def test_resuming_applies_and_records_changed_settings_and_refuses_fixed_ones(tmp_path):
    first = config(tmp_path / "run", steps=6, checkpoint_every=3)
    train(first, progress=False)
    at_6 = final_weights(tmp_path / "run")
    saved = (tmp_path / "run" / "config.json").read_text()
    other_data = dataclasses.replace(first, batch_size=8, data={"fsm": dict(FSM, seed=4)})
    with pytest.raises(ValueError, match=r"cannot change: data: .*; batch_size: 16 -> 8\. Resume"):
        train(other_data, progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == saved
    # Two more steps at a vanishing learning rate: the new lr applies, not the saved 3e-3.
    longer = dataclasses.replace(first, steps=8, lr=1e-12)
    train(longer, progress=False)
    for name, value in final_weights(tmp_path / "run").items():
        torch.testing.assert_close(value, at_6[name], atol=1e-7, rtol=0, msg=name)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-12
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "config_changes.jsonl").open()]
    assert record == {"step": 6, "changes": {"steps": [6, 8], "lr": [0.003, 1e-12]}}


def test_bf16_off_cuda_and_cpu_is_an_error_not_a_quiet_fp32_run(tmp_path):
    with pytest.raises(ValueError, match="bf16=true trains with bf16 autocast on a CUDA GPU or"):
        config(tmp_path / "run", bf16=True, device="mps")
    assert not (tmp_path / "run").exists()


def test_ddp_batch_must_split_evenly_over_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="batch_size 16 does not split evenly over 3 processes"):
        train(config(tmp_path / "run"), progress=False)
