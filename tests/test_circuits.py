"""Circuits: the patching engine, ground truth on a hand-built model, results and metrics."""

import json

import plotly.graph_objects as go
import pytest
import torch
from conftest import tiny_model
from sklearn.metrics import roc_auc_score

from codelens import CodebookConfig
from codelens.circuits import (
    Circuit,
    KLDivergence,
    LogitDifference,
    Patcher,
    acdc,
    active_codes,
    attribution_scores,
    build_graph,
    circuit_figure,
    completeness,
    curves_figure,
    eap,
    eap_ig,
    faithfulness,
    faithfulness_curve,
    fast_path,
)
from codelens.circuits.graph import node_stage
from codelens.circuits.result import node_of
from codelens.experiments.planted_circuit import planted_model

CODEBOOK = CodebookConfig(n_codes=16, k=2, mlp_groups=2)


def pair(seed=0, shape=(4, 6)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, shape, generator=gen), torch.randint(0, 10, shape, generator=gen)


def no_hooks_left(model) -> bool:
    return not any(hp.has_hooks(including_permanent=False) for hp in model.hook_dict.values())


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("level", ["components", "codes"])
def test_no_edge_ablated_is_the_clean_run_and_every_edge_the_corrupted_run(arch, level):
    model = tiny_model(arch, CODEBOOK)
    clean, corrupted = pair()
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    active = active_codes(model, clean, corrupted) if level == "codes" else None
    patcher = Patcher(model, build_graph(model, level, active), clean, corrupted=corrupted)
    with torch.no_grad():
        torch.testing.assert_close(patcher.run(patcher.empty_mask()), clean_logits)
        torch.testing.assert_close(patcher.run(patcher.full_mask()), corrupted_logits)
    assert no_hooks_left(model)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_zero_ablating_every_edge_of_one_receiver_equals_zeroing_its_input_senders():
    model = tiny_model("gpt2")
    clean, _ = pair()
    graph = build_graph(model)
    patcher = Patcher(model, graph, clean, ablation="zero")
    mask = patcher.empty_mask()
    mask[graph.receivers.index("logits")] = 1.0  # the logits see a residual of zeros
    with torch.no_grad():
        patched = patcher.run(mask)
        expected = model.unembed(model.ln_final(torch.zeros(4, 6, model.cfg.d_model)))
    torch.testing.assert_close(patched, expected)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])  # sequential and parallel attn/MLP
def test_zero_ablating_every_edge_out_of_a_head_equals_zeroing_the_head(arch):
    model = tiny_model(arch)
    clean, _ = pair()
    graph = build_graph(model)
    patcher = Patcher(model, graph, clean, ablation="zero")
    mask = patcher.empty_mask()
    mask[:, graph.senders.index("a0.h1")] = 1.0

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    with torch.no_grad():
        patched = patcher.run(mask)
        expected = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    torch.testing.assert_close(patched, expected)
    # with parallel attention and MLP, a layer's MLP reads nothing its heads write
    assert ("a0.h1->m0" in graph.edge_index()) == (arch == "gpt2")


def test_code_senders_carry_their_code_and_node():
    model = tiny_model("gpt2", CODEBOOK)
    clean, corrupted = pair()
    graph = build_graph(model, "codes", active_codes(model, clean, corrupted))
    assert graph.sender_codes, "the code graph has code senders"
    for column, code in graph.sender_codes.items():
        name, node = graph.senders[column], graph.sender_nodes[column]
        assert code.site in graph.code_sites and name.endswith(f":{code.id}")
        assert name.startswith(node) and graph.sender_stage[column] == node_stage(node)
    nodes = graph.node_columns()
    assert sorted(c for cols in nodes.values() for c in cols) == list(range(len(graph.senders)))
    assert node_stage("embed") == 0 and node_stage("m1:3") == node_stage("m1") == 4
    assert node_stage("a1.h2<q>") == 3 and node_stage("logits") > node_stage("m1")
    with pytest.raises(ValueError, match="not a circuit node"):
        node_stage("x1")


def test_hooks_and_flags_are_restored_when_the_forward_raises(monkeypatch):
    model = tiny_model("gpt2", CODEBOOK)
    clean, corrupted = pair()
    patcher = Patcher(model, build_graph(model), clean, corrupted=corrupted)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(patcher, "_delta", broken)
    with pytest.raises(RuntimeError, match="boom"):
        patcher.run(patcher.full_mask())
    assert no_hooks_left(model)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_integrated_gradients_add_up_to_the_total_effect():
    model = tiny_model("gpt2")
    clean, corrupted = pair()
    patcher = Patcher(model, build_graph(model), clean, corrupted=corrupted)
    metric = LogitDifference(clean[:, -1], corrupted[:, -1])
    scores = attribution_scores(patcher, metric, steps=20)
    with torch.no_grad():
        total = float(metric(patcher.run(patcher.full_mask())) - metric(patcher.clean_logits))
    assert float(scores.sum()) == pytest.approx(total, rel=0.02)
    assert not scores[~patcher.graph.valid].any()


