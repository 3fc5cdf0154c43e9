"""Offline-safe HTML assembly for circuitsvis views and plotly figures.

circuitsvis inlines its 1.3 MB JavaScript bundle into every figure, and its CDN variant
does not draw offline. A `Page` inlines the circuitsvis bundle (and the plotly.js bundle)
at most once and renders every figure against that shared copy, so a report with twenty
figures stays small and opens without network access. All data placed inside `<script>`
is escaped so that strings such as `</script>` cannot end the script early.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codelens.files import atomic_write_text

__all__ = ["CircuitsVisView", "Page", "render_page"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #1d1d1f; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
.codelens-section { margin-bottom: 1.5em; }
.codelens-text { white-space: pre-wrap; }
.codelens-cv { margin: 12px 0; min-height: 20px; }
.codelens-error { color: #b00020; font-family: monospace; }
"""


def _script_json(obj: Any) -> str:
    """Serialise obj as a JS literal that is safe inside a <script> element.

    `<`, `>` and `&` (and the JS line separators) become \\uXXXX escapes, which JSON
    and JS decode back to the same characters, so no data can close the script tag.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_plain_leaf)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _plain_leaf(obj: Any) -> Any:
    """json.dumps fallback for tensors, arrays and numpy scalars."""
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return _plain(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _plain(obj: Any) -> Any:
    """Convert tensors / arrays (also nested in lists and dicts) to plain Python."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _safe_inline_js(source: str) -> str:
    """Make a JS bundle safe to inline: `</script` becomes `<\\/script` (same JS meaning)."""
    out = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
    return out.replace("<!--", "<\\!--")


@functools.lru_cache(maxsize=1)
def _circuitsvis_bundle() -> str:
    """The circuitsvis IIFE bundle from the installed wheel (defines `CircuitsVis`)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    source = path.read_text(encoding="utf-8")
    # Drop the source-map comment: the .map file is not shipped next to the page.
    source = source.replace("//# sourceMappingURL=iife.js.map", "")
    return _safe_inline_js(source)


@functools.lru_cache(maxsize=1)
def _plotly_bundle() -> str:
    """The plotly.js bundle shipped with the plotly package."""
    from plotly.offline import get_plotlyjs

    return _safe_inline_js(get_plotlyjs())


class CircuitsVisView:
    """One circuitsvis figure: a React component name plus its props.

    Displays in Jupyter/Colab through `_repr_html_` (bundle inlined, works offline) and
    can be added to a `Page`, which shares one bundle between all its figures.
    """

    def __init__(self, component: str, props: dict[str, Any], title: str | None = None):
        self.component = component
        self.props = {k: _plain(v) for k, v in props.items() if v is not None}
        self.title = title

    def _markup(self, div_id: str) -> str:
        """Target div plus the script that renders into it (needs `CircuitsVis` loaded)."""
        return _cv_markup(div_id, self.component, self.props)

    def _repr_html_(self) -> str:
        div_id = f"codelens-cv-{uuid.uuid4().hex[:12]}"
        return (
            f'<div id="{div_id}" class="codelens-cv"></div>'
            f"<script>{_circuitsvis_bundle()}\n{_cv_call(div_id, self.component, self.props)}"
            "</script>"
        )

    def __repr__(self) -> str:
        return f"CircuitsVisView({self.component!r}, props={sorted(self.props)})"


def _cv_call(div_id: str, component: str, props: dict[str, Any]) -> str:
    """JS that renders one component into div_id, reporting failures in the div."""
    return (
        "(function(){var el=document.getElementById(" + _script_json(div_id) + ");"
        "try{CircuitsVis.render("
        + _script_json(div_id)
        + ",CircuitsVis["
        + _script_json(component)
        + "],"
        + _script_json(props)
        + ");}"
        "catch(e){el.className+=' codelens-error';el.textContent='circuitsvis failed: '+e;}"
        "})();"
    )


def _cv_markup(div_id: str, component: str, props: dict[str, Any]) -> str:
    return (
        f'<div id="{div_id}" class="codelens-cv"></div>\n'
        f"<script>{_cv_call(div_id, component, props)}</script>"
    )


def _is_plotly(item: Any) -> bool:
    return hasattr(item, "to_plotly_json") and hasattr(item, "to_html")


class Page:
    """An HTML report of headed sections holding circuitsvis views, plotly figures or text.

    Each JS bundle is inlined once, only if some figure needs it; `save` writes atomically.
    """

    def __init__(self, title: str, sections: Iterable[Any] = ()):
        self.title = title
        self._sections: list[tuple[str | None, Any]] = []
        for section in sections:
            if isinstance(section, tuple) and len(section) == 2:
                self.add(section[1], heading=section[0])
            else:
                self.add(section)

    def add(self, item: Any, heading: str | None = None) -> Page:
        """Append a view, plotly figure or plain text (shown literally) under heading."""
        if not (isinstance(item, (CircuitsVisView, str)) or _is_plotly(item)):
            raise TypeError(f"cannot place {type(item).__name__} on a page")
        if heading is None and isinstance(item, CircuitsVisView):
            heading = item.title
        self._sections.append((heading, item))
        return self

    def _body(self, prefix: str) -> tuple[str, bool, bool]:
        """Section markup plus whether circuitsvis / plotly bundles are needed."""
        parts: list[str] = []
        need_cv = need_plotly = False
        for i, (heading, item) in enumerate(self._sections):
            div_id = f"{prefix}{i}"
            parts.append('<section class="codelens-section">')
            if heading:
                parts.append(f"<h2>{html.escape(heading)}</h2>")
            if isinstance(item, CircuitsVisView):
                need_cv = True
                parts.append(item._markup(div_id))
            elif isinstance(item, str):
                parts.append(f'<p class="codelens-text">{html.escape(item)}</p>')
            else:
                need_plotly = True
                parts.append(
                    item.to_html(
                        full_html=False,
                        include_plotlyjs=False,
                        div_id=div_id,
                        default_width="100%",
                    )
                )
            parts.append("</section>")
        return "\n".join(parts), need_cv, need_plotly

    @staticmethod
    def _bundles(need_cv: bool, need_plotly: bool) -> str:
        scripts = []
        if need_cv:
            scripts.append(f"<script>{_circuitsvis_bundle()}</script>")
        if need_plotly:
            scripts.append("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>")
            scripts.append(f'<script charset="utf-8">{_plotly_bundle()}</script>')
        return "\n".join(scripts)

    def html(self) -> str:
        """The complete standalone HTML document."""
        body, need_cv, need_plotly = self._body("codelens-fig-")
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n"
            f"{self._bundles(need_cv, need_plotly)}\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n{body}\n</body>\n</html>\n"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to path atomically; returns the path."""
        return atomic_write_text(path, self.html())

    def _repr_html_(self) -> str:
        prefix = f"codelens-{uuid.uuid4().hex[:8]}-"
        body, need_cv, need_plotly = self._body(prefix)
        return (
            f"<div><h3>{html.escape(self.title)}</h3>{self._bundles(need_cv, need_plotly)}"
            f"{body}</div>"
        )


def render_page(title: str, sections: Iterable[Any], path: str | os.PathLike | None = None) -> str:
    """HTML for a page of sections: items or (heading, item) pairs (see `Page`).

    With path, the page is also written there atomically.
    """
    text = Page(title, sections).html()
    if path is not None:
        atomic_write_text(path, text)
    return text
