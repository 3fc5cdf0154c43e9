"""codelens.analysis: code precision/recall, neurons at matched recall, regex labels, search."""

import math

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.analysis import (
    CodeFiring,
    best_codes_for_labels,
    best_neurons_for_labels,
    code_firing,
    code_label_stats,
    codes_for_classes,
    neuron_precision_at_recall,
    regex_labels,
    search_codes,
)
from codelens.vocab import Code

# ---------------------------------------------------------------- a hand-built example
# Site "s0": 1 group, k=2, 4 codes -> indices 0-3. Site "s1": 2 groups, k=1, 3 codes ->
# group 0 is 4-6, group 1 is 7-9. Six tokens; tokens 0, 1 and 4 are labelled.
LABELS = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
S0 = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [0, 0], [-1, 3]])[:, None, :]
S1 = torch.tensor([[2, 0], [2, 0], [0, 0], [1, 0], [2, 0], [1, 0]])[:, :, None]


def hand_firing() -> CodeFiring:
    return code_firing({"s0": S0, "s1": S1}, {"s0": 4, "s1": 3})


def dense(firing: CodeFiring) -> torch.Tensor:
    """[N, C] bool: which codes fire where, built one code at a time (the slow reference)."""
    return torch.stack([firing.fires(i) for i in range(firing.n_codes_total)], dim=1)


def test_code_index_mapping():
    firing = hand_firing()
    assert firing.n_tokens == 6 and firing.n_codes_total == 10
    assert firing.offsets == (0, 4, 10)
    assert firing.code_index(Code("s1", 1, 2)) == 9
    for index in range(10):
        assert firing.code_index(firing.code(index)) == index
    site, group, code = firing.decode(torch.arange(10))
    assert site.tolist() == [0] * 4 + [1] * 6
    assert group.tolist() == [0] * 4 + [0, 0, 0, 1, 1, 1]
    assert code.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    token, index = firing.pairs()
    # token 4's repeated id 0 fires once; token 5's empty slot never fires
    assert (token == 4).sum() == 3 and (token == 5).sum() == 3
    assert firing.fires(0).tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="unknown site"):
        firing.code_index(Code("nope", 0, 0))


def test_hand_built_precision_and_recall():
    stats = code_label_stats(hand_firing(), LABELS)
    assert stats.n_positive == 3 and stats.n_tokens == 6
    assert stats.count.tolist() == [4, 2, 2, 2, 1, 2, 3, 6, 0, 0]
    assert stats.hits.tolist() == [3, 1, 1, 0, 0, 0, 3, 3, 0, 0]
    expected_p = [3 / 4, 1 / 2, 1 / 2, 0, 0, 0, 1, 1 / 2, 0, 0]
    expected_r = [1, 1 / 3, 1 / 3, 0, 0, 0, 1, 1, 0, 0]
    assert stats.precision.tolist() == pytest.approx(expected_p)
    assert stats.recall.tolist() == pytest.approx(expected_r)
    assert stats.f1[0].item() == pytest.approx(2 * 0.75 / 1.75)


def test_best_codes_ranked_by_precision_then_recall():
    matches = best_codes_for_labels(hand_firing(), LABELS, min_count=1, top=4)
    found = [m.code for m in matches]
    # the perfect code, then 3/4, then p=1/2 with recall 1 before p=1/2 with recall 1/3
    assert found == [Code("s1", 0, 2), Code("s0", 0, 0), Code("s1", 1, 0), Code("s0", 0, 1)]
    perfect = matches[0]
    assert (perfect.precision, perfect.recall, perfect.count, perfect.f1) == (1.0, 1.0, 3, 1.0)
    assert perfect.index == 6
    frequent = best_codes_for_labels(hand_firing(), LABELS, min_count=4, top=10)
    assert [m.code for m in frequent] == [Code("s0", 0, 0), Code("s1", 1, 0)]