# ---------------------------------------------------------------- ground truth


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module", params=["components", "codes"])
def planted_setup(request, planted):
    level = request.param
    model = planted.model
    active = active_codes(model, planted.clean, planted.corrupted) if level == "codes" else None
    graph = build_graph(model, level, active)
    patcher = Patcher(model, graph, planted.clean, corrupted=planted.corrupted)
    return level, patcher, planted.true_edges[level]


def edge_auc(circuit: Circuit, truth: set[str]) -> float:
    names = circuit.ranking()
    ranks = {name: len(names) - i for i, name in enumerate(names)}
    return roc_auc_score([n in truth for n in names], [ranks[n] for n in names])


def test_planted_edges_are_in_the_graph(planted_setup):
    _, patcher, truth = planted_setup
    edges = set(patcher.graph.edge_names())
    assert truth < edges and len(edges) > 3 * len(truth)


@pytest.mark.parametrize(
    "method",
    [
        lambda p, m: acdc(p, m, tau=0.1),
        lambda p, m: acdc(p, KLDivergence(p.clean_logits), tau=1e-3),
        lambda p, m: eap(p, m, tau=0.1),
        lambda p, m: eap_ig(p, m, steps=5, tau=0.1),
    ],
    ids=["acdc-logit-diff", "acdc-kl", "eap", "eap-ig"],
)
def test_every_method_ranks_the_planted_edges_first(planted_setup, planted, method):
    _, patcher, truth = planted_setup
    circuit = method(patcher, planted.metric)
    assert edge_auc(circuit, truth) == 1.0
    assert set(circuit.edges) == truth


@pytest.mark.parametrize("metric", ["logit-diff", "kl"])
def test_fast_path_returns_exactly_the_planted_edges_with_fewer_forwards(
    planted_setup, planted, metric
):
    _, patcher, truth = planted_setup
    chosen = planted.metric if metric == "logit-diff" else KLDivergence(patcher.clean_logits)
    tau = 0.1 if metric == "logit-diff" else 1e-3
    fast = fast_path(patcher, chosen, tau, attribution_metric=planted.metric)
    assert set(fast.edges) == truth
    assert fast.forwards < patcher.graph.n_edges  # exhaustive ACDC: one per edge, plus one
    assert edge_auc(fast, truth) == 1.0


def test_fast_path_keeps_strong_edges_without_a_forward(planted_setup, planted):
    _, patcher, truth = planted_setup
    tested = fast_path(patcher, planted.metric, 0.1)
    trusted = fast_path(patcher, planted.metric, 0.1, keep_above=0.5)
    assert set(trusted.edges) == set(tested.edges) == truth
    assert trusted.forwards < tested.forwards
    with pytest.raises(ValueError, match="keep_above"):
        fast_path(patcher, planted.metric, 0.1, keep_above=0.01)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fast_path_skips_dead_nodes_and_matches_acdc_on_a_random_model(arch):
    model = tiny_model(arch, seed=1)
    clean, corrupted = pair(seed=1, shape=(8, 6))
    with torch.no_grad():
        wanted, other = model(clean)[:, -1].argmax(-1), model(corrupted)[:, -1].argmax(-1)
    metric = LogitDifference(wanted, other)
    patcher = Patcher(model, build_graph(model), clean, corrupted=corrupted)
    with torch.no_grad():
        spread = float(metric(patcher.clean_logits) - metric(patcher.run(patcher.full_mask())))
    tau = 0.02 * abs(spread)
    exhaustive = acdc(patcher, metric, tau)
    fast = fast_path(patcher, metric, tau)
    # a node none of whose outgoing edges survive cannot matter: ACDC measured (about)
    # nothing for its incoming edges, which the fast path removes without a forward
    live = {edge.split("->")[0] for edge in exhaustive.edges} | {"logits"}
    into_dead = [e for e in exhaustive.scores if node_of(e.split("->")[1]) not in live]
    assert len(into_dead) > 20
    assert max(abs(exhaustive.scores[e]) for e in into_dead) < 1e-6
    assert set(fast.edges) == set(exhaustive.edges)
    assert fast.forwards * 2 < exhaustive.forwards


