"""`CodebookLayer`: top-k vector quantisation of grouped activations."""

from __future__ import annotations

import contextlib
import math
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from codelens.config import Combine, Similarity

if TYPE_CHECKING:
    from codelens.code_index import CodeIndex

EMPTY_SLOT = -1
"""A code id that contributes nothing: a hook may write it to empty a slot."""

SCRATCH_MB = 64.0
"""Largest CPU score chunk, in MiB; the buffer is kept and reused (see `_scores_scratch`)."""

ARGMAX_CHUNK_MB = 4.0
"""CPU score chunk, in MiB, for `_vector_argmax`: small enough to stay in the cache
between the score product and its passes."""

VECTOR_ARGMAX_MAX_THREADS = 1
"""Most intra-op threads with which k = 1 uses `_vector_argmax` (see there)."""


class CodebookLayer(HookedRootModule):
    """Replace each ``[..., G, d]`` activation by the combination of its top-k codes.

    There are G independent codebooks of C codes (one per attention head, or per MLP
    group). All groups are scored in one batched product; top-k runs in token chunks
    so the score matrix never exceeds ``memory_budget_mb``.

    Hook points:
        ``hook_codes``: int64 ``[..., G, k]`` chosen ids. A hook returning other ids
            makes the output exactly the combination of those codes (``EMPTY_SLOT``
            = -1 leaves a slot empty).
        ``hook_quantized``: ``[..., G, d]`` the combination of the codes.

    Scoring: ``similarity`` against the activation, or, with ``layer_norm``, against
    its LayerNorm (eps 1e-5); ``layer_norm_affine`` adds a per-group gain and bias
    (buffers ``ln_weight``/``ln_bias`` ``[G, d]``, not trained: scoring has no
    gradient) as the original implementation's codebooks had. With ``combine="mean"``
    and ``similarity="cosine"`` (x . c / |c|) this is the original's forward.

    Gradients: a straight-through estimator passes the downstream gradient to the
    input unchanged, and the codes get the downstream gradient of the slots they
    fill. ``reconstruction_loss`` (MSE of the output against the detached input,
    from the last forward) is what pulls codes toward the activations;
    ``commitment_loss`` (the same with the output detached) pulls activations toward
    their codes, so they cannot drift away while the straight-through gradient moves them.
    Both are computed only when autograd is recording (not under ``torch.no_grad``).

    ``code_index``: an optional `codelens.code_index.CodeIndex` (FAISS) that `top_k`
    searches instead of scoring every code, under ``torch.no_grad`` only.
    """

    def __init__(
        self,
        n_groups: int,
        d: int,
        n_codes: int,
        k: int,
        *,
        similarity: Similarity = "cosine",
        combine: Combine = "sum",
        layer_norm: bool = False,
        layer_norm_affine: bool = False,
        memory_budget_mb: float = 1024.0,
    ) -> None:
        super().__init__()
        if min(n_groups, d, n_codes) < 1:
            raise ValueError(
                f"n_groups, d and n_codes must be >= 1, got {n_groups}, {d}, {n_codes}"
            )
        if not 1 <= k <= n_codes:
            raise ValueError(f"k must be between 1 and n_codes={n_codes}, got k={k}")
        if similarity not in ("cosine", "dot", "euclidean"):
            raise ValueError(f"similarity must be cosine, dot or euclidean, got {similarity!r}")
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        if layer_norm_affine and not layer_norm:
            raise ValueError("layer_norm_affine=True needs layer_norm=True")
        self.n_groups, self.d, self.n_codes, self.k = n_groups, d, n_codes, k
        self.similarity: Similarity = similarity
        self.combine: Combine = combine
        self.layer_norm = layer_norm
        self.memory_budget_mb = memory_budget_mb
        self.codes = nn.Parameter(torch.randn(n_groups, n_codes, d) / math.sqrt(d))
        self.register_buffer("disabled", torch.zeros(n_groups, n_codes, dtype=torch.bool))
        # Per-group gain and bias of the scoring LayerNorm (None unless affine).
        self.register_buffer("ln_weight", torch.ones(n_groups, d) if layer_norm_affine else None)
        self.register_buffer("ln_bias", torch.zeros(n_groups, d) if layer_norm_affine else None)
        self.bypass = False
        self.code_index: CodeIndex | None = None
        self.reconstruction_loss: Tensor | None = None
        self.commitment_loss: Tensor | None = None
        self.nonfinite_input: Tensor | None = None  # device flag, see `_check_finite`
        self._any_disabled: tuple[Any, bool] = (None, False)
        self.hook_codes = HookPoint()
        self.hook_quantized = HookPoint()
        self.setup()

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild this layer (the constructor's arguments), JSON-ready."""
        return {
            "n_groups": self.n_groups,
            "d": self.d,
            "n_codes": self.n_codes,
            "k": self.k,
            "similarity": self.similarity,
            "combine": self.combine,
            "layer_norm": self.layer_norm,
            "layer_norm_affine": self.ln_weight is not None,
            "memory_budget_mb": self.memory_budget_mb,
        }

    def extra_repr(self) -> str:
        return (
            f"groups={self.n_groups}, d={self.d}, codes={self.n_codes}, k={self.k}, "
            f"similarity={self.similarity}, combine={self.combine}, layer_norm={self.layer_norm}, "
            f"layer_norm_affine={self.ln_weight is not None}"
        )

    def forward(self, x: Float[Tensor, "... G d"]) -> Float[Tensor, "... G d"]:
        if self.bypass:
            self._check_no_code_edits()
            return x
        if x.shape[-2:] != (self.n_groups, self.d):
            raise ValueError(
                f"CodebookLayer expects [..., {self.n_groups}, {self.d}] activations, "
                f"got shape {tuple(x.shape)}"
            )
        self._check_finite(x)
        chosen = self.top_k(x)
        hooked = self.hook_codes.has_hooks(dir="fwd")
        # Compiled, a hook's ids are always checked (a traced graph has no versions).
        unknown = not hooked or torch.compiler.is_compiling() or chosen.is_inference()
        version = None if unknown else chosen._version
        ids = self.hook_codes(chosen)
        if not hooked or (ids is chosen and version is not None and ids._version == version):
            quantized = self._combine_chosen(chosen)  # our own ids: in range, none empty
        else:
            self._check_ids(ids, x.shape[:-1])
            quantized = self.lookup(ids)
        quantized = self.hook_quantized(quantized)
        if not torch.is_grad_enabled():  # inference: no losses, no straight-through term
            self.reconstruction_loss = self.commitment_loss = None
            return quantized.to(x.dtype)
        out, self.reconstruction_loss, self.commitment_loss = _StraightThrough.apply(x, quantized)
        return out

    def _check_finite(self, x: Float[Tensor, "... G d"]) -> None:
        """Stop on NaN or inf in the input, which would quantise to finite codes and vanish.

        CPU inference raises at once. Training, and any run on an accelerator, keeps the
        finding on the device in ``nonfinite_input`` (no host sync per forward);
        `HookedCodebookTransformer.check_finite` reports it, and the trainer names the
        site when it stops on the non-finite loss that follows.
        """
        finite = torch.isfinite(x).all()
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            torch._assert_async(  # raises here on the CPU, with no host read
                finite, f"NaN or inf in the input of the codebook at {self.site_name()}"
            )
            return
        bad = finite.logical_not()
        if self.nonfinite_input is None:
            self.nonfinite_input = bad
        else:
            self.nonfinite_input = self.nonfinite_input | bad

    def _check_no_code_edits(self) -> None:
        """A bypassed codebook chooses no codes, so a hook that edits them (one marked
        ``edits_codes``, as every intervention is) would silently do nothing: refuse."""
        handles = self.hook_codes.fwd_hooks
        if any(getattr(getattr(h, "user_hook", None), "edits_codes", False) for h in handles):
            raise RuntimeError(
                f"an intervention edits the codes at {self.site_name()}, but the codebooks "
                "are bypassed (codebooks_bypassed()), so it would have no effect; apply it "
                "outside that block"
            )

    def site_name(self) -> str:
        """The hook point this codebook sits at (as the model's hook registry names it)."""
        name = self.hook_codes.name or "an unnamed site"
        return name.removesuffix(".hook_codes")

    def top_k(self, x: Float[Tensor, "... G d"]) -> Int[Tensor, "... G k"]:
        """Ids of the k best-scoring enabled codes of every group, chunked over tokens.

        Never differentiable. Called under ``torch.no_grad`` with a `code_index`
        attached, it searches the index instead.
        """
        search_index = self.code_index is not None and not torch.is_grad_enabled()
        with torch.no_grad(), _no_autocast(x.device):
            lead = x.shape[:-2]
            # LayerNorm scales each row by a positive number, which leaves its ranking
            # alone, and subtracts its mean, which is the same as centring every code:
            # (x - mean(x)) . c == x . (c - mean(c)). Without an affine or a distance,
            # when there are fewer codes than tokens, the codes are centred instead.
            centre = self.layer_norm and self.ln_weight is None and self.similarity != "euclidean"
            centre = centre and not search_index and self.n_codes < math.prod(lead)
            dtype = torch.promote_types(x.dtype, self.codes.dtype)  # the scores' precision
            if self.layer_norm and not centre:  # in the input's own layout: no transposed copy
                x = self._normalised(x, dtype)
            if search_index:
                flat = rearrange(x, "... g d -> g (...) d")
                ids = self.code_index.search(self, flat).to(torch.long)  # [G, N, k]
                return rearrange(ids, "g n k -> n g k").reshape(*lead, self.n_groups, self.k)
            weight, bias, alpha = self._score_terms(dtype, centre)
            if torch.compiler.is_compiling():  # one opaque op: no graph break, any shape
                return torch.ops.codelens.chunked_top_k(
                    x, weight, bias, alpha, self.k, self.memory_budget_mb
                )
            return _chunked_top_k(x, weight, bias, alpha, self.k, self.memory_budget_mb)

    @torch.no_grad()
    def code_score(
        self, x: Float[Tensor, "... G d"], group: int, code: int
    ) -> Float[Tensor, "..."]:
        """How strongly code ``code`` of ``group`` matches each activation: the score `top_k`
        ranks codes by (for ``euclidean`` up to a per-token constant, ``2 x.c - |c|^2``)."""
        if not (0 <= group < self.n_groups and 0 <= code < self.n_codes):
            raise ValueError(
                f"group {group}, code {code} out of range: {self.n_groups} groups of "
                f"{self.n_codes} codes"
            )
        dtype = torch.promote_types(x.dtype, self.codes.dtype)
        x = self._normalised(x, dtype) if self.layer_norm else x.to(dtype)
        weight, bias, alpha = self._score_terms(dtype)  # weight [G, d, C], bias [G, 1, C]
        score = alpha * (x[..., group, :] @ weight[group, :, code])
        return score if bias is None else score + bias[group, 0, code]

    def _normalised(self, x: Float[Tensor, "... G d"], dtype: torch.dtype) -> Tensor:
        """The LayerNorm-ed activation that ``layer_norm`` codebooks score, in ``dtype``."""
        x = F.layer_norm(x.to(dtype), (self.d,))
        if self.ln_weight is not None:  # [G, d] broadcasts over [..., G, d]
            x = torch.addcmul(self.ln_bias, x, self.ln_weight)
        return x

    def lookup(self, ids: Int[Tensor, "... G k"]) -> Float[Tensor, "... G d"]:
        """Combine the codes named by ``ids`` (``EMPTY_SLOT`` contributes zero)."""
        offsets = torch.arange(self.n_groups, device=ids.device)[:, None] * self.n_codes
        bags = rearrange(ids.clamp(min=0) + offsets, "... g k -> (... g) k")
        weights = rearrange((ids >= 0).to(self.codes.dtype), "... g k -> (... g) k")
        if self.combine == "mean":
            weights = weights / self.k
        table = rearrange(self.codes, "g c d -> (g c) d")
        combined = F.embedding_bag(bags, table, per_sample_weights=weights, mode="sum")
        return combined.view(*ids.shape[:-1], self.d)

    def _combine_chosen(self, ids: Int[Tensor, "... G k"]) -> Float[Tensor, "... G d"]:
        """`lookup` for ids known to be in range with no empty slot (what `top_k` returns):
        no weights, and for k=1 a plain row gather, whose backward is cheaper."""
        offsets = torch.arange(self.n_groups, device=ids.device)[:, None] * self.n_codes
        table = rearrange(self.codes, "g c d -> (g c) d")
        rows = ids + offsets
        if self.k == 1:
            return F.embedding(rows.squeeze(-1), table)
        bags = rearrange(rows, "... g k -> (... g) k")
        combined = F.embedding_bag(bags, table, mode=self.combine)
        return combined.view(*ids.shape[:-1], self.d)

    def disable_codes(self, ids: Int[Tensor, " n"] | list[int], group: int | None = None) -> None:
        """Never choose these codes (in one group, or in all groups)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.disabled.device).flatten()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_codes):
            raise ValueError(f"code ids must be in [0, {self.n_codes}), got {ids.tolist()}")
        if group is not None and not 0 <= group < self.n_groups:
            raise ValueError(f"group must be in [0, {self.n_groups}), got {group}")
        mask = self.disabled.clone()
        mask[slice(None) if group is None else group, ids] = True
        self._set_disabled(mask)

    def enable_all_codes(self) -> None:
        """Undo every `disable_codes`."""
        self.disabled.zero_()

    def _set_disabled(self, mask: Bool[Tensor, "G C"]) -> None:
        remaining = int((~mask).sum(-1).min())
        if remaining < self.k:
            raise ValueError(
                f"disabling these codes leaves {remaining} enabled codes, fewer than k={self.k}"
            )
        self.disabled.copy_(mask)

    def _has_disabled(self) -> bool:
        """Whether any code is disabled, read once per change of the mask (so an
        accelerator syncs only when codes are disabled or enabled, not per forward)."""
        key = (self.disabled._version, self.disabled.data_ptr())
        if self._any_disabled[0] != key:
            self._any_disabled = (key, bool(self.disabled.any()))
        return self._any_disabled[1]

    def _score_terms(
        self, dtype: torch.dtype, centre: bool = False
    ) -> tuple[Tensor, Tensor | None, float]:
        """``scores = bias + alpha * x @ weight`` for the chosen similarity; ``bias`` is
        None when it would be all zeros (then one bmm, no extra pass over the scores).
        ``centre`` subtracts each code's mean (cosine and dot only), which scores the
        LayerNorm of ``x`` up to a positive factor per token. All in ``dtype``."""
        codes = self.codes.detach().to(dtype)
        mask = None
        if torch.compiler.is_compiling() or self._has_disabled():  # compiled: no host read
            mask = torch.zeros_like(self.disabled, dtype=codes.dtype)
            mask = mask.masked_fill(self.disabled, -math.inf)
        if self.similarity == "cosine":
            weight, bias, alpha = F.normalize(codes, dim=-1), mask, 1.0
        elif self.similarity == "dot":
            weight, bias, alpha = codes, mask, 1.0
        else:  # argmin |x - c|^2 == argmax 2 x.c - |c|^2
            squares = codes.pow(2).sum(-1)
            weight, bias, alpha = codes, -squares if mask is None else mask - squares, 2.0
        if centre:
            weight = weight - weight.mean(-1, keepdim=True)
        bias = None if bias is None else bias[:, None, :]
        return rearrange(weight, "g c d -> g d c"), bias, alpha

    def _check_ids(self, ids: Tensor, expected: torch.Size) -> None:
        """Validate ids written by a user hook (not on the unhooked hot path).

        The range check is an on-device assertion: it raises at once on CPU and
        fails the device (a device-side assert) on an accelerator, without a
        device-to-host sync per forward.
        """
        if ids.dtype != torch.long or ids.shape != (*expected, self.k):
            raise ValueError(
                f"hook_codes must return int64 ids of shape {(*expected, self.k)}, "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        in_range = ((ids >= EMPTY_SLOT) & (ids < self.n_codes)).all()
        torch._assert_async(
            in_range, f"hook_codes returned ids outside [{EMPTY_SLOT}, {self.n_codes})"
        )


def _chunk_tokens(
    codes: int, element_size: int, activation_bytes: int, budget_mb: float, device: torch.device
) -> int:
    """Tokens per top-k chunk so that the whole forward fits the memory budget.

    ``codes`` counts every group's codes. A chunk costs its score matrix plus top-k's
    working copy of it; the budget also carries about four activation-sized tensors
    (grouped input, its normalised copy, ids and output), but the scores always get at
    least a quarter of it (no fall to one token per chunk when activations are large).
    On CUDA the chunk also fits in half of the memory still free.
    """
    per_token = 2 * codes * element_size
    budget = int(budget_mb * 2**20)
    available = max(budget - 4 * activation_bytes, budget // 4)
    if device.type == "cuda":
        available = min(available, _free_cuda_bytes(device) // 2)
    return max(1, available // per_token)


def _chunked_top_k(
    x: Float[Tensor, "... G d"],
    weight: Float[Tensor, "G d C"],
    bias: Float[Tensor, "G 1 C"] | None,
    alpha: float,
    k: int,
    budget_mb: float,
) -> Int[Tensor, "... G k"]:
    """Ids of the k best of ``bias + alpha * x @ weight`` per group, in token chunks.

    Scores are in ``weight``'s dtype (fp32 for a bf16 input under autocast: each chunk
    is cast on its own, never the whole activation).
    """
    *lead, n_groups, _ = x.shape
    n_codes, dtype = weight.shape[-1], weight.dtype
    flat = rearrange(x, "... g d -> g (...) d")  # a view: bmm takes strided rows
    n_tokens = flat.shape[1]
    ids = torch.empty(n_tokens, n_groups, k, dtype=torch.long, device=x.device)
    grouped = rearrange(ids, "n g k -> g n k")  # a view: chunks write in place
    per_token = n_groups * n_codes * weight.element_size()
    activation_bytes = x.numel() * weight.element_size()
    chunk = _chunk_tokens(
        n_groups * n_codes, weight.element_size(), activation_bytes, budget_mb, x.device
    )
    fast_argmax = k == 1 and _vector_argmax_applies(weight, n_codes)
    if flat.device.type == "cpu":
        cap_mb = ARGMAX_CHUNK_MB if fast_argmax else SCRATCH_MB
        chunk = min(chunk, int(cap_mb * 2**20) // per_token)
    chunk = max(1, min(chunk, n_tokens))
    scratch = _scores_scratch(n_groups * chunk * n_codes, weight)
    if fast_argmax:
        marks = torch.arange(n_codes, 2 * n_codes, dtype=dtype)
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        rows = flat[:, start:stop].to(dtype)
        scores = scratch[: n_groups * (stop - start) * n_codes]
        scores = scores.view(n_groups, stop - start, n_codes)
        if bias is None:
            torch.bmm(rows, weight, out=scores)
        else:
            torch.baddbmm(bias, rows, weight, alpha=alpha, out=scores)
        if fast_argmax:
            _vector_argmax(scores, grouped[:, start:stop, 0], marks)
        elif k == 1:  # an argmax is one pass; top-k keeps a heap per row
            grouped[:, start:stop] = scores.argmax(-1, keepdim=True)
        else:
            grouped[:, start:stop] = scores.topk(k, dim=-1, sorted=True).indices
    return ids.view(*lead, n_groups, k)


@torch.library.custom_op("codelens::chunked_top_k", mutates_args=())
def _chunked_top_k_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, alpha: float, k: int, budget_mb: float
) -> Tensor:
    """`_chunked_top_k` as one operator, so ``torch.compile`` keeps the layer in one graph
    with symbolic shapes (a Python loop over token chunks would fix the token count)."""
    with torch.no_grad():
        return _chunked_top_k(x, weight, bias, alpha, k, budget_mb)


@_chunked_top_k_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: float, k: int, budget_mb: float):
    return x.new_empty((*x.shape[:-1], k), dtype=torch.long)


class _StraightThrough(torch.autograd.Function):
    """Output the quantised value, with the straight-through gradient and both losses.

    Forward: ``quantized`` (in ``x``'s dtype), and its MSE to ``x`` twice (reconstruction and
    commitment have the same value). Backward: the output's gradient reaches ``x``
    and ``quantized`` unchanged; the reconstruction loss adds to ``quantized``'s
    gradient and the commitment loss to ``x``'s. One difference in the forward (kept
    for the backward) and one fused multiply-add per loss actually used, instead of an
    autograd graph of separate subtractions, casts and MSEs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, quantized: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        diff = quantized.float() - x.float()
        flat = diff.flatten()
        loss = flat.dot(flat) / flat.numel()
        ctx.save_for_backward(diff)
        ctx.dtypes = x.dtype, quantized.dtype
        ctx.set_materialize_grads(False)
        # In the input's dtype: under autocast the codes (fp32) never change what flows on.
        return quantized.to(x.dtype), loss, loss.clone()

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_recon: Tensor | None, grad_commit: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        (diff,) = ctx.saved_tensors
        scale = 2.0 / diff.numel()

        def grad(dtype: torch.dtype, loss_grad: Tensor | None, sign: float) -> Tensor | None:
            if loss_grad is None:  # None when nothing reaches this input
                return None if grad_out is None else grad_out.to(dtype)
            if grad_out is None:
                return (diff * (sign * scale * loss_grad)).to(dtype)
            return torch.addcmul(grad_out.float(), diff, sign * scale * loss_grad).to(dtype)

        x_dtype, q_dtype = ctx.dtypes
        grad_x = grad(x_dtype, grad_commit, -1.0) if ctx.needs_input_grad[0] else None
        grad_q = grad(q_dtype, grad_recon, 1.0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_q


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: scoring keeps the precision `top_k` chose."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _free_cuda_bytes(device: torch.device) -> int:
    """Device memory free for new tensors: free on the device plus what the caching
    allocator holds unused (a host query, no stream sync)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


_scratch = threading.local()


def _scores_scratch(numel: int, like: Tensor) -> Tensor:
    """A flat buffer for one score chunk.

    On CPU a fresh allocation this large comes as new pages from the OS, and faulting
    them in costs about as much as the score product itself; so the buffer is kept
    per thread and reused (CPU chunks are at most ``SCRATCH_MB``, see
    `CodebookLayer.top_k`). Accelerators' caching allocators already reuse memory.
    """
    if like.device.type != "cpu":
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    buffer = getattr(_scratch, "scores", None)
    if buffer is None or buffer.dtype != like.dtype or buffer.numel() < numel:
        buffer = _scratch.scores = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel]


_VECTOR_ARGMAX_MAX_CODES = 2**21
"""Codes per group up to which `_vector_argmax`'s float sums of code ids stay exact."""


def _vector_argmax_applies(like: Tensor, n_codes: int) -> bool:
    """Whether `_vector_argmax` is the faster exact argmax here: CPU, float32/64, few
    enough codes, and at most ``VECTOR_ARGMAX_MAX_THREADS`` threads.

    On an accelerator the plain argmax is already parallel, and the tie check would
    cost a device-to-host sync. With several CPU threads, each of its passes over each
    small chunk is a parallel region that waits for every thread: on a CPU shared with
    other jobs, 2 threads were slower with it than with one argmax per large chunk
    (docs/speed.md).
    """
    return (
        torch.get_num_threads() <= VECTOR_ARGMAX_MAX_THREADS
        and like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.float64)
        and n_codes <= _VECTOR_ARGMAX_MAX_CODES
    )


