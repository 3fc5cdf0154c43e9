"""`Circuit`: what a discovery method found, how, and at what cost; saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from codelens.circuits.graph import Graph
from codelens.files import atomic_write_text

FORMAT = "codelens-circuit/1"


def node_of(endpoint: str) -> str:
    """The node an edge endpoint belongs to: ``a1.h2<q>`` -> ``a1.h2``."""
    return endpoint.split("<", 1)[0]


@dataclass
class Circuit:
    """A circuit: its edges, every graph edge's score, and how it was found.

    ``scores`` holds every edge of the graph (higher = more important; for attribution
    methods the signed estimate of ``m(ablated) - m(full)``, ranked by magnitude, see
    `ranking`). ``forwards`` / ``backwards`` count model passes the method ran (not the
    patcher's reference runs); ``seconds`` is its wall time.
    """

    edges: list[str]
    scores: dict[str, float]
    method: str
    settings: dict[str, Any]
    level: str
    forwards: int
    backwards: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        graph: Graph,
        kept: Bool[Tensor, "R S"],
        scores: Float[Tensor, "R S"],
        method: str,
        settings: dict[str, Any],
        *,
        forwards: int,
        backwards: int,
        seconds: float,
    ) -> Circuit:
        index = graph.edge_index()
        values = scores.detach().cpu().tolist()
        kept = kept.cpu()
        return cls(
            edges=[name for name, (r, s) in index.items() if kept[r, s]],
            scores={name: float(values[r][s]) for name, (r, s) in index.items()},
            method=method,
            settings=settings,
            level=graph.level,
            forwards=forwards,
            backwards=backwards,
            seconds=seconds,
        )

    # ---------------------------------------------------------------- views

    @property
    def nodes(self) -> list[str]:
        """Every node an edge of the circuit touches, senders first."""
        seen: dict[str, None] = {}
        for edge in self.edges:
            sender, receiver = edge.split("->")
            seen.setdefault(sender)
            seen.setdefault(node_of(receiver))
        return list(seen)

    def ranking(self) -> list[str]:
        """Every graph edge, most important first (attribution: by magnitude)."""
        key = abs if self.method in ("eap", "eap-ig") else (lambda v: v)
        return sorted(self.scores, key=lambda e: key(self.scores[e]), reverse=True)

    def mask(self, graph: Graph, edges: list[str] | None = None) -> Float[Tensor, "R S"]:
        """The patching mask that keeps ``edges`` (default: this circuit) and ablates the rest."""
        index = graph.edge_index()
        unknown = [e for e in (self.edges if edges is None else edges) if e not in index]
        if unknown:
            raise ValueError(f"edges not in this graph: {unknown[:5]}")
        mask = graph.valid.float()
        for e in self.edges if edges is None else edges:
            mask[index[e]] = 0.0
        return mask

    def jaccard(self, other: Circuit) -> float:
        """Edge-set overlap with another circuit (1 = identical)."""
        a, b = set(self.edges), set(other.edges)
        return len(a & b) / len(a | b) if a | b else 1.0

    def summary(self) -> str:
        return (
            f"{self.method} ({self.level}): {len(self.edges)} of {len(self.scores)} edges, "
            f"{len(self.nodes)} nodes, {self.forwards} forwards, {self.backwards} backwards, "
            f"{self.seconds:.2f}s"
        )

    # ---------------------------------------------------------------- saving

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (a temporary file renamed into place)."""
        return atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit saved by `save`, with a clear error for anything else."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a valid circuit file: {err}") from err
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a codelens circuit file ({FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in data and n != "extra")
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"{path}: missing fields {missing}, unknown fields {unknown}")
        stray = sorted(set(data["edges"]) - set(data["scores"]))
        if stray:
            raise ValueError(f"{path}: circuit edges without a score: {stray[:5]}")
        return cls(**data)