def test_best_codes_ranked_by_f1_then_precision():
    # Code 0 fires on one of five labelled tokens (precision 1, recall 1/5); code 1 on
    # all five and one more (precision 5/6, recall 1). k=2 slots, one group.
    ids = torch.full((10, 1, 2), -1)
    ids[0, 0, 0] = 0
    ids[:6, 0, 1] = 1
    firing = code_firing({"s": ids}, 2)
    labels = torch.arange(10) < 5
    by_precision = best_codes_for_labels(firing, labels, min_count=1)
    assert [m.code.id for m in by_precision] == [0, 1]
    by_f1 = best_codes_for_labels(firing, labels, min_count=1, rank_by="f1")
    assert [m.code.id for m in by_f1] == [1, 0]
    assert [m.f1 for m in by_f1] == pytest.approx([10 / 11, 1 / 3])
    with pytest.raises(ValueError, match="rank_by must be"):
        best_codes_for_labels(firing, labels, rank_by="recall")


def test_labels_may_have_the_token_shape():
    ids = {"a": S1.reshape(2, 3, 2, 1)}
    firing = code_firing(ids, 3)
    assert firing.token_shape == (2, 3)
    flat = code_label_stats(firing, LABELS)
    shaped = code_label_stats(firing, LABELS.reshape(2, 3))
    assert torch.equal(flat.hits, shaped.hits)
    with pytest.raises(ValueError, match="labels has shape"):
        code_label_stats(firing, LABELS.reshape(3, 2))


def test_codes_for_classes_hand_built():
    classes = torch.tensor([0, 0, 1, 2, 0, -1])
    result = codes_for_classes(hand_firing(), classes, 3)
    assert result.class_count.tolist() == [3, 1, 1]
    # code 0 (s0/0) fires on tokens 0, 1, 3, 4 -> classes 0, 0, 2, 0
    assert result.cooccurrence[0].tolist() == [3, 0, 1]
    assert result.majority[0] == 0
    assert result.majority_precision[0] == 0.75 and result.majority_recall[0] == 1.0
    # code 9 never fires: no majority class
    assert result.majority[9] == -1 and result.majority_precision[9] == 0
    # class 0: s1/g0/2 is perfect; class 2: s0/3 fires at tokens 3, 5 (p 1/2, r 1) and
    # s1/g0/1 at tokens 3, 5 too: equal precision and recall, so the lower index (3) wins
    assert result.best_code.tolist()[0] == 6
    assert result.best_precision[0] == 1.0 and result.best_recall[0] == 1.0
    assert result.best_code[2] == 3
    assert result.table()[0] == {
        "class": 0,
        "site": "s1",
        "group": 0,
        "code": 2,
        "precision": 1.0,
        "recall": 1.0,
        "count": 3,
    }


def test_codes_for_classes_matches_a_per_code_loop():
    gen = torch.Generator().manual_seed(1)
    ids = {
        "x": torch.randint(-1, 7, (300, 3, 2), generator=gen),
        "y": torch.randint(0, 5, (300, 1, 3), generator=gen),
    }
    firing = code_firing(ids, {"x": 7, "y": 5})
    classes = torch.randint(-1, 4, (300,), generator=gen)
    result = codes_for_classes(firing, classes, 4, min_count=3)
    fires = dense(firing)
    for c in range(4):
        in_c = classes == c
        hits = (fires & in_c[:, None]).sum(0)
        count = fires.sum(0)
        torch.testing.assert_close(result.cooccurrence[:, c], hits)
        prec = hits.double() / count.clamp(min=1)
        rec = hits.double() / in_c.sum()
        torch.testing.assert_close(result.precision[:, c], prec)
        torch.testing.assert_close(result.recall[:, c], rec)
        key = [
            (prec[i].item(), rec[i].item(), -i) if count[i] >= 3 and hits[i] > 0 else None
            for i in range(firing.n_codes_total)
        ]
        best = max((k for k in key if k is not None), default=None)
        assert result.best_code[c] == (-best[2] if best else -1)
        # one label = one class: the same numbers as the binary statistics
        stats = code_label_stats(firing, in_c)
        torch.testing.assert_close(stats.precision, result.precision[:, c])


# ---------------------------------------------------------------- neurons


