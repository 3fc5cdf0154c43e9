"""Mixed precision, memory and compilation: bf16 autocast training on CPU, micro-batched
evaluation, chunk sizes with a floor, chunked k-means, gradient checkpointing that counts
usage once, and the codebook layer under torch.compile."""

import json
import math

import pytest
import torch
from conftest import tiny_model
from test_training import config, final_weights

from codelens import CodebookConfig
from codelens.codebook import CodebookLayer, _chunk_tokens
from codelens.training.init import kmeans
from codelens.training.trainer import enable_gradient_checkpointing, evaluate, train
from codelens.training.usage import CodebookMonitor


def test_bf16_autocast_scores_in_fp32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    layer = CodebookLayer(3, 8, 50, 4, similarity="euclidean")
    x = torch.randn(40, 3, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = layer.top_k(x)
        out = layer(x)
    assert torch.equal(ids, layer.top_k(x.detach().float()))  # fp32 scores of the same values
    assert out.dtype == torch.bfloat16 and layer.codes.dtype == torch.float32
    (out.float().sum() + layer.reconstruction_loss).backward()
    assert layer.codes.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_bf16_cpu_autocast_trains_and_resumes_exactly(tmp_path):
    """A full bf16 train step on CPU autocast (it crashed in top_k's ``out=`` product), and
    a run stopped at step 3 and resumed to 6 equals one run of 6 steps."""
    settings = dict(bf16=True, device="cpu", schedule="constant", warmup_steps=1, eval_every=3)
    whole = train(config(tmp_path / "whole", steps=6, **settings), progress=False)
    assert math.isfinite(whole.final_eval["lm_loss"])
    train(config(tmp_path / "parts", steps=3, checkpoint_every=3, **settings), progress=False)
    train(config(tmp_path / "parts", steps=6, checkpoint_every=3, **settings), progress=False)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(t.dtype == torch.float32 for t in a.values() if t.is_floating_point())


def test_micro_batched_evaluation_equals_whole_batches():
    model = tiny_model(codebook=CodebookConfig(n_codes=16, k=2, sites=("attn", "mlp")))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 10, (7, 12), generator=gen) for _ in range(2)]
    whole = evaluate(model, batches)
    pieces = evaluate(model, batches, micro_batch=3)
    assert whole.keys() == pieces.keys()
    for key in whole:
        assert pieces[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


def test_chunk_size_has_a_floor_when_activations_fill_the_budget():
    """Large activations shrink the score chunk to a quarter of the budget, not to 1 token."""
    per_token = 2 * 4 * 300 * 4
    cpu = torch.device("cpu")
    assert _chunk_tokens(4 * 300, 4, 0, 1.0, cpu) == 2**20 // per_token
    assert _chunk_tokens(4 * 300, 4, 10 * 2**20, 1.0, cpu) == 2**18 // per_token > 1


def test_kmeans_assigns_in_chunks_within_its_budget(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 8, generator=gen)
    whole = kmeans(x, 20, generator=torch.Generator().manual_seed(1))
    widths = []
    cdist = torch.cdist

    def recording(a, b, *args, **kwargs):
        widths.append(a.shape[1])
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording)
    budget = 2 * 20 * 4 * 50 / 2**20  # 50 samples per chunk
    chunked = kmeans(x, 20, generator=torch.Generator().manual_seed(1), memory_budget_mb=budget)
    assert max(widths) == 50
    assert torch.equal(chunked, whole)


def _compiled_matches_eager(backend: str, k: int, similarity: str, graphs: int = 1) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = CodebookLayer(4, 16, 300, k, similarity=similarity)
    layer.disable_codes([3, 5], group=1)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend=backend)
    layer(torch.randn(2, 3, 4, 16))  # einops registers its torch backend on first use
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape in ((2, 9), (3, 5), (4, 17)):
        x = torch.randn(*shape, 4, 16, requires_grad=True)
        results = []
        for run in (compiled, layer):
            x.grad = layer.codes.grad = None
            out = run(x)
            loss = layer.reconstruction_loss
            (out.square().sum() + loss).backward()
            results.append((out, loss, x.grad, layer.codes.grad))
        for got, expected in zip(*results, strict=True):
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(results[0][0], results[1][0])  # the same codes chosen
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == graphs


def test_compiled_codebook_layer_is_one_graph_for_any_token_count_and_equals_eager():
    """``torch.compile(dynamic=True, fullgraph=True)``: no graph break inside the layer
    (``fullgraph`` raises on one), one graph for three token counts, eager's outputs,
    losses and gradients (dynamo and AOT autograd; the other cases are marked slow)."""
    _compiled_matches_eager("aot_eager", 3, "euclidean")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "k", "similarity", "graphs"),
    # inductor adds a guard of its own on the size (numel <= 4096 picks another kernel),
    # so the largest shape gets a second graph: a range, not one graph per shape
    [("aot_eager", 1, "cosine", 1), ("inductor", 3, "euclidean", 2)],
)
def test_compiled_codebook_layer_equals_eager_slow(backend, k, similarity, graphs):
    _compiled_matches_eager(backend, k, similarity, graphs)


def _step_counts_and_grads(arch: str, checkpointing: bool):
    model = tiny_model(arch, CodebookConfig(n_codes=16, k=2, sites=("attn", "mlp")))
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    monitor = CodebookMonitor(model)
    tokens = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    calls = []
    first = model.codebook(next(iter(model.codebooks)))
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    with model.hooks(fwd_hooks=monitor.hooks()):
        (model(tokens, return_type="loss") + model.reconstruction_loss()).backward()
    handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return len(calls), monitor.window_counts, grads


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_gradient_checkpointing_counts_code_usage_once(arch):
    """The checkpointed blocks run twice (forward, then recomputed in the backward), but
    usage is counted once: the counts and gradients equal a run without checkpointing."""
    calls, counts, grads = _step_counts_and_grads(arch, checkpointing=True)
    plain_calls, plain_counts, plain_grads = _step_counts_and_grads(arch, checkpointing=False)
    assert (calls, plain_calls) == (2, 1)  # really recomputed
    for site in plain_counts:
        assert torch.equal(counts[site], plain_counts[site]), site
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], plain_grads[name], atol=1e-6), name


def test_training_with_gradient_checkpointing_logs_each_token_once(tmp_path):
    train(config(tmp_path / "run", steps=5, gradient_checkpointing=True), progress=False)
    (line,) = [
        x for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train" in x
    ]
    assert json.loads(line)["blocks.0.hook_mlp_out/tokens"] == 5 * 16 * 24


def test_bf16_training_ends_within_two_percent_of_float32(tmp_path):
    """The short version of `benchmarks/bf16_training.py`: same seed and data, 20 steps."""
    losses = {}
    for bf16 in (False, True):
        run = tmp_path / str(bf16)
        result = train(config(run, steps=20, bf16=bf16, device="cpu"), progress=False)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = [x for x in lines if x["split"] == "train"][-1]
        losses[bf16] = (last["loss"], last["lm_loss"], result.final_eval["lm_loss"])
    for fp32, bf16 in zip(losses[False], losses[True], strict=True):
        assert bf16 == pytest.approx(fp32, rel=0.02)
    assert losses[False] != losses[True]  # really a different precision
