"""A static, self-contained HTML code browser (no server, no network, no framework).

`collect_browser_data` turns code-id tensors plus token strings into a `BrowserData`
summary; `build_browser` writes one HTML file that lets you pick a site and group/head,
search codes by id, by a regular expression over the tokens they fire on, or by top
token, and open a per-code view with statistics, top tokens and example contexts.

Page size is bounded independently of how many tokens were analysed: each code keeps at
most `max_top_tokens` (token, count) pairs and `max_examples` examples of at most
`2 * context + 1` tokens, so the page holds at most
sites x groups x codes_that_fired x (2 * max_top_tokens + max_examples * (2 * context + 2))
integers, plus one string table of the distinct tokens involved (`max_codes_per_group`
caps the codes kept per group, most frequent first). The data is one compact JSON blob
in which tokens are indices into that string table. In the page, the code list is paged
(100 codes per page), so the DOM stays small however many codes there are.

URL hash parameters pre-set the view, e.g. `browser.html#site=blocks.1.hook_mlp_out&
group=0&search=regex:^May$` or `#search=id:42`; `search` takes the prefixes `id:`,
`regex:` and `token:`; `page=N` and `code=SITE|GROUP|ID` are also read. A regex is
matched against raw token strings (" May" has a leading space) over each code's top
tokens and example firing tokens; the "match" column is the share of the code's firings
on matching top tokens, and results are sorted by it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from codelens.files import atomic_write_text
from codelens.viz._page import _script_json
from codelens.vocab import CODES_HOOK

__all__ = ["BrowserData", "CodeSummary", "build_browser", "collect_browser_data"]


@dataclass
class CodeSummary:
    """What the browser shows for one code: firing count, top tokens, example contexts.

    examples holds (context tokens, index of the firing token in them) pairs.
    """

    count: int
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    examples: list[tuple[list[str], int]] = field(default_factory=list)


@dataclass
class BrowserData:
    """Browser input: site -> one {code id: CodeSummary} dict per group (or head).

    n_tokens is the number of token positions analysed (frequency = count / n_tokens).
    """

    sites: dict[str, list[dict[int, CodeSummary]]]
    n_tokens: int
    title: str = "codelens code browser"


def _site_name(key: str) -> str:
    """Display name of a cache key: drop the trailing `.hook_codes`."""
    return key.removesuffix(f".{CODES_HOOK}")


def _segment_rank(keys: Tensor) -> Tensor:
    """Rank of each element within its run of equal (sorted) keys: 0, 1, 2, ..."""
    n = keys.numel()
    idx = torch.arange(n)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    starts = torch.where(first, idx, torch.zeros_like(idx)).cummax(0).values
    return idx - starts


def _summarise_group(
    codes: Tensor,
    tok: Tensor,
    pos_b: Tensor,
    pos_p: Tensor,
    token_strs: Sequence[Sequence[str]],
    strings: list[str],
    max_examples: int,
    context: int,
    max_top_tokens: int,
    generator: torch.Generator,
) -> dict[int, CodeSummary]:
    """Summaries for one group: codes [N, k] at the N valid positions (pos_b, pos_p)."""
    n, k = codes.shape
    flat = codes.reshape(-1)
    pos = torch.arange(n).repeat_interleave(k)
    keep = flat >= 0
    flat, pos = flat[keep], pos[keep]
    if flat.numel() == 0:
        return {}
    counts = torch.bincount(flat)
    n_vocab = len(strings)

    # Top tokens: count (code, token) pairs, sort by code then count desc, keep the first few.
    uniq, cnt = torch.unique(flat * n_vocab + tok[pos], return_counts=True)
    code_of, tok_of = uniq // n_vocab, uniq % n_vocab
    order = torch.argsort(code_of * (int(cnt.max()) + 1) - cnt, stable=True)
    code_of, tok_of, cnt = code_of[order], tok_of[order], cnt[order]
    sel = _segment_rank(code_of) < max_top_tokens
    top: dict[int, list[tuple[str, int]]] = {}
    for c, t, m in zip(code_of[sel].tolist(), tok_of[sel].tolist(), cnt[sel].tolist(), strict=True):
        top.setdefault(c, []).append((strings[t], m))

    # Examples: a seeded random sample of each code's firing positions.
    prio = torch.randperm(flat.numel(), generator=generator)
    order = torch.argsort(flat * flat.numel() + prio)
    ex_code, ex_pos = flat[order], pos[order]
    sel = _segment_rank(ex_code) < max_examples
    examples: dict[int, list[tuple[list[str], int]]] = {}
    for c, b, p in zip(
        ex_code[sel].tolist(),
        pos_b[ex_pos[sel]].tolist(),
        pos_p[ex_pos[sel]].tolist(),
        strict=True,
    ):
        row = token_strs[b]
        lo = max(0, p - context)
        examples.setdefault(c, []).append((list(row[lo : p + context + 1]), p - lo))

    active = torch.nonzero(counts).squeeze(1).tolist()
    return {c: CodeSummary(int(counts[c]), top.get(c, []), examples.get(c, [])) for c in active}


def collect_browser_data(
    codes_by_site: Mapping[str, Int[Tensor, "batch pos groups k"]],
    token_strs: Sequence[Sequence[str]],
    max_examples: int = 8,
    context: int = 8,
    max_top_tokens: int = 10,
    seed: int = 0,
    title: str = "codelens code browser",
) -> BrowserData:
    """Count codes per site and group, with top tokens and example contexts.

    codes_by_site: cache key -> codes [batch, pos, groups, k] (or [batch, pos, groups]);
    a trailing `.hook_codes` is dropped from the site name. token_strs: the token strings
    of each sequence; positions past a sequence's length (padding) and negative code ids
    are ignored. Examples are a seeded random sample of each code's firing positions,
    `context` tokens either side. Counting is vectorised with torch, one pass per group.
    """
    table: dict[str, int] = {}
    lengths = [len(row) for row in token_strs]
    width = max(lengths, default=0)
    tok_grid = torch.full((len(token_strs), width), -1, dtype=torch.long)
    for b, row in enumerate(token_strs):
        if row:
            tok_grid[b, : len(row)] = torch.tensor([table.setdefault(s, len(table)) for s in row])
    strings = list(table)
    pos_b, pos_p = torch.nonzero(tok_grid >= 0, as_tuple=True)
    tok = tok_grid[pos_b, pos_p]
    generator = torch.Generator().manual_seed(seed)

    sites: dict[str, list[dict[int, CodeSummary]]] = {}
    for key, codes in codes_by_site.items():
        codes = torch.as_tensor(codes).detach().cpu().long()
        if codes.ndim == 3:
            codes = codes[..., None]
        if codes.ndim != 4:
            raise ValueError(
                f"{key}: codes must be [batch, pos, groups, k], got {tuple(codes.shape)}"
            )
        if codes.shape[0] != len(token_strs) or codes.shape[1] < width:
            raise ValueError(
                f"{key}: codes {tuple(codes.shape)} do not cover {len(token_strs)} sequences "
                f"of up to {width} tokens"
            )
        valid = codes[pos_b, pos_p]  # [N, groups, k]
        sites[_site_name(key)] = [
            _summarise_group(
                valid[:, g],
                tok,
                pos_b,
                pos_p,
                token_strs,
                strings,
                max_examples,
                context,
                max_top_tokens,
                generator,
            )
            for g in range(codes.shape[2])
        ]
    return BrowserData(sites=sites, n_tokens=int(pos_b.numel()), title=title)


def _unit(site: str) -> str:
    """What a group is called at this site: heads for attention outputs."""
    return "head" if ".attn." in f".{site}." or "hook_z" in site else "group"


def _encode(
    data: BrowserData, max_examples: int, max_top_tokens: int, max_codes_per_group: int | None
) -> dict:
    """The compact JSON blob: a string table plus per-code rows of integers.

    A code row is [id, count, [tok, count, ...], [[firing index, tok, tok, ...], ...]].
    """
    table: dict[str, int] = {}
    sid = table.setdefault  # sid(token, len(table)): index of token in the string table

    sites = []
    for name, groups in data.sites.items():
        encoded_groups, dropped = [], []
        for codes in groups:
            ranked = sorted(codes.items(), key=lambda kv: (-kv[1].count, kv[0]))
            kept = ranked if max_codes_per_group is None else ranked[:max_codes_per_group]
            dropped.append(len(ranked) - len(kept))
            rows = []
            for code, summary in kept:
                toks = [
                    v
                    for t, c in summary.top_tokens[:max_top_tokens]
                    for v in (sid(t, len(table)), int(c))
                ]
                exs = [
                    [int(idx), *[sid(t, len(table)) for t in ctx]]
                    for ctx, idx in summary.examples[:max_examples]
                    if 0 <= idx < len(ctx)
                ]
                rows.append([int(code), int(summary.count), toks, exs])
            encoded_groups.append(rows)
        sites.append(
            {"name": name, "unit": _unit(name), "groups": encoded_groups, "dropped": dropped}
        )
    return {
        "v": 1,
        "title": data.title,
        "n_tokens": int(data.n_tokens),
        "strings": list(table),
        "sites": sites,
    }


def build_browser(
    data: BrowserData,
    path: str | os.PathLike,
    max_examples: int = 8,
    max_top_tokens: int = 10,
    max_codes_per_group: int | None = None,
) -> Path:
    """Write the code browser for data to path (one static HTML file, atomic write)."""
    blob = _script_json(_encode(data, max_examples, max_top_tokens, max_codes_per_group))
    title = html.escape(data.title)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1 id="title">{title}</h1>\n{_BODY}\n'
        f'<script type="application/json" id="codelens-data">{blob}</script>\n'
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )
    return atomic_write_text(path, page)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 4px; }
#summary, #status { color: #555; margin: 4px 0 10px; }
#status.error { color: #b00020; font-weight: 600; }
#controls { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: center;
            padding: 10px; background: #f3f4f6; border-radius: 6px; }
#controls input[type=text] { width: 22em; font-family: ui-monospace, monospace; }
#main { display: flex; gap: 20px; align-items: flex-start; margin-top: 12px; }
#listpane { flex: 1 1 55%; min-width: 0; }
#detail { flex: 1 1 45%; min-width: 0; border-left: 3px solid #e5e7eb; padding-left: 16px; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid #e5e7eb;
         vertical-align: top; }
th { background: #f9fafb; position: sticky; top: 0; }
tr.code-row { cursor: pointer; }
tr.code-row:hover { background: #eef2ff; }
tr.code-row.selected { background: #dbeafe; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tok { white-space: pre; font-family: ui-monospace, monospace; font-size: 0.92em;
       border: 1px solid #d1d5db; border-radius: 3px; padding: 0 2px; margin: 0 1px;
       background: #fafafa; display: inline-block; }
.tok.fire { background: #fbbf24; border-color: #b45309; font-weight: 700; }
.example { margin: 4px 0; padding: 4px; background: #f9fafb; border-radius: 4px;
           line-height: 1.9; }
.bar { display: inline-block; height: 0.7em; background: #60a5fa; vertical-align: middle; }
#pager button { margin: 0 4px; }
"""

