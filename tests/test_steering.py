"""Topic steering: codelens.steering and the topic codes of codelens.analysis, and the
experiment (codelens.experiments.steering) with its quick pipeline against loose targets."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.analysis import (
    TopicCode,
    TopicSwap,
    token_strings,
    topic_codes,
    topic_stats,
    topic_swaps,
)
from codelens.analysis.topic_classifier import TopicClassifier
from codelens.data.stories import TOPICS, generate_stories
from codelens.data.text import train_bpe_tokenizer
from codelens.experiments.baselines import MEAN_DIFFERENCE
from codelens.experiments.steering import (
    QUICK,
    corpus_rows,
    regex_search,
    run_experiment,
    summary_line,
    swap_sets,
    write_report,
)
from codelens.steering import (
    SteeringTrial,
    _past_broken,
    continuation_texts,
    force_code_hooks,
    generate_texts,
    on_topic_share,
    option_hooks,
    option_record,
    perplexity,
    real_text_on_topic,
    steering_options,
    swap_code_hooks,
    sweep_steering,
)
from codelens.vocab import Code


@pytest.fixture(scope="module")
def stories():
    return generate_stories(40, seed=3)


@pytest.fixture(scope="module")
def tokenizer(stories):
    return train_bpe_tokenizer([s.text for s in stories], 400)


def _openings(tokenizer, stories, length):
    texts = [s.text for s in stories]
    return corpus_rows(tokenizer, texts, [0] * len(texts), length, one_per_text=True)[0]


def test_story_openings_start_with_bos_and_drop_short_stories(tokenizer, stories):
    tokens = _openings(tokenizer, stories, 20)
    assert tokens.shape == (len(stories), 21)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert tokens[0, 1:].tolist() == tokenizer.encode(stories[0].text)[:20]
    assert len(_openings(tokenizer, stories, 10_000)) == 0


def test_token_strings_spell_the_text(tokenizer, stories):
    tokens = _openings(tokenizer, stories[:3], 30)
    strings = token_strings(tokenizer, tokens)
    assert strings[0][0] == ""
    for row, story in zip(strings, stories[:3], strict=True):
        assert story.text.startswith("".join(row))


def test_continuation_texts_cut_at_end_of_text(tokenizer):
    eos = tokenizer.eos_token_id
    hello, world = tokenizer.encode(" hello"), tokenizer.encode(" world")
    row = [eos, 7, *hello, eos, *world]
    generated = [(torch.tensor([row]), 2), (torch.tensor([[eos, 7, *world, *hello]]), 2)]
    assert continuation_texts(tokenizer, generated) == [" hello", " world hello"]


def test_on_topic_share_uses_the_top_topic(stories):
    fit_on = generate_stories(200, seed=4)
    classifier = TopicClassifier.fit([s.text for s in fit_on], [s.topic for s in fit_on])
    texts = [s.text for s in stories if s.topic == "dragon"]
    assert on_topic_share(classifier, texts, "dragon") == 1.0
    assert on_topic_share(classifier, texts, "cake") == 0.0


def test_real_text_on_topic_judges_documents_cut_to_the_generation_length(tokenizer):
    classifier = TopicClassifier.fit(
        ["dragon cave wings", "dragon roar cave", "cake sugar icing", "sugar cake bake"],
        ["dragon", "dragon", "cake", "cake"],
    )
    # the opening words are the other topic's: only a long enough cut sees the dragons
    texts = [" sugar icing" + " dragon cave wings roar" * 3, " cake sugar bake icing"]
    labels = ["dragon", "cake"]
    short = len(tokenizer.encode(" sugar icing"))
    args = (classifier, tokenizer, texts, labels, ["dragon", "cake"])
    assert real_text_on_topic(*args, short) == {"dragon": 0.0, "cake": 1.0}
    assert real_text_on_topic(*args, 1000) == {"dragon": 1.0, "cake": 1.0}
    with pytest.raises(ValueError, match=r"topics \['pony'\] have no documents"):
        real_text_on_topic(classifier, tokenizer, texts, labels, ["pony"], 10)
    with pytest.raises(ValueError, match="n_tokens must be a positive int"):
        real_text_on_topic(*args, 0)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        real_text_on_topic(classifier, tokenizer, texts, labels[:1], ["dragon"], 10)


@torch.no_grad()
def test_perplexity_counts_only_the_new_tokens():
    model = tiny_model()
    tokens = torch.randint(0, 10, (3, 9))
    expected = math.exp(float(model(tokens, return_type="loss")))
    assert perplexity(model, [(tokens, 1)]) == pytest.approx(expected, rel=1e-4)
    half = perplexity(model, [(tokens, 5)])
    logprobs = model(tokens).log_softmax(-1)[:, 4:-1].gather(-1, tokens[:, 5:, None])
    assert half == pytest.approx(math.exp(-float(logprobs.mean())), rel=1e-4)


def test_experiment_topics_must_be_corpus_topics():
    with pytest.raises(ValueError, match=r"\['unicorn'\] are not corpus topics"):
        dataclasses.replace(QUICK, topics=("dragon", "unicorn"))


def test_generation_must_fit_the_models_context():
    model = tiny_model()  # n_ctx 64; the prompt "12" is BOS + 2 tokens
    (out,) = generate_texts(model, ("12",), samples=2, new_tokens=61, seed=0)
    tokens, prompt_length = out
    assert prompt_length == 3 and tokens.shape == (2, 64)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate_texts(model, ("12",), samples=2, new_tokens=62, seed=0)


def test_regex_search_scores_codes_against_own_and_base_neurons():
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2, sites=("attn", "mlp")))
    tokens = torch.randint(0, 10, (16, 10))
    tokens[:, 0] = 10  # BOS
    strings = [[" May" if t == 3 else " x" for t in row] for row in tokens.tolist()]
    rows = regex_search(model, tokens, strings, base=model)
    assert [r["pattern"] for r in rows] == ["month"]  # no other pattern has a match
    (month,) = rows
    assert month["positives"] == int((tokens[:, 1:] == 3).sum())
    base = tiny_model(seed=1)

    def silent(post, hook):  # every base neuron is 0 everywhere: no better than chance
        return torch.zeros_like(post)

    hooks = [(f"blocks.{layer}.mlp.hook_post", silent) for layer in range(base.cfg.n_layers)]
    with base.hooks(fwd_hooks=hooks):
        other = regex_search(model, tokens, strings, base=base)
    chance = month["positives"] / tokens[:, 1:].numel()
    assert other[0]["base_neuron_precision"] == pytest.approx(chance)
    assert month["neuron_precision"] > 2 * chance  # its own neurons, not the base's
    assert other[0]["neuron_precision"] == month["neuron_precision"]
    assert "base_neuron_precision" not in regex_search(model, tokens, strings)[0]


@pytest.fixture(scope="module")
def random_topic_stats():
    """A tiny codebook model and its topic stats on random tokens, 3 topics."""
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2))
    tokens = torch.randint(0, 10, (24, 12))
    topic_of_row = torch.arange(24) % 3
    return model, topic_stats(model, tokens, topic_of_row, 3)


def test_topic_codes_rank_by_precision_above_the_recall_floor(random_topic_stats):
    model, stats = random_topic_stats
    found = topic_codes(stats, top=4, min_recall=0.1, min_count=2)
    assert len(found) == 3
    for topic, picks in enumerate(found):
        assert picks, "random codes spread over every topic"
        precision = [p.precision for p in picks]
        assert precision == sorted(precision, reverse=True)
        assert all(p.recall >= 0.1 and p.count >= 2 for p in picks)
        assert {p.code.site for p in picks} <= set(model.codebooks)
        for p in picks:
            index = stats.firing.code_index(p.code)
            assert p.precision == float(stats.precision[index, topic])
            assert p.as_dict()["code"] == p.code.id and p.as_dict()["site"] == p.code.site


def test_topic_codes_one_per_head(random_topic_stats):
    _, stats = random_topic_stats
    found = topic_codes(stats, top=50, min_recall=0.1, min_count=2, one_per_head=True)
    every = topic_codes(stats, top=50, min_recall=0.1, min_count=2)
    for picks, all_picks in zip(found, every, strict=True):
        heads = [(p.code.site, p.code.group) for p in picks]
        assert len(heads) == len(set(heads)) and len(picks) < len(all_picks)
        assert picks[0] == all_picks[0]


def test_steering_options_go_from_swaps_to_many_heads():
    codes = [Code("s", g, g) for g in range(5)]
    swap = TopicSwap(TopicCode(Code("s", 0, 1), 0.9, 0.5, 10), (2,))
    swaps = {"first": [swap], "none": []}
    options = steering_options(codes, 8, swaps)
    assert options[:5] == [  # ever stronger: forced into 0, 1, 1.5, 2 and k/2 slots
        {"swaps": swaps["first"], "heads": "first", "force": f} for f in (0, 1, 1.5, 2, 4)
    ]
    forces = [o["force"] for o in steering_options(codes, 2, swaps) if "swaps" in o]
    assert forces == [0, 1, 1.5, 2]
    assert [o["force"] for o in steering_options(codes, 1, swaps) if "swaps" in o] == [0, 1]
    assert [o["slots"] for o in options[5::4]] == ["lowest", 4, "all"]
    for slots in ("lowest", 4, "all"):
        chosen = [o["codes"] for o in options if o.get("slots") == slots]
        assert chosen == [codes[:1], codes[:2], codes[:4], codes]
    assert all(o["slots"] == "all" for o in steering_options(codes, 1))
    assert {o["slots"] for o in steering_options(codes, 2)} == {"lowest", "all"}
    assert steering_options([], 8) == []
    record = option_record({**options[1], "on_topic": 0.5})
    assert record == {"swaps": [swap.as_dict()], "heads": "first", "force": 1, "on_topic": 0.5}
    record = option_record(options[5], lambda c: {"effect": c.id / 10})
    assert json.loads(json.dumps(record))["codes"] == [{**codes[0].as_dict(), "effect": 0.0}]


def test_sweep_steering_picks_the_most_on_topic_fluent_option():
    results = {1: (0.9, 30.0), 2: (0.6, 12.0), 3: (0.6, 11.0), 4: (0.2, 10.0)}
    tried = []

    def trial(option):
        tried.append(option["n"])
        on_topic, ppl = results[option["n"]]
        return SteeringTrial(on_topic, ppl, [f"text {option['n']}"])

    options = [{"n": n} for n in results]
    swept, best = sweep_steering(options, trial, perplexity_before=10.0, max_perplexity_ratio=2.0)
    assert [o["perplexity_ratio"] for o in swept] == [3.0, 1.2, 1.1, 1.0]
    assert best == {"n": 2, "on_topic": 0.6, "perplexity_ratio": 1.2}  # 1 is not fluent; tie: first
    swept, best = sweep_steering(
        options,
        trial,
        perplexity_before=10.0,
        max_perplexity_ratio=2.0,
        skip=lambda option, done: option["n"] == 2,
    )
    assert [o["n"] for o in swept] == [1, 3, 4] and best["n"] == 3
    assert (
        sweep_steering(options[:1], trial, perplexity_before=10.0, max_perplexity_ratio=2.0)[1]
        is None
    )


def test_sweep_steering_confirms_its_finalists_before_the_pick():
    first = {1: (0.9, 30.0), 2: (0.8, 12.0), 3: (0.7, 11.0), 4: (0.6, 10.0), 5: (0.5, 10.0)}
    again = {2: (0.4, 12.0), 3: (0.7, 40.0), 4: (0.7, 10.0)}
    confirmed = []

    def trial(option):
        return SteeringTrial(*first[option["n"]], [])

    def confirm(option):
        assert set(option) == {"n"}, "a finalist is confirmed with its settings alone"
        confirmed.append(option["n"])
        return SteeringTrial(*again[option["n"]], [])

    options = [{"n": n} for n in first]
    swept, best = sweep_steering(
        options, trial, perplexity_before=10.0, max_perplexity_ratio=2.0,
        confirm=confirm, finalists=3,
    )  # fmt: skip
    assert confirmed == [2, 3, 4]  # the three most on-topic fluent options; 1 is not fluent
    by_n = {o["n"]: o for o in swept}
    assert by_n[2]["on_topic"] == pytest.approx(0.6) and by_n[2]["first_on_topic"] == 0.8
    assert by_n[3]["perplexity_ratio"] == pytest.approx(math.sqrt(1.1 * 4.0))  # now broken
    assert by_n[4]["first_perplexity_ratio"] == 1.0 and "first_on_topic" not in by_n[5]
    assert best["n"] == 4 and best["on_topic"] == pytest.approx(0.65)  # 2 drew well once
    # no finalist stays fluent: the best unconfirmed fluent option
    again.update({2: (0.8, 100.0), 3: (0.7, 100.0), 4: (0.6, 100.0)})
    _, best = sweep_steering(
        options, trial, perplexity_before=10.0, max_perplexity_ratio=2.0,
        confirm=confirm, finalists=3,
    )  # fmt: skip
    assert best["n"] == 5
    confirmed.clear()  # no more fluent options than finalists: nothing to choose between
    _, best = sweep_steering(
        options, trial, perplexity_before=10.0, max_perplexity_ratio=2.0,
        confirm=confirm, finalists=4,
    )  # fmt: skip
    assert confirmed == [] and best == {"n": 2, "on_topic": 0.8, "perplexity_ratio": 1.2}
    with pytest.raises(ValueError, match="finalists must be >= 1"):
        sweep_steering(options, trial, perplexity_before=10.0, max_perplexity_ratio=2.0,
                       confirm=confirm, finalists=0)  # fmt: skip


def test_sweep_skips_more_forced_heads_once_fewer_broke_the_fluency_guard():
    broke = {"codes": [1], "slots": "all", "perplexity_ratio": 3.0}
    more = {"codes": [1, 2], "slots": "all"}
    assert _past_broken(more, [broke], limit=2.0)
    assert not _past_broken(more, [{**broke, "perplexity_ratio": 1.5}], limit=2.0)
    assert not _past_broken({**more, "codes": [1]}, [broke], limit=2.0)
    assert not _past_broken({**more, "slots": "lowest"}, [broke], limit=2.0)
    lowest = {**broke, "slots": "lowest"}
    assert _past_broken({**more, "slots": "lowest"}, [lowest], limit=2.0)
    swap = {"swaps": [], "heads": "all", "force": 2}
    assert not _past_broken(swap, [broke], limit=2.0)
    swap_broke = {**swap, "force": 1, "perplexity_ratio": 3.0}
    assert _past_broken(swap, [swap_broke], limit=2.0)
    assert not _past_broken({**swap, "heads": "first"}, [swap_broke], limit=2.0)
    assert not _past_broken({**swap, "force": 1}, [swap_broke], limit=2.0)
    assert not _past_broken(more, [swap_broke], limit=2.0)


def _topic_rows(n_rows, n_topics, length, vocab=13):
    """Random tokens whose rows each carry their topic's marker token often (the
    vocabulary's last ``n_topics`` ids; with 3 topics, 10 + topic)."""
    topic_of_row = torch.arange(n_rows) % n_topics
    first_marker = vocab - n_topics
    tokens = torch.randint(0, first_marker, (n_rows, length))
    marked = torch.rand(n_rows, length) < 0.5
    tokens = torch.where(marked, first_marker + topic_of_row[:, None], tokens)
    return tokens, topic_of_row


