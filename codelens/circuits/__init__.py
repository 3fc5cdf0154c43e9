"""Circuit discovery over components and codes, through `HookedCodebookTransformer`.

Build a `Graph` (``level="codes"`` splits codebook sites into their active codes), a
`Patcher` for a clean batch and its ablation, then run `acdc`, `eap`, `eap_ig` or
`fast_path`; judge the `Circuit` with `faithfulness`, `completeness` and
`faithfulness_curve`. `find_circuit` (or `circuit_at_faithfulness` for any edge ranking)
returns the fewest top-ranked edges that reach a target faithfulness. See docs/circuits.md.

`attribution_graph` builds the exact attribution graph over codes of one prompt
(`prune_graph`, `validate_graph`, `attribution_page`).
"""

from codelens.circuits.attribution import (
    AttributionGraph,
    CodeNode,
    InterventionCheck,
    PrunedGraph,
    attribution_graph,
    graph_scores,
    node_influence,
    prune_graph,
    validate_graph,
)
from codelens.circuits.attribution_view import (
    attribution_page,
    save_circuit_tracer_json,
    to_circuit_tracer_json,
)
from codelens.circuits.evaluate import (
    FRACTIONS,
    Curve,
    completeness,
    faithfulness,
    faithfulness_curve,
)
from codelens.circuits.figure import circuit_figure, curves_figure
from codelens.circuits.graph import Graph, active_codes, build_graph
from codelens.circuits.methods import (
    METHODS,
    acdc,
    attribution_scores,
    discover,
    eap,
    eap_ig,
    fast_path,
)
from codelens.circuits.metrics import KLDivergence, LogitDifference
from codelens.circuits.patching import Patcher
from codelens.circuits.result import Circuit
from codelens.circuits.target import RANKINGS, circuit_at_faithfulness, find_circuit

__all__ = [
    "FRACTIONS",
    "METHODS",
    "RANKINGS",
    "AttributionGraph",
    "CodeNode",
    "InterventionCheck",
    "PrunedGraph",
    "attribution_graph",
    "attribution_page",
    "graph_scores",
    "node_influence",
    "prune_graph",
    "save_circuit_tracer_json",
    "to_circuit_tracer_json",
    "validate_graph",
    "Circuit",
    "Curve",
    "Graph",
    "KLDivergence",
    "LogitDifference",
    "Patcher",
    "acdc",
    "active_codes",
    "attribution_scores",
    "build_graph",
    "circuit_at_faithfulness",
    "circuit_figure",
    "completeness",
    "curves_figure",
    "discover",
    "eap",
    "eap_ig",
    "faithfulness",
    "faithfulness_curve",
    "fast_path",
    "find_circuit",
]
