"""Views of an attribution graph: a self-contained HTML page, and circuit-tracer's JSON.

`attribution_page` writes one static HTML file (inline SVG and JavaScript, no network,
opens offline and in Colab through `page_html`): the pruned graph with nodes laid out
by position (columns) and by stage (rows: embeddings at the bottom, then each layer's
attention and MLP codes, logits on top), edges drawn with width by weight (blue
positive, red negative). Hovering a code shows its score, influence and, when a
`codelens.viz.BrowserData` is given, the tokens it fires on most (the code browser's
data); clicking a node highlights every path through it. The URL hash ``#node=ID``
selects a node and ``#hover=ID`` opens its card, as a click and a hover do.

`to_circuit_tracer_json` gives the graph in the JSON that circuit-tracer's frontend
reads (``create_graph_files``: keys ``metadata``, ``qParams``, ``nodes``, ``links``),
checked against its ``frontend/graph_models.py`` and ``utils/create_graph_files.py``
(safety-research/circuit-tracer, commits 196e2ce and 9a7fc2b). Codes are not
transcoder features; they are mapped as follows. A code at an attention site of layer
l sits on frontend layer ``2l``, one at an MLP site on ``2l+1``; its feature index is
``group * n_codes + id``; logits sit on layer ``2 * n_layers + 1``. Not verified:
whether the frontend draws these graphs, its ``process_token`` escaping of token
strings (not applied), and what Neuronpedia's upload validator requires beyond these
fields. The frontend's server also needs a ``graph-metadata.json``, not written here.
"""

from __future__ import annotations

import html
import os
import uuid
from pathlib import Path
from typing import Any

from codelens.circuits.attribution import (
    EDGE_THRESHOLD,
    NODE_THRESHOLD,
    AttributionGraph,
    PrunedGraph,
    node_influence,
    prune_graph,
)
from codelens.files import atomic_write_json, atomic_write_text
from codelens.viz._page import _script_json
from codelens.vocab import is_attn_site, layer_of

MAX_TOP_TOKENS = 8


def _token_strings(graph: AttributionGraph, tokenizer: Any) -> list[str]:
    ids = graph.tokens.tolist()
    if tokenizer is None:
        return [f"#{t}" for t in ids]
    return [tokenizer.decode([t]) for t in ids]


def _kept(graph: AttributionGraph, pruned: PrunedGraph) -> tuple[list[int], list[tuple]]:
    """Kept nodes (codes linked by a kept edge; every embedding and logit) and edges."""
    edges = [
        (int(s), int(t), float(graph.adjacency[t, s]))
        for t, s in pruned.edge_mask.nonzero().tolist()
    ]
    linked = {s for s, _, _ in edges} | {t for _, t, _ in edges}
    nodes = [
        i
        for i in range(graph.n_nodes)
        if pruned.node_mask[i] and (i >= graph.n_codes or i in linked)
    ]
    keep = set(nodes)
    return nodes, [e for e in edges if e[0] in keep and e[1] in keep]


def graph_view_data(
    graph: AttributionGraph,
    *,
    tokenizer: Any = None,
    browser: Any = None,
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
) -> dict[str, Any]:
    """The page's data: kept nodes (with each code's top tokens from ``browser``) and edges."""
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    nodes, edges = _kept(graph, pruned)
    tokens = _token_strings(graph, tokenizer)
    scores = node_influence(graph)
    share = scores / scores.sum().clamp(min=1e-30)
    out_nodes = []
    for i in nodes:
        entry: dict[str, Any] = {
            "id": i,
            "label": graph.node_label(i, tokenizer),
            "stage": int(graph.stage[i]),
            "influence": round(float(share[i]), 6),
        }
        if i < graph.n_codes:
            node = graph.code_nodes[i]
            entry.update(kind="code", pos=node.position, score=round(float(graph.value[i]), 5))
            summary = None
            if browser is not None:
                groups = browser.sites.get(node.code.site, [])
                if node.code.group < len(groups):
                    summary = groups[node.code.group].get(node.code.id)
            if summary is not None:
                entry["count"] = summary.count
                entry["top"] = [[t, int(c)] for t, c in summary.top_tokens[:MAX_TOP_TOKENS]]
        elif i < graph.logit_slice.start:
            entry.update(kind="embed", pos=i - graph.n_codes)
        else:
            k = i - graph.logit_slice.start
            entry.update(
                kind="logit",
                pos=graph.n_pos - 1,
                prob=round(float(graph.logit_probabilities[k]), 5),
                score=round(float(graph.value[i]), 5),
            )
        out_nodes.append(entry)
    return {
        "tokens": tokens,
        "n_stages": 2 * graph.n_layers + 2,
        "nodes": out_nodes,
        "edges": [[s, t, round(w, 6)] for s, t, w in edges],
        "thresholds": [node_threshold, edge_threshold],
    }