def test_topic_swaps_map_other_topics_codes_to_this_topics_best_code():
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=16, k=2))
    tokens, topic_of_row = _topic_rows(60, 3, 16)
    stats = topic_stats(model, tokens, topic_of_row, 3, skip=1)
    site = next(s for s in model.codebooks if s.endswith("attn.hook_z"))
    swaps = topic_swaps(stats, 0, sites=[site], min_count=3, target_precision=0.6)
    assert swaps, "marker tokens give every head topic codes"
    assert len({s.target.code.group for s in swaps}) == len(swaps), "one target per head"
    for s in swaps:
        target = s.target.code
        assert target.site == site and s.target.precision >= 0.6
        for code in s.sources:
            index = stats.firing.code_index(Code(site, target.group, code))
            assert int(stats.majority[index]) != 0
            assert float(stats.majority_precision[index]) >= 0.5
        head = [stats.firing.code_index(Code(site, target.group, c)) for c in range(16)]
        same_head = [
            i for i in head if float(stats.precision[i, 0]) >= 0.6 and int(stats.count[i]) >= 3
        ]
        assert s.target.recall == max(float(stats.recall[i, 0]) for i in same_head)
        assert s.as_dict() == {**s.target.as_dict(), "sources": list(s.sources)}
    with pytest.raises(ValueError, match="not above chance"):
        topic_swaps(stats, 0, source_precision=0.3)