def reference_best_neuron(neurons, labels, recall):
    """The paper's procedure, one neuron and sign at a time."""
    positives = int(labels.sum())
    m = math.ceil(recall * positives - 1e-6)
    best = None
    for d in range(neurons.shape[1]):
        for sign in (1, -1):
            values = sign * neurons[:, d]
            threshold = values[labels].sort(descending=True).values[m - 1]
            fired = values >= threshold
            hits = int((fired & labels).sum())
            key = (hits / int(fired.sum()), hits, -d, sign)
            if best is None or key > best[0]:
                best = (key, threshold.item())
    (precision, hits, neg_d, sign), threshold = best
    return precision, -neg_d, threshold, sign, hits / positives


def test_neuron_perfect_at_half_recall_but_not_at_full():
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    x = torch.tensor([10.0, 9, 1, 0, 2, 3, -1, -2])[:, None]
    assert neuron_precision_at_recall(x, labels, 0.5) == (1.0, 0, 9.0, 1)
    precision, neuron, threshold, sign = neuron_precision_at_recall(x, labels, 1.0)
    assert (precision, neuron, threshold, sign) == (pytest.approx(4 / 6), 0, 0.0, 1)


def test_negative_neuron_and_best_neuron_index():
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    good = -torch.tensor([10.0, 9, 1, 0, 2, 3, -1, -2])
    noise = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])
    neurons = torch.stack([noise, good], dim=1)
    match = neuron_precision_at_recall(neurons, labels, 0.5)
    assert match == (1.0, 1, 9.0, -1)
    assert (
        (match.sign * neurons[:, match.neuron] >= match.threshold) == labels.bool()
    ).sum() == 8 - 2


def test_ties_fire_together_and_report_achieved_recall():
    labels = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    relu = torch.tensor([5.0, 0, 0, 0, 0, 0])[:, None]
    full = best_neurons_for_labels(relu, labels, [1.0, 0.5])
    # at recall 1 the threshold is 0: every token at 0 fires with it
    assert full[0] == (pytest.approx(1 / 3), 0, 0.0, 1)
    assert full.fires[0] == 6 and full.recall[0] == 1.0
    assert full[1] == (1.0, 0, 5.0, 1) and full.recall[1] == 0.5
    tied = torch.tensor([5.0, 5, 0, 0, 1, 2])[:, None]
    half = best_neurons_for_labels(tied, labels, 0.5)
    assert half.precision[0] == 1.0 and half.recall[0] == 1.0 and half.hits[0] == 2


def test_batched_equals_unbatched_and_reference():
    gen = torch.Generator().manual_seed(0)
    n, d = 120, 23
    neurons = (torch.randn(n, d, generator=gen) * 2).round()  # many ties
    neurons[:, 5] += 3 * torch.arange(n).remainder(3).eq(0)  # a useful neuron
    labels = torch.stack(
        [torch.arange(n).remainder(3).eq(0), torch.rand(n, generator=gen) < 0.3], dim=1
    )
    labels = labels[:, [0, 1, 0, 1, 0]]
    recalls = torch.tensor([0.25, 0.5, 1.0, 1.0, 0.6])
    # a tiny memory budget forces one-neuron chunks
    batched = best_neurons_for_labels(neurons, labels, recalls, memory_budget_mb=1e-4)
    whole = best_neurons_for_labels(neurons, labels, recalls)
    for name in ("precision", "recall", "neuron", "sign", "threshold", "hits", "fires"):
        torch.testing.assert_close(getattr(batched, name), getattr(whole, name))
    for i in range(len(recalls)):
        single = neuron_precision_at_recall(neurons, labels[:, i], recalls[i])
        assert single == batched[i]
        precision, neuron, threshold, sign, achieved = reference_best_neuron(
            neurons, labels[:, i], recalls[i].item()
        )
        assert batched[i] == (pytest.approx(precision), neuron, threshold, sign)
        assert batched.recall[i].item() == pytest.approx(achieved)


def test_tokfsm_flow_state_codes_vs_neurons():
    classes = torch.tensor([0, 0, 1, 2, 0, -1])
    per_class = codes_for_classes(hand_firing(), classes, 3)
    found = per_class.best_code >= 0
    labels = classes.reshape(-1, 1) == found.nonzero().reshape(1, -1)
    neurons = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    matches = best_neurons_for_labels(neurons, labels, per_class.best_recall[found])
    assert len(matches) == 3
    for i, c in enumerate(found.nonzero().squeeze(1).tolist()):
        expected = neuron_precision_at_recall(neurons, classes == c, per_class.best_recall[c])
        assert matches[i] == expected


