"""Browser tests: the code browser and circuitsvis/plotly pages draw in offline headless Chromium.

Skipped without Chromium unless CODELENS_REQUIRE_BROWSER=1. Screenshots go to
$CODELENS_SCREENSHOT_DIR when set (else the test's temp folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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

from codelens.viz import (
    Page,
    attention_pattern,
    build_browser,
    code_tokens,
    code_usage,
    collect_browser_data,
    site_code_tokens,
    top_examples,
)

pytestmark = pytest.mark.browser

MLP = "blocks.1.hook_mlp_out"
ATTN = "blocks.0.attn.hook_z"
N_SEQ, SEQ = 12, 24
WORDS = [" the", " cat", " sat", " on", " mat", " and", ",", ".", " in", " was"]


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


def _shots_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("CODELENS_SCREENSHOT_DIR") or tmp_path)


def _corpus() -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Token strings with awkward tokens, and codes: 42 fires on "May", 7 on "<bos>",
    13 on "</script>"; all other codes are random ids in [100, 400)."""
    g = torch.Generator().manual_seed(0)
    token_strs = []
    for b in range(N_SEQ):
        row = ["<bos>"] + [
            WORDS[int(i)] for i in torch.randint(len(WORDS), (SEQ - 1,), generator=g)
        ]
        row[5], row[7], row[11], row[13] = "May", "</script>", "&amp;", "\n"
        token_strs.append(row[: SEQ - b % 3])  # ragged: the rest is padding
    mlp = torch.randint(100, 400, (N_SEQ, SEQ, 2, 2), generator=g)
    attn = torch.randint(100, 400, (N_SEQ, SEQ, 4, 2), generator=g)
    for b, row in enumerate(token_strs):
        for p, tok in enumerate(row):
            if tok == "May":
                mlp[b, p, 0, 0] = 42
            if tok == "<bos>":
                attn[b, p, 1, 0] = 7
            if tok == "</script>":
                attn[b, p, 1, 0] = 13
    return token_strs, {f"{MLP}.hook_codes": mlp, f"{ATTN}.hook_codes": attn}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    token_strs, codes = _corpus()
    data = collect_browser_data(codes, token_strs, max_examples=4, context=4)
    path = build_browser(data, tmp_path_factory.mktemp("browser") / "codes.html")
    return path, data


def _rows(dom: str) -> list[dict[str, str]]:
    return [
        dict(re.findall(r'data-(site|group|code)="([^"]*)"', m.group(0)))
        for m in re.finditer(r'<tr class="code-row[^"]*"[^>]*>', dom)
    ]


def _ready(dom: str) -> None:
    assert 'data-ready="1"' in dom, "browser script did not finish"
    assert 'id="status" class="error"' not in dom


def test_browser_draws_paged_list_and_screenshot(chromium, browser, tmp_path):
    path, data = browser
    html = path.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html  # nothing to fetch
    dom = dump_dom(chromium, file_url(path, f"site={MLP}&group=0"))
    _ready(dom)
    rows = _rows(dom)
    n_codes = len(data.sites[MLP][0])
    assert n_codes > 100 and len(rows) == 100  # paged
    assert all(r["site"] == MLP and r["group"] == "0" for r in rows)
    assert f"of {n_codes} (page 1 of {-(-n_codes // 100)})" in visible_text(dom)

    dom2 = dump_dom(chromium, file_url(path, f"site={MLP}&group=0&page=1"))
    assert len(_rows(dom2)) == 100 and f"codes 101\u2013200 of {n_codes}" in visible_text(dom2)

    shot = screenshot(
        chromium,
        file_url(path, f"site={MLP}&group=0&search=id:42"),
        _shots_dir(tmp_path) / "codelens_browser.png",
    )
    pixels = read_png(shot)
    assert pixels.shape[:2] == (900, 1200)
    assert content_pixel_share(pixels) > 0.01  # text, table and highlighted examples drew


def test_browser_regex_search(chromium, browser):
    path, data = browser
    dom = dump_dom(chromium, file_url(path, f"site={MLP}&group=0&search=regex:%5EMay%24"))
    _ready(dom)
    rows = _rows(dom)
    assert rows[0] == {"site": MLP, "group": "0", "code": "42"}  # 100% of its firings match
    assert 0 < len(rows) < len(data.sites[MLP][0])
    assert "100.00%" in visible_text(dom)
    # A code that never fires on "May" is not listed, across all sites either.
    dom_all = dump_dom(chromium, file_url(path, "search=regex:^May$"))
    codes = {(r["site"], r["code"]) for r in _rows(dom_all)}
    assert (MLP, "42") in codes and (ATTN, "7") not in codes and (ATTN, "13") not in codes
    # Search by top token (exact, surrounding whitespace ignored).
    dom_tok = dump_dom(chromium, file_url(path, "site=&search=token:%3C%2Fscript%3E"))
    rows = _rows(dom_tok)
    assert rows[0] == {"site": ATTN, "group": "1", "code": "13"} and len(rows) > 1


