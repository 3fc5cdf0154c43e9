"""Attribution graphs over codes: the exact per-prompt graph of a codebook model.

A codebook site's output *is* the sum of its active codes, so a codebook model is its
own replacement model: a graph over codes needs no error nodes. `attribution_graph`
builds, for one prompt, the graph whose

- **nodes** are every active code at each (site, group, position) (a `CodeNode`), the
  token embedding at each position, and the top logits at the last position
  (circuit-tracer's default: at most ``max_n_logits=10``, as few as reach
  ``desired_logit_prob=0.95`` of the probability);
- **edges** are direct effects in the *frozen* model: attention patterns, every
  LayerNorm/RMSNorm scale, the MLP nonlinearities and the code selections are held
  at their values on the prompt. An MLP's activation becomes a fixed gain per hidden
  unit, ``act(h0) / h0`` (gated MLPs: the gate ``act(gate0)`` is held and the linear
  branch stays), and a normalisation divides by its prompt-time scale. Everything is
  then affine, and exact at the prompt: every target's input is the sum of its edges
  plus a constant ``bias`` (biases, positional embeddings, LayerNorm shifts).

**What an edge means.** A code's activation is its selection: on (its write is its
vector; ``1/k`` of it with ``combine="mean"``) or off. A code's *input* is its
selection score, the codebook's own similarity of the site input to that code:
``x . c / |c|`` (cosine: only the code is normalised, so the score is linear in the
input), ``x . c`` (dot) or ``2 x . c - |c|^2`` (euclidean: ``-|x - c|^2`` plus
``|x|^2``, which is the same for every code and leaves the ranking alone). With
``layer_norm`` scoring the site input's LayerNorm scale is frozen too (affine gain and
shift included). The weight of ``s -> t`` is how much ``s``'s write adds to ``t``'s
score (for a logit: to the logit itself) along paths through no other node: with
frozen selections, removing ``s``'s write lowers ``t``'s score by exactly that
weight, and no other node's write changes. A positive edge makes ``t`` *more*
likely to stay selected; whether it flips a selection depends on the margin to the
runner-up code, which the graph does not hold (`validate_graph` measures the flips).

The edges are computed by batched backward passes through a linear replay of the
model built from its own weights and the frozen values (one forward and backward
per ``batch_size`` targets). Sites without a codebook are not nodes: paths through
them (frozen attention, linearised MLPs) are part of the edges.

`prune_graph`, `graph_scores` and `node_influence` follow circuit-tracer's pruning
and scores; `validate_graph` checks the graph against the real model by removing
codes; `to_circuit_tracer_json` writes the frontend's graph format.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codelens.codebook import EMPTY_SLOT
from codelens.vocab import (
    Code,
    attn_pattern,
    attn_site,
    block_hook,
    codes_hook,
    is_attn_site,
    is_mlp_site,
    layer_of,
    mlp_site,
    resid_pre,
)

MAX_N_LOGITS = 10
"""circuit-tracer's default cap on logit nodes."""
DESIRED_LOGIT_PROB = 0.95
"""circuit-tracer's default: the fewest top logits holding this much probability."""
NODE_THRESHOLD = 0.8
"""circuit-tracer's default share of node influence that pruning keeps."""
EDGE_THRESHOLD = 0.98
"""circuit-tracer's default share of edge influence that pruning keeps."""
_SCORE_LN_EPS = 1e-5  # `CodebookLayer` scores with F.layer_norm's default eps


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class CodeNode:
    """An active code at one position: ``code`` (site, group, id) and its ``slot`` (0 = best)."""

    code: Code
    position: int
    slot: int

    def __str__(self) -> str:
        return f"{self.code}@{self.position}"