def test_one_label_many_recalls():
    gen = torch.Generator().manual_seed(3)
    neurons = torch.randn(50, 7, generator=gen)
    labels = torch.rand(50, generator=gen) < 0.4
    many = best_neurons_for_labels(neurons, labels, [0.1, 0.5, 0.9])
    for i, r in enumerate([0.1, 0.5, 0.9]):
        assert many[i] == neuron_precision_at_recall(neurons, labels, r)


# ---------------------------------------------------------------- regex labels


def test_regex_labels_with_spans_crossing_tokens():
    tokens = ["The", " year", " 20", "19", " was", " 2", "0", "20", "!"]
    labels = regex_labels(tokens, r"\b2\d{3}\b")
    assert labels.tolist() == [False, False, True, True, False, True, True, True, False]
    only_year = regex_labels(tokens, r"year (\d+)", group=1)
    assert only_year.nonzero().squeeze(1).tolist() == [2, 3]
    named = regex_labels(tokens, r"year (?P<y>\d+)", group="y")
    assert torch.equal(named, only_year)
    assert not regex_labels(tokens, r"x*").any()  # empty matches label nothing
    batch = regex_labels([tokens, tokens[::-1]], r"The")
    assert batch.shape == (2, 9) and batch[0, 0] and batch[1, 8] and batch.sum() == 2


