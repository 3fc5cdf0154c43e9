"""Attribution graphs over codes: exactness, the planted circuit, pruning, validation."""

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.circuits.attribution import (
    attribution_graph,
    graph_scores,
    influence,
    node_influence,
    normalize_adjacency,
    prune_graph,
    replacement_completeness,
    validate_graph,
)
from codelens.experiments.planted_circuit import N_TOKENS, PAD, planted_model
from codelens.vocab import Code, block_hook, codes_hook, quantized_hook

CONFIGS = {
    "sum-k2": CodebookConfig(n_codes=16, k=2),
    "attn-dot-k3": CodebookConfig(n_codes=16, k=3, sites=("attn",), similarity="dot"),
    "mean-euclid-ln": CodebookConfig(
        n_codes=16,
        k=2,
        combine="mean",
        similarity="euclidean",
        layer_norm=True,
        layer_norm_affine=True,
        mlp_groups=2,
    ),
}
PROMPT = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


def _model(arch: str, name: str):
    model = tiny_model(arch, CONFIGS[name])
    if CONFIGS[name].layer_norm_affine:  # non-trivial scoring gain and shift
        gen = torch.Generator().manual_seed(1)
        for cb in model.codebooks.values():
            cb.ln_weight.copy_(1 + 0.3 * torch.randn(cb.ln_weight.shape, generator=gen))
            cb.ln_bias.copy_(0.3 * torch.randn(cb.ln_bias.shape, generator=gen))
    return model


def _all_scores(cb, x: torch.Tensor) -> torch.Tensor:
    """Every code's score against ``x [pos, G, d]``, written out from the definitions."""
    if cb.layer_norm:
        x = torch.nn.functional.layer_norm(x, (cb.d,))
        if cb.ln_weight is not None:
            x = x * cb.ln_weight + cb.ln_bias
    c = cb.codes.detach()
    if cb.similarity == "euclidean":
        return -((x[:, :, None, :] - c[None]) ** 2).sum(-1) + (x**2).sum(-1)[..., None]
    if cb.similarity == "cosine":
        c = c / c.norm(dim=-1, keepdim=True)
    return torch.einsum("pgd,gcd->pgc", x, c)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_graph_rebuilds_every_logit_and_score(arch, name):
    model = _model(arch, name)
    graph = attribution_graph(model, PROMPT)
    assert graph.n_codes == sum(
        PROMPT.numel() * cb.n_groups * cb.k for cb in model.codebooks.values()
    )
    with torch.no_grad():
        logits = model(PROMPT[None])[0, -1]
    rows = graph.logit_slice
    assert torch.allclose(graph.value[rows], logits[graph.logit_tokens], atol=1e-6)
    rebuilt = graph.adjacency.sum(1) + graph.bias
    codes_and_logits = torch.ones(graph.n_nodes, dtype=torch.bool)
    codes_and_logits[graph.embed_slice] = False
    rel = (rebuilt - graph.value).abs() / graph.value.abs().clamp(min=1.0)
    assert rel[codes_and_logits].max() <= 1e-4
    assert graph.reconstruction_error().max() <= 1e-4
    # every code node's value is its score, and the codebook chose the best codes
    _, cache = model.run_with_cache(PROMPT[None])
    for site, cb in model.codebooks.items():
        x = cache[site][0]
        x = x.reshape(x.shape[0], cb.n_groups, cb.d)
        scores = _all_scores(cb, x)
        best = scores.topk(cb.k, dim=-1).values
        nodes = [i for i, n in enumerate(graph.code_nodes) if n.code.site == site]
        values = graph.value[nodes].view(PROMPT.numel(), cb.n_groups, cb.k)
        assert torch.allclose(values, best, atol=1e-4, rtol=1e-4)


def test_batching_does_not_change_the_graph():
    model = _model("gpt2", "attn-dot-k3")  # MLPs without codebooks: the backward passes
    one = attribution_graph(model, PROMPT[:6], batch_size=1)
    many = attribution_graph(model, PROMPT[:6], batch_size=500)
    assert torch.allclose(one.adjacency, many.adjacency, atol=1e-6)


