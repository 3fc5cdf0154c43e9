"""Sparse autoencoders trained on cached activations of a frozen model.

``z = topk(relu((x - b_dec) @ W_enc + b_enc))`` (or ``relu(...)`` with an L1 penalty),
``x_hat = z @ W_dec + b_dec``. Decoder rows are kept at unit norm (the gradient along
each row is removed before a step, rows renormalised after), so a latent's value is its
contribution's size. Dead latents (no firing for ``dead_window`` steps) get an auxiliary
TopK loss (AuxK): the ``aux_k`` largest dead pre-activations reconstruct the main
reconstruction's error, weighted by ``min(n_dead / aux_k, 1)``.

Training runs on activations scaled to unit mean squared norm per dimension; the scale is
folded into the biases afterwards (TopK and ReLU are positively homogeneous), so a saved
SAE reads raw activations. Metric definitions follow SAELens (see `sae_metrics`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from codelens.baselines.features import LinearFeatures, _saved_group


@dataclass(frozen=True)
class SAEConfig:
    """How to build and train a `SparseAutoencoder`.

    ``n_latents``: dictionary size; ``k``: latents kept per token (TopK); ``kind="relu"``
    trains ReLU latents with ``l1_coefficient`` instead. ``aux_k`` defaults to d_in // 2
    as in SAELens. ``lr`` is above SAELens' 3e-4 because these runs are short (thousands
    of steps, not millions of tokens).
    """

    n_latents: int
    kind: Literal["topk", "relu"] = "topk"
    k: int = 32
    l1_coefficient: float = 1e-3
    aux_k: int | None = None
    aux_coefficient: float = 1.0
    dead_window: int = 200
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("topk", "relu"):
            raise ValueError(f"kind must be 'topk' or 'relu', got {self.kind!r}")
        for name in ("n_latents", "k", "steps", "batch_size", "dead_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "topk" and self.k > self.n_latents:
            raise ValueError(f"k={self.k} exceeds n_latents={self.n_latents}")
        if self.aux_k is not None and not 1 <= self.aux_k <= self.n_latents:
            raise ValueError(f"aux_k must be in [1, {self.n_latents}], got {self.aux_k}")
        if self.lr <= 0 or self.l1_coefficient < 0 or self.aux_coefficient < 0:
            raise ValueError("lr must be > 0; l1_coefficient and aux_coefficient >= 0")


@dataclass
class TrainStats:
    """What training did: wall and CPU seconds, steps, final losses, dead share over the
    last window. CPU seconds are what the run takes on an idle core (with one thread)."""

    seconds: float
    cpu_seconds: float
    steps: int
    tokens: int
    final_mse: float
    final_aux_loss: float
    dead_fraction: float
    losses: list[float] = field(default_factory=list, repr=False)


class SparseAutoencoder(LinearFeatures):
    """A TopK (or ReLU) sparse autoencoder of the activation at ``site``."""

    kind: ClassVar[str] = "sae"

    def __init__(
        self, site: str, d_in: int, config: SAEConfig, *, group: int | None = None
    ) -> None:
        super().__init__(site, group)
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        decoder = torch.randn(config.n_latents, d_in, generator=gen)
        decoder = decoder / decoder.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.T.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(config.n_latents))
        self.offset = nn.Parameter(torch.zeros(d_in))

    def pre_activations(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... F"]:
        self.check_input(x)
        return (x - self.offset) @ self.encoder + self.encoder_bias

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... F"]:
        return self._activate(self.pre_activations(x))

    def _activate(self, pre: Tensor) -> Tensor:
        if self.config.kind == "relu":
            return torch.relu(pre)
        top = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.reconstruct(x)

    # ------------------------------------------------------------ saving

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "d_in": self.d_in, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> SparseAutoencoder:
        try:
            config = SAEConfig(**meta["config"])
        except TypeError as err:
            raise ValueError(f"saved SAE config is not valid: {err}") from err
        sae = cls(meta["site"], int(meta["d_in"]), config, group=_saved_group(meta))
        expected = {k: list(v.shape) for k, v in sae.state_dict().items()}
        got = {k: list(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise ValueError(f"saved SAE tensors {got} do not match its config ({expected})")
        sae.load_state_dict(tensors)
        return sae


def _aux_k(config: SAEConfig, d_in: int) -> int:
    return config.aux_k or min(config.n_latents, max(1, d_in // 2))


def auxk_loss(
    sae: SparseAutoencoder,
    pre: Float[Tensor, "B F"],
    error: Float[Tensor, "B d"],
    dead: Bool[Tensor, " F"],
    aux_k: int,
) -> Tensor:
    """AuxK: the ``aux_k`` largest pre-activations among ``dead`` latents reconstruct
    ``error`` through the decoder (no bias); summed squared error, mean over tokens."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), device=pre.device)
    top = pre.masked_fill(~dead, -torch.inf).topk(min(aux_k, n_dead), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return ((z_aux @ sae.decoder - error) ** 2).sum(-1).mean()


def train_sae(
    acts: Float[Tensor, "N d"] | np.ndarray,
    site: str,
    config: SAEConfig,
    *,
    group: int | None = None,
    device: str | torch.device | None = None,
    chunk_rows: int = 65_536,
) -> tuple[SparseAutoencoder, TrainStats]:
    """Train an SAE on ``acts`` (tokens x dims: a tensor, or an `ActivationStore` site's
    memory map) with Adam on ``device`` (default: the tensor's, else CPU; pass the
    model's). Only the batches move to the device; the returned SAE is on the CPU.

    Batches are drawn without replacement, reshuffled every epoch, from ``config.seed``.
    """
    if not isinstance(acts, np.ndarray):
        acts = torch.as_tensor(acts)
    if len(acts.shape) != 2 or acts.shape[0] < 2 or acts.dtype not in _FLOATS:
        raise ValueError(f"acts must be a float [n_tokens >= 2, d] tensor, got {tuple(acts.shape)}")
    if device is None:
        device = acts.device if isinstance(acts, Tensor) else "cpu"
    device = torch.device(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    n, d = acts.shape
    total = torch.zeros(d, dtype=torch.float64, device=device)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, chunk_rows):  # mean and scale in one streamed pass
        x = _rows(acts, slice(start, start + chunk_rows), device)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("acts contain NaN or infinite values")
        total += x.sum(0, dtype=torch.float64)
        squares += (x.double() ** 2).sum()
    mean = total / n
    variance = float(squares / n - (mean**2).sum())  # mean squared norm about the mean
    scale = math.sqrt(max(variance, 0.0)) / math.sqrt(d) or 1.0
    sae = SparseAutoencoder(site, d, config, group=group).to(device)
    with torch.no_grad():
        sae.offset.copy_(mean.float() / scale)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[Tensor] = []
    with torch.enable_grad():  # also when called under no_grad
        mse, aux, since_fired = _train_loop(sae, acts, scale, config, gen, losses, device)
    with torch.no_grad():  # fold the input scale: the saved SAE reads raw activations
        sae.offset.mul_(scale)
        sae.encoder_bias.mul_(scale)
    stats = TrainStats(
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        config.steps,
        config.steps * config.batch_size,
        float(mse.detach()) * scale**2,
        float(aux.detach()) * scale**2,
        float((since_fired >= min(config.dead_window, config.steps)).float().mean()),
        torch.stack(losses).tolist(),
    )
    return sae.cpu().eval().requires_grad_(False), stats


_FLOATS = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    np.float16,
    np.float32,
    np.float64,
)