def test_planted_circuit_is_faithful_and_complete(planted_setup, planted):
    _, patcher, truth = planted_setup
    circuit = eap(patcher, planted.metric, tau=0.1)
    assert faithfulness(patcher, circuit, planted.metric) == pytest.approx(1.0, abs=1e-4)
    assert completeness(patcher, circuit, planted.metric) == pytest.approx(0.0, abs=1e-4)
    curve = faithfulness_curve(patcher, circuit, planted.metric)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < curve.cpr <= 1.0 + 1e-4 and 0.0 <= curve.cmd < 1.0
    # once the top edges hold every planted edge, the circuit is the model
    full_at = next(i for i, n in enumerate(curve.n_edges) if n >= len(truth))
    assert all(abs(f - 1) < 1e-4 for f in curve.faithfulness[full_at:])


# ---------------------------------------------------------------- results


def test_circuit_round_trips_through_json_atomically(tmp_path, planted_setup, planted):
    _, patcher, _ = planted_setup
    circuit = eap(patcher, planted.metric, tau=0.1)
    path = circuit.save(tmp_path / "c" / "circuit.json")
    assert Circuit.load(path) == circuit
    assert [p.name for p in path.parent.iterdir()] == ["circuit.json"]
    assert isinstance(circuit_figure(circuit), go.Figure)
    curve = faithfulness_curve(patcher, circuit, planted.metric, fractions=(0.1, 1.0))
    assert len(curves_figure({"eap": curve}).data) == 1