@dataclass
class AttributionGraph:
    """An attribution graph over codes for one prompt.

    Node order (rows and columns of ``adjacency``), as circuit-tracer's:
    ``[code nodes | token embeddings (one per position) | logits]``. ``adjacency[t, s]``
    is the signed direct effect of source ``s`` on target ``t``'s input (rows are
    targets, columns sources); embedding rows and logit columns are zero.

    ``value[t]`` is each target's input on the real model (a code's selection score,
    a logit), ``bias[t]`` the part of it that no node writes, so
    ``value == adjacency.sum(1) + bias`` for every code and logit row (to float
    rounding; see `reconstruction_error`). ``activation`` is each node's write
    multiplier: 1 for a code (``1/k`` with ``combine="mean"``) and an embedding.
    """

    tokens: Int[Tensor, " pos"]
    code_nodes: list[CodeNode]
    logit_tokens: Int[Tensor, " n_logits"]
    logit_probabilities: Float[Tensor, " n_logits"]
    adjacency: Float[Tensor, "N N"]
    value: Float[Tensor, " N"]
    bias: Float[Tensor, " N"]
    activation: Float[Tensor, " N"]
    stage: Int[Tensor, " N"]
    n_layers: int
    sites: list[str] = field(default_factory=list)

    @property
    def n_codes(self) -> int:
        return len(self.code_nodes)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_codes + self.n_pos + self.n_logits

    @property
    def embed_slice(self) -> slice:
        return slice(self.n_codes, self.n_codes + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(self.n_codes + self.n_pos, self.n_nodes)

    @property
    def logit_weights(self) -> Float[Tensor, " N"]:
        """circuit-tracer's influence seed: each logit's probability, zero elsewhere."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_slice] = self.logit_probabilities
        return w

    def node_label(self, index: int, tokenizer: Any = None) -> str:
        """A short display name: ``a1.h2:64@5``, ``emb "3"@5``, ``logit "7"``."""
        if index < self.n_codes:
            return str(self.code_nodes[index])
        if index < self.logit_slice.start:
            pos = index - self.n_codes
            return f"emb {_token_text(int(self.tokens[pos]), tokenizer)}@{pos}"
        token = int(self.logit_tokens[index - self.logit_slice.start])
        return f"logit {_token_text(token, tokenizer)}"

    def node_index(self, code: Code, position: int) -> int:
        """The index of ``code`` active at ``position`` (a ValueError if it is not a node)."""
        for i, node in enumerate(self.code_nodes):
            if node.code == code and node.position == position:
                return i
        raise ValueError(f"{code} is not active at position {position} in this graph")

    def reconstruction_error(self) -> Float[Tensor, " N"]:
        """``|value - (sum of inputs + bias)| / max(|value|, 1)`` per code and logit row
        (zero for embeddings): how exactly the graph rebuilds the real model."""
        rebuilt = self.adjacency.double().sum(1) + self.bias.double()
        err = (self.value.double() - rebuilt).abs() / self.value.double().abs().clamp(min=1.0)
        err[self.embed_slice] = 0.0
        return err.float()


def _token_text(token: int, tokenizer: Any) -> str:
    if tokenizer is None:
        return f"#{token}"
    return repr(tokenizer.decode([token]))


# ---------------------------------------------------------------- the frozen replay


@dataclass
class _Site:
    """One codebook site on the prompt: its chosen ids and the frozen scoring terms."""

    name: str
    ids: Int[Tensor, "pos G k"]
    vectors: Float[Tensor, "pos G k d"]  # the chosen codes' writes (already / k for mean)
    read: Float[Tensor, "pos G k d"]  # score = x_scored . read + offset
    offset: Float[Tensor, "pos G k"]
    scale: Float[Tensor, "pos G 1"] | None  # frozen LayerNorm scale of the site input
    ln_weight: Tensor | None
    ln_bias: Tensor | None
    real_input: Float[Tensor, "pos G d"]

    def score(self, x: Float[Tensor, "B pos G d"]) -> Float[Tensor, "B pos G k"]:
        if self.scale is not None:
            x = (x - x.mean(-1, keepdim=True)) / self.scale
            if self.ln_weight is not None:
                x = x * self.ln_weight + self.ln_bias
        return einsum(x, self.read, "b p g d, p g k d -> b p g k") + self.offset

    def write(self, m: Float[Tensor, "B pos G k"]) -> Float[Tensor, "B pos G d"]:
        return einsum(m, self.vectors, "b p g k, p g k d -> b p g d")


def _site_terms(model, name: str, x0: Tensor, ids: Tensor) -> _Site:
    cb = model.codebook(name)
    codes = cb.codes.detach().float().cpu()
    group = torch.arange(cb.n_groups)[:, None]
    chosen = codes[group, ids.clamp(min=0)]  # [pos, G, k, d]
    present = (ids != EMPTY_SLOT).to(codes.dtype)[..., None]
    vectors = chosen * present / (cb.k if cb.combine == "mean" else 1)
    if cb.similarity == "cosine":
        read, offset = chosen / chosen.norm(dim=-1, keepdim=True), torch.zeros(ids.shape)
    elif cb.similarity == "dot":
        read, offset = chosen, torch.zeros(ids.shape)
    else:
        read, offset = 2 * chosen, -chosen.pow(2).sum(-1)
    scale = None
    if cb.layer_norm:
        scale = (x0.var(-1, unbiased=False, keepdim=True) + _SCORE_LN_EPS).sqrt()
    return _Site(
        name=name,
        ids=ids,
        vectors=vectors,
        read=read,
        offset=offset.to(codes.dtype),
        scale=scale,
        ln_weight=None if cb.ln_weight is None else cb.ln_weight.detach().float().cpu(),
        ln_bias=None if cb.ln_bias is None else cb.ln_bias.detach().float().cpu(),
        real_input=x0,
    )


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is exactly 0 (then ``num`` is 0 for every
    activation that maps 0 to 0, so the value stays exact)."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


class _Replay:
    """The model with attention, normalisation, MLP gains and selections frozen on one
    prompt: an affine map from node multipliers to every code score and the logits.

    The prompt runs on the model's device; the replay runs on the CPU in float32,
    whatever the model's device and dtype (the graph is a CPU tensor)."""

    def __init__(self, model, tokens: Int[Tensor, " pos"]) -> None:
        cfg = model.cfg
        self.model, self.n_layers = model, cfg.n_layers
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.gated = bool(getattr(cfg, "gated_mlp", False))
        self.rms = getattr(cfg, "normalization_type", "LN") not in ("LN", "LNPre")
        self.sites = list(model.codebooks)
        names = ["hook_embed", resid_pre(0), "ln_final.hook_scale"]
        for layer in range(self.n_layers):
            names += [
                block_hook(layer, "ln1.hook_scale"),
                block_hook(layer, "ln2.hook_scale"),
                attn_pattern(layer),
                block_hook(layer, "mlp.hook_post"),
                block_hook(layer, "mlp.hook_pre_linear" if self.gated else "mlp.hook_pre"),
            ]
        names += self.sites + [codes_hook(s) for s in self.sites]
        device = next(model.parameters()).device
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens[None].to(device), names_filter=names)
        c = {n: cache[n][0].detach().cpu().float() for n in names}
        self.real_logits = logits[0, -1].detach().cpu().float()
        self.embed = c["hook_embed"]
        self.const0 = c[resid_pre(0)] - self.embed  # positional embeddings (or zero)
        self.scale_final = c["ln_final.hook_scale"][-1]
        self.frozen = []
        for layer in range(self.n_layers):
            linear = c[block_hook(layer, "mlp.hook_pre_linear" if self.gated else "mlp.hook_pre")]
            self.frozen.append(
                {
                    "scale1": c[block_hook(layer, "ln1.hook_scale")],
                    "scale2": c[block_hook(layer, "ln2.hook_scale")],
                    "pattern": c[attn_pattern(layer)],
                    "gain": _safe_ratio(c[block_hook(layer, "mlp.hook_post")], linear),
                }
            )
        self.site_terms: dict[str, _Site] = {}
        for site in self.sites:
            cb = model.codebook(site)
            x0 = c[site]
            if x0.shape[-2:] != (cb.n_groups, cb.d):
                x0 = rearrange(x0, "p (g d) -> p g d", g=cb.n_groups)
            ids = cache[codes_hook(site)][0].detach().cpu()
            self.site_terms[site] = _site_terms(model, site, x0, ids)

    def _norm(self, module, x: Tensor, scale: Tensor) -> Tensor:
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        x = x / scale * module.w.detach().float().cpu()
        bias = getattr(module, "b", None)
        return x if bias is None else x + bias.detach().float().cpu()

    def run(
        self, m_embed: Float[Tensor, "B pos"], m_codes: dict[str, Float[Tensor, "B pos G k"]]
    ) -> tuple[dict[str, Float[Tensor, "B pos G k"]], Float[Tensor, "B vocab"]]:
        """Every site's scores of its chosen codes, and the last position's logits."""
        model = self.model
        resid = m_embed[..., None] * self.embed + self.const0
        scores: dict[str, Tensor] = {}
        for layer in range(self.n_layers):
            block, frozen = model.blocks[layer], self.frozen[layer]
            attn = block.attn
            x = self._norm(block.ln1, resid, frozen["scale1"])
            w_v = attn.W_V.detach().float().cpu()
            n_heads = attn.W_O.shape[0]
            kv = torch.arange(n_heads) // (n_heads // w_v.shape[0])
            v = einsum(x, w_v, "b p d, h d e -> b p h e")
            if getattr(attn, "b_V", None) is not None:
                v = v + attn.b_V.detach().float().cpu()
            z = einsum(frozen["pattern"], v[:, :, kv], "h q k, b k h e -> b q h e")
            z = self._site(attn_site(layer), z, m_codes, scores)
            attn_out = einsum(z, attn.W_O.detach().float().cpu(), "b p h e, h e d -> b p d")
            if getattr(attn, "b_O", None) is not None:
                attn_out = attn_out + attn.b_O.detach().float().cpu()
            mid = resid if self.parallel else resid + attn_out
            x = self._norm(block.ln2, mid, frozen["scale2"])
            mlp = block.mlp
            hidden = x @ mlp.W_in.detach().float().cpu()
            if getattr(mlp, "b_in", None) is not None:
                hidden = hidden + mlp.b_in.detach().float().cpu()
            out = (hidden * frozen["gain"]) @ mlp.W_out.detach().float().cpu()
            if getattr(mlp, "b_out", None) is not None:
                out = out + mlp.b_out.detach().float().cpu()
            site = mlp_site(layer)
            if site in self.site_terms:
                grouped = rearrange(
                    out, "b p (g d) -> b p g d", g=self.site_terms[site].ids.shape[1]
                )
                out = rearrange(self._site(site, grouped, m_codes, scores), "b p g d -> b p (g d)")
            resid = resid + attn_out + out if self.parallel else mid + out
        x = self._norm(model.ln_final, resid[:, -1], self.scale_final)
        logits = x @ model.W_U.detach().float().cpu()
        if getattr(model, "b_U", None) is not None:
            logits = logits + model.b_U.detach().float().cpu()
        return scores, logits

    def _site(self, site: str, x: Tensor, m_codes: dict, scores: dict) -> Tensor:
        terms = self.site_terms.get(site)
        if terms is None:
            return x
        scores[site] = terms.score(x)
        return terms.write(m_codes[site])