def _frozen_run(model, tokens, clean_cache, node=None, add=False):
    """The real model with attention patterns, norm scales, MLP gains and every code
    selection held at ``clean_cache``'s values, and ``node``'s write removed (its slot
    emptied) or, with ``add``, added a second time. Returns each site's input and the
    last position's logits."""
    hooks, seen, n_layers = [], {}, model.cfg.n_layers
    gated = bool(model.cfg.gated_mlp)
    linear = "mlp.hook_pre_linear" if gated else "mlp.hook_pre"

    def hold(name):
        return name, lambda x, hook: clean_cache[name]

    def record(name):
        def hook(x, hook):
            seen[name] = x

        return name, hook

    for layer in range(n_layers):
        for part in ("ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern"):
            hooks.append(hold(block_hook(layer, part)))
        pre, post = block_hook(layer, linear), block_hook(layer, "mlp.hook_post")
        gain = clean_cache[post] / clean_cache[pre]
        hooks.append(record(pre))
        hooks.append((post, lambda x, hook, pre=pre, gain=gain: seen[pre] * gain))
    hooks.append(hold("ln_final.hook_scale"))
    for site, cb in model.codebooks.items():
        ids = clean_cache[codes_hook(site)].clone()
        if node is not None and node.code.site == site:
            p, g = node.position, node.code.group
            if add:
                extra = torch.zeros(ids.shape[1], cb.n_groups, cb.d)
                extra[p, g] = cb.codes.detach()[g, node.code.id]
                hooks.append((quantized_hook(site), lambda x, hook, e=extra: x + e))
            else:
                ids[0, p, g, node.slot] = -1
        hooks.append((codes_hook(site), lambda x, hook, ids=ids: ids))
        hooks.append(record(site))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return {s: seen[s][0].clone() for s in model.codebooks}, logits[0, -1]


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
def test_removing_or_adding_a_write_moves_its_children_by_exactly_the_edge_weight(arch):
    """Checked on the real model frozen by hooks, independently of the graph's replay."""
    model = _model(arch, "sum-k2")
    tokens = PROMPT[None, :8]
    graph = attribution_graph(model, tokens)
    _, clean = model.run_with_cache(tokens)
    base_inputs, base_logits = _frozen_run(model, tokens, clean)
    assert torch.allclose(base_logits, clean["unembed.hook_out"][0, -1], atol=1e-5)
    checked = 0
    for index in (0, 9, graph.n_codes // 2, graph.n_codes - 20):
        node = graph.code_nodes[index]
        inputs, logits = _frozen_run(model, tokens, clean, node)
        added, _ = _frozen_run(model, tokens, clean, node, add=True)
        for child, other in enumerate(graph.code_nodes):
            cb = model.codebook(other.code.site)
            before = base_inputs[other.code.site][other.position]
            after = inputs[other.code.site][other.position]
            before, after = (
                v.reshape(cb.n_groups, cb.d)[other.code.group] for v in (before, after)
            )
            vector = cb.codes.detach()[other.code.group, other.code.id]
            change = (after - before) @ vector / vector.norm()
            assert change == pytest.approx(-float(graph.adjacency[child, index]), abs=1e-5)
            again = added[other.code.site][other.position].reshape(cb.n_groups, cb.d)
            change = (again[other.code.group] - before) @ vector / vector.norm()
            assert change == pytest.approx(float(graph.adjacency[child, index]), abs=1e-5)
            checked += bool(graph.adjacency[child, index].abs() > 1e-3)
        change = logits[graph.logit_tokens] - base_logits[graph.logit_tokens]
        assert torch.allclose(change, -graph.adjacency[graph.logit_slice, index], atol=1e-5)
    assert checked > 10  # the removals really moved children


def test_the_graph_recovers_the_planted_paths_exactly():
    planted = planted_model()
    for t in range(N_TOKENS):
        graph = attribution_graph(planted.model, torch.tensor([PAD, t]))
        assert graph.reconstruction_error().max() <= 1e-4
        a = graph.adjacency
        reaches_a_logit = node_influence(graph) + graph.logit_weights > 0
        live = (a.abs() > 1e-4 * a.abs().max()) & reaches_a_logit[:, None]
        edges = {
            f"{graph.node_label(s)}->{graph.node_label(r)}" for r, s in live.nonzero().tolist()
        }
        expected = {
            f"emb #{t}@1->m0.g0:{t}@1",
            f"m0.g0:{t}@1->m1.g0:{t}@1",
            f"m1.g0:{t}@1->logit #{t}",
            f"emb #{t}@1->a0.h1:{t}@1",
            f"a0.h1:{t}@1->logit #{t}",
        }
        assert edges == expected
        pruned = prune_graph(graph, node_threshold=0.99, edge_threshold=0.99)
        kept = {
            f"{graph.node_label(s)}->{graph.node_label(r)}"
            for r, s in pruned.edge_mask.nonzero().tolist()
        }
        assert kept == expected


def test_validation_sees_the_flip_a_frozen_graph_cannot():
    planted = planted_model()
    t = 2
    graph = attribution_graph(planted.model, torch.tensor([PAD, t]))
    check = validate_graph(planted.model, graph, top_n=3)
    labels = [graph.node_label(i) for i in check.nodes]
    assert set(labels) == {f"m0.g0:{t}@1", f"m1.g0:{t}@1", f"a0.h1:{t}@1"}
    for label, predicted, measured, held, flips in zip(
        labels, check.predicted, check.measured, check.measured_held, check.flips, strict=True
    ):
        assert float(held) == pytest.approx(float(predicted), abs=1e-3 * 5)
        if label.startswith("m0"):  # no direct edge to the logit; m1 flips to its null code
            assert abs(float(predicted)) < 1e-6 and flips == 1 and measured < -1
        else:  # a direct write: the frozen prediction holds
            assert flips == 0
            assert float(measured) == pytest.approx(float(predicted), rel=1e-3)
    assert check.flipped_runs == 1


def test_validation_on_a_random_model_reports_a_rank_correlation():
    model = _model("llama", "sum-k2")
    graph = attribution_graph(model, PROMPT)
    check = validate_graph(model, graph, top_n=12)
    assert len(check.nodes) == 12 == len(check.measured) == len(check.flips)
    assert -1.0 <= check.spearman <= 1.0
    assert (check.flips >= 0).all()


def test_influence_is_the_closed_form_on_a_dag():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=gen).tril(-1)  # row t reads only earlier nodes
    normalized = normalize_adjacency(a)
    assert torch.allclose(normalized.sum(1)[1:], torch.ones(6))
    w = torch.zeros(7)
    w[-1] = 1.0
    closed = w @ (torch.linalg.inv(torch.eye(7) - normalized) - torch.eye(7))
    assert torch.allclose(influence(normalized, w), closed, atol=1e-6)