_BODY = """<div id="summary"></div>
<div id="controls">
  <label>Site <select id="site"></select></label>
  <label><span id="unit-label">Group</span> <select id="group"></select></label>
  <label>Search by <select id="mode">
    <option value="id">code id</option>
    <option value="regex">regex over fired tokens</option>
    <option value="token">top token</option>
  </select></label>
  <input type="text" id="q" placeholder="e.g. 42, or ^ May$" spellcheck="false">
  <button id="go" type="button">Search</button>
  <button id="clear" type="button">Clear</button>
  <label>Sort <select id="sort">
    <option value="count">most frequent</option>
    <option value="id">code id</option>
  </select></label>
</div>
<div id="status"></div>
<div id="main">
  <div id="listpane">
    <div id="pager"><button id="prev" type="button">&larr; prev</button>
      <span id="pageinfo"></span><button id="next" type="button">next &rarr;</button></div>
    <table id="code-list"><thead><tr><th>site</th><th>group</th><th>code</th>
      <th>count</th><th>freq</th><th id="match-col">match</th><th>top tokens</th></tr></thead>
      <tbody></tbody></table>
  </div>
  <div id="detail"><p>Select a code to see its statistics and examples.</p></div>
</div>
<noscript>This code browser needs JavaScript.</noscript>"""