def page_html(graph: AttributionGraph, *, title: str = "codelens attribution graph", **kw) -> str:
    """The viewer as one HTML string (``IPython.display.HTML(page_html(...))`` in Colab);
    keyword arguments as `graph_view_data`."""
    blob = _script_json(graph_view_data(graph, **kw))
    safe = html.escape(title)
    root = f"ag-{uuid.uuid4().hex[:12]}"  # several graphs in one notebook stay apart
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{safe}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{safe}</h1>\n<div class="ag-root" id="{root}">\n<div class="ag-summary"></div>\n'
        '<div class="ag-wrap"><svg class="ag-svg" xmlns="http://www.w3.org/2000/svg"></svg>'
        '<div class="ag-card" hidden></div></div>\n<div class="ag-selected"></div>\n'
        "<noscript>This graph viewer needs JavaScript.</noscript>\n"
        f'<script type="application/json" class="ag-data">{blob}</script>\n'
        f"<script>{_JS.replace('__ROOT__', root)}</script>\n</div>\n</body>\n</html>\n"
    )


def attribution_page(
    graph: AttributionGraph,
    path: str | os.PathLike,
    *,
    title: str = "codelens attribution graph",
    **kw,
) -> Path:
    """Write the viewer to ``path`` (one self-contained HTML file, written atomically)."""
    return atomic_write_text(path, page_html(graph, title=title, **kw))


# ---------------------------------------------------------------- circuit-tracer JSON


def _frontend_layer(site: str) -> int:
    return 2 * layer_of(site) + (0 if is_attn_site(site) else 1)


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def to_circuit_tracer_json(
    graph: AttributionGraph,
    slug: str,
    *,
    model=None,
    tokenizer: Any = None,
    scan: str = "codelens",
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
) -> dict[str, Any]:
    """The pruned graph in circuit-tracer's frontend JSON (see the module docstring).

    ``model`` gives each site's codebook size (for feature indices; without it the
    largest id in the graph plus one). ``influence`` is circuit-tracer's cumulative
    score (lower is more important), null for logits.
    """
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    nodes, edges = _kept(graph, pruned)
    tokens = _token_strings(graph, tokenizer)
    n_codes_at: dict[str, int] = {}
    for node in graph.code_nodes:
        if model is not None:
            n_codes_at[node.code.site] = model.codebook(node.code.site).n_codes
        else:
            n_codes_at[node.code.site] = max(n_codes_at.get(node.code.site, 0), node.code.id + 1)
    logit_layer = 2 * graph.n_layers + 1
    ids: dict[int, str] = {}
    out_nodes = []
    for i in nodes:
        base = {"ctx_idx": 0, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0}
        base |= {"reverse_ctx_idx": 0, "clerp": "", "activation": None}
        influence = float(pruned.cumulative_scores[i])
        if i < graph.n_codes:
            node = graph.code_nodes[i]
            layer = _frontend_layer(node.code.site)
            feature = node.code.group * n_codes_at[node.code.site] + node.code.id
            ids[i] = f"{layer}_{feature}_{node.position}"
            base |= {
                "feature": _cantor(layer, feature),
                "layer": str(layer),
                "ctx_idx": node.position,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{feature}-0",
                "clerp": str(node.code),
                "influence": influence,
                "activation": float(graph.activation[i]),
            }
        elif i < graph.logit_slice.start:
            pos = i - graph.n_codes
            token = int(graph.tokens[pos])
            ids[i] = f"E_{token}_{pos}"
            base |= {
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "jsNodeId": f"E_{token}-{pos}",
                "influence": influence,
            }
        else:
            k = i - graph.logit_slice.start
            token = int(graph.logit_tokens[k])
            prob = float(graph.logit_probabilities[k])
            pos = graph.n_pos - 1
            ids[i] = f"{logit_layer}_{token}_{pos}"
            text = tokenizer.decode([token]) if tokenizer is not None else f"#{token}"
            base |= {
                "feature": token,
                "layer": str(logit_layer),
                "ctx_idx": pos,
                "feature_type": "logit",
                "token_prob": prob,
                "is_target_logit": k == 0,
                "jsNodeId": f"L_{token}-{pos}",
                "clerp": f'Output "{text}" (p={prob:.3f})',
                "influence": None,
            }
        out_nodes.append({"node_id": ids[i], **base})
    links = [{"source": ids[s], "target": ids[t], "weight": w} for s, t, w in edges]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": tokens,
            "prompt": "".join(tokens),
            "node_threshold": node_threshold,
            "schema_version": 1,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": out_nodes,
        "links": links,
    }