def test_browser_id_search_detail_and_awkward_tokens(chromium, browser):
    path, data = browser
    frag = f"site={ATTN}&group=1&search=id:7,13&code={ATTN}%7C1%7C13"
    dom = dump_dom(chromium, file_url(path, frag))
    _ready(dom)
    assert sorted(r["code"] for r in _rows(dom)) == ["13", "7"]
    text = visible_text(dom)
    assert "<bos>" in text and "</script>" in text and "&amp;" in text  # shown literally
    detail = dom[dom.index('id="detail"') :]
    assert 'data-code="13"' in detail[:200]
    assert f"count{data.sites[ATTN][1][13].count}" in visible_text(detail).replace("\n", "")
    fired = re.findall(r'<span class="tok fire">([^<]*)</span>', detail)
    assert fired and all(t == "&lt;/script&gt;" for t in fired)
    assert "<noscript>" in dom  # markup after the data blob survived

    # A single id match opens its detail view by itself.
    dom = dump_dom(chromium, file_url(path, f"site={ATTN}&group=1&search=7"))
    detail = visible_text(dom[dom.index('id="detail"') :])
    assert "code 7" in detail and f"count{N_SEQ}" in detail.replace("\n", "")
    assert "<bos>" in detail


def test_browser_bad_regex_reports_error(chromium, browser):
    path, _ = browser
    dom = dump_dom(chromium, file_url(path, "search=regex:(unclosed"))
    assert 'data-ready="1"' in dom
    assert 'id="status" class="error"' in dom and "invalid regular expression" in dom
    assert _rows(dom) == []


def test_page_circuitsvis_and_plotly_draw_offline(chromium, tmp_path):
    toks = ["<bos>", "In", " May", "</script>", "<!--", " &amp;", "\n", " end"]
    codes = torch.tensor([[1, 2], [3, 4], [5, 1], [7, 8], [1, 9], [2, 3], [4, 6], [1, 0]])
    page = Page(
        "views </script> <bos>",
        [
            ("where code 1 fires", code_tokens(toks, codes, 1)),
            site_code_tokens(toks, codes),
            top_examples([(toks, 3), (toks, 2)], code=1, site=MLP, context=3),
            attention_pattern(toks, torch.softmax(torch.randn(2, 8, 8), -1).tril()),
            code_usage(
                {"<bos> site": torch.tensor([0, 3, 5, 0, 9]), "b": torch.tensor([1, 0])},
                title="usage of <b>",
            ),
            "plain text </script> <bos> stays text",
        ],
    )
    path = page.save(tmp_path / "page.html")
    html = path.read_text(encoding="utf-8")
    assert html.count("var CircuitsVis=") == 1  # the bundle is shared
    # Every "</script>" closes one of our script elements: no data ended a script early.
    assert script_elements(html) == html.lower().count("</script") == 8
    dom = dump_dom(chromium, file_url(path))
    assert "circuitsvis failed" not in visible_text(dom)
    for i in range(3):  # React drew token views into the first three figures
        fig = dom[dom.index(f'id="codelens-fig-{i}"') :]
        assert fig.index('class="colored-tokens"') < fig.index("</section>")
    fig3 = dom[dom.index('id="codelens-fig-3"') :]
    assert "<canvas" in fig3[: fig3.index("</section>")]  # attention heads drawn
    assert 'class="main-svg"' in dom  # plotly drew
    text = visible_text(dom)
    for tok in ("<bos>", "</script>", "<!--", "&amp;"):
        assert tok in text
    assert "plain text </script> <bos> stays text" in text
    # plotly shows markup-like labels literally (<b> is not turned into bold).
    assert "usage of <b> (dead codes: 42.9% of 7)" in text and "<bos> site (dead 40.0%)" in text

    shot = screenshot(chromium, file_url(path), _shots_dir(tmp_path) / "codelens_page.png")
    assert content_pixel_share(read_png(shot)) > 0.01