def test_swap_sets_add_looser_targets_only_where_they_add_heads():
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=16, k=2))
    attention = [s for s in model.codebooks if s.endswith("attn.hook_z")]
    loosest_seen = False
    for n_topics in (5, 3, 2):
        tokens, topic_of_row = _topic_rows(240, n_topics, 16)
        stats = topic_stats(model, tokens, topic_of_row, n_topics, skip=1)
        source = 0.5 if n_topics > 2 else 0.75
        looser_seen = False
        for topic in range(n_topics):
            sets = swap_sets(model, stats, topic)
            loosest = topic_swaps(
                stats, topic, sites=attention, source_precision=source, target_precision=0.4
            )
            name = "all heads, targets 40% precise"
            if name in sets:  # at least twice chance, and not a set already there
                loosest_seen = True
                assert n_topics == 5 and sets[name] == loosest
                assert all(loosest != other for key, other in sets.items() if key != name)
            else:
                assert n_topics < 5 or not loosest or loosest in sets.values()
            strict = topic_swaps(stats, topic, sites=attention, source_precision=source)
            assert sets["all heads"] == strict
            assert sets["first-layer heads"] == topic_swaps(
                stats, topic, sites=attention[:1], source_precision=source
            )
            looser = topic_swaps(
                stats, topic, sites=attention, source_precision=source, target_precision=0.6
            )
            name = "all heads, targets 60% precise"
            if name in sets:
                looser_seen = True
                assert sets[name] == looser and len(looser) > len(strict)
            else:
                assert n_topics == 2 or len(looser) == len(strict)
        assert looser_seen == (n_topics > 2), "random marker codes give looser heads"
    assert loosest_seen, "five topics' random marker codes give 40% precise targets"