def save_circuit_tracer_json(graph: AttributionGraph, path: str | os.PathLike, **kw) -> Path:
    """Write `to_circuit_tracer_json` to ``path`` (slug: the file's stem)."""
    path = Path(path)
    return atomic_write_json(path, to_circuit_tracer_json(graph, path.stem, **kw))


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 4px; }
.ag-summary, .ag-selected { color: #444; margin: 6px 0; }
.ag-wrap { position: relative; overflow: auto; border: 1px solid #e5e7eb; }
.ag-svg text { font: 11px ui-monospace, monospace; fill: #374151; }
.ag-edge { fill: none; stroke-linecap: round; opacity: 0.55; }
.ag-node { cursor: pointer; stroke: #111827; stroke-width: 0.8; }
.ag-node.code { fill: #fde68a; } .ag-node.embed { fill: #a7f3d0; }
.ag-node.logit { fill: #c7d2fe; }
.dim { opacity: 0.08 !important; }
.ag-on { stroke-width: 2.4; stroke: #dc2626; }
.ag-card { position: absolute; background: #fff; border: 1px solid #9ca3af;
           border-radius: 6px; padding: 6px 8px; font-size: 12px; min-width: 220px;
           max-width: 360px;
           box-shadow: 0 2px 6px rgba(0,0,0,.15); pointer-events: none; }
.ag-card .tok { font-family: ui-monospace, monospace; background: #f3f4f6;
                border: 1px solid #d1d5db; border-radius: 3px; padding: 0 2px;
                white-space: pre; }
"""

_JS = r"""
(function () {
  "use strict";
  var root = document.getElementById("__ROOT__");
  function part(name) { return root.querySelector("." + name); }
  var D = JSON.parse(part("ag-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var svg = part("ag-svg"), card = part("ag-card");
  var COL = 120, ROW = 70, R = 7, PAD = 40;
  var byId = {}, groups = {}, nodeEl = {}, edgeEl = [];
  D.nodes.forEach(function (n) {
    byId[n.id] = n;
    var key = n.pos + ":" + n.stage;
    (groups[key] = groups[key] || []).push(n);
  });
  Object.keys(groups).forEach(function (key) {
    var g = groups[key];
    g.sort(function (a, b) { return b.influence - a.influence; });
    g.forEach(function (n, i) {
      var step = Math.min(18, (COL - 20) / g.length);
      n.x = PAD + n.pos * COL + COL / 2 + (i - (g.length - 1) / 2) * step;
      n.y = PAD + (D.n_stages - 1 - n.stage) * ROW;
    });
  });
  var width = PAD * 2 + D.tokens.length * COL, height = PAD * 2 + D.n_stages * ROW;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  function el(tag, attrs) {
    var e = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    svg.appendChild(e);
    return e;
  }
  D.tokens.forEach(function (t, p) {
    var label = el("text", {x: PAD + p * COL + COL / 2, y: height - 8, "text-anchor": "middle"});
    label.textContent = JSON.stringify(t).slice(1, -1) + "@" + p;
  });
  var wmax = 1e-12;
  D.edges.forEach(function (e) { wmax = Math.max(wmax, Math.abs(e[2])); });
  var out = {}, inc = {};
  D.edges.forEach(function (e, k) {
    var s = byId[e[0]], t = byId[e[1]];
    var mid = (s.y + t.y) / 2;
    var path = el("path", {
      d: "M" + s.x + "," + s.y + " C" + s.x + "," + mid + " " + t.x + "," + mid +
         " " + t.x + "," + t.y,
      "class": "ag-edge", stroke: e[2] >= 0 ? "#2563eb" : "#dc2626",
      "stroke-width": (0.5 + 5 * Math.abs(e[2]) / wmax).toFixed(2),
      "data-source": e[0], "data-target": e[1]
    });
    edgeEl.push(path);
    (out[e[0]] = out[e[0]] || []).push(e[1]);
    (inc[e[1]] = inc[e[1]] || []).push(e[0]);
  });
  var logitTop = null, best = -1;
  D.nodes.forEach(function (n) {
    if (n.kind === "logit" && n.prob > best) { best = n.prob; logitTop = n.id; }
  });
  for (var st = 0; st < D.n_stages; st++) {
    var name = st === 0 ? "emb" : st === D.n_stages - 1 ? "logits" :
      (st % 2 ? "a" : "m") + Math.floor((st - 1) / 2);
    el("text", {x: 4, y: PAD + (D.n_stages - 1 - st) * ROW + 4}).textContent = name;
  }
  D.nodes.forEach(function (n) {
    var c = el("circle", {cx: n.x, cy: n.y, r: n.kind === "code" ? R : R + 2,
                         "class": "ag-node " + n.kind});
    nodeEl[n.id] = c;
    c.addEventListener("mouseenter", function () { showCard(n.id); });
    c.addEventListener("mouseleave", function () { card.hidden = true; });
    c.addEventListener("click", function () { select(n.id); });
    if (n.kind === "embed" || (n.kind === "logit" && n.id === logitTop)) {
      var t = el("text", {x: n.x + 10, y: n.y + 4});
      t.textContent = n.label;
    }
  });
  part("ag-summary").textContent =
    D.nodes.length + " nodes, " + D.edges.length + " edges (pruned at node " +
    D.thresholds[0] + ", edge " + D.thresholds[1] + "). Hover a node for its card; " +
    "click one to highlight its paths.";
  function text(tag, s) { var e = document.createElement(tag); e.textContent = s; return e; }
  function showCard(id) {
    var n = byId[id];
    if (!n) return;
    card.innerHTML = "";
    card.appendChild(text("b", n.label));
    var lines = ["kind: " + n.kind, "influence: " + n.influence.toFixed(4)];
    if (n.score !== undefined) lines.push((n.kind === "logit" ? "logit: " : "score: ") + n.score);
    if (n.prob !== undefined) lines.push("probability: " + n.prob);
    if (n.count !== undefined) lines.push("fires " + n.count + " times in the browser data");
    lines.forEach(function (l) { card.appendChild(text("div", l)); });
    if (n.top) {
      var row = text("div", "top tokens: ");
      row.className = "ag-top";
      n.top.forEach(function (tc) {
        var s = text("span", tc[0]); s.className = "tok"; row.appendChild(s);
        row.appendChild(document.createTextNode(" " + tc[1] + " "));
      });
      card.appendChild(row);
    }
    card.style.left = (n.x + 380 > width ? Math.max(0, n.x - 380) : n.x + 14) + "px";
    card.style.top = (n.y + 6) + "px";
    card.hidden = false;
  }
  function reach(start, next) {
    var seen = {}, todo = [start];
    seen[start] = true;
    while (todo.length) {
      (next[todo.pop()] || []).forEach(function (m) {
        if (!seen[m]) { seen[m] = true; todo.push(m); }
      });
    }
    return seen;
  }
  var selected = null;
  function select(id) {
    if (selected === id || !byId[id]) {
      selected = null;
      Object.keys(nodeEl).forEach(function (k) { nodeEl[k].classList.remove("dim", "ag-on"); });
      edgeEl.forEach(function (p) { p.classList.remove("dim"); });
      part("ag-selected").textContent = "";
      return;
    }
    selected = id;
    var down = reach(id, out), up = reach(id, inc), on = {};
    Object.keys(down).forEach(function (k) { on[k] = true; });
    Object.keys(up).forEach(function (k) { on[k] = true; });
    Object.keys(nodeEl).forEach(function (k) {
      nodeEl[k].classList.toggle("dim", !on[k]);
      nodeEl[k].classList.toggle("ag-on", String(k) === String(id));
    });
    var n_edges = 0;
    edgeEl.forEach(function (p) {
      var s = p.getAttribute("data-source"), t = p.getAttribute("data-target");
      var lit = (down[s] && down[t]) || (up[s] && up[t]);
      p.classList.toggle("dim", !lit);
      if (lit) n_edges++;
    });
    part("ag-selected").textContent =
      "selected " + byId[id].label + ": " + Object.keys(on).length + " nodes and " +
      n_edges + " edges on its paths";
  }
  var hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("node") !== null) select(Number(hash.get("node")));
  if (hash.get("hover") !== null) showCard(Number(hash.get("hover")));
})();
"""
