"""The computational graph that circuits live in: senders write to the residual stream,
receivers read from it, and an edge is one sender's write as seen by one receiver.

Senders, in topological order: the embeddings (``embed``), each attention head
(``a{l}.h{h}``) and each MLP (``m{l}``). At a codebook site a graph built with
``level="codes"`` replaces the head or MLP by its codes, one sender per code that is
active on the data (``a{l}.h{h}:{code}``, ``m{l}.g{g}:{code}``): a site's output is
exactly the sum of its active codes, so each code's write is a separate edge.

Receivers: each head's query, key and value inputs separately (``a{l}.h{h}<q>``), each
MLP's input (``m{l}``) and the logits (``logits``). An edge runs from every sender to
every receiver that reads the residual stream after it is written (with parallel
attention and MLP, as in GPT-NeoX, a layer's MLP does not read that layer's heads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Int
from torch import Tensor

from codelens.vocab import (
    Code,
    attn_site,
    cached_batches,
    codes_hook,
    hook_in_block,
    is_attn_site,
    is_block_hook,
    is_mlp_site,
    mlp_site,
)

Level = Literal["components", "codes"]
LEVELS = ("components", "codes")
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class CodeSite:
    """The codes of one codebook site that are senders of a code-level graph.

    ``columns[g, c]`` is the sender column of code ``c`` of group ``g``; codes that
    are not senders (never active on the data) map to the graph's spare column, which
    no edge uses, so they are always kept as they are.
    """

    hook: str
    kind: Literal["attn", "mlp"]
    layer: int
    columns: Int[Tensor, "groups codes_plus_one"]


@dataclass
class Graph:
    """Senders, receivers and which (receiver, sender) pairs are edges.

    ``valid[r, s]`` is True where sender ``s`` writes before receiver ``r`` reads.
    Build one with `build_graph`. Sender and receiver names are for display and for the
    edge names a `Circuit` saves; ``sender_nodes[s]`` is the node sender ``s`` belongs to
    (a code's head or MLP) and ``sender_codes[s]`` the `Code` of a code sender.
    """

    n_layers: int
    n_heads: int
    level: Level
    senders: list[str]
    sender_stage: Int[Tensor, " S"]
    receivers: list[str]
    receiver_stage: Int[Tensor, " R"]
    component_columns: dict[str, tuple[int, int]] = field(default_factory=dict)
    code_sites: dict[str, CodeSite] = field(default_factory=dict)
    sender_nodes: list[str] = field(default_factory=list)
    sender_codes: dict[int, Code] = field(default_factory=dict)

    @property
    def valid(self) -> Bool[Tensor, "R S"]:
        return self.sender_stage[None, :] < self.receiver_stage[:, None]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_names(self) -> list[str]:
        """Every edge as ``"sender->receiver"``, in (receiver, sender) order."""
        r, s = self.valid.nonzero(as_tuple=True)
        return [
            f"{self.senders[j]}->{self.receivers[i]}"
            for i, j in zip(r.tolist(), s.tolist(), strict=True)
        ]

    def edge_index(self) -> dict[str, tuple[int, int]]:
        """Edge name -> (receiver row, sender column)."""
        r, s = self.valid.nonzero(as_tuple=True)
        return {
            f"{self.senders[j]}->{self.receivers[i]}": (i, j)
            for i, j in zip(r.tolist(), s.tolist(), strict=True)
        }

    def node_columns(self) -> dict[str, list[int]]:
        """Node -> its sender columns: one for a component, one per code at a code site
        (``a1.h2:64`` belongs to head ``a1.h2``, ``m0.g1:5`` to MLP ``m0``)."""
        nodes: dict[str, list[int]] = {}
        for column, node in enumerate(self.sender_nodes):
            nodes.setdefault(node, []).append(column)
        return nodes

    def receiver_rows(self, name: str) -> slice:
        """Rows of a receiver block: ``"a{l}<q>"`` (queries), ``"m{l}"``, ``"logits"``."""
        return self._receiver_blocks[name]

    @property
    def _receiver_blocks(self) -> dict[str, slice]:
        blocks: dict[str, slice] = {}
        row = 0
        for layer in range(self.n_layers):
            for kind in QKV:
                blocks[f"a{layer}<{kind}>"] = slice(row, row + self.n_heads)
                row += self.n_heads
            blocks[f"m{layer}"] = slice(row, row + 1)
            row += 1
        blocks["logits"] = slice(row, row + 1)
        return blocks


INSIDE_COMPONENT = (
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
)
"""Hooks inside one attention layer's or MLP's computation: a codebook there is part of
that component (its reads and writes stay the graph's edges)."""


def check_codebook_sites(sites: Iterable[str]) -> None:
    """Refuse codebooks the graph cannot express.

    Edges are head and MLP writes to the residual stream, added up at each receiver. A
    codebook at ``hook_z`` or ``hook_mlp_out`` is a sender (split into codes at
    ``level="codes"``) and one inside a component (`INSIDE_COMPONENT`) belongs to it; one
    on the residual stream or a sum of heads (``hook_resid_pre``, ``hook_attn_out``, ...)
    would quantise many senders' writes at once, so no edge could be ablated alone.
    """
    outside = [
        s
        for s in sites
        if not (is_attn_site(s) or is_mlp_site(s))
        and not (is_block_hook(s) and hook_in_block(s) in INSIDE_COMPONENT)
    ]
    if outside:
        raise ValueError(
            f"circuits cannot express the codebooks at {outside}: a codebook there quantises "
            "the sum of several heads' and MLPs' writes, so no single edge can be ablated. "
            "Circuits take codebooks at attn.hook_z and hook_mlp_out, or inside one head or "
            f"MLP ({', '.join(INSIDE_COMPONENT)}); take the others off with "
            "model.remove_codebook(site) first"
        )


def node_stage(node: str) -> float:
    """Where a node or sender name of this module sits, left to right: ``embed`` 0, layer
    l's heads ``2l + 1`` and its MLP ``2l + 2`` (codes with their head or MLP), logits last."""
    if node == "embed":
        return 0.0
    if node == "logits":
        return float("inf")
    layer = node[1:].split(".", 1)[0].split(":", 1)[0].split("<", 1)[0]
    if node[:1] not in ("a", "m") or not layer.isdigit():
        raise ValueError(f"not a circuit node name: {node!r}")
    return 2 * int(layer) + (1 if node[0] == "a" else 2)


def build_graph(
    model,
    level: Level = "components",
    active_codes: dict[str, Bool[Tensor, "groups codes"]] | None = None,
) -> Graph:
    """The graph of ``model``; ``level="codes"`` needs ``active_codes`` (site -> which
    codes fire on the data, see `active_codes`) and splits codebook sites into codes."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    if n_kv != n_heads:
        raise ValueError(
            f"grouped-query attention ({n_kv} key/value heads for {n_heads} query heads) "
            "is not supported: circuits need one key and one value input per head"
        )
    # GPT-NeoX / Pythia: a layer's MLP reads the residual before its attention writes
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    sites = dict(getattr(model, "codebooks", {}))
    check_codebook_sites(sites)
    if level == "codes":
        if not sites:
            raise ValueError("a code-level graph needs a model with codebooks")
        if active_codes is None:
            raise ValueError("a code-level graph needs active_codes (see circuits.active_codes)")
        missing = set(sites) - set(active_codes)
        if missing:
            raise ValueError(f"active_codes lacks the codebook sites {sorted(missing)}")
    senders: list[str] = ["embed"]
    nodes: list[str] = ["embed"]
    sender_codes: dict[int, Code] = {}
    stages: list[int] = [0]
    component_columns: dict[str, tuple[int, int]] = {"embed": (0, 1)}
    code_specs: list[tuple[str, str, int, Tensor, int]] = []
    for layer in range(n_layers):
        for kind, hook, stage in (
            ("attn", attn_site(layer), 2 * layer + 1),
            ("mlp", mlp_site(layer), 2 * layer + 2),
        ):
            start = len(senders)
            if level == "codes" and hook in sites:
                active = active_codes[hook].to("cpu", torch.bool)
                cb = sites[hook]
                if active.shape != (cb.n_groups, cb.n_codes):
                    raise ValueError(
                        f"active_codes[{hook!r}] has shape {tuple(active.shape)}, "
                        f"expected {(cb.n_groups, cb.n_codes)}"
                    )
                groups, codes = active.nonzero(as_tuple=True)
                for g, c in zip(groups.tolist(), codes.tolist(), strict=True):
                    node = f"a{layer}.h{g}" if kind == "attn" else f"m{layer}"
                    group = "" if kind == "attn" or cb.n_groups == 1 else f".g{g}"
                    sender_codes[len(senders)] = Code(hook, g, c)
                    senders.append(f"{node}{group}:{c}")
                    nodes.append(node)
                    stages.append(stage)
                code_specs.append((hook, kind, layer, active, start))
            else:
                names = (
                    [f"a{layer}.h{h}" for h in range(n_heads)] if kind == "attn" else [f"m{layer}"]
                )
                senders += names
                nodes += names
                stages += [stage] * len(names)
                component_columns[hook] = (start, len(senders))
    spare = len(senders)
    code_sites = {}
    for hook, kind, layer, active, start in code_specs:
        columns = torch.full((active.shape[0], active.shape[1] + 1), spare, dtype=torch.long)
        flat = active.nonzero(as_tuple=True)
        columns[flat] = torch.arange(start, start + int(active.sum()))
        code_sites[hook] = CodeSite(hook, kind, layer, columns)  # last column: EMPTY_SLOT
    receivers: list[str] = []
    receiver_stage: list[int] = []
    for layer in range(n_layers):
        for kind in QKV:
            receivers += [f"a{layer}.h{h}<{kind}>" for h in range(n_heads)]
            receiver_stage += [2 * layer + 1] * n_heads
        receivers.append(f"m{layer}")
        receiver_stage.append(2 * layer + (1 if parallel else 2))
    receivers.append("logits")
    receiver_stage.append(2 * n_layers + 1)
    return Graph(
        n_layers=n_layers,
        n_heads=n_heads,
        level=level,
        senders=senders,
        sender_stage=torch.tensor(stages),
        receivers=receivers,
        receiver_stage=torch.tensor(receiver_stage),
        component_columns=component_columns,
        code_sites=code_sites,
        sender_nodes=nodes,
        sender_codes=sender_codes,
    )


@torch.no_grad()
def active_codes(model, *tokens: Int[Tensor, "batch pos"]) -> dict[str, Bool[Tensor, "G C"]]:
    """Which codes of each codebook site fire anywhere on ``tokens`` (one forward each)."""
    sites = dict(getattr(model, "codebooks", {}))
    if not sites:
        raise ValueError("the model has no codebooks")
    names = [codes_hook(site) for site in sites]
    found = {
        site: torch.zeros(cb.n_groups, cb.n_codes, dtype=torch.bool) for site, cb in sites.items()
    }
    for batch in tokens:
        _, cache = next(cached_batches(model, batch, names, batch_size=len(batch)))
        for site, cb in sites.items():
            ids = rearrange(cache[codes_hook(site)], "... g k -> g (... k)").cpu()
            group = torch.arange(cb.n_groups)[:, None].expand_as(ids)
            keep = ids >= 0
            found[site][group[keep], ids[keep]] = True
    return found
