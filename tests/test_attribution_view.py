"""The attribution graph viewer draws in offline headless Chromium; the circuit-tracer JSON."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _chromium import (
    content_pixel_share,
    dump_dom,
    file_url,
    read_png,
    require_chromium,
    screenshot,
    script_elements,
    visible_text,
)
from conftest import digit_tokenizer, tiny_model

from codelens import CodebookConfig
from codelens.circuits.attribution import attribution_graph, prune_graph
from codelens.circuits.attribution_view import (
    attribution_page,
    graph_view_data,
    save_circuit_tracer_json,
    to_circuit_tracer_json,
)
from codelens.viz import collect_browser_data
from codelens.vocab import collect_codes

PROMPT = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2", CodebookConfig(n_codes=16, k=1))
    graph = attribution_graph(model, PROMPT)
    corpus = torch.randint(0, 10, (16, 12), generator=torch.Generator().manual_seed(0))
    tok = digit_tokenizer()
    strings = [[tok.decode([t]) for t in row] for row in corpus.tolist()]
    browser = collect_browser_data(collect_codes(model, corpus), strings)
    return model, graph, browser, tok


def test_view_data_holds_the_pruned_graph_and_browser_tokens(setup):
    model, graph, browser, tok = setup
    data = graph_view_data(graph, tokenizer=tok, browser=browser)
    pruned = prune_graph(graph)
    ids = {n["id"] for n in data["nodes"]}
    assert all(pruned.node_mask[i] for i in ids)
    assert set(range(graph.n_codes, graph.n_nodes)) <= ids  # embeddings and logits stay
    assert len(data["edges"]) == int(pruned.edge_mask.sum())
    for s, t, w in data["edges"]:
        assert w == pytest.approx(float(graph.adjacency[t, s]), abs=1e-5)
    codes = [n for n in data["nodes"] if n["kind"] == "code"]
    assert codes and all("top" in n for n in codes)  # every code of the prompt fired on the corpus
    node = graph.code_nodes[codes[0]["id"]]
    expected = browser.sites[node.code.site][node.code.group][node.code.id].top_tokens
    assert codes[0]["top"][0] == [expected[0][0], expected[0][1]]


@pytest.mark.browser
def test_viewer_draws_hovers_and_highlights_paths(setup, tmp_path):
    chromium = require_chromium()
    model, graph, browser, tok = setup
    path = attribution_page(graph, tmp_path / "graph.html", tokenizer=tok, browser=browser)
    page = path.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert script_elements(page) == 2 and "<script src" not in page  # data + code, all inline
    data = graph_view_data(graph, tokenizer=tok, browser=browser)
    code = max((n for n in data["nodes"] if n["kind"] == "code"), key=lambda n: n["influence"])
    dom = dump_dom(chromium, file_url(path, f"node={code['id']}&hover={code['id']}"))
    text = visible_text(dom)
    assert f"{len(data['nodes'])} nodes, {len(data['edges'])} edges" in text
    assert dom.count('class="ag-node') == len(data["nodes"])
    assert dom.count('class="ag-edge') == len(data["edges"])
    match = re.search(r"selected (\S+): (\d+) nodes and (\d+) edges", text)
    assert match and match.group(1) == code["label"]
    lit_nodes = len(re.findall(r'class="ag-node [a-z]+( ag-on)?"', dom))
    assert lit_nodes == int(match.group(2))  # the rest carry "dim"
    assert 0 < int(match.group(3)) <= len(data["edges"])
    card = dom[dom.index('class="ag-card"') :]
    assert "hidden" not in card[: card.index(">")]
    assert code["label"] in card and "top tokens" in card
    assert f'<span class="tok">{code["top"][0][0]}</span>' in card
    shot = screenshot(chromium, file_url(path), tmp_path / "graph.png")
    assert content_pixel_share(read_png(shot)) > 0.01


def test_circuit_tracer_json_follows_the_frontend_schema(setup, tmp_path):
    model, graph, _, tok = setup
    out = to_circuit_tracer_json(graph, "demo", model=model, tokenizer=tok)
    assert set(out) == {"metadata", "qParams", "nodes", "links"}
    assert out["metadata"]["schema_version"] == 1 and out["metadata"]["slug"] == "demo"
    keys = {
        "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
        "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
        "activation",
    }  # fmt: skip
    assert all(set(n) == keys for n in out["nodes"])
    ids = [n["node_id"] for n in out["nodes"]]
    assert len(ids) == len(set(ids))
    assert all({lk["source"], lk["target"]} <= set(ids) for lk in out["links"])
    types = {n["feature_type"] for n in out["nodes"]}
    assert types == {"cross layer transcoder", "embedding", "logit"}
    logits = [n for n in out["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    assert all(n["layer"] == str(2 * model.cfg.n_layers + 1) for n in logits)
    embeds = [n for n in out["nodes"] if n["feature_type"] == "embedding"]
    assert [n["node_id"] for n in embeds] == [f"E_{t}_{p}" for p, t in enumerate(PROMPT.tolist())]
    saved = save_circuit_tracer_json(graph, tmp_path / "demo.json", model=model, tokenizer=tok)
    assert json.loads(saved.read_text()) == json.loads(json.dumps(out))