def test_regex_labels_errors():
    with pytest.raises(ValueError, match="invalid regular expression"):
        regex_labels(["a"], r"(unclosed")
    with pytest.raises(ValueError, match="different lengths"):
        regex_labels([["a"], ["a", "b"]], "a")
    with pytest.raises(ValueError, match="has 0 groups"):
        regex_labels(["a"], "a", group=1)
    with pytest.raises(ValueError, match="empty"):
        regex_labels([], "a")


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors():
    firing = hand_firing()
    with pytest.raises(ValueError, match="labels has shape"):
        code_label_stats(firing, LABELS[:5])
    with pytest.raises(ValueError, match="no positive"):
        best_codes_for_labels(firing, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels is empty"):
        code_label_stats(firing, torch.zeros(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        code_label_stats(firing, LABELS.long())
    with pytest.raises(ValueError, match=r"must be in \[-1, 4\)"):
        code_firing({"s0": S0 + 2}, 4)
    with pytest.raises(ValueError, match="covers? tokens"):
        code_firing({"s0": S0, "s1": S1[:5]}, 4)
    with pytest.raises(ValueError, match="no entry for site"):
        code_firing({"s0": S0}, {"s1": 4})
    with pytest.raises(ValueError, match=r"classes must be in \[-1, 2\)"):
        codes_for_classes(firing, torch.tensor([0, 1, 2, 0, 0, 0]), 2)
    neurons = torch.randn(6, 3)
    with pytest.raises(ValueError, match="labels must be"):
        best_neurons_for_labels(neurons, LABELS[:4], 0.5)
    with pytest.raises(ValueError, match=r"recalls must be in \(0, 1\]"):
        best_neurons_for_labels(neurons, LABELS, [0.0])
    with pytest.raises(ValueError, match=r"label columns \[1\] have no positive"):
        best_neurons_for_labels(
            neurons, torch.stack([LABELS, torch.zeros(6, dtype=torch.bool)], 1), [0.5, 0.5]
        )
    with pytest.raises(ValueError, match="do not match"):
        best_neurons_for_labels(neurons, torch.stack([LABELS, LABELS], 1), [0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        best_neurons_for_labels(torch.full((6, 2), math.nan), LABELS, 0.5)


# ---------------------------------------------------------------- end to end on a model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=1))


MLP0 = "blocks.0.hook_mlp_out"
LABELLED_POSITIONS = [3, 7, 8]


def force_code_3(ids, hook):
    """Code 3 of the layer-0 MLP exactly at the labelled positions, never elsewhere."""
    ids = torch.where(ids == 3, 4, ids)
    ids[:, LABELLED_POSITIONS] = 3
    return ids


def test_search_codes_finds_a_forced_code(model):
    tokens = torch.randint(0, 10, (6, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros_like(tokens, dtype=torch.bool)
    labels[:, LABELLED_POSITIONS] = True
    with model.hooks(fwd_hooks=[(f"{MLP0}.hook_codes", force_code_3)]):
        result = search_codes(model, tokens, labels, batch_size=4, min_count=2, top=5)
        _, cache = model.run_with_cache(tokens)
    best = result.matches[0]
    assert best.code == Code(MLP0, 0, 3)
    assert (best.precision, best.recall, best.count) == (1.0, 1.0, 18)

    # batched caching equals one full forward
    sites = list(model.codebooks)
    full = code_firing({s: cache[f"{s}.hook_codes"] for s in sites}, {s: 16 for s in sites})
    assert torch.equal(result.firing.ids, full.ids)
    assert result.firing.ids.shape == (72, 2 * (4 + 1))
    assert result.neuron_hooks == (("blocks.0.mlp.hook_post", 64), ("blocks.1.mlp.hook_post", 64))
    acts = torch.cat([cache[n].reshape(72, -1) for n, _ in result.neuron_hooks], dim=1)
    torch.testing.assert_close(result.neuron_acts, acts)

    # each neuron's numbers are what its threshold gives, at no less than the code's recall
    assert len(result.neurons) == len(result.matches)
    for i, match in enumerate(result.matches):
        precision, neuron, threshold, sign = result.neurons[i]
        fired = sign * acts[:, neuron] >= threshold
        hits = (fired & result.labels).sum().item()
        assert precision == pytest.approx(hits / fired.sum().item())
        assert hits / result.labels.sum().item() >= match.recall - 1e-9
    rows = result.table()
    assert rows[0]["site"] == MLP0 and rows[0]["code"] == 3
    assert rows[0]["neuron"].startswith("blocks.") and "precision_gain" in rows[0]
    assert rows[0]["precision_gain"] == pytest.approx(1.0 - rows[0]["neuron_precision"])


def test_search_codes_options(model):
    tokens = torch.randint(0, 10, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = tokens < 4
    labels[0, 0] = True
    mask = torch.ones_like(labels)
    mask[:, 0] = False
    result = search_codes(
        model,
        tokens,
        labels,
        sites=[MLP0],
        neuron_hooks=("blocks.1.hook_resid_post",),
        min_count=1,
        token_mask=mask,
    )
    assert result.firing.sites == (MLP0,) and result.firing.n_tokens == 27
    assert result.neuron_acts.shape == (27, 32)
    assert result.labels.sum() == (labels & mask).sum()
    bare = search_codes(model, tokens, labels, neuron_hooks=(), min_count=1)
    assert bare.neurons is None and bare.neuron_acts is None
    assert "neuron" not in bare.table()[0]


def test_search_result_for_labels_equals_a_fresh_search(model):
    tokens = torch.randint(0, 10, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    first = search_codes(model, tokens, tokens < 3, token_mask=mask, min_count=1, top=4)
    again = first.for_labels((tokens > 6)[mask], min_count=1, top=4)
    fresh = search_codes(model, tokens, tokens > 6, token_mask=mask, min_count=1, top=4)
    assert again.table() == fresh.table() and again.table() != first.table()
    assert torch.equal(again.labels, fresh.labels)
    by_f1 = search_codes(model, tokens, tokens > 6, token_mask=mask, min_count=1, rank_by="f1")
    assert by_f1.table() == first.for_labels((tokens > 6)[mask], min_count=1, rank_by="f1").table()
    f1s = [row["f1"] for row in by_f1.table()]
    assert f1s == sorted(f1s, reverse=True)
    with pytest.raises(ValueError, match="no positive"):
        first.for_labels(torch.zeros(first.firing.n_tokens, dtype=torch.bool))


def test_search_codes_bad_inputs(model):
    tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = tokens == 1
    with pytest.raises(ValueError, match="labels has shape"):
        search_codes(model, tokens, labels[:, :5])
    with pytest.raises(ValueError, match="no codebook at sites"):
        search_codes(model, tokens, labels, sites=["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="no hook points"):
        search_codes(model, tokens, labels, neuron_hooks=("mlp.hook_nonsense",))
    with pytest.raises(ValueError, match="no positive"):
        search_codes(model, tokens, torch.zeros_like(labels))
