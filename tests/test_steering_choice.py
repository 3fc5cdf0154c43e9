"""Choosing how to steer (codelens.steering): measured code effects, the options built from
them, the fluency-guarded pick, and the activation-addition baseline."""

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.interventions import intervene
from codelens.steering import (
    CodeEffects,
    SteeringTrial,
    add_direction_hooks,
    choose_steering,
    code_effects,
    force_code_hooks,
    mean_difference_direction,
)
from codelens.vocab import Code, attn_site, mlp_site, resid_pre


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(codebook=CodebookConfig(n_codes=8, k=3, sites=("attn", "mlp")))


def _docs(seed, n=5, length=9):
    tokens = torch.randint(0, 10, (n, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 10  # BOS
    return tokens


@torch.no_grad()
def _mean_loglik(model, tokens, hooks=()):
    with intervene(model, list(hooks)):
        logprobs = model(tokens).log_softmax(-1)[:, :-1]
    return float(logprobs.gather(-1, tokens[:, 1:, None]).mean())


@pytest.mark.parametrize("slots", ["all", "lowest", 2])
def test_code_effects_equal_a_loop_over_codes(model, slots):
    codes = [Code(attn_site(0), 1, 3), Code(attn_site(1), 0, 5), Code(mlp_site(0), 0, 2)]
    codes.append(Code(attn_site(0), 2, 7))  # two codes of one site in one batch
    topic, other = _docs(1), _docs(2, n=7, length=12)
    effects = code_effects(model, codes, topic, other, slots=slots, batch_size=4)
    for i, code in enumerate(codes):
        hooks = force_code_hooks(model, [code], slots, positions=slice(1, None))
        d_topic = _mean_loglik(model, topic, hooks) - _mean_loglik(model, topic)
        d_other = _mean_loglik(model, other, hooks) - _mean_loglik(model, other)
        assert float(effects.topic[i]) == pytest.approx(d_topic, abs=1e-5)
        assert float(effects.other[i]) == pytest.approx(d_other, abs=1e-5)
        assert float(effects.effect[i]) == pytest.approx(d_topic - d_other, abs=1e-5)
        both = (d_topic * 5 * 8 + d_other * 7 * 11) / (5 * 8 + 7 * 11)
        assert float(effects.fluency[i]) == pytest.approx(both, abs=1e-5)
    assert effects.effect.abs().max() > 1e-3, "random codes change the likelihood"


def test_force_code_hooks_fill_as_many_lowest_slots_as_asked(model):
    site = attn_site(0)
    name = f"{site}.hook_codes"
    tokens = _docs(5)
    _, clean = model.run_with_cache(tokens, names_filter=name)
    for slots, filled in (("lowest", 1), (2, 2), ("all", 3)):
        with intervene(model, force_code_hooks(model, [Code(site, 1, 6)], slots)):
            _, forced = model.run_with_cache(tokens, names_filter=name)
        assert (forced[name][:, :, 1, 3 - filled :] == 6).all()
        assert torch.equal(forced[name][:, :, 1, : 3 - filled], clean[name][:, :, 1, : 3 - filled])
        assert torch.equal(forced[name][:, :, [0, 2, 3]], clean[name][:, :, [0, 2, 3]])
    two = [Code(site, 1, 6), Code(site, 1, 7)]
    with intervene(model, force_code_hooks(model, two, 2)):
        _, forced = model.run_with_cache(tokens, names_filter=name)
    assert sorted(forced[name][0, 0, 1, 1:].tolist()) == [6, 7]
    with pytest.raises(ValueError, match="do not fit 1 slots"):
        force_code_hooks(model, [*two, Code(site, 1, 5)], 1)
    with pytest.raises(ValueError, match=r"an int in \[1, k=3\]"):
        force_code_hooks(model, two, 4)


def test_a_code_that_changes_nothing_has_zero_effect():
    torch.manual_seed(0)
    model = tiny_model(codebook=CodebookConfig(n_codes=8, k=2, sites=("attn",)))
    layer = model.codebooks[attn_site(0)]
    with torch.no_grad():  # every code of head 1 is the same vector: forcing one is a no-op
        layer.codes[1] = layer.codes[1, :1].expand_as(layer.codes[1]).clone()
    codes = [Code(attn_site(0), 1, 4), Code(attn_site(0), 0, 4)]
    effects = code_effects(model, codes, _docs(1), _docs(2))
    assert effects.topic[0].abs() < 1e-5 and effects.other[0].abs() < 1e-5
    assert effects.effect[0].abs() < 1e-5 and effects.fluency[0].abs() < 1e-5
    assert effects.effect[1].abs() > 1e-4, "another head's code does change the text"


def test_code_effects_refuse_bad_input(model):
    code = Code(attn_site(0), 0, 1)
    assert code_effects(model, [], _docs(1), _docs(2)).ranked() == []
    with pytest.raises(ValueError, match="outside the codebook"):
        code_effects(model, [Code(attn_site(0), 0, 8)], _docs(1), _docs(2))
    with pytest.raises(ValueError, match="no codebook"):
        code_effects(model, [Code("blocks.9.attn.hook_z", 0, 1)], _docs(1), _docs(2))
    with pytest.raises(TypeError, match="Code"):
        code_effects(model, [(attn_site(0), 0, 1)], _docs(1), _docs(2))
    with pytest.raises(ValueError, match="slots must be"):
        code_effects(model, [code], _docs(1), _docs(2), slots="some")
    with pytest.raises(ValueError, match="other_tokens"):
        code_effects(model, [code], _docs(1), _docs(2)[:0])


def _effects(values):
    codes = tuple(Code(attn_site(0), g % 4, g) for g in range(len(values)))
    effect = torch.tensor(values, dtype=torch.float32)
    return CodeEffects(codes, effect, torch.zeros_like(effect), torch.zeros_like(effect))


def test_ranked_codes_keep_the_best_of_each_head_above_the_floor():
    effects = _effects([0.1, 0.5, -0.2, 0.3, 0.4, 0.0])  # codes 0 and 4 share head 0
    ranked = effects.ranked()
    assert [c.id for c in ranked] == [1, 4, 3]  # 0: head 0 taken; 2, 5: not positive
    assert [c.id for c in effects.ranked(2)] == [1, 4]
    assert [c.id for c in effects.ranked(one_per_head=False)] == [1, 4, 3, 0]
    assert effects.record(ranked[0]) == {"effect": 0.5, "topic": 0.5, "other": 0.0, "fluency": 0.0}


def test_choose_steering_takes_the_most_on_topic_option_within_the_fluency_guard(model):
    effects = _effects([0.5, 0.4, 0.3, 0.2])
    best_two = effects.ranked()[:2]
    tried = []

    def trial(option):  # fake generations: more codes are more on topic and less fluent
        tried.append(option)
        n = len(option["codes"])
        on_topic = (0.2 if option["slots"] == "all" else 0.08) * n + 0.05
        perplexity = 10.0 * (1 + 0.45 * n) if option["slots"] == "all" else 10.0
        return SteeringTrial(on_topic, perplexity, ["text"])

    swept, best = choose_steering(
        model, effects, trial, perplexity_before=10.0, max_perplexity_ratio=2.0, max_codes=4
    )
    # all slots: 1 code ratio 1.45, 2 codes 1.9 (fluent), 4 codes 2.8 (too much)
    assert best["codes"] == best_two and best["slots"] == "all"
    assert best["on_topic"] == pytest.approx(0.45)  # 2 codes
    lowest = [o for o in swept if o["slots"] == "lowest"]
    assert [len(o["codes"]) for o in lowest] == [1, 2, 4]  # always fluent, less on topic
    assert all(o["perplexity_ratio"] <= 2.0 or len(o["codes"]) == 4 for o in swept)
    assert tried[0]["codes"] == effects.ranked()[:1], "the best measured code is tried first"
    _, none = choose_steering(
        model, effects, trial, perplexity_before=1.0, max_perplexity_ratio=2.0, max_codes=4
    )
    assert none is None  # nothing passes the guard against a perplexity of 1


def test_choose_steering_skips_more_codes_once_fewer_broke_the_guard(model):
    def trial(option):
        return SteeringTrial(0.5, 30.0 if option["slots"] == "all" else 10.0, [])

    swept, _ = choose_steering(
        model, _effects([0.5, 0.4, 0.3]), trial, perplexity_before=10.0, max_codes=3
    )
    every = [len(o["codes"]) for o in swept if o["slots"] == "all"]
    assert every == [1]  # 2 and 3 codes not tried
    assert [len(o["codes"]) for o in swept if o["slots"] == "lowest"] == [1, 2, 3]


def test_mean_difference_direction_is_the_difference_of_means(model):
    topic, other = _docs(1), _docs(2, n=3, length=6)
    hook = resid_pre(1)
    direction = mean_difference_direction(model, hook, topic, other, start=2, batch_size=2)
    _, a = model.run_with_cache(topic, names_filter=hook)
    _, b = model.run_with_cache(other, names_filter=hook)
    expected = a[hook][:, 2:].reshape(-1, 32).mean(0) - b[hook][:, 2:].reshape(-1, 32).mean(0)
    assert direction.shape == (32,)
    torch.testing.assert_close(direction, expected, atol=1e-5, rtol=1e-5)


def test_add_direction_hooks_add_exactly_scale_times_direction_where_asked(model):
    hook = resid_pre(1)
    tokens = _docs(3, n=2, length=7)
    direction = torch.randn(32)
    _, clean = model.run_with_cache(tokens, names_filter=hook)
    hooks = add_direction_hooks(model, hook, direction, 2.5, positions=[1, 4])
    with intervene(model, hooks):
        _, steered = model.run_with_cache(tokens, names_filter=hook)
    change = steered[hook] - clean[hook]
    torch.testing.assert_close(change[:, [1, 4]], (2.5 * direction).expand(2, 2, 32))
    assert change[:, [0, 2, 3, 5, 6]].abs().max() == 0
    with pytest.raises(RuntimeError, match="boom"), intervene(model, hooks):
        raise RuntimeError("boom")
    _, after = model.run_with_cache(tokens, names_filter=hook)
    assert torch.equal(after[hook], clean[hook]), "no hook is left behind"
    with pytest.raises(ValueError, match="no hook"):
        add_direction_hooks(model, "blocks.9.hook_resid_pre", direction, 1.0)


def test_mean_difference_baseline_sweeps_its_scale_on_the_code_prompts(model):
    from types import SimpleNamespace

    from codelens.data.stories import TOPICS
    from codelens.experiments.baselines import steer_with_direction, unsteered
    from codelens.steering import steering_trial

    class Classifier:  # a fake: on the first topic when a text has more 1s than 2s
        def predict(self, texts):
            return [TOPICS[0] if t.count("1") > t.count("2") else "other" for t in texts]

    exp = SimpleNamespace(
        topics=(TOPICS[0],), topic_skip=2, samples=2, sweep_samples=2, new_tokens=6, seed=0,
        max_perplexity_ratio=100.0, sweep_perplexity_ratio=100.0, unsteered_samples=2,
        baselines={"direction_scales": [0.0, 30.0]}, finalists=0,
    )  # fmt: skip
    prompts = (("12", "3"), ("45", "6"))  # (eval, sweep)
    tokens = _docs(4, n=6, length=10)
    topic_of_row = torch.tensor([0, 1, 0, 2, 0, 3])
    plain = unsteered(model, Classifier(), exp, prompts)
    (row,) = steer_with_direction(
        model, tokens, topic_of_row, Classifier(), exp, plain, prompts, topics=TOPICS
    )
    assert row["topic"] == TOPICS[0] and row["hook"] == resid_pre(1)
    assert row["before"] == plain["before"][TOPICS[0]]
    assert [o["scale"] for o in row["sweep"]] == [0.0, 30.0]
    unsteered_sweep = steering_trial(
        model, model, Classifier(), TOPICS[0], None, prompts[1], samples=2, new_tokens=6, seed=200
    )
    zero = row["sweep"][0]  # adding nothing: exactly the unsteered sweep, same prompts and seeds
    assert zero["on_topic"] == unsteered_sweep.on_topic
    assert zero["perplexity_ratio"] == pytest.approx(1.0)
    assert row["scale"] in (0.0, 30.0) and 0 <= row["after"] <= 1
    assert row["sweep"][1]["perplexity_ratio"] != pytest.approx(1.0), "30x the direction acts"
    exp.finalists = 1  # the baseline's best option is confirmed, as the codes' are
    (row,) = steer_with_direction(
        model, tokens, topic_of_row, Classifier(), exp, plain, prompts, topics=TOPICS
    )
    assert sum("first_on_topic" in o for o in row["sweep"]) == 1
    assert not any(key in row for key in ("first_on_topic", "first_perplexity_ratio"))