# ---------------------------------------------------------------- building the graph


def _select_logits(
    logits: Float[Tensor, " vocab"], max_n_logits: int, desired_logit_prob: float
) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.double(), -1).float()
    top = probs.topk(min(max_n_logits, probs.shape[0]))
    cumulative = top.values.cumsum(0)
    n = int(torch.searchsorted(cumulative, torch.tensor(desired_logit_prob))) + 1
    n = min(n, top.values.shape[0])
    return top.indices[:n], top.values[:n]


def attribution_graph(
    model,
    tokens: Int[Tensor, " pos"],
    *,
    targets: Sequence[int] | None = None,
    max_n_logits: int = MAX_N_LOGITS,
    desired_logit_prob: float = DESIRED_LOGIT_PROB,
    batch_size: int = 64,
) -> AttributionGraph:
    """The attribution graph of ``model`` on one prompt (see the module docstring).

    ``tokens``: one prompt, ``[pos]`` or ``[1, pos]``. ``targets``: the logit token ids
    to explain at the last position; by default the top logits (at most
    ``max_n_logits``, the fewest whose probability reaches ``desired_logit_prob``).
    ``batch_size`` targets share one backward pass.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be one prompt, [pos] or [1, pos], got {tuple(tokens.shape)}")
    if not getattr(model, "codebooks", None):
        raise ValueError("an attribution graph over codes needs a model with codebooks")
    if any(cb.bypass for cb in model.codebooks.values()):
        raise ValueError("a codebook is bypassed: the graph is defined for the quantised model")
    other = [s for s in model.codebooks if not (is_attn_site(s) or is_mlp_site(s))]
    if other:
        raise ValueError(
            f"attribution graphs take codebooks at attn.hook_z and hook_mlp_out only; "
            f"the model also has codebooks at {other} (take them off with "
            "model.remove_codebook(site) first)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not 0.0 < desired_logit_prob <= 1.0 or max_n_logits < 1:
        raise ValueError(
            f"need max_n_logits >= 1 and 0 < desired_logit_prob <= 1, got {max_n_logits}, "
            f"{desired_logit_prob}"
        )
    replay = _Replay(model, tokens.cpu())
    vocab = replay.real_logits.shape[0]
    if targets is None:
        logit_tokens, logit_probs = _select_logits(
            replay.real_logits, max_n_logits, desired_logit_prob
        )
    else:
        logit_tokens = torch.as_tensor(list(targets), dtype=torch.long).flatten()
        if logit_tokens.numel() == 0 or logit_tokens.min() < 0 or logit_tokens.max() >= vocab:
            raise ValueError(f"targets must be non-empty token ids in [0, {vocab}), got {targets}")
        logit_probs = torch.softmax(replay.real_logits.double(), -1).float()[logit_tokens]

    code_nodes, stage, activation, value = [], [], [], []
    n_pos = tokens.shape[0]
    for site in replay.sites:
        terms = replay.site_terms[site]
        cb = model.codebook(site)
        if bool((terms.ids == EMPTY_SLOT).any()):
            raise ValueError(f"{site} has an empty slot on the prompt: remove hooks first")
        real_scores = terms.score(terms.real_input[None])[0].tolist()
        layer = layer_of(site)
        site_stage = 2 * layer + (1 if is_attn_site(site) else 2)
        weight = 1.0 / cb.k if cb.combine == "mean" else 1.0
        for p, groups in enumerate(terms.ids.tolist()):
            for g, slots in enumerate(groups):
                for j, code_id in enumerate(slots):
                    code_nodes.append(CodeNode(Code(site, g, code_id), p, j))
                    stage.append(site_stage)
                    activation.append(weight)
                    value.append(real_scores[p][g][j])
    n_codes = len(code_nodes)
    n_sources = n_codes + n_pos
    n_nodes = n_sources + logit_tokens.shape[0]

    every_site = all(
        site in replay.site_terms
        for layer in range(model.cfg.n_layers)
        for site in (attn_site(layer), mlp_site(layer))
    )
    blocks = (
        _direct_edges(replay, logit_tokens)
        if every_site
        else _backward_edges(replay, logit_tokens, batch_size)
    )
    adjacency = torch.zeros(n_nodes, n_nodes)
    target_rows = torch.cat([torch.arange(n_codes), torch.arange(n_sources, n_nodes)])
    for start, block in blocks:  # rows of targets start, start + 1, ...
        adjacency[target_rows[start : start + block.shape[0]], :n_sources] = block
    bias_targets = _bias(replay, logit_tokens)
    bias = torch.zeros(n_nodes)
    bias[target_rows] = bias_targets
    full_value = torch.zeros(n_nodes)
    full_value[:n_codes] = torch.tensor(value)
    full_value[n_sources:] = replay.real_logits[logit_tokens]
    full_activation = torch.ones(n_nodes)
    full_activation[:n_codes] = torch.tensor(activation)
    full_activation[n_sources:] = 0.0
    stages = torch.tensor(stage + [0] * n_pos + [2 * model.cfg.n_layers + 1] * len(logit_tokens))
    return AttributionGraph(
        tokens=tokens.cpu(),
        code_nodes=code_nodes,
        logit_tokens=logit_tokens,
        logit_probabilities=logit_probs,
        adjacency=adjacency,
        value=full_value,
        bias=bias,
        activation=full_activation,
        stage=stages,
        n_layers=model.cfg.n_layers,
        sites=list(replay.sites),
    )


def _multipliers(replay: _Replay, batch: int, fill: float, grad: bool):
    """Node multipliers (1 = the prompt's writes): embeddings ``[B, pos]``, codes per site."""
    n_pos = replay.embed.shape[0]
    m_embed = torch.full((batch, n_pos), fill, requires_grad=grad)
    m_codes = {
        s: torch.full((batch, *t.ids.shape), fill, requires_grad=grad)
        for s, t in replay.site_terms.items()
    }
    return m_embed, m_codes


def _flat_targets(replay: _Replay, scores: dict, logits: Tensor, logit_tokens: Tensor) -> Tensor:
    parts = [scores[s].flatten(1) for s in replay.sites]
    return torch.cat([*parts, logits[:, logit_tokens]], dim=1)


def _bias(replay: _Replay, logit_tokens: Tensor) -> Float[Tensor, " targets"]:
    """Every target's input with no node writing: the replay with all multipliers 0."""
    with torch.no_grad():
        scores, logits = replay.run(*_multipliers(replay, 1, 0.0, False))
    return _flat_targets(replay, scores, logits, logit_tokens)[0]


def _backward_edges(
    replay: _Replay, logit_tokens: Tensor, batch_size: int
) -> Iterator[tuple[int, Float[Tensor, "rows sources"]]]:
    """Edges by batched backward passes through the replay: ``batch_size`` targets per
    pass, each in its own batch row. Works with codebooks at any subset of sites.
    Yields (first target index, rows); targets are code nodes, then logits."""
    n_targets = sum(t.ids.numel() for t in replay.site_terms.values()) + len(logit_tokens)
    for start in range(0, n_targets, batch_size):
        picked = torch.arange(start, min(start + batch_size, n_targets))
        m_embed, m_codes = _multipliers(replay, len(picked), 1.0, True)
        values = _flat_targets(replay, *replay.run(m_embed, m_codes), logit_tokens)
        values[torch.arange(len(picked)), picked].sum().backward()
        grads = [m_codes[s].grad.flatten(1) for s in replay.sites] + [m_embed.grad]
        yield start, torch.cat(grads, dim=1)


def _center(x: Tensor, rms: bool) -> Tensor:
    return x if rms else x - x.mean(-1, keepdim=True)


def _direct_edges(
    replay: _Replay, logit_tokens: Tensor
) -> Iterator[tuple[int, Float[Tensor, "rows sources"]]]:
    """Edges by exact linear algebra, for codebooks at every attention and MLP site.

    Every site's output is then its codes, so the only path from a source to a target
    is the residual stream: ``A[t, s] = r_t(pos_s) . write_s`` for sources written
    before ``t`` reads, where ``r_t`` is ``t``'s score gradient with respect to the
    residual stream at its read point. For an attention code that is one vector scaled
    by the frozen pattern and norm scale of each key position; for an MLP code or a
    logit it is one vector at its own position. Cost: targets x sources x d_model.
    Yields (first target index, rows) per site, then the logits.
    """
    model, rms = replay.model, replay.rms
    n_pos = replay.embed.shape[0]
    writes, positions, stages = [], [], []
    for site in replay.sites:
        terms, layer = replay.site_terms[site], layer_of(site)
        if is_attn_site(site):
            w_o = model.blocks[layer].attn.W_O.detach().float().cpu()
            write = einsum(terms.vectors, w_o, "p h k e, h e d -> p h k d")
        else:
            write = _place_groups(terms.vectors)
        writes.append(write.flatten(0, 2))
        positions.append(torch.arange(n_pos)[:, None, None].expand(terms.ids.shape).flatten())
        stage = 2 * layer + (1 if is_attn_site(site) else 2)
        stages.append(torch.full((terms.ids.numel(),), stage))
    writes.append(replay.embed)
    positions.append(torch.arange(n_pos))
    stages.append(torch.zeros(n_pos, dtype=torch.long))
    write, pos, stage = torch.cat(writes), torch.cat(positions), torch.cat(stages)
    start = 0
    for site in replay.sites:
        terms, layer = replay.site_terms[site], layer_of(site)
        block, frozen = model.blocks[layer], replay.frozen[layer]
        read = terms.read
        if terms.scale is not None:  # d score / d site input, through the scoring LayerNorm
            if terms.ln_weight is not None:
                read = read * terms.ln_weight[:, None, :]
            read = (read - read.mean(-1, keepdim=True)) / terms.scale[..., None]
        if is_attn_site(site):
            w_v = block.attn.W_V.detach().float().cpu()
            n_heads = block.attn.W_O.shape[0]
            kv = torch.arange(n_heads) // (n_heads // w_v.shape[0])
            u = einsum(read, w_v[kv], "p h k e, h d e -> p h k d")
            r = _center(u * block.ln1.w.detach().float().cpu(), rms).flatten(0, 2)
            heads = torch.arange(n_heads)[None, :, None].expand(terms.ids.shape).flatten()
            queries = torch.arange(n_pos)[:, None, None].expand(terms.ids.shape).flatten()
            weight = frozen["pattern"][heads, queries][:, pos] / frozen["scale1"][pos, 0]
            reads_after = stage < 2 * layer + 1
        else:
            w_out = block.mlp.W_out.detach().float().cpu()
            hidden = einsum(_place_groups(read), w_out, "p g k d, m d -> p g k m")
            hidden = hidden * frozen["gain"][:, None, None, :]
            u = hidden @ block.mlp.W_in.detach().float().cpu().T
            r = _center(u * block.ln2.w.detach().float().cpu(), rms)
            r = (r / frozen["scale2"][:, None, None, :]).flatten(0, 2)
            queries = torch.arange(n_pos)[:, None, None].expand(terms.ids.shape).flatten()
            weight = (queries[:, None] == pos[None, :]).float()
            reads_after = stage < 2 * layer + (1 if replay.parallel else 2)
        yield start, (r @ write.T) * weight * reads_after[None, :]
        start += r.shape[0]
    final = model.W_U.detach().float().cpu()[:, logit_tokens].T
    r = _center(final * model.ln_final.w.detach().float().cpu(), rms) / replay.scale_final
    yield start, (r @ write.T) * (pos == n_pos - 1)[None, :]


def _place_groups(vectors: Float[Tensor, "p G k dg"]) -> Float[Tensor, "p G k d"]:
    """Group vectors written into their slice of the full MLP output (``d = G * dg``)."""
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype)
    placed = einsum(vectors, eye, "p g k e, g h -> p g k h e")
    return placed.flatten(-2)


