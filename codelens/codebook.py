"""`CodebookLayer`: top-k vector quantisation of grouped activations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from codelens.config import Combine, Similarity

EMPTY_SLOT = -1
"""A code id that contributes nothing: a hook may write it to empty a slot."""


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
        self.reconstruction_loss: Tensor | None = None
        self.commitment_loss: Tensor | None = None
        self.hook_codes = HookPoint()
        self.hook_quantized = HookPoint()
        self.setup()

    def extra_repr(self) -> str:
        return (
            f"groups={self.n_groups}, d={self.d}, codes={self.n_codes}, k={self.k}, "
            f"similarity={self.similarity}, combine={self.combine}, layer_norm={self.layer_norm}, "
            f"layer_norm_affine={self.ln_weight is not None}"
        )

    def forward(self, x: Float[Tensor, "... G d"]) -> Float[Tensor, "... G d"]:
        if self.bypass:
            return x
        if x.shape[-2:] != (self.n_groups, self.d):
            raise ValueError(
                f"CodebookLayer expects [..., {self.n_groups}, {self.d}] activations, "
                f"got shape {tuple(x.shape)}"
            )
        ids = self.hook_codes(self.top_k(x))
        if self.hook_codes.has_hooks(dir="fwd"):
            self._check_ids(ids, x.shape[:-1])
        quantized = self.hook_quantized(self.lookup(ids))
        if not torch.is_grad_enabled():  # inference: no losses, no straight-through term
            self.reconstruction_loss = self.commitment_loss = None
            return quantized
        self.reconstruction_loss = F.mse_loss(quantized.float(), x.detach().float())
        self.commitment_loss = F.mse_loss(x.float(), quantized.detach().float())
        # Forward value is exactly `quantized`; the gradient also reaches `x` unchanged.
        return quantized + (x - x.detach())

    @torch.no_grad()
    def top_k(self, x: Float[Tensor, "... G d"]) -> Int[Tensor, "... G k"]:
        """Ids of the k best-scoring enabled codes of every group, chunked over tokens."""
        lead = x.shape[:-2]
        flat = rearrange(x, "... g d -> g (...) d")
        if self.layer_norm:
            flat = F.layer_norm(flat, (self.d,))
            if self.ln_weight is not None:
                flat = torch.addcmul(self.ln_bias[:, None], flat, self.ln_weight[:, None])
        weight, bias, alpha = self._score_terms()
        n_tokens = flat.shape[1]
        chunk = self._chunk_size(flat.element_size(), flat.nbytes)
        ids = torch.empty(self.n_groups, n_tokens, self.k, dtype=torch.long, device=x.device)
        for start in range(0, n_tokens, chunk):
            stop = min(start + chunk, n_tokens)
            scores = torch.baddbmm(bias, flat[:, start:stop], weight, alpha=alpha)
            ids[:, start:stop] = scores.topk(self.k, dim=-1, sorted=True).indices
        return rearrange(ids, "g n k -> n g k").reshape(*lead, self.n_groups, self.k)

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

    def _score_terms(self) -> tuple[Tensor, Tensor, float]:
        """``scores = bias + alpha * x @ weight`` for the chosen similarity, as one baddbmm."""
        codes = self.codes.detach()
        mask = torch.zeros_like(self.disabled, dtype=codes.dtype).masked_fill(
            self.disabled, -math.inf
        )
        if self.similarity == "cosine":
            weight, bias, alpha = F.normalize(codes, dim=-1), mask, 1.0
        elif self.similarity == "dot":
            weight, bias, alpha = codes, mask, 1.0
        else:  # argmin |x - c|^2 == argmax 2 x.c - |c|^2
            weight, bias, alpha = codes, mask - codes.pow(2).sum(-1), 2.0
        return rearrange(weight, "g c d -> g d c"), bias[:, None, :], alpha

    def _chunk_size(self, element_size: int, activation_bytes: int = 0) -> int:
        """Tokens per top-k chunk so that the whole forward fits the memory budget.

        A chunk costs its score matrix plus top-k's working copy of it; the budget
        also carries about four activation-sized tensors (grouped input, its
        normalised copy, ids and output).
        """
        per_token = 2 * self.n_groups * self.n_codes * element_size
        available = int(self.memory_budget_mb * 2**20) - 4 * activation_bytes
        return max(1, available // per_token)

    def _check_ids(self, ids: Tensor, expected: torch.Size) -> None:
        """Validate ids written by a user hook (not on the unhooked hot path).

        The range check reads the ids, so it runs on CPU only: on an accelerator it
        would sync every hooked forward (the `interventions` API checks its ids once,
        when it is built).
        """
        if ids.dtype != torch.long or ids.shape != (*expected, self.k):
            raise ValueError(
                f"hook_codes must return int64 ids of shape {(*expected, self.k)}, "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.device.type != "cpu" or not ids.numel():
            return
        if int(ids.min()) < EMPTY_SLOT or int(ids.max()) >= self.n_codes:
            raise ValueError(
                f"hook_codes returned ids outside [{EMPTY_SLOT}, {self.n_codes}): "
                f"min {int(ids.min())}, max {int(ids.max())}"
            )
