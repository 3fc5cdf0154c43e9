"""Circuits at a target faithfulness: the size search, verified with forwards."""

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.circuits import (
    KLDivergence,
    LogitDifference,
    Patcher,
    active_codes,
    attribution_scores,
    build_graph,
    circuit_at_faithfulness,
    faithfulness,
    find_circuit,
)
from codelens.experiments.planted_circuit import planted_model


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def component_patcher(planted):
    graph = build_graph(planted.model)
    return Patcher(planted.model, graph, planted.clean, corrupted=planted.corrupted)


def check_search(circuit, target):
    """The search's own record: it reached the target at the size it returned, and every
    smaller size it evaluated, one fewer edge included, fell short."""
    search = dict(circuit.settings["search"])
    n = circuit.settings["n_edges"]
    assert len(circuit.edges) == n and search[n] >= target
    assert n - 1 in search
    assert all(f < target for size, f in search.items() if size < n)


@pytest.mark.parametrize("level", ["components", "codes"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_full_faithfulness_returns_exactly_the_planted_circuit(planted, level, method):
    circuit = find_circuit(planted.model, planted, level, method, faithfulness=1.0)
    assert set(circuit.edges) == planted.true_edges[level]
    assert circuit.settings["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    check_search(circuit, 1.0)
    # about log2(edges) forwards per phase, far fewer than one per edge
    assert circuit.forwards < 2 * circuit.settings["graph_edges"].bit_length() + 10


def test_default_target_on_the_planted_model(planted):
    # components: either planted path alone carries half the logit difference, so 0.8
    # needs both, every planted edge
    components = find_circuit(planted.model, planted, "components")
    assert set(components.edges) == planted.true_edges["components"]
    assert components.method == "eap-ig" and components.settings["faithfulness_target"] == 0.8
    # codes: each of the 12 label codes on the two paths carries 1/8 of the difference
    # averaged over the pairs, so dropping one (0.875) still reaches 0.8, dropping two not
    codes = find_circuit(planted.model, planted, "codes", "eap")
    assert len(codes.edges) == 13 and set(codes.edges) < planted.true_edges["codes"]
    assert codes.settings["faithfulness"] == pytest.approx(0.875, abs=1e-5)
    check_search(codes, 0.8)


def test_reached_faithfulness_is_what_the_evaluator_measures(planted, component_patcher):
    scores = attribution_scores(component_patcher, planted.metric)
    for target in (0.3, 0.8):
        circuit = circuit_at_faithfulness(component_patcher, planted.metric, scores, target)
        measured = faithfulness(component_patcher, circuit, planted.metric)
        assert measured == pytest.approx(circuit.settings["faithfulness"], abs=1e-6)
        assert set(circuit.ranking()[: len(circuit.edges)]) == set(circuit.edges)


def test_any_ranking_plugs_in_by_edge_name_or_as_a_function(planted, component_patcher):
    truth = planted.true_edges["components"]
    by_name = {edge: 2.0 - 0.1 * i for i, edge in enumerate(sorted(truth))}
    circuit = circuit_at_faithfulness(
        component_patcher, planted.metric, by_name, 0.9, method="attribution-graph"
    )
    assert set(circuit.edges) == truth and circuit.method == "attribution-graph"
    assert circuit.ranking()[: len(truth)] == sorted(truth)  # the order searched

    def reversed_eap(patcher, metric):  # the worst ranking: it still ends at a faithful size
        return -1.0 / (attribution_scores(patcher, metric).abs() + 1e-3)

    worst = find_circuit(planted.model, planted, "components", reversed_eap, 0.8)
    assert worst.method == "reversed_eap" and truth <= set(worst.edges)
    assert worst.settings["faithfulness"] >= 0.8
    check_search(worst, 0.8)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_search_on_a_random_model_is_verified_at_every_size_it_reports(arch):
    # on a random model faithfulness is not monotone in the size: the answer is the
    # smallest evaluated size that reaches the target, with one edge fewer below it
    model = tiny_model(arch, seed=1, codebook=CodebookConfig(n_codes=16, k=2))
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 10, (8, 6), generator=gen)
    corrupted = torch.randint(0, 10, (8, 6), generator=gen)
    with torch.no_grad():
        wanted, other = model(clean)[:, -1].argmax(-1), model(corrupted)[:, -1].argmax(-1)
    metric = LogitDifference(wanted, other)
    graph = build_graph(model, "codes", active_codes(model, clean, corrupted))
    patcher = Patcher(model, graph, clean, corrupted=corrupted)
    scores = attribution_scores(patcher, metric, steps=3)
    for target in (0.5, 0.8, 1.0):
        circuit = circuit_at_faithfulness(patcher, metric, scores, target, method="eap-ig")
        check_search(circuit, target)
        assert faithfulness(patcher, circuit, metric) == pytest.approx(
            circuit.settings["faithfulness"], abs=1e-5
        )
        top = sorted(circuit.scores, key=lambda e: abs(circuit.scores[e]), reverse=True)
        assert set(circuit.edges) == set(top[: len(circuit.edges)])


def test_unreachable_target_names_the_best_reached_and_its_size(planted, component_patcher):
    scores = attribution_scores(component_patcher, planted.metric)
    with pytest.raises(ValueError, match=r"best reached is 0\.5000 with 4 edges"):
        circuit_at_faithfulness(component_patcher, planted.metric, scores, 0.8, max_edges=4)
    with pytest.raises(ValueError, match="no circuit of at most 3 of"):
        find_circuit(planted.model, planted, "components", "eap", 0.8, max_edges=3)


def test_bad_inputs_raise_clear_errors(planted, component_patcher):
    metric, patcher = planted.metric, component_patcher
    scores = attribution_scores(patcher, metric)
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"faithfulness must lie in \(0, 1\]"):
            find_circuit(planted.model, planted, "components", faithfulness=bad)
        with pytest.raises(ValueError, match=r"faithfulness must lie in \(0, 1\]"):
            circuit_at_faithfulness(patcher, metric, scores, bad)
    with pytest.raises(ValueError, match="level must be one of"):
        find_circuit(planted.model, planted, "component")
    with pytest.raises(ValueError, match="select by tau"):
        find_circuit(planted.model, planted, "components", "acdc")
    with pytest.raises(ValueError, match="a name or a function"):
        find_circuit(planted.model, planted, "components", 3)
    with pytest.raises(ValueError, match="not in the graph"):
        circuit_at_faithfulness(patcher, metric, {"embed->nowhere": 1.0})
    with pytest.raises(ValueError, match="receivers x senders"):
        circuit_at_faithfulness(patcher, metric, scores[:, :-1])
    with pytest.raises(ValueError, match="finite"):
        circuit_at_faithfulness(patcher, metric, scores * float("nan"))
    with pytest.raises(ValueError, match="max_edges must be in"):
        circuit_at_faithfulness(patcher, metric, scores, max_edges=0)
    with pytest.raises(ValueError, match="not a distance"):
        circuit_at_faithfulness(patcher, KLDivergence(patcher.clean_logits), scores)
