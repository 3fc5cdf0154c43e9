"""Fast unit tests for codelens.viz (no browser): escaping, page assembly, figures, browser data."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import pytest
import torch
from _chromium import script_elements, visible_text

from codelens.files import atomic_write_text
from codelens.viz import (
    BrowserData,
    CircuitsVisView,
    CodeSummary,
    Page,
    attention_pattern,
    build_browser,
    code_tokens,
    code_usage,
    collect_browser_data,
    intervention_results,
    precision_recall,
    render_page,
    site_code_tokens,
    steering_results,
    top_examples,
    training_curves,
)
from codelens.viz._page import _script_json

NASTY = ["<bos>", "</script>", "<!--", "&amp;", "\u2028", ' "q" ', "\n"]


# --- escaping and page assembly -------------------------------------------------------------


def test_script_json_escapes_and_round_trips():
    obj = {"tokens": NASTY, "x": torch.tensor([1, 2]), "n": None}
    text = _script_json(obj)
    for raw in ("<", ">", "&", "\u2028"):
        assert raw not in text
    assert json.loads(text) == {"tokens": NASTY, "x": [1, 2], "n": None}


def test_token_views_escape_tokens_for_circuitsvis():
    codes = torch.tensor([[1, 2], [3, 1], [4, 5], [1, 1], [0, 2], [6, 7], [8, 9]])
    view = code_tokens(NASTY, codes, 1)
    assert view.component == "ColoredTokens"
    assert view.props["tokens"][:4] == ["&lt;bos&gt;", "&lt;/script&gt;", "&lt;!--", "&amp;amp;"]
    assert view.props["values"] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert code_tokens(NASTY, codes[:, 0], 3).props["values"][1] == 1.0  # [pos] codes
    with pytest.raises(ValueError):
        code_tokens(NASTY[:3], codes, 1)


def test_site_code_tokens_layers_most_frequent_codes():
    codes = torch.tensor([[5, 2], [5, 3], [2, 9]])
    view = site_code_tokens(["a", "b", "c"], codes, max_codes=3)
    assert view.props["labels"] == ["code 2", "code 5", "code 3"]  # count 2, 2, 1; ties by id
    assert view.props["values"] == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_top_examples_windows_and_marks_firing_token():
    toks = [f"t{i}" for i in range(20)]
    view = top_examples([(toks, 10), (["<bos>", "x"], 0)], code=4, site="s", context=2)
    windows, acts = view.props["tokens"][0][0], view.props["activations"][0][0]
    assert windows[0] == ["t8", "t9", "t10", "t11", "t12"] and acts[0] == [0, 0, 1, 0, 0]
    assert windows[1] == ["&lt;bos&gt;", "x"] and acts[1] == [1, 0]
    with pytest.raises(ValueError):
        top_examples([(toks, 25)])


def test_attention_pattern_checks_shape():
    view = attention_pattern(["a", "b"], torch.ones(3, 2, 2) / 2)
    assert view.component == "AttentionPatterns" and len(view.props["attention"]) == 3
    with pytest.raises(ValueError):
        attention_pattern(["a", "b", "c"], torch.ones(3, 2, 2))


def test_page_shares_bundles_and_keeps_scripts_intact():
    views = [code_tokens(NASTY, torch.arange(7), 1, title=f"v{i} </script>") for i in range(3)]
    figs = [
        code_usage(torch.tensor([0, 1, 2])),
        steering_results([{"topic": "a", "before": 0.1, "after": 0.5}]),
    ]
    html = render_page("t </script>", [*views, ("plots", figs[0]), figs[1], "text <bos>"])
    assert html.count("var CircuitsVis=") == 1
    assert html.count("sourceMappingURL=iife") == 0
    # One plotly.js copy: the page is far smaller than two copies of the 4.8 MB bundle.
    assert html.count("window.PlotlyConfig") == 1 and len(html) < 1.5e6 + 5e6
    assert script_elements(html) == html.lower().count("</script")
    text = visible_text(html)
    assert "t </script>" in text and "v2 </script>" in text and "text <bos>" in text
    # Only the bundles the page needs.
    only_text = render_page("x", ["hello"])
    assert "CircuitsVis" not in only_text and "PlotlyConfig" not in only_text


def test_view_repr_html_is_self_contained():
    view = code_tokens(["<bos>", "a"], torch.tensor([1, 2]), 1)
    snippet = view._repr_html_()
    assert "var CircuitsVis=" in snippet and "CircuitsVis.render(" in snippet
    assert "<iframe" not in snippet and "unpkg.com" not in snippet
    assert script_elements(snippet) == snippet.lower().count("</script") == 1
    assert isinstance(view, CircuitsVisView) and "ColoredTokens" in repr(view)
    with pytest.raises(TypeError):
        Page("x").add(object())


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "page.html"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["page.html"]
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o044  # not a private 0600 temp file
    saved = Page("p", ["x"]).save(tmp_path / "p.html")
    assert saved.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    html = render_page("r", ["x"], path=tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html


# --- figures ---------------------------------------------------------------------------------


def test_code_usage_histogram_with_dead_share():
    fig = code_usage(torch.tensor([0, 0, 5, 10, 1]), title="usage <b>")
    assert "dead codes: 40.0% of 5" in fig.layout.title.text
    assert "&lt;b&gt;" in fig.layout.title.text  # plotly would render <b> as markup
    assert fig.layout.yaxis.type == "log"
    assert sum(fig.data[0].y) == 5
    multi = code_usage({"a": torch.tensor([0, 1]), "b": torch.tensor([3, 3, 0, 0])}, bins=4)
    assert len(multi.data) == 2 and "dead codes: 50.0% of 6" in multi.layout.title.text
    assert multi.data[0].name == "a (dead 50.0%)"


def test_precision_recall_scatter():
    codes = [{"label": "code 3 <bos>", "precision": 0.9, "recall": 0.5}]
    neurons = [{"label": "n1", "precision": 0.4, "recall": 0.2}]
    fig = precision_recall(codes, neurons)
    assert [t.name for t in fig.data] == ["codes", "best neurons"]
    assert fig.data[0].text == ("code 3 &lt;bos&gt;",)
    assert fig.data[1].x == (0.2,) and fig.data[1].y == (0.4,)


def test_codes_stay_visible_where_neurons_share_their_point():
    same = [{"precision": 1.0, "recall": 0.5}]
    fig = precision_recall(same, same)
    codes, neurons = fig.data  # neurons drawn last, on top
    assert codes.marker.symbol.endswith("-open") and neurons.marker.symbol.endswith("-open")
    assert codes.marker.size > neurons.marker.size  # the cross fits inside the circle
    assert fig.layout.yaxis.range[1] >= 1.05 and fig.layout.xaxis.range[0] <= -0.05


def test_swap_chart_puts_each_unit_on_its_own_axis():
    rows = [
        {"kind": "swap", "success rate": 0.8, "JSD to target": 0.1},
        {"kind": "clean", "success rate": 0.1, "JSD to target": 0.7},
    ]
    units = {"success rate": "share of prompts", "JSD to target": "bits"}
    fig = intervention_results(rows, units=units)
    rate, jsd = fig.data
    assert rate.yaxis != jsd.yaxis and rate.xaxis != jsd.xaxis
    titles = {fig.layout[a.replace("y", "yaxis")].title.text for a in (rate.yaxis, jsd.yaxis)}
    assert titles == {"share of prompts", "bits"}
    same_unit = intervention_results(rows, units={"success rate": "x", "JSD to target": "x"})
    assert same_unit.data[0].yaxis == same_unit.data[1].yaxis


def test_training_curves_do_not_zoom_into_noise(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "flat": 1.1111 + 1e-5 * (s % 2), "loss": 3.0 - s / 10} for s in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    fig = training_curves(path)
    flat = next(t for t in fig.data if t.name == "flat")
    low, high = fig.layout[flat.yaxis.replace("y", "yaxis")].range
    assert high - low == pytest.approx(0.11112, rel=1e-3) and low < 1.1111 < 1.11111 < high
    loss = next(t for t in fig.data if t.name == "loss")
    assert fig.layout[loss.yaxis.replace("y", "yaxis")].range is None  # it moves: autorange


def test_intervention_and_steering_bars():
    rows = [
        {"kind": "swap", "success_rate": 0.8, "success_rate_err": 0.05, "jsd": 0.1, "n": 20},
        {"kind": "ablate", "success_rate": 0.3, "jsd": 0.2, "n": 20},
    ]
    fig = intervention_results(rows, metrics=["success_rate", "jsd"])
    assert fig.layout.barmode == "group" and [t.name for t in fig.data] == ["success_rate", "jsd"]
    assert fig.data[0].error_y.array == (0.05, 0.0) and fig.data[0].x == ("swap", "ablate")
    assert [t.name for t in intervention_results(rows).data] == ["success_rate", "jsd", "n"]
    steer = steering_results([{"topic": "dragons", "before": 0.1, "after": 0.7}])
    assert [t.name for t in steer.data] == ["before", "after"] and steer.data[1].y == (0.7,)


def test_training_curves_groups_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 0, "loss/ce": 3.0, "loss/recon": 1.0, "dead_frac": 0.5, "note": "x"},
        {"step": 10, "loss/ce": 2.0, "loss/recon": float("nan"), "dead_frac": 0.2},
        {"step": 20, "lr": 1e-3},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 30, "loss/c')
    fig = training_curves(path)
    names = {t.name: t for t in fig.data}
    assert set(names) == {"loss/ce", "loss/recon", "dead_frac", "lr"}
    assert [a.text for a in fig.layout.annotations] == ["loss", "dead_frac", "lr"]
    assert names["loss/ce"].x == (0, 10) and names["loss/recon"].y[1] is None
    assert names["loss/ce"].xaxis == names["loss/recon"].xaxis != names["lr"].xaxis
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 2, "a": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        training_curves(path)


# --- browser data ----------------------------------------------------------------------------


def _brute_force(codes, token_strs, g):
    counts, tok_counts = {}, {}
    for b, row in enumerate(token_strs):
        for p, tok in enumerate(row):
            for c in codes[b, p, g].tolist():
                if c < 0:
                    continue
                counts[c] = counts.get(c, 0) + 1
                tok_counts.setdefault(c, {}).setdefault(tok, 0)
                tok_counts[c][tok] += 1
    return counts, tok_counts


def test_collect_browser_data_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    words = ["<bos>", " a", " b", " c", "</script>"]
    token_strs = [
        [words[int(i)] for i in torch.randint(5, (n,), generator=gen)] for n in (10, 7, 3)
    ]
    codes = torch.randint(0, 6, (3, 10, 2, 2), generator=gen)
    codes[0, 0, 0, 1] = -1  # ignored
    codes[1, 7:] = 99  # padding positions: never counted
    data = collect_browser_data(
        {"blocks.0.hook_mlp_out.hook_codes": codes}, token_strs, max_examples=3, context=2
    )
    assert list(data.sites) == ["blocks.0.hook_mlp_out"] and data.n_tokens == 20
    for g in range(2):
        counts, tok_counts = _brute_force(codes, token_strs, g)
        got = data.sites["blocks.0.hook_mlp_out"][g]
        assert {c: s.count for c, s in got.items()} == counts and 99 not in got
        for c, summary in got.items():
            expected = sorted(tok_counts[c].items(), key=lambda kv: (-kv[1], kv[0]))
            assert sorted(summary.top_tokens, key=lambda kv: (-kv[1], kv[0])) == expected
            assert [n for _, n in summary.top_tokens] == sorted(
                (n for _, n in summary.top_tokens), reverse=True
            )
            assert 1 <= len(summary.examples) <= 3
            for ctx, idx in summary.examples:
                assert len(ctx) <= 5 and ctx[idx] in tok_counts[c]


def test_collect_browser_data_is_seeded_and_validates():
    token_strs = [["a"] * 30]
    codes = torch.zeros(1, 30, 1, 1, dtype=torch.long)
    one = collect_browser_data({"s": codes}, token_strs, max_examples=4, context=0, seed=3)
    two = collect_browser_data({"s": codes}, token_strs, max_examples=4, context=0, seed=3)
    assert one == two and one.sites["s"][0][0].count == 30
    assert collect_browser_data({"s": codes[..., 0]}, token_strs).sites["s"][0][0].count == 30
    with pytest.raises(ValueError):
        collect_browser_data({"s": codes[:, :10]}, token_strs)


def _blob(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="codelens-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_build_browser_embeds_compact_bounded_data(tmp_path):
    summary = CodeSummary(
        count=50,
        top_tokens=[(f"<t{i}>", 50 - i) for i in range(30)],
        examples=[(["<bos>", "</script>", "x"], 1)] * 20,
    )
    groups = [{c: summary for c in range(5)}, {7: CodeSummary(1, [("a", 1)], [(["a"], 0)])}]
    data = BrowserData({"blocks.0.attn.hook_z": groups, "mlp</script>": [{}]}, n_tokens=100)
    path = build_browser(data, tmp_path / "b.html", max_examples=2, max_top_tokens=3,
                         max_codes_per_group=4)  # fmt: skip
    html = path.read_text(encoding="utf-8")
    assert script_elements(html) == html.lower().count("</script") == 2
    blob = _blob(html)
    strings = blob["strings"]
    assert len(strings) == len(set(strings))
    site = blob["sites"][0]
    assert site["unit"] == "head" and site["dropped"] == [1, 0]
    row = site["groups"][0][0]
    assert row[0] == 0 and row[1] == 50 and len(row[2]) == 6 and len(row[3]) == 2
    assert [strings[i] for i in row[2][::2]] == ["<t0>", "<t1>", "<t2>"]
    assert row[3][0][0] == 1 and [strings[i] for i in row[3][0][1:]] == ["<bos>", "</script>", "x"]
    assert blob["sites"][1] == {
        "name": "mlp</script>",
        "unit": "group",
        "groups": [[]],
        "dropped": [0],
    }
    assert not math.isnan(blob["n_tokens"]) and blob["n_tokens"] == 100