_JS = r"""
(function () {
  "use strict";
  var PAGE = 100;
  var D, S;
  var DEFAULTS = {site: -1, group: -1, mode: "id", q: "", sort: "count", page: 0, code: null};
  var state = Object.assign({}, DEFAULTS);
  var results = [];
  function $(id) { return document.getElementById(id); }
  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function vis(t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"); }
  function tokSpan(i, fire) { return h("span", fire ? "tok fire" : "tok", vis(S[i])); }
  function pct(x) { return (100 * x).toFixed(x < 0.001 ? 4 : 2) + "%"; }
  function setStatus(msg, isError) {
    var s = $("status"); s.textContent = msg; s.className = isError ? "error" : "";
  }

  function parseSearch(text) {
    var m = /^(id|regex|re|token|tok):([\s\S]*)$/.exec(text);
    if (m) return {mode: {re: "regex", tok: "token"}[m[1]] || m[1], q: m[2]};
    if (/^\s*\d+(\s*[,\s]\s*\d+)*\s*$/.test(text)) return {mode: "id", q: text};
    return {mode: state.mode, q: text};
  }

  function readHash() {
    var raw = location.hash.replace(/^#/, "");
    if (!raw) return;
    raw.split("&").forEach(function (part) {
      var i = part.indexOf("="); if (i < 0) return;
      var k = part.slice(0, i), v;
      try { v = decodeURIComponent(part.slice(i + 1)); } catch (e) { v = part.slice(i + 1); }
      if (k === "site") {
        state.site = -1;
        D.sites.forEach(function (s, si) { if (s.name === v) state.site = si; });
      } else if (k === "group") {
        state.group = v === "all" || v === "" ? -1 : parseInt(v, 10);
        if (isNaN(state.group)) state.group = -1;
      } else if (k === "search") {
        var p = parseSearch(v); state.mode = p.mode; state.q = p.q;
      } else if (k === "mode") { state.mode = v; }
      else if (k === "q") { state.q = v; }
      else if (k === "sort") { state.sort = v === "id" ? "id" : "count"; }
      else if (k === "page") { state.page = Math.max(0, parseInt(v, 10) || 0); }
      else if (k === "code") { state.code = v; }
    });
  }

  function writeHash() {
    var parts = [];
    if (state.site >= 0) parts.push("site=" + encodeURIComponent(D.sites[state.site].name));
    if (state.group >= 0) parts.push("group=" + state.group);
    if (state.q) parts.push("search=" + encodeURIComponent(state.mode + ":" + state.q));
    if (state.sort !== "count") parts.push("sort=id");
    if (state.page) parts.push("page=" + state.page);
    if (state.code) parts.push("code=" + encodeURIComponent(state.code));
    try { history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* file: */ }
  }

  function fillSelects() {
    var site = $("site"); site.textContent = "";
    site.appendChild(new Option("all sites", "-1"));
    D.sites.forEach(function (s, si) { site.appendChild(new Option(s.name, String(si))); });
    site.value = String(state.site);
    var group = $("group"); group.textContent = "";
    group.appendChild(new Option("all", "-1"));
    var n = 0, units = {};
    D.sites.forEach(function (s, si) {
      if (state.site >= 0 && si !== state.site) return;
      n = Math.max(n, s.groups.length); units[s.unit] = 1;
    });
    var unit = Object.keys(units).length === 1 ? Object.keys(units)[0] : "group/head";
    for (var g = 0; g < n; g++) group.appendChild(new Option(unit + " " + g, String(g)));
    if (state.group >= n) state.group = -1;
    group.value = String(state.group);
    $("unit-label").textContent = unit[0].toUpperCase() + unit.slice(1);
    $("mode").value = state.mode; $("q").value = state.q; $("sort").value = state.sort;
  }

  function scope() {
    var out = [];
    D.sites.forEach(function (s, si) {
      if (state.site >= 0 && si !== state.site) return;
      s.groups.forEach(function (rows, gi) {
        if (state.group >= 0 && gi !== state.group) return;
        for (var i = 0; i < rows.length; i++) out.push({s: si, g: gi, r: rows[i], score: -1});
      });
    });
    return out;
  }

  function matcher() {
    var q = state.q, test;
    if (state.mode === "regex") {
      var re;
      try { re = new RegExp(q); } catch (e) {
        throw new Error("invalid regular expression: " + e.message);
      }
      test = function (t) { return re.test(t); };
    } else {
      var want = q.trim();
      test = function (t) { return t.trim() === want; };
    }
    var cache = new Int8Array(S.length);
    return function (i) {
      if (!cache[i]) cache[i] = test(S[i]) ? 1 : 2;
      return cache[i] === 1;
    };
  }

  function search() {
    var entries = scope();
    var q = state.q.trim();
    if (!q) return entries;
    if (state.mode === "id") {
      var ids = {};
      q.split(/[\s,]+/).forEach(function (x) { if (/^\d+$/.test(x)) ids[x] = true; });
      return entries.filter(function (e) { return ids[String(e.r[0])]; });
    }
    var m = matcher(), out = [];
    entries.forEach(function (e) {
      var toks = e.r[2], hits = 0, any = false;
      for (var i = 0; i < toks.length; i += 2) if (m(toks[i])) { hits += toks[i + 1]; any = true; }
      if (!any) e.r[3].forEach(function (ex) { if (m(ex[1 + ex[0]])) any = true; });
      if (any) { e.score = hits / e.r[1]; out.push(e); }
    });
    return out;
  }

  function sortResults() {
    results.sort(function (a, b) {
      if (a.score !== b.score) return b.score - a.score;
      if (state.sort === "id") return a.r[0] - b.r[0] || a.s - b.s || a.g - b.g;
      return b.r[1] - a.r[1] || a.r[0] - b.r[0] || a.s - b.s || a.g - b.g;
    });
  }

  function codeKey(e) { return D.sites[e.s].name + "|" + e.g + "|" + e.r[0]; }

  function renderList() {
    var body = $("code-list").tBodies[0];
    body.textContent = "";
    var pages = Math.max(1, Math.ceil(results.length / PAGE));
    if (state.page >= pages) state.page = pages - 1;
    var lo = state.page * PAGE, hi = Math.min(results.length, lo + PAGE);
    var searching = state.q.trim() && state.mode !== "id";
    $("match-col").style.display = searching ? "" : "none";
    for (var i = lo; i < hi; i++) {
      var e = results[i], r = e.r, site = D.sites[e.s];
      var tr = h("tr", "code-row");
      tr.setAttribute("data-site", site.name);
      tr.setAttribute("data-group", String(e.g));
      tr.setAttribute("data-code", String(r[0]));
      if (state.code === codeKey(e)) tr.className += " selected";
      tr.appendChild(h("td", "", site.name));
      tr.appendChild(h("td", "", site.unit + " " + e.g));
      tr.appendChild(h("td", "num", r[0]));
      tr.appendChild(h("td", "num", r[1]));
      tr.appendChild(h("td", "num", pct(r[1] / Math.max(1, D.n_tokens))));
      var mc = h("td", "num", searching ? pct(e.score) : "");
      if (!searching) mc.style.display = "none";
      tr.appendChild(mc);
      var tt = h("td", "top-tokens");
      for (var j = 0; j < r[2].length && j < 10; j += 2) tt.appendChild(tokSpan(r[2][j], false));
      tr.appendChild(tt);
      tr.addEventListener("click", (function (entry) {
        return function () {
          state.code = codeKey(entry); writeHash(); renderList(); renderDetail();
        };
      })(e));
      body.appendChild(tr);
    }
    $("pageinfo").textContent = results.length
      ? "codes " + (lo + 1) + "\u2013" + hi + " of " + results.length
        + " (page " + (state.page + 1) + " of " + pages + ")"
      : "no codes";
    $("prev").disabled = state.page <= 0;
    $("next").disabled = state.page >= pages - 1;
  }

  function findCode(key) {
    if (!key) return null;
    var parts = key.split("|");
    if (parts.length === 1) {  // bare id: first match in the current results
      for (var i = 0; i < results.length; i++) {
        if (String(results[i].r[0]) === parts[0]) return results[i];
      }
      return null;
    }
    var id = parts.pop(), g = parseInt(parts.pop(), 10), name = parts.join("|");
    for (var si = 0; si < D.sites.length; si++) {
      if (D.sites[si].name !== name) continue;
      var rows = D.sites[si].groups[g] || [];
      for (var k = 0; k < rows.length; k++) {
        if (String(rows[k][0]) === id) return {s: si, g: g, r: rows[k]};
      }
    }
    return null;
  }

  function renderDetail() {
    var box = $("detail"), e = findCode(state.code);
    box.textContent = "";
    if (!e) {
      box.appendChild(h("p", "", "Select a code to see its statistics and examples."));
      return;
    }
    var site = D.sites[e.s], r = e.r;
    box.setAttribute("data-code", String(r[0]));
    box.appendChild(h("h2", "", "code " + r[0]));
    box.appendChild(h("p", "where", site.name + " \u00b7 " + site.unit + " " + e.g));
    var stats = h("table", "stats"), tb = h("tbody");
    [["count", r[1]], ["frequency", pct(r[1] / Math.max(1, D.n_tokens))],
     ["distinct top tokens shown", r[2].length / 2]].forEach(function (kv) {
      var tr = h("tr");
      tr.appendChild(h("th", "", kv[0])); tr.appendChild(h("td", "num", kv[1]));
      tb.appendChild(tr);
    });
    stats.appendChild(tb); box.appendChild(stats);
    box.appendChild(h("h3", "", "top tokens"));
    var tt = h("table", "top-token-table"), body = h("tbody");
    for (var j = 0; j < r[2].length; j += 2) {
      var tr = h("tr"), share = r[2][j + 1] / r[1];
      var td = h("td"); td.appendChild(tokSpan(r[2][j], false)); tr.appendChild(td);
      tr.appendChild(h("td", "num", r[2][j + 1]));
      var bar = h("td"), b = h("span", "bar"); b.style.width = Math.round(120 * share) + "px";
      bar.appendChild(b); bar.appendChild(document.createTextNode(" " + pct(share)));
      tr.appendChild(bar); body.appendChild(tr);
    }
    tt.appendChild(body); box.appendChild(tt);
    box.appendChild(h("h3", "", "examples"));
    if (!r[3].length) box.appendChild(h("p", "", "no examples stored"));
    r[3].forEach(function (ex) {
      var div = h("div", "example");
      for (var i = 1; i < ex.length; i++) div.appendChild(tokSpan(ex[i], i - 1 === ex[0]));
      box.appendChild(div);
    });
  }

  function update(keepPage) {
    if (!keepPage) state.page = 0;
    try {
      results = search();
      sortResults();
      var n = results.length, one = n === 1;
      setStatus(state.q.trim()
        ? n + (one ? " code matches " : " codes match ") + state.mode + ":" + state.q
        : "all " + n + (one ? " code" : " codes") + " in scope", false);
    } catch (err) {
      results = [];
      setStatus(String(err.message || err), true);
    }
    if (results.length === 1 && state.q.trim()) state.code = codeKey(results[0]);
    renderList();
    renderDetail();
    writeHash();
  }

  function init() {
    D = JSON.parse($("codelens-data").textContent);
    S = D.strings;
    var total = 0, dropped = 0;
    D.sites.forEach(function (s) {
      s.groups.forEach(function (g) { total += g.length; });
      (s.dropped || []).forEach(function (d) { dropped += d; });
    });
    $("summary").textContent = D.n_tokens + " token positions \u00b7 "
      + D.sites.length + " sites \u00b7 " + total + " codes that fired"
      + (dropped ? " (" + dropped + " rarer codes not kept)" : "");
    readHash();
    fillSelects();
    $("site").addEventListener("change", function () {
      state.site = parseInt(this.value, 10); state.code = null; fillSelects(); update();
    });
    $("group").addEventListener("change", function () {
      state.group = parseInt(this.value, 10); state.code = null; update();
    });
    $("mode").addEventListener("change", function () { state.mode = this.value; update(); });
    $("sort").addEventListener("change", function () { state.sort = this.value; update(); });
    var timer = null;
    function fromInput() {
      var p = parseSearch($("q").value);
      state.mode = p.mode; state.q = p.q; $("mode").value = p.mode; update();
    }
    $("q").addEventListener("input", function () {
      clearTimeout(timer); timer = setTimeout(fromInput, 250);
    });
    $("q").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { clearTimeout(timer); fromInput(); }
    });
    $("go").addEventListener("click", fromInput);
    $("clear").addEventListener("click", function () {
      $("q").value = ""; state.q = ""; state.code = null; update();
    });
    $("prev").addEventListener("click", function () { state.page -= 1; update(true); });
    $("next").addEventListener("click", function () { state.page += 1; update(true); });
    window.addEventListener("hashchange", function () {
      state = Object.assign({}, DEFAULTS); readHash(); fillSelects(); update(true); });
    update(true);
    document.body.setAttribute("data-ready", "1");
  }

  try { init(); } catch (err) {
    setStatus("code browser failed to start: " + (err.message || err), true);
  }
})();
"""
