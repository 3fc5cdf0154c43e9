"""What a newcomer meets first: token checks without syncs, EOS and BOS from the tokenizer,
quiet loads and generation, clear load errors."""

import warnings

import pytest
import torch
from conftest import ARCHS, VOCAB, digit_tokenizer, tiny_model

import codelens.model as model_module
from codelens import HookedCodebookTransformer
from codelens.vocab import assert_token_ids_on_device

BOS, EOS = 10, 11


def count_checks(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    check = model_module.check_token_ids

    def counting(tokens, vocab_size):
        calls.append(tuple(tokens.shape))
        check(tokens, vocab_size)

    monkeypatch.setattr(model_module, "check_token_ids", counting)
    return calls


@pytest.mark.parametrize("cached", [True, False])
def test_generate_checks_the_prompt_once_not_every_step(monkeypatch, cached):
    model = tiny_model("gpt2")
    prompt = torch.tensor([[BOS, 1, 2, 3]])
    calls = count_checks(monkeypatch)
    out = model.generate(
        prompt, max_new_tokens=6, stop_at_eos=False, use_past_kv_cache=cached, verbose=False
    )
    assert out.shape == (1, 10)
    assert calls == [(1, 4)]
    model(prompt)  # a direct call on host memory is still checked
    assert len(calls) == 2 and model.validate_tokens


def test_the_device_check_reads_nothing_back_to_the_host(monkeypatch):
    def no_host_read(*args, **kwargs):
        raise AssertionError("a host read")

    for name in ("item", "tolist", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    assert_token_ids_on_device(torch.tensor([[0, 5, 12]]), VOCAB)
    # on a CPU the assertion fails at once; on an accelerator at the next sync
    with pytest.raises(RuntimeError, match=r"token ids must be in \[0, 13\)"):
        assert_token_ids_on_device(torch.tensor([[0, 13]]), VOCAB)
    with pytest.raises(ValueError, match="integer tensor"):
        assert_token_ids_on_device(torch.tensor([0.5]), VOCAB)


def test_to_tokens_checks_ids_against_the_model_vocabulary():
    config = dict(ARCHS["gpt_neox"], vocab_size=11)  # the tokenizer knows 13 tokens
    model = HookedCodebookTransformer.from_config(config, digit_tokenizer(), seed=0)
    with pytest.raises(
        ValueError, match=r"ids for this text must be in \[0, 11\) .*, got min 1, max 12"
    ):
        model.to_tokens("1x")  # x is <unk> = 12


def test_generate_stops_at_the_tokenizer_eos_not_at_a_config_default(arch):
    model = tiny_model(arch)
    assert model.cfg.eos_token_id == EOS
    assert model.original_model.config.eos_token_id == EOS
    torch.manual_seed(0)
    prompts = torch.full((32, 1), BOS)
    out = model.generate(prompts, max_new_tokens=12, verbose=False)[:, 1:]
    for row in out.tolist():
        stop = row.index(EOS) + 1 if EOS in row else len(row)
        assert all(t == EOS for t in row[stop:]), row  # padded only after EOS
    # GPT-NeoX's config default (eos_token_id=2) is the digit "2": rows used to end there
    cut_at_two = [r for r in out.tolist() if r[-4:] == [2, 2, 2, 2] and EOS not in r]
    assert not cut_at_two


def test_bos_is_prepended_by_default_as_in_training(tmp_path):
    model = tiny_model("gpt_neox")
    assert model.to_tokens("12").tolist() == [[BOS, 1, 2]]
    assert model.to_tokens("12", prepend_bos=False).tolist() == [[1, 2]]
    assert model.to_str_tokens("12")[0] == "<bos>"
    loaded = HookedCodebookTransformer.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.to_tokens("12").tolist() == [[BOS, 1, 2]]


def test_generate_and_moving_the_model_are_quiet(capsys):
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate("12", max_new_tokens=3, verbose=False)
        model.to("cpu")
    assert capsys.readouterr().out == ""


def test_a_mistyped_local_path_says_so_and_suggests_the_near_name(tmp_path, monkeypatch):
    saved = tiny_model("gpt2").save_pretrained(tmp_path / "runs" / "final")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model directory at .*fnal; did you mean"):
        HookedCodebookTransformer.from_pretrained("runs/fnal")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        HookedCodebookTransformer.from_pretrained("./missing")
    assert HookedCodebookTransformer.from_pretrained("runs/final").codebooks == {}
    assert saved.is_dir()


def test_a_hub_id_that_cannot_be_found_names_both_places_it_looked():
    with pytest.raises(OSError, match="is not a local directory .* not found on the HuggingFace"):
        HookedCodebookTransformer.from_pretrained("no-such-model-codelens-test")


def test_a_run_directory_points_to_its_final_model(tmp_path):
    run = tmp_path / "run"
    tiny_model("gpt2").save_pretrained(run / "final")
    (run / "config.json").write_text("{}")  # what the trainer writes next to final/
    with pytest.raises(ValueError, match=r"is a codelens training run, not a model; .*run/final"):
        HookedCodebookTransformer.from_pretrained(run)


def test_top_examples_are_the_strongest_firings_with_their_context():
    from codelens import CodebookConfig
    from codelens.analysis import top_examples
    from codelens.vocab import Code, codes_hook, mlp_site

    model = tiny_model("gpt_neox", CodebookConfig(n_codes=6, k=2, sites=("mlp",)))
    tokens = torch.randint(0, 10, (9, 10), generator=torch.Generator().manual_seed(1))
    site = mlp_site(1)
    _, cache = model.run_with_cache(tokens)
    ids = cache[codes_hook(site)][:, :, 0]
    code = Code(site, 0, int(ids[0, 0, 0]))
    found = top_examples(model, tokens, code, n=5, context=3, batch_size=4)
    fires = (ids == code.id).any(-1)
    assert len(found) == min(5, int(fires.sum()))
    cb = model.codebook(site)
    acts = cache[site].reshape(*tokens.shape, 1, cb.d)
    scores = cb.code_score(acts, 0, code.id)
    expected = scores[fires].sort(descending=True).values[:5]
    torch.testing.assert_close(torch.tensor([e.score for e in found]), expected)
    for example in found:
        assert fires[example.sequence, example.position]
        start = max(0, example.position - 2)
        want = [str(t) for t in tokens[example.sequence, start : example.position + 1].tolist()]
        assert list(example.tokens) == want
    assert str(found[0]).endswith(f"[[{found[0].tokens[-1]}]]")
    never = next(c for c in range(6) if not (ids == c).any())  # this seed leaves one unused
    assert top_examples(model, tokens, Code(site, 0, never)) == []
    with pytest.raises(ValueError, match="no codebook at 'blocks.0.attn.hook_z'"):
        top_examples(model, tokens, Code("blocks.0.attn.hook_z", 0, 1))
    with pytest.raises(ValueError, match="out of range"):
        top_examples(model, tokens, Code(site, 0, 6))


def test_progress_bars_are_silent_off_a_terminal_and_when_asked(monkeypatch, capsys):
    from codelens import progress

    assert list(progress.bar(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.bar(range(3), desc="x").disable
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.bar(range(3), desc="x").disable is not True


def test_batched_collection_checks_all_tokens_once_before_any_forward(monkeypatch):
    import codelens.vocab as vocab
    from codelens import CodebookConfig

    model = tiny_model("gpt2", CodebookConfig(n_codes=8, sites=("mlp",)))
    calls = []
    check = vocab.check_token_ids
    monkeypatch.setattr(vocab, "check_token_ids", lambda t, v: (calls.append(v), check(t, v)))
    tokens = torch.randint(0, 10, (10, 5), generator=torch.Generator().manual_seed(0))
    codes = vocab.collect_codes(model, tokens, batch_size=3)  # four batches
    assert calls == [VOCAB] and codes["blocks.0.hook_mlp_out"].shape == (10, 5, 1, 1)
    tokens[9, 4] = VOCAB
    forwards = []
    model.blocks[0].register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 13\) .*, got min 0, max 13"):
        vocab.collect_codes(model, tokens, batch_size=3)
    assert forwards == []  # refused before the first batch ran


def test_an_unfinished_run_says_its_model_is_not_written_yet(tmp_path):
    run = tmp_path / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"run_dir": "unfinished", "steps": 100}')
    with pytest.raises(ValueError, match=r"unfinished/final \(not written yet"):
        HookedCodebookTransformer.from_pretrained(run)
