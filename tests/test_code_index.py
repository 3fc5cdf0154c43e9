"""The FAISS code index: exact and approximate top-k, rebuilds, where it is (not) used."""

import sys

import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig, CodebookLayer
from codelens.code_index import CodeIndex, use_code_index

faiss = pytest.importorskip("faiss")

SIMILARITIES = ["cosine", "dot", "euclidean"]


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact top-k ids that the search found, per (token, group)."""
    return float((found[..., :, None] == exact[..., None, :]).any(-1).float().mean())


def layer_and_queries(similarity, n_codes=600, k=4, groups=2, d=16, layer_norm=False):
    torch.manual_seed(0)
    layer = CodebookLayer(groups, d, n_codes, k, similarity=similarity, layer_norm=layer_norm)
    with torch.no_grad():  # codes of varied length, so dot and cosine rank differently
        layer.codes.mul_(torch.rand(groups, n_codes, 1) + 0.5)
    return layer, torch.randn(300, groups, d)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_flat_index_is_exact(similarity):
    layer, x = layer_and_queries(similarity, layer_norm=similarity == "dot")
    layer.disable_codes([3, 5], group=1)
    exact = layer.top_k(x)
    use_code_index(layer, "flat")
    with torch.no_grad():
        found = layer.top_k(x)
    assert recall(found, exact) > 0.999  # float rounding may swap a near-tie
    assert not (found[:, 1] == 3).any() and not (found[:, 1] == 5).any()


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall(similarity, kind):
    layer, x = layer_and_queries(similarity, n_codes=2000)
    exact = layer.top_k(x)
    use_code_index(layer, kind, ef_search=300, nprobe=25)  # of 51 lists
    with torch.no_grad():
        found = layer.top_k(x)
    assert recall(found, exact) >= 0.95  # a wrong metric transform gives well under 0.9
    assert ((found >= 0) & (found < layer.n_codes)).all()


def test_index_is_used_only_without_grad_and_rebuilt_when_codes_change():
    layer, x = layer_and_queries("cosine")
    use_code_index(layer, "flat")
    index = layer.code_index
    layer(x)  # grad enabled: exact scoring, no index
    assert index.builds == 0
    with torch.no_grad():
        layer(x)
        layer(x)
    assert index.builds == 1  # built once, reused
    optimizer = torch.optim.SGD([layer.codes], lr=1.0)
    layer(x).sum().backward()
    optimizer.step()  # codes changed in place
    with torch.no_grad():
        after = layer.top_k(x)
    assert index.builds == 2
    use_code_index(layer, None)
    assert layer.code_index is None
    assert recall(after, layer.top_k(x)) > 0.999
    layer.code_index = index
    layer.disable_codes([int(after[0, 0, 0])], group=0)
    with torch.no_grad():
        layer.top_k(x)
    assert index.builds == 3  # the disabled mask changed


def test_short_approximate_results_are_completed_exactly():
    """IVF with one probe into lists shorter than k comes back with -1s; those rows
    are scored exactly, so every slot holds a real, distinct code."""
    layer, x = layer_and_queries("euclidean", n_codes=200, k=50, groups=1)
    use_code_index(layer, "ivf", nlist=5, nprobe=1)
    with torch.no_grad():
        found = layer.top_k(x)
    assert ((found >= 0) & (found < 200)).all()
    assert (found.sort(-1).values.diff(dim=-1) > 0).all()


def test_model_forward_and_code_search_use_the_index():
    model = tiny_model("gpt2", CodebookConfig(n_codes=64, k=2))
    tokens = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(0))
    names = [f"{site}.hook_codes" for site in model.codebooks]
    with torch.no_grad():
        _, exact = model.run_with_cache(tokens, names_filter=names)
    assert use_code_index(model, "flat") == len(model.codebooks)
    with torch.no_grad():
        _, indexed = model.run_with_cache(tokens, names_filter=names)
    assert all(cb.code_index.builds == 1 for cb in model.codebooks.values())
    for name in names:
        assert recall(indexed[name], exact[name]) > 0.999


def test_bad_options_and_missing_faiss(monkeypatch):
    with pytest.raises(ValueError, match="kind"):
        CodeIndex("lsh")
    with pytest.raises(ValueError, match="ef_search"):
        CodeIndex("hnsw", ef_search=0)
    layer = CodebookLayer(1, 4, 10, 1)
    with pytest.raises(ValueError, match="nprobe"):
        use_code_index(layer, "ivf", nprobe=0)
    assert layer.code_index is None  # nothing changed on a bad option
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"codelens\[faiss\]"):
        CodeIndex("flat")
