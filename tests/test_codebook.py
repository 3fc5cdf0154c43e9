"""CodebookLayer on its own: scoring, chunking, id patching, gradients, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from codelens import EMPTY_SLOT, CodebookConfig, CodebookLayer, codebook


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
@pytest.mark.parametrize("k", [1, 4])
def test_top_k_matches_brute_force(similarity, layer_norm, k):
    torch.manual_seed(0)
    layer = CodebookLayer(3, 8, 50, k, similarity=similarity, layer_norm=layer_norm)
    x = torch.randn(40, 3, 8)
    assert torch.equal(layer.top_k(x), brute_force_ids(layer, x))


def test_chunked_top_k_equals_unchunked():
    torch.manual_seed(0)
    big = CodebookLayer(4, 16, 300, 3)
    small = CodebookLayer(4, 16, 300, 3, memory_budget_mb=0.01)
    small.load_state_dict(big.state_dict())
    x = torch.randn(5, 70, 4, 16)
    assert codebook._chunk_tokens(4 * 300, 4, 0, 0.01, x.device) < 350  # really chunked
    assert torch.equal(small.top_k(x), big.top_k(x))


def test_cpu_scratch_chunks_equal_one_chunk(monkeypatch):
    """CPU score chunks are capped by the reused scratch buffer as well as the budget."""
    torch.manual_seed(0)
    layer = CodebookLayer(4, 16, 300, 1)
    x = torch.randn(333, 4, 16)
    whole = layer.top_k(x)
    monkeypatch.setattr(codebook, "SCRATCH_MB", 4 * 300 * 4 * 10 / 2**20)  # 10 tokens
    assert torch.equal(layer.top_k(x), whole)
    assert torch.equal(layer.top_k(x[:7]), whole[:7])


@pytest.mark.parametrize("trial", range(6))
def test_vector_argmax_equals_argmax(trial):
    """The vectorised k=1 argmax gives argmax's ids exactly, with tied maxima (the first
    wins), NaN (counts as the largest) and infinities."""
    gen = torch.Generator().manual_seed(trial)
    scores = torch.randn(3, 64, 37, generator=gen)
    if trial % 2:
        scores = scores.mul(2).round()  # many rows with tied maxima
    for value, share in ((torch.nan, 0.02), (torch.inf, 0.03), (-torch.inf, 0.1)):
        if trial >= 2:
            scores[torch.rand(scores.shape, generator=gen) < share] = value
    scores[0, 0] = -torch.inf  # a row of one repeated value
    ids = torch.empty(3, 64, dtype=torch.long)
    codebook._vector_argmax(scores.clone(), ids, torch.arange(37, 74, dtype=torch.float))
    assert torch.equal(ids, scores.argmax(-1))


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_k1_vector_argmax_path_equals_plain_argmax(monkeypatch, similarity):
    """On one thread, k=1 takes the vectorised argmax over small chunks; ids equal the
    plain argmax over one chunk, also with disabled codes."""
    torch.manual_seed(0)
    layer = CodebookLayer(3, 8, 200, 1, similarity=similarity)
    layer.disable_codes([1, 5, 7], group=1)
    x = torch.randn(500, 3, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert codebook._vector_argmax_applies(x, layer.n_codes)
        monkeypatch.setattr(codebook, "ARGMAX_CHUNK_MB", 3 * 200 * 4 * 30 / 2**20)  # 30 tokens
        fast = layer.top_k(x)
        monkeypatch.setattr(codebook, "VECTOR_ARGMAX_MAX_THREADS", 0)
        assert not codebook._vector_argmax_applies(x, layer.n_codes)
        plain = layer.top_k(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("k", [1, 4])
def test_layer_norm_scoring_by_centred_codes(similarity, k):
    """Without an affine, LayerNorm scoring centres the codes instead of normalising the
    activations: the chosen codes score as high as the best ones under the explicit
    LayerNorm (computed here in float64), so ids differ at most between near-ties."""
    torch.manual_seed(0)
    layer = CodebookLayer(3, 16, 300, k, similarity=similarity, layer_norm=True)
    x = torch.randn(2000, 3, 16) * 3 + torch.randn(3, 16)  # rows with a large mean
    ids = layer.top_k(x)
    normed = F.layer_norm(x.double(), (16,))
    codes = layer.codes.detach().double()
    if similarity == "cosine":
        codes = F.normalize(codes, dim=-1)
    reference = torch.einsum("ngd,gcd->ngc", normed, codes)
    best = reference.topk(k, dim=-1).values
    torch.testing.assert_close(reference.gather(-1, ids), best, rtol=0, atol=1e-5)
    assert (ids == reference.topk(k, dim=-1).indices).float().mean() > 0.99


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
    "bad, error, match",
    [
        (torch.full((4, 2, 2), 20), RuntimeError, "outside"),
        (torch.full((4, 2, 2), -2), RuntimeError, "outside"),
        (torch.zeros(4, 2, 3, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(4, 2, 2, dtype=torch.int32), ValueError, "int64"),
    ],
)
def test_hook_returning_bad_ids_is_refused(bad, error, match):
    layer = CodebookLayer(2, 6, 20, 2)
    layer.hook_codes.add_hook(lambda ids, hook: bad)
    with pytest.raises(error, match=match):
        layer(torch.randn(4, 2, 6))


def test_hook_editing_ids_in_place_is_checked():
    """A hook that writes into the chosen ids and returns None is validated too."""
    layer = CodebookLayer(2, 6, 20, 1)

    def overwrite(ids, hook):
        ids[0, 0, 0] = 20  # one past the end: group 1's first code if unchecked

    layer.hook_codes.add_hook(overwrite)
    with pytest.raises(RuntimeError, match="outside"):
        layer(torch.randn(4, 2, 6))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_hooked_id_check_runs_on_device_without_host_sync(grad):
    """Issue 19.5: the old check read ids back to the host, so it ran on CPU only and
    an id >= n_codes on an accelerator silently read the next group's code. The check
    must be an on-device assertion with no device-to-host read, whatever the device."""
    layer = CodebookLayer(3, 6, 20, 2)
    layer.hook_codes.add_hook(lambda ids, hook: ids.flip(-1))  # new, valid ids
    x = torch.randn(4, 3, 6, requires_grad=grad)
    layer(x)  # the first forward reads the disabled-codes mask once; later ones never
    with torch.set_grad_enabled(grad), _RecordOps() as record:
        layer(x)
    assert "_assert_async" in record.ops
    syncs = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}
    assert not syncs & set(record.ops), sorted(syncs & set(record.ops))


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


def reference_forward(layer, x, scale_quantized):
    """The layer's training forward written out with plain autograd ops (test only)."""
    ids = brute_force_ids(layer, x.detach())
    chosen = torch.stack([layer.codes[g, ids[:, g]] for g in range(layer.n_groups)], dim=1)
    quantized = chosen.sum(2) / (layer.k if layer.combine == "mean" else 1)
    quantized = quantized * scale_quantized
    recon = F.mse_loss(quantized, x.detach())
    commitment = F.mse_loss(x, quantized.detach())
    return quantized + (x - x.detach()), recon, commitment


