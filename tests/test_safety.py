"""Nothing lost, nothing silent (issue 26): saves that cannot destroy, tested by fault
injection (an error and a kill -9 at every step of a save, and at random moments),
concurrent saves, and clear errors instead of silent wrong results."""

import os
import random
import shutil
import signal
import time
import warnings

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig, HookedCodebookTransformer, checkpoint
from codelens.checkpoint import CheckpointError

CONFIG = CodebookConfig(n_codes=6, k=1, layers=(1,))


@pytest.fixture(scope="module")
def models():
    """Two models with the same layout and different weights: the 'old' and the 'new' save."""
    return tiny_model("gpt_neox", CONFIG, seed=0), tiny_model("gpt_neox", CONFIG, seed=1)


def _state(model):
    return checkpoint.base_state(model) | {
        f"codebook:{k}": v for k, v in checkpoint.codebook_state(model).items()
    }


def _saved_state(path):
    """What ``path`` holds, read the way a load reads it (finishing an interrupted save)."""
    with checkpoint.reading(path), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        checkpoint.read_manifest(path)
        base = checkpoint.read_tensors(path / checkpoint.BASE_FILE)
        codebooks = checkpoint.read_tensors(path / checkpoint.CODEBOOK_FILE)
    assert not [w for w in seen if ".codelens-" in str(w.message)]  # our leftovers are not stray
    return base | {f"codebook:{k}": v for k, v in codebooks.items()}


def _which(path, states):
    """The index of the model ``path`` holds, bit for bit; fails if it holds neither."""
    saved = _saved_state(path)
    for i, state in enumerate(states):
        if saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state):
            return i
    raise AssertionError(f"{path} holds neither the old nor the new model")


def _ours(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith(".codelens-"))


def _in_child(work):
    """Run ``work`` in a forked child (cheap: no re-import); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_status(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# ------------------------------------------------------------------ nothing lost


def test_resaving_keeps_the_users_files(models, tmp_path):
    """Re-saving used to delete every other file in the checkpoint directory."""
    old, new = models
    ck = tmp_path / "ck"
    old.save_pretrained(ck)
    (ck / "notes.txt").write_text("my notes")
    (ck / ".ipynb_checkpoints").mkdir()
    (ck / ".ipynb_checkpoints" / "a.ipynb").write_text("{}")
    new.save_pretrained(ck)
    assert (ck / "notes.txt").read_text() == "my notes"
    assert (ck / ".ipynb_checkpoints" / "a.ipynb").read_text() == "{}"
    assert _which(ck, [_state(old), _state(new)]) == 1
    assert _ours(ck) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("marker", ["hf_config", "codebooks.safetensors", "codelens.json"])
def test_a_directory_that_only_looks_like_a_checkpoint_is_refused(models, tmp_path, marker):
    """Any folder holding hf_config/, codebooks.safetensors or codelens.json used to be wiped."""
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "results.csv").write_text("a,b\n1,2\n")
    (folder / marker).mkdir() if "." not in marker else (folder / marker).write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete codelens checkpoint.*overwrite=True"):
        models[0].save_pretrained(folder)
    assert (folder / "results.csv").read_text() == "a,b\n1,2\n" and (folder / marker).exists()
    models[0].save_pretrained(folder, overwrite=True)
    assert (folder / "results.csv").read_text() == "a,b\n1,2\n"
    assert _which(folder, [_state(models[0])]) == 0


def test_a_damaged_checkpoint_may_be_resaved_an_incomplete_one_is_refused(models, tmp_path):
    states = [_state(m) for m in models]
    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])  # complete but damaged: a save repairs it
    models[1].save_pretrained(ck)
    assert _which(ck, states) == 1
    (ck / "codebooks.safetensors").unlink()  # incomplete: maybe not ours any more
    with pytest.raises(FileExistsError, match="codebooks.safetensors is missing"):
        models[0].save_pretrained(ck)


def test_a_checkpoint_hidden_by_an_older_codelens_crash_is_restored(models, tmp_path, tokens):
    """Older saves renamed the old checkpoint to .ck.old-*, then the new one into place;
    a crash between the two left no checkpoint at ck."""
    models[0].save_pretrained(tmp_path / ".ck.old-1a2b3c4d")
    (tmp_path / ".ck.tmp-5e6f7a8b").mkdir()  # a new one that was not finished
    with pytest.warns(UserWarning, match=r"restored .*ck from \.ck\.old-1a2b3c4d"):
        loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded(tokens), models[0](tokens))
    assert (tmp_path / ".ck.tmp-5e6f7a8b").is_dir()  # never deleted: maybe not ours


def test_a_file_destination_is_refused(models, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="it is a file"):
        models[0].save_pretrained(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_saved_files_get_the_users_umask(models, tmp_path):
    """Files used to be 0600 in 0700 directories, unreadable by a shared server's group."""
    previous = os.umask(0o022)
    try:
        models[0].save_pretrained(tmp_path / "ck")
    finally:
        os.umask(previous)
    entries = [tmp_path / "ck", *(tmp_path / "ck").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in entries}
    wrong = {
        p: oct(m)
        for p, m in modes.items()
        if m != (0o755 if os.path.isdir(tmp_path / p) else 0o644)
    }
    assert wrong == {}