def test_replacement_and_completeness_scores():
    # nodes: 0 token, 1 error, 2 feature, 3 logit; the logit reads 2 (weight 3) and 1 (1)
    a = torch.zeros(4, 4)
    a[2, 0] = 1.0
    a[3, 2], a[3, 1] = 3.0, 1.0
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    tokens = torch.tensor([True, False, False, False])
    errors = torch.tensor([False, True, False, False])
    replacement, completeness = replacement_completeness(a, w, tokens, errors)
    # influence: token 0.75 (through 2), error 0.25, feature 0.75
    assert replacement == pytest.approx(0.75 / (0.75 + 0.25))
    # non-error shares: node 3 reads 25% error; weights I + w = [.75, .25, .75, 1]
    assert completeness == pytest.approx((0.75 + 0.25 + 0.75 + 0.75) / 2.75)
    graph = attribution_graph(_model("gpt_neox", "sum-k2"), PROMPT)
    assert graph_scores(graph) == (1.0, 1.0)


def test_pruning_keeps_tokens_and_logits_and_shrinks_with_the_thresholds():
    graph = attribution_graph(_model("gpt2", "sum-k2"), PROMPT)
    loose = prune_graph(graph)
    tight = prune_graph(graph, node_threshold=0.5, edge_threshold=0.8)
    assert loose.node_mask[graph.n_codes :].all() and tight.node_mask[graph.n_codes :].all()
    assert tight.node_mask.sum() <= loose.node_mask.sum() < graph.n_nodes
    assert tight.edge_mask.sum() <= loose.edge_mask.sum()
    assert not (loose.edge_mask & (graph.adjacency == 0)).any()
    # every kept code has a kept edge in and out
    kept = loose.node_mask[: graph.n_codes]
    assert loose.edge_mask[:, : graph.n_codes].any(0)[kept].all()
    assert loose.edge_mask[: graph.n_codes].any(1)[kept].all()
    assert ((loose.cumulative_scores > 0) & (loose.cumulative_scores <= 1 + 1e-6)).all()