def test_bad_circuit_files_raise(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid circuit file"):
        Circuit.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a codelens circuit file"):
        Circuit.load(bad)
    bad.write_text(json.dumps({"format": "codelens-circuit/1", "edges": []}))
    with pytest.raises(ValueError, match="missing fields"):
        Circuit.load(bad)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("gpt2", CODEBOOK)
    clean, corrupted = pair()
    graph = build_graph(model)
    with pytest.raises(ValueError, match="level must be one of"):
        build_graph(model, "neurons")
    with pytest.raises(ValueError, match="needs active_codes"):
        build_graph(model, "codes")
    with pytest.raises(ValueError, match="needs a model with codebooks"):
        build_graph(tiny_model("gpt2"), "codes", {})
    with pytest.raises(ValueError, match="grouped-query attention"):
        build_graph(tiny_model("llama"))
    with pytest.raises(ValueError, match="same shape"):
        Patcher(model, graph, clean, corrupted=corrupted[:, :3])
    with pytest.raises(ValueError, match="only for, ablation='corrupted'"):
        Patcher(model, graph, clean)
    with pytest.raises(ValueError, match="ablation must be one of"):
        Patcher(model, graph, clean, ablation="resample")
    code_graph = build_graph(model, "codes", active_codes(model, clean))
    with pytest.raises(ValueError, match="mean ablation is defined for components only"):
        Patcher(model, code_graph, clean, ablation="mean")
    patcher = Patcher(model, graph, clean, corrupted=corrupted)
    with pytest.raises(ValueError, match="mask must have shape"):
        patcher.run(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="EAP needs a task metric"):
        eap(patcher, KLDivergence(patcher.clean_logits))
    with pytest.raises(ValueError, match="positions must be an int or one index"):
        LogitDifference(clean[:, 0], corrupted[:, 0], positions=torch.tensor([1, 2]))(
            patcher.clean_logits
        )


# ---------------------------------------------------------------- tasks


def test_fsm_task_pairs_states_that_favour_different_first_digits():
    from codelens.data.fsm import FSMConfig, TokFSM
    from codelens.experiments.circuit_tasks import fsm_next_state_task

    fsm = TokFSM(FSMConfig(n_states=20, n_successors=4, seq_len=25, seed=42))
    task = fsm_next_state_task(fsm, n_pairs=16, state_index=1)
    assert task.clean.shape == task.corrupted.shape == (16, 1 + 2 * fsm.n_digits)
    assert (task.metric.correct != task.metric.wrong).all()
    first = fsm.encode(fsm.transitions)[..., 0 :: fsm.n_digits]
    for tokens, digit in ((task.clean, task.metric.correct), (task.corrupted, task.metric.wrong)):
        state = fsm.decode(tokens[:, 1 + fsm.n_digits :])[:, 0]
        counts = torch.stack([(first[s] == d).sum() for s, d in zip(state, digit, strict=True)])
        assert (counts * 2 > fsm.config.n_successors).all()  # each state's strict favourite
    with pytest.raises(ValueError, match="state_index"):
        fsm_next_state_task(fsm, state_index=99)


def test_logit_difference_averages_sets_of_words():
    logits = torch.arange(2 * 3 * 5, dtype=torch.float).reshape(2, 3, 5)
    metric = LogitDifference(torch.tensor([[4, 2], [4, 2]]), torch.tensor([[0], [1]]))
    assert float(metric(logits)) == pytest.approx(((3 - 0) + (3 - 1)) / 2)


def test_story_task_pairs_two_topics_and_scores_their_words():
    from codelens.data.stories import LEXICONS, generate_stories
    from codelens.data.text import train_bpe_tokenizer
    from codelens.experiments.circuit_tasks import story_topic_task

    tokenizer = train_bpe_tokenizer([s.text for s in generate_stories(300, seed=5)], 1000)
    task = story_topic_task(tokenizer, "snow", "fire", n_pairs=4, length=24)
    assert task.clean.shape == task.corrupted.shape == (4, 25)
    assert (task.clean[:, 0] == tokenizer.bos_token_id).all()
    snow_words = {tokenizer.decode([int(i)]).strip() for i in task.metric.correct[0]}
    assert snow_words and snow_words <= set(LEXICONS["snow"])
    with pytest.raises(ValueError, match="two different corpus topics"):
        story_topic_task(tokenizer, "snow", "snow")


def test_study_writes_circuits_curves_and_figures(tmp_path, planted):
    from codelens.experiments.circuit_study import run_study
    from codelens.experiments.circuit_tasks import Task

    task = Task("planted", planted.clean, planted.corrupted, planted.metric)
    report = run_study(
        planted.model, task, tmp_path, methods=("acdc", "fast"), tau=0.1, compare_tl=True
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for level in ("components", "codes"):
        entry = saved["levels"][level]
        assert entry["methods"]["fast"]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
        assert entry["fast_vs_acdc"]["jaccard"] == 1.0
        assert entry["fast_vs_acdc"]["forwards_ratio"] > 1.0
        for method in ("acdc", "fast"):
            loaded = Circuit.load(tmp_path / "circuits" / f"{level}-{method}.json")
            assert set(loaded.edges) == planted.true_edges[level]
    tl = saved["levels"]["components"]["tl_node_attribution"]
    assert tl["nodes"] == 7 and -1.0 <= tl["spearman_signed"] <= 1.0
    assert "| fast |" in (tmp_path / "report.md").read_text()
    assert "plotly" in (tmp_path / "report.html").read_text().lower()


def test_circuit_command_rejects_what_is_not_a_tokfsm_run(tmp_path):
    from codelens.cli import main

    with pytest.raises(SystemExit, match="not a training run directory .* or a steering run"):
        main(["circuit", str(tmp_path)])
    (tmp_path / "final").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "corpus.jsonl"}}))
    with pytest.raises(SystemExit, match="not trained on TokFSM data"):
        main(["circuit", str(tmp_path)])


def test_circuit_command_finds_the_topic_circuit_of_a_steering_run(tmp_path):
    import dataclasses

    from conftest import ARCHS

    from codelens import HookedCodebookTransformer
    from codelens.cli import main
    from codelens.data.stories import generate_stories
    from codelens.data.text import train_bpe_tokenizer
    from codelens.experiments.steering import QUICK

    texts = [story.text for story in generate_stories(300, seed=0)]
    tokenizer = train_bpe_tokenizer(texts, 1024, save_dir=tmp_path / "tokenizer")
    config = dict(ARCHS["gpt_neox"], vocab_size=len(tokenizer))
    model = HookedCodebookTransformer.from_config(config, tokenizer, CODEBOOK)
    model.save_pretrained(tmp_path / "codebooks" / "final")
    exp = QUICK.with_run_dir(str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps({"experiment": dataclasses.asdict(exp)}))
    main(["circuit", str(tmp_path), "--pairs", "2", "-o", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == f"stories: {exp.topics[0]} vs {exp.topics[1]} topic words"
    assert (report["pairs"], report["tau"]) == (2, exp.circuit_tau)
    assert {level: list(e["methods"]) for level, e in report["levels"].items()} == {
        "components": ["eap-ig", "fast"],
        "codes": ["eap-ig"],
    }
    (tmp_path / "report.json").write_text(json.dumps({"experiment": {"topics": ["dragon"]}}))
    with pytest.raises(SystemExit, match="no steering experiment this codelens reads"):
        main(["circuit", str(tmp_path)])