def _rows(acts: Tensor | np.ndarray, rows: Any, device: torch.device) -> Tensor:
    """Rows of a tensor or memory map, as float32 on ``device``."""
    if isinstance(acts, np.ndarray):
        if isinstance(rows, Tensor):
            rows = rows.numpy()
        return torch.from_numpy(np.array(acts[rows])).to(device, torch.float32)  # a writable copy
    return acts[rows].to(device, torch.float32)


def _train_loop(
    sae: SparseAutoencoder,
    acts: Tensor,
    scale: float,
    config: SAEConfig,
    gen: torch.Generator,
    losses: list[Tensor],
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam steps on ``acts / scale``; returns the last MSE, AuxK loss and steps since
    each latent fired."""
    n, d = acts.shape
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    since_fired = torch.zeros(config.n_latents, dtype=torch.long, device=device)
    aux_k = _aux_k(config, d)
    order, cursor = torch.randperm(n, generator=gen), 0
    mse = aux = torch.zeros((), device=device)
    for _ in range(config.steps):
        if cursor + config.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        x = _rows(acts, order[cursor : cursor + config.batch_size], device) / scale
        cursor += config.batch_size
        pre = sae.pre_activations(x)
        z = sae._activate(pre)
        x_hat = z @ sae.decoder + sae.offset
        mse = ((x_hat - x) ** 2).sum(-1).mean()
        loss = mse
        if config.kind == "relu":
            loss = loss + config.l1_coefficient * z.sum(-1).mean()
        fired = (z > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = since_fired >= config.dead_window
        n_dead = int(dead.sum())
        aux = torch.zeros((), device=device)
        if n_dead and config.aux_coefficient > 0:
            aux = auxk_loss(sae, pre, (x - x_hat).detach(), dead, aux_k)
            loss = loss + config.aux_coefficient * min(n_dead / aux_k, 1.0) * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = sae.decoder, sae.decoder.grad
            g -= (g * w).sum(1, keepdim=True) * w
        optimizer.step()
        with torch.no_grad():
            sae.decoder /= sae.decoder.norm(dim=1, keepdim=True).clamp(min=1e-12)
        losses.append(mse.detach())
    return mse, aux, since_fired


@torch.no_grad()
def sae_metrics(
    features: LinearFeatures, acts: Float[Tensor, "N d"], batch_size: int = 4096
) -> dict[str, float]:
    """Reconstruction metrics on held-out ``acts``, as SAELens defines them.

    ``l0``: mean number of non-zero features per token; ``mse``: mean squared error per
    element; ``explained_variance``: 1 - (summed squared error) / (summed squared
    deviation from the mean), over all tokens; ``dead_fraction``: share of features that
    never fire on ``acts``; ``cossim``: mean cosine of input and reconstruction.
    """
    acts = torch.as_tensor(acts).float()
    features.check_input(acts)
    mean = acts.mean(0)
    err = var = l0 = cos = 0.0
    fired = torch.zeros(features.n_features, dtype=torch.bool)
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size]
        z = features.encode(x)
        x_hat = z @ features.decoder + features.offset
        err += float(((x_hat - x) ** 2).sum())
        var += float(((x - mean) ** 2).sum())
        l0 += float((z != 0).sum())
        cos += float(torch.cosine_similarity(x_hat, x, dim=-1).sum())
        fired |= (z != 0).any(0)
    n = acts.shape[0]
    return {
        "l0": l0 / n,
        "mse": err / acts.numel(),
        "explained_variance": 1 - err / var if var > 0 else float("nan"),
        "dead_fraction": float((~fired).float().mean()),
        "cossim": cos / n,
    }