def _vector_argmax(
    scores: Float[Tensor, "G n C"], out: Int[Tensor, "G n"], marks: Float[Tensor, " C"]
) -> None:
    """``out = scores.argmax(-1)``, exactly, from vectorised passes; overwrites ``scores``.

    On CPU, ``argmax`` compares one element at a time, while ``amax``, ``eq`` and a
    matrix-vector product run in SIMD: together about twice as fast on a chunk that
    stays in the cache. The row maximum marks its position with 1.0 (every other score
    becomes 0.0); the product of that mask with ``marks`` (``C + c`` for code c) is then
    exactly ``C + id`` when the row has one maximum, and at least ``2C`` when it has
    several. Rows with tied maxima take ``argmax`` of their mask (the first maximum, as
    ``argmax`` picks), and rows with a NaN the plain ``argmax`` of their scores, taken
    before the mask replaces them (NaN counts as the largest). Reading the two flags
    costs nothing on CPU, the only device this runs on.
    """
    n_codes = scores.shape[-1]
    best = scores.amax(-1, keepdim=True)
    nan_rows = best.squeeze(-1).isnan()
    nan_ids = scores[nan_rows].argmax(-1) if bool(nan_rows.any()) else None
    torch.eq(scores, best, out=scores)
    found = torch.matmul(scores, marks)  # C + id where the row has exactly one maximum
    out.copy_(found)
    out.sub_(n_codes)
    other = (found < n_codes) | (found >= 2 * n_codes)  # tied maxima, or NaN (no mark)
    if bool(other.any()):
        out[other] = scores[other].argmax(-1)  # the first of the marked maxima
        if nan_ids is not None:
            out[nan_rows] = nan_ids