def test_loading_ignores_stray_files_and_says_so_once(models, tmp_path, tokens):
    """Loading used to refuse a checkpoint with notes.txt or .ipynb_checkpoints/ beside it."""
    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)
    (ck / "notes.txt").write_text("hi")
    (ck / ".ipynb_checkpoints").mkdir()
    (ck / ".ipynb_checkpoints" / "x.json").write_text("{}")
    with pytest.warns(
        UserWarning, match=r"ignoring 2 file\(s\).*\.ipynb_checkpoints/x.json, notes.txt"
    ) as seen:
        loaded = HookedCodebookTransformer.from_pretrained(ck)
    assert len([w for w in seen if "ignoring" in str(w.message)]) == 1
    assert torch.equal(loaded(tokens), models[0](tokens))
    (ck / "tokenizer" / "added_tokens.json").write_text("{}")  # inside an entry it owns: refused
    with pytest.raises(CheckpointError, match="added_tokens.json is not listed"), pytest.warns():
        HookedCodebookTransformer.from_pretrained(ck)


# ------------------------------------------------------------------ fault injection

# Every file-system step a save takes: an error, or a kill, is injected at each call.
STEPS = [("os", "replace"), ("os", "mkdir"), ("os", "fsync"), ("os", "chmod"), ("shutil", "rmtree")]


def _count_steps(monkeypatch, fail_at=None, on_fail=None):
    """Wrap every step; the ``fail_at``-th call runs ``on_fail`` instead. Returns the counter."""
    calls = [0]
    modules = {"os": os, "shutil": shutil}
    wrapped = [(modules[m], name, getattr(modules[m], name)) for m, name in STEPS]
    wrapped.append((checkpoint, "save_file", checkpoint.save_file))
    for module, name, real in wrapped:

        def step(*args, _real=real, _name=name, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                on_fail(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, step)
    return calls


def _steps_in_a_save(models, path):
    """How many steps re-saving over a checkpoint takes (the longest kind of save)."""
    models[0].save_pretrained(path)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_steps(mp)
        models[1].save_pretrained(path)
    return calls[0]


def test_an_error_at_every_step_of_a_save_leaves_old_or_new(models, tmp_path):
    states = [_state(m) for m in models]
    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)
    n_steps = _steps_in_a_save(models, tmp_path / "count")
    assert n_steps > 25
    outcomes = []
    for step in range(1, n_steps + 1):
        models[0].save_pretrained(ck)

        def fail(name, step=step):
            raise OSError(f"injected failure in {name} at step {step}")

        with pytest.MonkeyPatch.context() as mp:
            _count_steps(mp, fail_at=step, on_fail=fail)
            try:
                models[1].save_pretrained(ck)
            except OSError as err:
                assert "injected failure" in str(err)
        outcomes.append(_which(ck, states))
        assert _ours(ck) == [], f"step {step} left {_ours(ck)}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "count"]
    assert 0 in outcomes and 1 in outcomes


def _kill_self(name):
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill_9_at_every_step_of_a_save_leaves_old_or_new(models, tmp_path):
    """A child killed at each file-system step of a save; the next load finds old or new."""
    states = [_state(m) for m in models]
    ck = tmp_path / "ck"
    n_steps = _steps_in_a_save(models, tmp_path / "count")
    recovered, outcomes = 0, []
    for step in range(1, n_steps + 1):
        models[0].save_pretrained(ck)

        def save_and_die(step=step):
            with pytest.MonkeyPatch.context() as mp:
                _count_steps(mp, fail_at=step, on_fail=_kill_self)
                models[1].save_pretrained(ck)

        assert _exit_status(_in_child(save_and_die)) == -signal.SIGKILL
        recovered += bool(_ours(ck))
        outcomes.append(_which(ck, states))
        assert _ours(ck) == []
    assert recovered > n_steps // 2 and 0 in outcomes and 1 in outcomes


def _started_child(work):
    """Fork a child that runs ``work`` and return its pid once it has begun ``work``
    (so the fork's own start-up time is not part of a random kill delay)."""
    read_end, write_end = os.pipe()

    def signalled():
        os.close(read_end)
        os.write(write_end, b"1")
        work()

    pid = _in_child(signalled)
    os.close(write_end)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    return pid


def test_kill_9_at_random_moments_leaves_old_or_new(models, tmp_path, tokens):
    """>= 50 saves in a child process killed at a random moment; nothing is ever lost."""
    states = [_state(m) for m in models]
    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)
    timing = tmp_path / "timing"
    models[0].save_pretrained(timing)
    start = time.perf_counter()
    models[1].save_pretrained(timing)  # a re-save, the kind every kill below interrupts
    duration = time.perf_counter() - start
    rng = random.Random(26)
    held, interrupted, kills = 0, 0, 0
    while kills < 50:
        target = 1 - held
        pid = _started_child(lambda target=target: models[target].save_pretrained(ck))
        time.sleep(rng.uniform(0, duration))
        os.kill(pid, signal.SIGKILL)
        if _exit_status(pid) != -signal.SIGKILL:
            continue  # the save finished before the kill: not a kill point
        kills += 1
        interrupted += bool(_ours(ck))
        held = _which(ck, states)
        assert _ours(ck) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "timing"]
    # Kill points are random, so only a share of them fall inside a staged save; the
    # every-step test above covers each step deterministically.
    assert interrupted >= 5, f"only {interrupted} of {kills} kills hit a save in progress"
    loaded = HookedCodebookTransformer.from_pretrained(ck)
    assert torch.equal(loaded(tokens), models[held](tokens))


def test_concurrent_saves_and_loads_are_serialised(models, tmp_path):
    """Four processes save into one directory while this one loads it: every load is whole."""
    states = [_state(m) for m in models]
    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)

    def save_repeatedly(i):
        for _ in range(3):
            models[i % 2].save_pretrained(ck)

    pids = [_in_child(lambda i=i: save_repeatedly(i)) for i in range(4)]
    seen, status = set(), {}
    while len(status) < len(pids):
        seen.add(_which(ck, states))
        for pid in set(pids) - set(status):
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status[pid] = os.waitstatus_to_exitcode(code)
    assert list(status.values()) == [0, 0, 0, 0]
    assert _which(ck, states) in (0, 1) and seen <= {0, 1}
    assert _ours(ck) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ------------------------------------------------------------------ all-or-nothing


def test_a_failed_add_codebooks_installs_nothing(tmp_path, tokens, monkeypatch):
    """A failed add_codebooks used to leave codebooks installed with codebook_config=None."""
    from codelens import _bridge

    model = tiny_model("gpt_neox")
    before = model(tokens)
    with pytest.raises(ValueError, match="must not repeat a layer"):
        CodebookConfig(n_codes=4, layers=(0, 0))
    install, installed = _bridge.install_site, []

    def fails_on_the_third_site(model, site, layer):
        if len(installed) == 2:
            raise RuntimeError("injected failure")
        installed.append(site)
        return install(model, site, layer)

    monkeypatch.setattr(_bridge, "install_site", fails_on_the_third_site)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_codebooks(CodebookConfig(n_codes=4))
    monkeypatch.undo()
    assert len(installed) == 2
    assert model.codebooks == {} and model.codebook_config is None
    assert not [name for name in model.hook_dict if "hook_codes" in name]
    assert torch.equal(model(tokens), before)
    model.add_codebooks(CodebookConfig(n_codes=4, layers=(0,)))  # a retry works
    model.save_pretrained(tmp_path / "ck")
    loaded = HookedCodebookTransformer.from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded(tokens), model(tokens))


def test_manifest_sites_are_cross_checked_against_the_config(models, tmp_path):
    """k edited from 1 to 2 in the config, digest re-sealed: used to load with other logits."""
    import json

    ck = tmp_path / "ck"
    models[0].save_pretrained(ck)
    manifest = json.loads((ck / "codelens.json").read_text())
    manifest["codebook"]["k"] = 2
    manifest["digest"] = checkpoint._digest(manifest)
    (ck / "codelens.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'sites' entry .* does not match"):
        HookedCodebookTransformer.from_pretrained(ck)


# ------------------------------------------------------------------ clear errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n_codes=2.5), "n_codes must be a whole number, got 2.5"),
        (dict(k=True), "k must be a whole number, got True"),
        (dict(mlp_groups=2.0), "mlp_groups must be a whole number"),
        (dict(mlp_n_codes="8"), "mlp_n_codes must be a whole number"),
        (dict(layers=(0.5,)), "layers entry must be a whole number, got 0.5"),
        (dict(sites="attn"), "sites must be a tuple of site kinds .* got the string 'attn'"),
        (dict(memory_budget_mb=float("nan")), "memory_budget_mb must be a finite number > 0"),
        (dict(memory_budget_mb=float("inf")), "memory_budget_mb must be a finite number > 0"),
        (dict(memory_budget_mb="big"), "memory_budget_mb must be a number"),
    ],
)
def test_config_values_are_checked_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        CodebookConfig(**fields)


# ------------------------------------------------------------------ non-finite values


def _poison(site, value=float("nan")):
    """A hook on a codebook site (it runs before the codebook) putting ``value`` in one entry."""

    def hook(x, hook):
        x = x.clone()
        x.view(-1)[0] = value
        return x

    return [(site, hook)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_codebook_input_stops_inference(models, tokens, value):
    """NaN at a codebook site used to quantise to finite codes and vanish."""
    site = "blocks.1.attn.hook_z"
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"NaN or inf .* codebook at {site}"):
        models[0].run_with_hooks(tokens, fwd_hooks=_poison(site, value))


def test_non_finite_codebook_input_in_training_is_kept_on_device_and_reported(models, tokens):
    """With autograd on (training), nothing syncs per forward: the flag is read later."""
    model = models[0]
    site = "blocks.1.hook_mlp_out"
    model.run_with_hooks(tokens, fwd_hooks=_poison(site))  # no error, no host sync
    assert model.nonfinite_sites() == [site]
    assert model.nonfinite_sites() == []  # read once, then cleared
    model(tokens)
    model.check_finite()  # clean input: nothing to report
    model.run_with_hooks(tokens, fwd_hooks=_poison(site))
    with pytest.raises(ValueError, match=f"NaN or inf in the input of the codebooks at {site}"):
        model.check_finite()


def test_training_names_the_site_a_nan_entered_at(tmp_path):
    from test_training import config

    from codelens.training.trainer import NonFiniteLossError, train

    model = tiny_model("gpt_neox", CodebookConfig(n_codes=8, k=1))

    def poison(step, metrics):
        if step == 2:
            with torch.no_grad():
                model.blocks[0].attn.W_O.fill_(float("nan"))  # NaN first at the MLP codebook

    cfg = config(tmp_path / "run", steps=4, codebook=None, log_every=100)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(NaN or inf reached the codebooks at"):
        train(cfg, model=model, on_step=poison, progress=False)


# ------------------------------------------------------------------ circuits


@pytest.fixture(scope="module")
def circuit_setup():
    from codelens.circuits import LogitDifference, Patcher, build_graph

    model = tiny_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 10, (2, 6), generator=gen)
    corrupted = torch.randint(0, 10, (2, 6), generator=gen)
    patcher = Patcher(model, build_graph(model), clean, corrupted=corrupted)
    return model, patcher, LogitDifference(torch.tensor([1, 2]), torch.tensor([3, 4]))


@pytest.mark.parametrize("method", ["acdc", "eap", "fast_path"])
@pytest.mark.parametrize("tau", [float("nan"), -0.1, float("inf"), "0.1"])
def test_circuit_thresholds_are_checked(circuit_setup, method, tau):
    """tau = NaN gave an all-edge circuit, a negative tau a no-edge one, without a word."""
    from codelens import circuits

    _, patcher, metric = circuit_setup
    with pytest.raises(ValueError, match="tau must be a"):
        getattr(circuits, method)(patcher, metric, tau=tau)


@pytest.mark.parametrize("method", ["acdc", "fast_path"])
def test_a_metric_returning_nan_stops_the_search(circuit_setup, method):
    from codelens import circuits

    _, patcher, metric = circuit_setup

    def broken(logits):
        return metric(logits) * float("nan")

    with pytest.raises(ValueError, match="broken returned nan: circuits cannot be judged"):
        getattr(circuits, method)(patcher, broken, tau=0.1, **({} if method == "acdc" else {}))


def test_eap_with_a_metric_returning_a_python_float(circuit_setup):
    from codelens.circuits import eap

    _, patcher, metric = circuit_setup
    with pytest.raises(ValueError, match="returned float .*not a Python float"):
        eap(patcher, lambda logits: float(metric(logits)), tau=0.1)


def test_patcher_refuses_a_graph_of_another_architecture(circuit_setup):
    """A GPT-NeoX graph (parallel MLPs) used to be accepted for a GPT-2 model."""
    from codelens.circuits import Patcher, build_graph

    gpt2, patcher, _ = circuit_setup
    neox_graph = build_graph(tiny_model("gpt_neox"))
    with pytest.raises(ValueError, match="another architecture: this model runs each MLP after"):
        Patcher(gpt2, neox_graph, patcher.clean, ablation="zero")


# ------------------------------------------------------------------ interventions


def test_interventions_inside_codebooks_bypassed_raise(models, tokens):
    """They used to be silent no-ops, even with positions past the sequence."""
    from codelens.interventions import CodeIntervention, force_codes, intervene

    model = models[0]
    site = "blocks.1.attn.hook_z"
    hooks = force_codes(model, site, 0, positions=[500])
    with model.codebooks_bypassed():
        with pytest.raises(RuntimeError, match=f"edits the codes at {site}, but the codebooks"):
            model.run_with_hooks(tokens, fwd_hooks=hooks)
        with pytest.raises(RuntimeError, match="bypassed"):
            with intervene(model, CodeIntervention.force(site, 0)):
                pass
        with pytest.raises(RuntimeError, match="bypassed"):
            with intervene(model, CodeIntervention.ablate(site, [0], mode="disable")):
                pass
        with model.hooks(fwd_hooks=[(f"{site}.hook_codes", lambda ids, hook: None)]):
            model(tokens)  # a hook that only reads codes is no intervention: allowed
    with intervene(model, CodeIntervention.force(site, 0)):
        with model.codebooks_bypassed(), pytest.raises(RuntimeError, match="bypassed"):
            model(tokens)


# ------------------------------------------------------------------ inputs and the CLI


def test_unclear_model_input_errors_are_clear(tmp_path):
    from conftest import ARCHS, digit_tokenizer

    gpt2 = tiny_model("gpt2")  # learned positions: 64 of them
    with pytest.raises(ValueError, match="input is 70 tokens long, but the model has 64 positions"):
        gpt2(torch.zeros(1, 70, dtype=torch.long))  # was an IndexError from the embedding
    with pytest.raises(ValueError, match="input is 8[01] tokens long"):
        tiny_model("gpt_neox")("1" * 80)  # text was silently cut to 64 tokens
    assert tiny_model("gpt_neox")(torch.zeros(1, 70, dtype=torch.long)).shape[1] == 70  # rotary
    for empty in ([], ""):
        with pytest.raises(ValueError, match="the input is empty"):
            gpt2(empty)
    small = HookedCodebookTransformer.from_config(
        dict(ARCHS["gpt2"], vocab_size=10), digit_tokenizer()
    )  # the tokenizer's <bos> is id 10
    with pytest.raises(ValueError, match=r"tokenizer's ids for this text must be in \[0, 10\)"):
        small("123")
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        HookedCodebookTransformer.from_config(
            dict(ARCHS["gpt2"], vocab_size=13), None, device="gpu"
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but this torch build has no usable"):
            HookedCodebookTransformer.from_config(
                dict(ARCHS["gpt2"], vocab_size=13), digit_tokenizer(), device="cuda"
            )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["circuit", "run", "--threads", "0"], "argument --threads: must be a whole number >= 1"),
        (["browse", "run", "--sequences", "0"], "argument --sequences: must be a whole number"),
        (["browse", "run", "--sequences", "-5"], "got -5"),
        (["browse", "run", "--block-len", "x"], "got 'x'"),
    ],
)
def test_cli_numbers_are_checked(argv, message, capsys):
    from codelens.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_output_onto_a_directory(tmp_path, models, capsys):
    from codelens.cli import main

    with pytest.raises(SystemExit, match="is a directory; give the HTML file to write"):
        main(["browse", str(tmp_path), "-o", str(tmp_path)])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    models[0].save_pretrained(tmp_path / "ck")
    with pytest.raises(SystemExit) as exit_:  # a refused save is a message, not a traceback
        main(["convert", str(tmp_path / "ck"), str(tmp_path / "mine")])
    assert exit_.value.code == 2
    assert "not a complete codelens checkpoint" in capsys.readouterr().err


def test_resuming_from_a_corrupted_newest_checkpoint_names_the_previous_one(tmp_path):
    from test_training import config

    from codelens.training.trainer import train

    cfg = config(tmp_path / "run", steps=4, checkpoint_every=2, keep_checkpoints=2)
    train(cfg, progress=False)
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    damaged = newest / "trainer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-9])
    with pytest.raises(CheckpointError, match=r"previous checkpoint .*step-00000002 is intact"):
        train(config(tmp_path / "run", steps=6, checkpoint_every=2), progress=False)


def test_training_checkpoints_get_the_umask_and_killed_ones_are_cleared(tmp_path):
    """Training checkpoints were written in 0700 temporary directories that a kill leaked."""
    from codelens.training import state as train_state

    model = tiny_model("gpt_neox", CodebookConfig(n_codes=4, k=1, layers=(0,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead, alive = root / ".tmp-999999999-0a1b2c3d", root / f".tmp-{os.getpid()}-0a1b2c3d"
    dead.mkdir()
    alive.mkdir()
    previous = os.umask(0o022)
    try:
        path = train_state.save_state(tmp_path, 3, model, optimizer, {}, keep=2)
    finally:
        os.umask(previous)
    assert not dead.exists() and alive.exists()  # another live process's is left alone
    modes = {p.stat().st_mode & 0o777 for p in [path, *path.rglob("*")]}
    assert modes <= {0o755, 0o644}, sorted(map(oct, modes))