def _first_attention_site():
    """A tiny model (8 codes, k=2), its first attention site, that site's codes hook name
    and random tokens."""
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2))
    site = next(s for s in model.codebooks if s.endswith("attn.hook_z"))
    return model, site, f"{site}.hook_codes", torch.randint(0, 10, (3, 8))


def test_swap_code_hooks_swap_sources_and_optionally_force_the_target():
    model, site, name, tokens = _first_attention_site()
    _, clean = model.run_with_cache(tokens, names_filter=name)
    ids = clean[name][:, :, 1]
    source = int(ids[0, 0, 0])
    target = (source + 1) % 8
    swaps = [TopicSwap(TopicCode(Code(site, 1, target), 1.0, 1.0, 1), (source,))]
    with model.hooks(fwd_hooks=swap_code_hooks(model, swaps)):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    expected = torch.where(ids == source, target, ids)
    assert torch.equal(cache[name][:, :, 1], expected)
    assert torch.equal(cache[name][:, :, 0], clean[name][:, :, 0])
    with model.hooks(fwd_hooks=swap_code_hooks(model, swaps, force=1)):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    assert (cache[name][:, :, 1, -1] == target).all()
    assert torch.equal(cache[name][:, :, 1, 0], expected[..., 0])  # the other slot: swapped
    with model.hooks(fwd_hooks=swap_code_hooks(model, swaps, force=2)):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    assert (cache[name][:, :, 1] == target).all()
    for bad in (3, -1, 2.5, True, "1", float("nan")):
        with pytest.raises(ValueError, match=r"force must be a number in \[0, k=2\]"):
            swap_code_hooks(model, swaps, force=bad)