def test_bad_inputs_are_refused_early():
    model = _model("gpt2", "sum-k2")
    with pytest.raises(ValueError, match="one prompt"):
        attribution_graph(model, PROMPT[None].repeat(2, 1))
    with pytest.raises(ValueError, match="batch_size"):
        attribution_graph(model, PROMPT, batch_size=0)
    with pytest.raises(ValueError, match="targets"):
        attribution_graph(model, PROMPT, targets=[99])
    with pytest.raises(ValueError, match="codebooks"):
        attribution_graph(tiny_model("gpt2"), PROMPT)
    graph = attribution_graph(model, PROMPT, targets=[4, 7])
    assert graph.logit_tokens.tolist() == [4, 7]
    with pytest.raises(ValueError, match="node_threshold"):
        prune_graph(graph, node_threshold=0.0)
    with pytest.raises(ValueError, match="target"):
        validate_graph(model, graph, target=2)


@pytest.mark.parametrize("name", ["sum-k2", "mean-euclid-ln"])
def test_direct_linear_algebra_equals_the_backward_passes(arch, name):
    """With codebooks at every site the graph uses the closed form; it must agree with
    batched backward passes through the frozen replay (the general path)."""
    from codelens.circuits import attribution

    replay = attribution._Replay(_model(arch, name), PROMPT)
    targets = torch.tensor([1, 2, 3])
    backward = torch.cat([b for _, b in attribution._backward_edges(replay, targets, 64)])
    direct = torch.cat([b for _, b in attribution._direct_edges(replay, targets)])
    assert torch.allclose(direct, backward, atol=1e-5 * backward.abs().max())


def test_the_tutorial_steers_the_planted_prediction_through_the_codes_it_found():
    """docs/circuits.md: force the two codes that write to the logit to label 3's codes."""
    from codelens.interventions import force_codes, intervene

    model = planted_model().model
    tokens = torch.tensor([PAD, 2])
    graph = attribution_graph(model, tokens)
    pruned = prune_graph(graph, node_threshold=0.99, edge_threshold=0.99)
    writers = [s for t, s in pruned.edge_mask.nonzero().tolist() if t >= graph.logit_slice.start]
    found = {graph.code_nodes[s].code for s in writers}
    assert found == {Code("blocks.0.attn.hook_z", 1, 2), Code("blocks.1.hook_mlp_out", 0, 2)}
    hooks = []
    for code in found:
        hooks += force_codes(model, code.site, 3, group=code.group, positions=1, slots="all")
    with torch.no_grad(), intervene(model, hooks):
        steered = model(tokens[None])[0, -1]
    assert int(steered.argmax()) == 3


def test_exact_on_a_briefly_trained_model():
    """Trained weights (40 Adam steps on a repeating-digit task) rather than random ones."""
    model = tiny_model("gpt_neox", CodebookConfig(n_codes=16, k=2))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        half = torch.randint(0, 10, (16, 6), generator=gen)
        batch = torch.cat([half, half], dim=1)
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()
        )
        losses.append(loss.item())
        loss = loss + model.reconstruction_loss() + 0.25 * model.commitment_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert losses[-1] < losses[0] - 0.2  # the weights really moved
    graph = attribution_graph(model, torch.tensor([3, 1, 4, 1, 5, 3, 1, 4, 1]))
    assert graph.reconstruction_error().max() <= 1e-4
