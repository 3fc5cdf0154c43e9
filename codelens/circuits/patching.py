"""One patching engine for every circuit method: any set of edges ablated in one forward.

A receiver's input is the residual stream plus, for every ablated edge ``s -> r``,
``patched_s - current_s``: the receiver sees the ablated value of the sender while every
other receiver sees the sender as it is. ``mask[r, s]`` (1 = ablated, 0 = kept; values in
between interpolate, which is what integrated gradients need) selects the edges, so a
circuit, its complement, a single edge or all edges at once cost one forward each, and
the gradient of a metric with respect to the mask scores every edge at once.

Ablation values: ``"corrupted"`` runs a paired corrupted input (a code sender's
ablated value is then whether the corrupted run chose that code), ``"mean"`` the
batch mean at each position (components only), ``"zero"`` removes the write (a code is
removed from its site's sum). Hooks and the model's hook flags are always restored,
even when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor

from codelens.circuits.graph import Graph
from codelens.codebook import EMPTY_SLOT
from codelens.vocab import (
    attn_input,
    attn_site,
    codes_hook,
    mlp_in,
    mlp_site,
    quantized_hook,
    resid_post,
    resid_pre,
)

Ablation = Literal["corrupted", "mean", "zero"]
ABLATIONS = ("corrupted", "mean", "zero")
Metric = Callable[[Tensor], Tensor]


@dataclass
class _Record:
    """Sender values of one forward: component outputs and code-site ids."""

    components: dict[str, Tensor] = field(default_factory=dict)  # hook -> [B, T, n, d]
    z: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, T, H, d_head]
    ids: dict[str, Tensor] = field(default_factory=dict)  # code site -> [B, T, G, k]


def _check_graph_fits(graph: Graph, model) -> None:
    """Refuse a graph built for another model: other sizes, another block layout (GPT-NeoX
    runs a layer's MLP in parallel with its attention, GPT-2 after it) or other codebooks."""
    if graph.n_layers != model.cfg.n_layers or graph.n_heads != model.cfg.n_heads:
        raise ValueError(
            f"the graph was built for another model: {graph.n_layers} layers x "
            f"{graph.n_heads} heads, the model has {model.cfg.n_layers} x {model.cfg.n_heads}"
        )
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    stage = dict(zip(graph.receivers, graph.receiver_stage.tolist(), strict=True))
    wrong = [
        layer
        for layer in range(graph.n_layers)
        if stage.get(f"m{layer}") != 2 * layer + (1 if parallel else 2)
    ]
    if wrong:
        layout = "in parallel with" if parallel else "after"
        raise ValueError(
            f"the graph was built for another architecture: this model runs each MLP "
            f"{layout} its layer's attention, the graph does not (layers {wrong})"
        )
    codebooks = dict(getattr(model, "codebooks", {}))
    for hook, site in graph.code_sites.items():
        cb = codebooks.get(hook)
        if cb is None or tuple(site.columns.shape) != (cb.n_groups, cb.n_codes + 1):
            raise ValueError(
                f"the graph's code site {hook} does not match the model's codebooks "
                f"({sorted(codebooks)}); build the graph from this model"
            )


class Patcher:
    """Runs ``model`` on ``clean`` tokens with any set of edges of ``graph`` ablated.

    ``forwards`` counts every model forward this patcher ran, including the two
    reference runs made here (clean, and corrupted when ``ablation="corrupted"``).
    """

    def __init__(
        self,
        model,
        graph: Graph,
        clean: Int[Tensor, "batch pos"],
        *,
        ablation: Ablation = "corrupted",
        corrupted: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if (ablation == "corrupted") != (corrupted is not None):
            raise ValueError("corrupted tokens are needed for, and only for, ablation='corrupted'")
        if corrupted is not None and corrupted.shape != clean.shape:
            raise ValueError(
                f"clean and corrupted tokens must have the same shape, got "
                f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
            )
        if ablation == "mean" and graph.code_sites:
            raise ValueError(
                "mean ablation is defined for components only; code nodes are ablated by "
                "'zero' (removed from the site's sum) or 'corrupted' (the corrupted run's codes)"
            )
        _check_graph_fits(graph, model)
        self.model, self.graph, self.ablation = model, graph, ablation
        self.forwards = 0
        device = next(model.parameters()).device
        self.clean = clean.to(device)
        self._W_O = {
            layer: model.blocks[layer].attn.W_O.detach() for layer in range(graph.n_layers)
        }
        self._codebooks = dict(getattr(model, "codebooks", {}))
        self._n_senders = len(graph.senders)
        with torch.no_grad():
            self.clean_logits, clean_rec = self._forward(self.clean, None)
            if ablation == "corrupted":
                self.corrupted_logits, self._patched = self._forward(corrupted.to(device), None)
            else:
                self._patched = _constant_record(clean_rec, ablation)

    # ---------------------------------------------------------------- masks

    def empty_mask(self) -> Float[Tensor, "R S"]:
        """No edge ablated (the full model)."""
        return torch.zeros(len(self.graph.receivers), self._n_senders, device=self.clean.device)

    def full_mask(self) -> Float[Tensor, "R S"]:
        """Every edge ablated (the empty circuit)."""
        return self.graph.valid.to(self.clean.device, torch.float32)

    def run(self, mask: Float[Tensor, "R S"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits with ``mask[r, s]`` of edge ``s -> r`` ablated (non-edges ignored)."""
        expected = (len(self.graph.receivers), self._n_senders)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
        return self._forward(self.clean, mask)[0]

    # ---------------------------------------------------------------- the forward

    def _forward(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, _Record]:
        rec = _Record()
        if mask is not None:
            valid = self.graph.valid.to(mask.device)
            mask = torch.cat([mask * valid, mask.new_zeros(mask.shape[0], 1)], dim=1)
        hooks = self._hooks(rec, mask)
        self.forwards += 1
        with _hook_flags(self.model), self.model.hooks(fwd_hooks=hooks):
            logits = self.model(tokens)
        return logits, rec

    def _hooks(self, rec: _Record, mask: Tensor | None) -> list[tuple[str, Callable]]:
        g = self.graph
        hooks: list[tuple[str, Callable]] = [(resid_pre(0), self._record_component(rec, "embed"))]
        for layer in range(g.n_layers):
            attn, mlp = attn_site(layer), mlp_site(layer)
            if mask is not None:
                for kind in ("q", "k", "v"):
                    rows = g.receiver_rows(f"a{layer}<{kind}>")
                    hooks.append((attn_input(layer, kind), self._receive(rec, mask, rows)))
                rows = g.receiver_rows(f"m{layer}")
                hooks.append((mlp_in(layer), self._receive(rec, mask, rows)))
            for site in (attn, mlp):
                if site in self._codebooks:
                    hooks.append((codes_hook(site), self._record_ids(rec, site)))
            z_hook = quantized_hook(attn) if attn in self._codebooks else attn
            hooks.append((z_hook, self._record_z(rec, layer)))
            out_hook = quantized_hook(mlp) if mlp in self._codebooks else mlp
            hooks.append((out_hook, self._record_component(rec, mlp)))
        if mask is not None:
            rows = g.receiver_rows("logits")
            hooks.append((resid_post(g.n_layers - 1), self._receive(rec, mask, rows)))
        return hooks

    def _record_component(self, rec: _Record, key: str):
        def hook(x: Tensor, hook) -> None:
            if x.dim() == 4:  # quantized MLP output, [B, T, G, d / G]
                x = rearrange(x, "b t g e -> b t (g e)")
            rec.components[key] = x[:, :, None, :]

        return hook

    def _record_z(self, rec: _Record, layer: int):
        def hook(z: Tensor, hook) -> None:
            rec.z[layer] = z

        return hook

    def _record_ids(self, rec: _Record, site: str):
        def hook(ids: Tensor, hook) -> None:
            rec.ids[site] = ids

        return hook

    def _receive(self, rec: _Record, mask: Tensor, rows: slice):
        def hook(x: Tensor, hook) -> Tensor:
            delta = self._delta(rec, mask[rows])
            return x + (delta if x.dim() == 4 else delta[:, :, 0])

        return hook

    # ---------------------------------------------------------------- deltas

    def _delta(self, rec: _Record, m: Float[Tensor, "r S1"]) -> Float[Tensor, "b t r d"]:
        """``sum_s m[r, s] * (patched_s - current_s)`` over the senders recorded so far."""
        g, pat = self.graph, self._patched
        delta = None
        for key, current in rec.components.items():
            if key == "embed" or key not in g.code_sites:
                start, stop = g.component_columns[key]
                diff = pat.components[key] - current
                term = einsum(m[:, start:stop], diff, "r n, b t n d -> b t r d")
                delta = term if delta is None else delta + term
        for layer, z in rec.z.items():
            site = attn_site(layer)
            if site in g.code_sites:
                continue
            start, stop = g.component_columns[site]
            diff = einsum(pat.z[layer] - z, self._W_O[layer], "b t h e, h e d -> b t h d")
            term = einsum(m[:, start:stop], diff, "r h, b t h d -> b t r d")
            delta = term if delta is None else delta + term
        for site, ids in rec.ids.items():
            if site in g.code_sites:
                term = self._code_term(site, m, pat.ids[site]) - self._code_term(site, m, ids)
                delta = term if delta is None else delta + term
        return delta

    def _code_term(
        self, site: str, m: Float[Tensor, "r S1"], ids: Int[Tensor, "b t G k"]
    ) -> Float[Tensor, "b t r d"]:
        """``sum`` over the codes in ``ids`` of ``m[r, code] * code's write``."""
        spec, cb = self.graph.code_sites[site], self._codebooks[site]
        n_codes = cb.n_codes
        safe = torch.where(ids == EMPTY_SLOT, n_codes, ids)
        group = torch.arange(cb.n_groups, device=ids.device)[:, None]
        weight = m[:, spec.columns.to(ids.device)[group, safe]]  # [r, b, t, G, k]
        present = (ids != EMPTY_SLOT).to(m.dtype) / (cb.k if cb.combine == "mean" else 1)
        vectors = cb.codes.detach()[group, ids.clamp(min=0)]  # [b, t, G, k, e]
        summed = einsum(weight * present, vectors, "r b t g k, b t g k e -> b t r g e")
        if spec.kind == "attn":
            return einsum(summed, self._W_O[spec.layer], "b t r h e, h e d -> b t r d")
        return rearrange(summed, "b t r g e -> b t r (g e)")


def _constant_record(clean: _Record, ablation: Ablation) -> _Record:
    """Mean (over the batch, per position) or zero values of every sender."""
    rec = _Record()

    def value(x: Tensor) -> Tensor:
        if ablation == "zero":
            return torch.zeros_like(x)
        return x.mean(0, keepdim=True).expand_as(x)

    rec.components = {k: value(v) for k, v in clean.components.items()}
    rec.z = {k: value(v) for k, v in clean.z.items()}
    rec.ids = {k: torch.full_like(v, EMPTY_SLOT) for k, v in clean.ids.items()}
    return rec


@contextlib.contextmanager
def _hook_flags(model) -> Iterator[None]:
    """Per-head q/k/v inputs and ``hook_mlp_in`` on for the duration, restored after."""
    split = bool(getattr(model.cfg, "use_split_qkv_input", False))
    mlp_in = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    try:
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(split)
        model.set_use_hook_mlp_in(mlp_in)