def test_a_fractional_force_puts_more_slots_where_targets_are_more_precise():
    model, site, name, tokens = _first_attention_site()
    swaps = [  # head 1's target is the more precise: 0.5 of the heads means head 1 alone
        TopicSwap(TopicCode(Code(site, 0, 3), 0.6, 1.0, 1), (7,)),
        TopicSwap(TopicCode(Code(site, 1, 5), 0.9, 1.0, 1), (7,)),
    ]
    for force, slots in ((0.5, (0, 1)), (1, (1, 1)), (1.5, (1, 2)), (2, (2, 2))):
        with model.hooks(fwd_hooks=swap_code_hooks(model, swaps, force=force)):
            _, cache = model.run_with_cache(tokens, names_filter=name)
        for head, (target, n) in enumerate(zip((3, 5), slots, strict=True)):
            forced = cache[name][:, :, head, 2 - n :] if n else cache[name][:, :, head, :0]
            assert (forced == target).all(), (force, head)
            if n < 2:  # the other slots keep the head's own codes (swapped 7s aside)
                assert not (cache[name][:, :, head, : 2 - n] == target).all()


def test_option_hooks_force_the_codes_at_every_position():
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2))
    site = next(s for s in model.codebooks if s.endswith("attn.hook_z"))
    tokens = torch.randint(0, 10, (2, 7))
    name = f"{site}.hook_codes"
    _, clean = model.run_with_cache(tokens, names_filter=name)
    for slots, forced in (("all", [0, 1]), ("lowest", [1])):
        option = {"codes": [Code(site, 1, 3)], "slots": slots}
        with model.hooks(fwd_hooks=option_hooks(model, option)):
            _, cache = model.run_with_cache(tokens, names_filter=name)
        assert (cache[name][:, :, 1, forced] == 3).all(), slots
        assert torch.equal(cache[name][:, :, 0], clean[name][:, :, 0]), "other heads kept"


