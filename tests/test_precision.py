"""Mixed precision and memory: bf16 autocast training on CPU, micro-batched evaluation,
chunk sizes with a floor."""

import math

import pytest
import torch
from conftest import tiny_model
from test_training import config, final_weights

from codelens import CodebookConfig
from codelens.codebook import CodebookLayer
from codelens.training.trainer import evaluate, train


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
    layer = CodebookLayer(4, 16, 300, 3, memory_budget_mb=1.0)
    per_token = 2 * 4 * 300 * 4
    assert layer._chunk_size(4, 0) == 2**20 // per_token
    assert layer._chunk_size(4, 10 * 2**20) == 2**18 // per_token > 1
