"""Visualisation: circuitsvis token views, plotly figures, offline pages, a code browser.

Everything takes plain data (tensors, token strings, dicts), so it works with any model.
Pages and the browser inline their JavaScript once and draw without network access.
"""

from codelens.viz._page import CircuitsVisView, Page, render_page
from codelens.viz.browser import BrowserData, CodeSummary, build_browser, collect_browser_data
from codelens.viz.figures import (
    code_usage,
    intervention_results,
    precision_recall,
    steering_results,
    training_curves,
)
from codelens.viz.tokens import attention_pattern, code_tokens, site_code_tokens, top_examples

__all__ = [
    "BrowserData",
    "CircuitsVisView",
    "CodeSummary",
    "Page",
    "attention_pattern",
    "build_browser",
    "code_tokens",
    "code_usage",
    "collect_browser_data",
    "intervention_results",
    "precision_recall",
    "render_page",
    "site_code_tokens",
    "steering_results",
    "top_examples",
    "training_curves",
]
