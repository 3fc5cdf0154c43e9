"""CodebookLayer on its own: scoring, chunking, id patching, gradients, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from codelens import EMPTY_SLOT, CodebookConfig, CodebookLayer


def brute_force_ids(layer: CodebookLayer, x: torch.Tensor) -> torch.Tensor:
    """Reference top-k by an explicit per-group loop (test only)."""
    out = []
    for g in range(layer.n_groups):
        xg, codes = x[:, g], layer.codes[g].detach()
        if layer.layer_norm:
            xg = F.layer_norm(xg, (layer.d,))
        if layer.similarity == "cosine":
            scores = F.normalize(xg, dim=-1) @ F.normalize(codes, dim=-1).T
        elif layer.similarity == "dot":
            scores = xg @ codes.T
        else:
            scores = -torch.cdist(xg, codes)
        scores = scores.masked_fill(layer.disabled[g], -torch.inf)
        out.append(scores.topk(layer.k, dim=-1).indices)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_top_k_matches_brute_force(similarity, layer_norm):
    torch.manual_seed(0)
    layer = CodebookLayer(3, 8, 50, 4, similarity=similarity, layer_norm=layer_norm)
    x = torch.randn(40, 3, 8)
    assert torch.equal(layer.top_k(x), brute_force_ids(layer, x))


def test_chunked_top_k_equals_unchunked():
    torch.manual_seed(0)
    big = CodebookLayer(4, 16, 300, 3)
    small = CodebookLayer(4, 16, 300, 3, memory_budget_mb=0.01)
    small.load_state_dict(big.state_dict())
    x = torch.randn(5, 70, 4, 16)
    assert small._chunk_size(4) < 350  # really chunked
    assert torch.equal(small.top_k(x), big.top_k(x))


def test_output_is_combination_of_chosen_codes():
    torch.manual_seed(0)
    for combine in ("sum", "mean"):
        layer = CodebookLayer(2, 6, 20, 3, combine=combine)
        x = torch.randn(7, 2, 6)
        ids = layer.top_k(x)
        expected = torch.stack([layer.codes[g, ids[:, g]].sum(1) for g in range(2)], dim=1)
        if combine == "mean":
            expected = expected / 3
        torch.testing.assert_close(layer(x), expected)


def test_hook_returning_ids_gives_exactly_those_codes():
    torch.manual_seed(0)
    layer = CodebookLayer(2, 6, 20, 2)
    x = torch.randn(4, 2, 6)
    forced = torch.tensor([[5, EMPTY_SLOT], [7, 7]]).expand(4, 2, 2).clone()
    layer.hook_codes.add_hook(lambda ids, hook: forced)
    out = layer(x)
    layer.reset_hooks()
    assert torch.equal(out[:, 0], layer.codes[0, 5].detach().expand(4, 6))
    assert torch.equal(out[:, 1], (2 * layer.codes[1, 7]).detach().expand(4, 6))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((4, 2, 2), 20), "outside"),
        (torch.full((4, 2, 2), -2), "outside"),
        (torch.zeros(4, 2, 3, dtype=torch.long), "shape"),
        (torch.zeros(4, 2, 2, dtype=torch.int32), "int64"),
    ],
)
def test_hook_returning_bad_ids_is_refused(bad, match):
    layer = CodebookLayer(2, 6, 20, 2)
    layer.hook_codes.add_hook(lambda ids, hook: bad)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 2, 6))


def test_disabled_codes_are_never_chosen():
    torch.manual_seed(0)
    layer = CodebookLayer(2, 4, 10, 2)
    x = torch.randn(200, 2, 4)
    popular = layer.top_k(x)[:, 0, 0].mode().values.item()
    layer.disable_codes([popular], group=0)
    ids = layer.top_k(x)
    assert not (ids[:, 0] == popular).any()
    assert torch.equal(ids, brute_force_ids(layer, x))
    with pytest.raises(ValueError, match="fewer than k"):
        layer.disable_codes(list(range(9)))
    with pytest.raises(ValueError, match="code ids"):
        layer.disable_codes([10])
    layer.enable_all_codes()
    assert not layer.disabled.any()


def test_straight_through_gradient_and_reconstruction_loss():
    torch.manual_seed(0)
    layer = CodebookLayer(2, 4, 10, 1)
    x = torch.randn(6, 2, 4, requires_grad=True)
    upstream = torch.randn(6, 2, 4)
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)  # identity to the input
    assert layer.codes.grad.abs().sum() > 0  # codes get the slots' gradient
    layer.codes.grad = None
    layer(x.detach())
    layer.reconstruction_loss.backward()
    assert layer.codes.grad.abs().sum() > 0


def test_bypass_is_identity():
    layer = CodebookLayer(2, 4, 10, 1)
    x = torch.randn(3, 2, 4)
    layer.bypass = True
    assert layer(x) is x


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        CodebookLayer(2, 4, 10, 11)
    with pytest.raises(ValueError, match="similarity"):
        CodebookLayer(2, 4, 10, 1, similarity="manhattan")
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 2, 4\]"):
        CodebookLayer(2, 4, 10, 1)(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="k must be"):
        CodebookConfig(n_codes=4, k=5)
    with pytest.raises(ValueError, match="sites"):
        CodebookConfig(sites=("resid",))
    with pytest.raises(ValueError, match="unknown CodebookConfig keys"):
        CodebookConfig.from_dict({"n_code": 3})


def test_config_round_trip():
    cfg = CodebookConfig(n_codes=7, k=2, sites=["mlp"], layers=[0, 1], mlp_groups=2)
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg
