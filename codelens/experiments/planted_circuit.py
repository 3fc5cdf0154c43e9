"""A small GPT-2 built by hand whose circuit is known: the ground truth for the methods.

Sequences are ``[PAD, t]``; tokens ``t`` = 0-3 each name a label (the same number),
predicted at the last position along two planted paths, each worth half of the logit:

- code -> code -> logit: ``embed -> m0`` (the layer-0 MLP picks code ``t`` of its
  codebook), ``m0:t -> m1`` (the layer-1 MLP maps it to its code ``t``), ``m1:t -> logits``;
- through a head: ``embed -> a0.h1<v>`` (head 1 of layer 0 copies the token into its
  code ``t``), ``a0.h1:t -> logits``.

Every other weight is zero, every write lives in its own block of the residual stream,
and LayerNorm runs with a huge epsilon so it is linear up to ~1e-5 relative: every edge
off the planted paths has (almost exactly) no effect. The layer-1 MLP inhibits
mixtures, so a patched input that holds no code, or two, yields its null code
``m1:4`` deterministically instead of a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from codelens.circuits.metrics import LogitDifference
from codelens.config import CodebookConfig
from codelens.experiments.circuit_tasks import Task
from codelens.vocab import attn_site, mlp_site

N_TOKENS = 4
D_MODEL, N_HEADS, BLOCK = 48, 2, 8
EMBED, HEAD, MLP0, MLP1 = (slice(i * BLOCK, (i + 1) * BLOCK) for i in range(4))
NULL_CODE = N_TOKENS
PAD = 5  # a first token that writes nothing: head 1 then averages it with the real token


@dataclass
class Planted(Task):
    """The planted task (``[PAD, t]`` pairs), the model, and its planted edges per level."""

    model: object
    true_edges: dict[str, set[str]]  # level -> planted edges


def _block_vectors(n: int, gen: torch.Generator) -> Tensor:
    """``n`` orthonormal zero-sum vectors in one residual block (LayerNorm centring: no-op)."""
    raw = torch.randn(BLOCK, n, generator=gen)
    raw -= raw.mean(0, keepdim=True)
    return torch.linalg.qr(raw).Q.T  # [n, BLOCK], rows orthonormal, each row sums to 0


def _placed(vectors: Tensor, block: slice) -> Tensor:
    out = torch.zeros(vectors.shape[0], D_MODEL)
    out[:, block] = vectors
    return out


def planted_model(seed: int = 0) -> Planted:
    """The hand-built model, its 12 (clean, corrupted) token pairs, the metric and truth."""
    from codelens.data.fsm import TokFSM
    from codelens.model import HookedCodebookTransformer

    gen = torch.Generator().manual_seed(seed)
    e = _placed(_block_vectors(N_TOKENS, gen), EMBED)
    a = _placed(_block_vectors(N_TOKENS, gen), HEAD)
    o = _placed(_block_vectors(N_TOKENS, gen), MLP0)
    p_and_null = _placed(_block_vectors(N_TOKENS + 1, gen), MLP1)
    p, null = p_and_null[:N_TOKENS], p_and_null[N_TOKENS]
    d_head = D_MODEL // N_HEADS
    u = torch.eye(d_head)[:N_TOKENS]  # head 1's value vector for each token

    config = GPT2Config(
        vocab_size=12,
        n_embd=D_MODEL,
        n_layer=2,
        n_head=N_HEADS,
        n_inner=D_MODEL,
        n_positions=4,
        layer_norm_epsilon=1e4,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.zero_()
        for name, param in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.fill_(100.0)  # LN(x) = 100 x / sqrt(var + 1e4) ~ x
        t = hf.transformer
        t.wte.weight[:N_TOKENS] = e
        # layer 0, head 1: value = token one-hot, output = the token's vector in HEAD
        v_cols = slice(2 * D_MODEL + d_head, 2 * D_MODEL + 2 * d_head)
        t.h[0].attn.c_attn.weight[:, v_cols] = e.T @ u
        t.h[0].attn.c_proj.weight[d_head : 2 * d_head] = u.T @ a
        # layer-0 MLP: hidden j fires for token j, writes o_j
        t.h[0].mlp.c_fc.weight[:, :N_TOKENS] = 10 * e.T
        t.h[0].mlp.c_proj.weight[:N_TOKENS] = o
        # layer-1 MLP: hidden j fires for o_j alone (2 o_j - sum o inhibits mixtures)
        t.h[1].mlp.c_fc.weight[:, :N_TOKENS] = 10 * (2 * o - o.sum(0)).T
        t.h[1].mlp.c_proj.weight[:N_TOKENS] = p
        t.h[1].mlp.c_proj.bias[:] = null
        hf.lm_head.weight[:N_TOKENS] = 5 * (p + a)

    codebook = CodebookConfig(n_codes=8, k=1, sites=("attn", "mlp"))
    model = HookedCodebookTransformer.from_hf_model(hf, TokFSM().tokenizer(), codebook)
    with torch.no_grad():
        for cb in model.codebooks.values():
            cb.codes.copy_(torch.randn(cb.codes.shape, generator=gen))
        model.codebook(attn_site(0)).codes[1, :N_TOKENS] = u
        model.codebook(mlp_site(0)).codes[0, :N_TOKENS] = o
        m1 = model.codebook(mlp_site(1)).codes
        m1[0, :N_TOKENS] = p
        m1[0, NULL_CODE] = null

    pairs = [(c, x) for c in range(N_TOKENS) for x in range(N_TOKENS) if c != x]
    clean = torch.tensor([[PAD, c] for c, _ in pairs])
    corrupted = torch.tensor([[PAD, x] for _, x in pairs])
    metric = LogitDifference(clean[:, -1], corrupted[:, -1])
    codes = range(N_TOKENS)
    true_edges = {
        "components": {
            "embed->m0",
            "m0->m1",
            "m1->logits",
            "embed->a0.h1<v>",
            "a0.h1->logits",
        },
        "codes": {"embed->m0", "embed->a0.h1<v>"}
        | {f"m0:{c}->m1" for c in codes}
        | {f"m1:{c}->logits" for c in codes}
        | {f"a0.h1:{c}->logits" for c in codes},
    }
    return Planted("planted", clean, corrupted, metric, model, true_edges)