@pytest.mark.parametrize("k, combine", [(1, "sum"), (3, "sum"), (3, "mean")])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 2.0), (0.0, 1.0)])
@pytest.mark.parametrize("hooked", [False, True])
def test_gradients_match_plain_autograd(k, combine, weights, hooked):
    """Output, both losses and the gradients of input and codes equal a plain-autograd
    straight-through forward, also with a hook editing the quantised output."""
    torch.manual_seed(0)
    layer = CodebookLayer(2, 5, 12, k, combine=combine, similarity="dot", layer_norm=True)
    scale = 1.5 if hooked else 1.0
    if hooked:
        layer.hook_quantized.add_hook(lambda q, hook: q * scale)
    x = torch.randn(9, 2, 5, requires_grad=True)
    upstream = torch.randn(9, 2, 5)
    grads, values = [], []
    for forward in (layer, lambda x: reference_forward(layer, x, scale)):
        out = forward(x)
        out, recon, commitment = (
            (out, layer.reconstruction_loss, layer.commitment_loss) if forward is layer else out
        )
        loss = (out * upstream).sum() + weights[0] * recon + weights[1] * commitment
        loss.backward()
        grads.append((x.grad.clone(), layer.codes.grad.clone()))
        values.append((out.detach(), recon.detach(), commitment.detach()))
        x.grad = layer.codes.grad = None
    for ours, reference in zip(values[0] + grads[0], values[1] + grads[1], strict=True):
        torch.testing.assert_close(ours, reference)


def test_losses_alone_backpropagate():
    """Backward through a loss only (the output unused) reaches the codes."""
    layer = CodebookLayer(2, 4, 10, 2)
    x = torch.randn(6, 2, 4, requires_grad=True)
    layer(x)
    layer.commitment_loss.backward()
    assert x.grad.abs().sum() > 0 and layer.codes.grad is None


def test_inference_mode_forward_with_hooks():
    """Ids made under inference mode have no version counter; a hook still works."""
    layer = CodebookLayer(2, 4, 10, 2)
    x = torch.randn(6, 2, 4)
    expected = layer.lookup(torch.full((6, 2, 2), 3))
    layer.hook_codes.add_hook(lambda ids, hook: torch.full_like(ids, 3))
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, expected)


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


@pytest.mark.parametrize(
    "settings",
    [
        {"similarity": "cosine"},
        {"similarity": "dot"},
        {"similarity": "euclidean"},
        {"similarity": "cosine", "layer_norm": True},
        {"similarity": "dot", "layer_norm": True, "layer_norm_affine": True},
    ],
)
def test_code_score_ranks_codes_as_top_k_does(settings):
    torch.manual_seed(0)
    cb = CodebookLayer(2, 8, 16, 1, **settings)
    if cb.ln_weight is not None:
        with torch.no_grad():
            cb.ln_weight.uniform_(0.5, 1.5)
            cb.ln_bias.normal_()
    x = torch.randn(5, 7, 2, 8)
    ids = cb.top_k(x)
    for group in range(2):
        scores = torch.stack([cb.code_score(x, group, c) for c in range(16)], -1)
        assert torch.equal(scores.argmax(-1), ids[..., group, 0])