def test_force_code_hooks_put_codes_of_one_head_together():
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2))
    site = next(s for s in model.codebooks if s.endswith("attn.hook_z"))
    codes = [Code(site, 1, 3), Code(site, 1, 5)]
    assert len(force_code_hooks(model, codes, "all")) == 1
    assert len(force_code_hooks(model, [*codes, Code(site, 0, 2)], "all")) == 2
    with pytest.raises(TypeError, match="Code"):
        force_code_hooks(model, [{"site": site, "group": 1, "code": 3}], "all")
    tokens = torch.randint(0, 10, (2, 6))
    _, cache = model.run_with_cache(tokens, names_filter=f"{site}.hook_codes")
    with model.hooks(fwd_hooks=force_code_hooks(model, codes, "all")):
        _, forced = model.run_with_cache(tokens, names_filter=f"{site}.hook_codes")
    ids = forced[f"{site}.hook_codes"]
    assert sorted(ids[0, 0, 1].tolist()) == [3, 5]
    assert torch.equal(ids[:, :, 0], cache[f"{site}.hook_codes"][:, :, 0])
    with model.hooks(fwd_hooks=force_code_hooks(model, codes[:1], "all")):
        _, forced = model.run_with_cache(tokens, names_filter=f"{site}.hook_codes")
    assert (forced[f"{site}.hook_codes"][:, :, 1] == 3).all(), "one code fills all k slots"


def _fake_report():
    code = {"site": "blocks.0.attn.hook_z", "group": 1, "code": 5}
    return {
        "experiment": {
            "model": {"model_type": "gpt_neox"},
            "codebook_stage": {"codebook": {"n_codes": 8, "k": 2}},
            "n_stories": 10,
            "seed": 0,
            "samples": 2,
            "unsteered_samples": 5,
            "new_tokens": 5,
        },
        "environment": {"torch": "2.0", "transformers": "5.0"},
        "heldout_loss": {"baseline": 1.0, "codebooks": 1.1, "ratio": 1.1},
        "classifier": {"fit_stories": 80, "heldout_stories": 40, "heldout_accuracy": 0.975},
        "regex": [
            {"pattern": "year", "positives": 3},
            {
                "pattern": "month",
                "positives": 4,
                **code,
                "precision": 0.9,
                "recall": 0.5,
                "neuron_precision": 0.4,
                "neuron_recall": 0.5,
                "precision_gain": 0.5,
                "base_neuron_precision": 0.7,
            },
        ],
        "steering": {
            "unsteered_perplexity": 5.0,
            "unsteered_example": "once",
            "topics": [
                {"topic": "cake", "before": 0.1},
                {
                    "topic": "boat",
                    "before": 0.1,
                    "after": 0.9,
                    "steer": {"codes": [{**code, "precision": 0.8, "recall": 0.2}], "slots": "all"},
                    "perplexity": 6.0,
                    "perplexity_ratio": 1.2,
                    "example": "a boat",
                },
            ],
        },
        "timings": {"total s": 1.0},
    }