# ---------------------------------------------------------------- influence and pruning


def normalize_adjacency(adjacency: Float[Tensor, "N N"]) -> Float[Tensor, "N N"]:
    """``|A|`` with each row divided by its sum (a target's inputs share 1; empty rows stay 0)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(
    normalized: Float[Tensor, "N N"], weights: Float[Tensor, " N"], max_iter: int = 1000
) -> Float[Tensor, " N"]:
    """``w A + w A^2 + ...``: each node's total (multi-hop) share in the seed ``weights``.

    The series ends because the graph is a DAG (``A^n = 0`` past its depth); this is
    ``w ((I - A)^-1 - I)``, computed as circuit-tracer does."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ normalized
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def node_influence(graph: AttributionGraph, weights: Tensor | None = None) -> Float[Tensor, " N"]:
    """Each node's influence on the logits, weighted by their probabilities (or ``weights``)."""
    w = graph.logit_weights if weights is None else weights
    return influence(normalize_adjacency(graph.adjacency), w)


def _threshold(scores: Tensor, share: float) -> float:
    """The score at which the sorted-descending scores first hold ``share`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(share))), ordered.numel() - 1)
    return float(ordered[index])


@dataclass
class PrunedGraph:
    """Which nodes and edges pruning keeps, and each node's cumulative influence share
    (the share held by nodes ranked at or above it: lower is more important)."""

    node_mask: Bool[Tensor, " N"]
    edge_mask: Bool[Tensor, "N N"]
    cumulative_scores: Float[Tensor, " N"]


def prune_graph(
    graph: AttributionGraph,
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
) -> PrunedGraph:
    """Prune by influence as circuit-tracer does (defaults 0.8 and 0.98).

    Keep the top nodes holding ``node_threshold`` of the total node influence (token
    and logit nodes always stay); then, on the graph of kept nodes, the top edges
    holding ``edge_threshold`` of the total edge influence (an edge's score is its
    normalised weight times its target's influence plus seed weight); then drop, until
    nothing changes, code nodes with no kept outgoing edge or no kept incoming edge.
    """
    for name, share in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {share}")
    n_codes, w = graph.n_codes, graph.logit_weights
    scores = node_influence(graph)
    node_mask = scores >= _threshold(scores, node_threshold)
    node_mask[n_codes:] = True
    kept = graph.adjacency * (node_mask[:, None] & node_mask[None, :])
    normalized = normalize_adjacency(kept)
    edge_scores = normalized * (influence(normalized, w) + w)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    edge_mask &= edge_scores > 0
    while True:
        before = node_mask.clone()
        node_mask[:n_codes] &= edge_mask[:, :n_codes].any(0) & edge_mask[:n_codes].any(1)
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        if torch.equal(before, node_mask):
            break
    order = scores.argsort(descending=True)
    cumulative = torch.empty_like(scores)
    cumulative[order] = scores[order].cumsum(0) / scores.sum().clamp(min=1e-30)
    return PrunedGraph(node_mask, edge_mask, cumulative)


def replacement_completeness(
    adjacency: Float[Tensor, "N N"],
    weights: Float[Tensor, " N"],
    token_mask: Bool[Tensor, " N"],
    error_mask: Bool[Tensor, " N"],
) -> tuple[float, float]:
    """circuit-tracer's graph scores on any adjacency.

    Replacement: the influence of the token nodes over that of the token and error
    nodes. Completeness: the share of every node's input that is not from error
    nodes, weighted by the node's influence plus its seed weight.
    """
    normalized = normalize_adjacency(adjacency)
    infl = influence(normalized, weights)
    tokens, errors = float(infl[token_mask].sum()), float(infl[error_mask].sum())
    replacement = tokens / (tokens + errors) if tokens + errors > 0 else 1.0
    non_error = 1.0 - normalized[:, error_mask].sum(1)
    total = infl + weights
    completeness = float((non_error * total).sum() / total.sum().clamp(min=1e-30))
    return replacement, completeness


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """``(replacement, completeness)`` of a graph over codes: it has no error nodes,
    so both are 1 (what circuit-tracer's graphs reach only without reconstruction error)."""
    token_mask = torch.zeros(graph.n_nodes, dtype=torch.bool)
    token_mask[graph.embed_slice] = True
    no_errors = torch.zeros(graph.n_nodes, dtype=torch.bool)
    return replacement_completeness(graph.adjacency, graph.logit_weights, token_mask, no_errors)


# ---------------------------------------------------------------- validation by intervention


@dataclass
class InterventionCheck:
    """The graph's predictions against the real model, one removed code at a time.

    ``nodes``: the checked code nodes (graph indices, by influence on the target
    logit). ``predicted``: the logit change the frozen graph predicts when the code's
    write is removed (minus its direct edge: with frozen selections nothing else
    moves). ``measured``: the real change, with the code removed from its site's sum
    at its position (`codelens.interventions.ablate_codes`, mode "zero").
    ``flips``: how many code selections downstream changed in that run.
    ``measured_held``: the real change with every other selection held at its clean
    value (attention patterns and norm scales still move): what is left of the gap
    once flips are taken out. ``spearman`` / ``spearman_held``: against ``predicted``.
    """

    target: int
    nodes: list[int]
    predicted: Float[Tensor, " n"]
    measured: Float[Tensor, " n"]
    measured_held: Float[Tensor, " n"]
    flips: Int[Tensor, " n"]
    spearman: float
    spearman_held: float

    @property
    def spearman_unflipped(self) -> float | None:
        """The Spearman over the removals that flipped no selection, where the frozen
        graph's assumption holds (None with fewer than 3 such removals)."""
        from scipy.stats import spearmanr

        keep = self.flips == 0
        if int(keep.sum()) < 3:
            return None
        return float(spearmanr(self.predicted[keep].numpy(), self.measured[keep].numpy()).statistic)

    @property
    def flipped_runs(self) -> int:
        """How many of the removals flipped at least one downstream selection."""
        return int((self.flips > 0).sum())


def validate_graph(
    model, graph: AttributionGraph, *, target: int = 0, top_n: int = 50
) -> InterventionCheck:
    """Remove each of the ``top_n`` most influential codes (on logit node ``target``,
    0 = the most probable) from the real model and compare the logit change with the
    graph's prediction (Spearman). Selections flipped downstream are what a frozen
    graph cannot see; `InterventionCheck.flips` counts them, and a second run per code
    with every other selection held measures the change without them."""
    from scipy.stats import spearmanr

    from codelens.interventions import ablate_codes

    if not 0 <= target < graph.n_logits:
        raise ValueError(
            f"target must be a logit node index in [0, {graph.n_logits}), got {target}"
        )
    if top_n < 2:
        raise ValueError(f"top_n must be >= 2 (a rank correlation needs two points), got {top_n}")
    row = graph.logit_slice.start + target
    seed = torch.zeros(graph.n_nodes)
    seed[row] = 1.0
    scores = node_influence(graph, seed)[: graph.n_codes]
    nodes = scores.argsort(descending=True)[: min(top_n, graph.n_codes)].tolist()
    token = int(graph.logit_tokens[target])
    device = next(model.parameters()).device
    tokens = graph.tokens[None].to(device)
    names = [codes_hook(s) for s in graph.sites]
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens, names_filter=names)
        base = float(clean_logits[0, -1, token])
        measured, held, flips = [], [], []
        for index in nodes:
            node = graph.code_nodes[index]
            code = node.code
            hooks = ablate_codes(
                model, code.site, code.id, group=code.group, positions=node.position
            )
            with model.hooks(fwd_hooks=hooks):
                logits, cache = model.run_with_cache(tokens, names_filter=names)
            measured.append(float(logits[0, -1, token]) - base)
            changed = sum(int((cache[n] != clean[n]).sum()) for n in names)
            flips.append(changed - 1)  # the removed slot itself reads EMPTY_SLOT
            with model.hooks(fwd_hooks=_held_selections(clean, node)):
                held.append(float(model(tokens)[0, -1, token]) - base)
    predicted = -graph.adjacency[row, nodes]
    measured_t, held_t = torch.tensor(measured), torch.tensor(held)
    return InterventionCheck(
        target=target,
        nodes=nodes,
        predicted=predicted,
        measured=measured_t,
        measured_held=held_t,
        flips=torch.tensor(flips),
        spearman=float(spearmanr(predicted.numpy(), measured_t.numpy()).statistic),
        spearman_held=float(spearmanr(predicted.numpy(), held_t.numpy()).statistic),
    )


def _held_selections(clean: dict[str, Tensor], removed: CodeNode) -> list[tuple[str, Any]]:
    """Hooks that give every site its clean code ids, with ``removed``'s slot emptied."""
    hooks = []
    for name, ids in clean.items():
        ids = ids.clone()
        if name == codes_hook(removed.code.site):
            ids[0, removed.position, removed.code.group, removed.slot] = EMPTY_SLOT
        hooks.append((name, lambda x, hook, ids=ids: ids))
    return hooks