def test_write_report_writes_markdown_json_and_html(tmp_path):
    write_report(_fake_report(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (
        "| boat | blocks.0.attn.hook_z, 1, 5 (all slots, every position) | 80.0 | 20.0 | "
        "10.0 (2.8-30.1) | 90.0 (52.9-97.8) |" in md  # Wilson 95%: 2 of 20, 7 of 8 generations
    )
    assert "| cake | none | | | 10.0 (2.8-30.1) | | | |" in md
    assert "4 prompts x 2 samples x 5 new tokens steered (5 samples unsteered)" in md
    assert "is right on 97.5% of 40 held-out stories." in md
    assert "| month | 4 | blocks.0.attn.hook_z, 1, 5 | 90.0 | 50.0 | 40.0 | 50.0 | 70.0 |" in md
    assert json.loads((tmp_path / "report.json").read_text())["heldout_loss"]["ratio"] == 1.1
    assert "Stack: torch 2.0, transformers 5.0." in md
    report = _fake_report()
    boat = report["steering"]["topics"][1]
    code = boat["steer"]["codes"][0]
    boat["steer"] = {"swaps": [{**code, "sources": [1, 2]}], "heads": "first", "force": 2}
    write_report(report, tmp_path)
    assert (
        "| boat | blocks.0.attn.hook_z, 1, 5 (other topics' codes swapped to these in first, "
        "forced in the 2 lowest slots) | 80.0 | 20.0 | 10.0 (2.8-30.1) | 90.0 (52.9-97.8) |"
    ) in (tmp_path / "report.md").read_text()
    assert "plotly" in (tmp_path / "report.html").read_text().lower()


def test_summary_line_counts_the_issue_targets():
    report = _fake_report()
    line = summary_line(report)
    # boat: 10% -> 90% at 1.2x perplexity; month: 50 points over its own neurons, 20 over
    # the base model's.
    assert line.startswith("steered (>=80% on topic from <=15%, perplexity <=2x): 1/2 topics; ")
    assert "over neurons: 1/2 (over the base model's: 0/2)" in line
    report["steering"]["topics"][1]["perplexity_ratio"] = 2.5
    assert "1/2 topics" not in summary_line(report)


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    """The whole pipeline on the quick preset; the targets are for the full run."""
    report = run_experiment(QUICK.with_run_dir(str(tmp_path)))
    assert 1.0 <= report["heldout_loss"]["ratio"] <= 1.5
    rows = report["steering"]["topics"]
    assert [r["topic"] for r in rows] == list(TOPICS[: len(rows)])
    for r in rows:
        assert r["candidates"], r
        if "after" not in r:
            continue
        steer = r["steer"]
        if "codes" in steer:
            pool = [(c["site"], c["group"], c["code"]) for c in r["candidates"]]
            assert all((c["site"], c["group"], c["code"]) in pool for c in steer["codes"])
            assert all(c["effect"] > 0 for c in steer["codes"]), steer
            effects = [c["effect"] for c in r["effects"]]
            assert effects == sorted(effects, reverse=True) and len(effects) == len(pool)
        else:
            assert steer["swaps"], r
            floor = 0.4 if "40%" in steer["heads"] else 0.6 if "60%" in steer["heads"] else 0.8
            assert all(s["sources"] and s["precision"] >= floor for s in steer["swaps"])
    assert sum("after" in r for r in rows) >= 3, rows
    # Steering raises the on-topic share. The quick model is too small to steer within the
    # fluency guard, but a topic's code forced into every slot at every position must put
    # the topic into more sweep texts than the same prompts and seeds unsteered: steering
    # that changed nothing would give exactly the unsteered share.
    rises = [
        max(o["on_topic"] for o in r["sweep"] if o.get("slots") == "all") - r["sweep_before"]
        for r in rows
    ]
    assert sum(rise > 0 for rise in rises) >= 3 and sum(rises) / len(rises) >= 0.1, rises
    found = [r for r in report["regex"] if "code" in r]
    assert len(found) == len(report["regex"]) == 5
    assert sum(r["precision"] >= r["neuron_precision"] for r in found) >= 3, found
    assert sum(r["precision"] >= r["base_neuron_precision"] for r in found) >= 3, found
    for name in ("report.md", "report.json", "report.html"):
        assert (tmp_path / name).is_file()
    circuit = report["circuit"]["levels"]
    assert circuit["components"]["methods"]["fast"]["faithfulness"] > 0.5, circuit
    assert (tmp_path / "circuits" / "circuits" / "codes-eap-ig.json").is_file()
    table = {r["method"]: r for r in report["baselines"]["rows"]}
    assert list(table)[0] == "codes"
    assert table["codes"]["regex_precision"] == pytest.approx(
        sum(r["precision"] for r in found) / len(found)
    )
    for r in table.values():
        assert 0 <= r["steering_success"] <= 1, r
        if r["method"] != MEAN_DIFFERENCE:  # a direction has no features to score on regexes
            assert 0 <= r["regex_precision"] <= 1, r
    direction = report["baselines"]["details"][MEAN_DIFFERENCE]["steering"]
    assert [r["topic"] for r in direction] == [r["topic"] for r in rows]
    assert "Codes against baselines" in (tmp_path / "report.md").read_text()
    assert [p["k"] for p in report["baselines"]["sae_sweep"]["points"]] == [4, 16]
    assert "### SAE L0 sweep" in (tmp_path / "report.md").read_text()
    assert report["classifier"]["heldout_accuracy"] >= 0.95, report["classifier"]
    probing = {r["method"] for r in report["baselines"]["probing"]["rows"]}
    assert {"codes (codebook model)", "SAE matched L0", "SAE best L0 (sweep)"} <= probing
    assert "### k-sparse probing of topics" in (tmp_path / "report.md").read_text()
