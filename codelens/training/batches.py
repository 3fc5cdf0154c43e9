"""Batch sources whose batch at step s is a pure function of (seed, s).

That makes resuming exact and O(1) (no data-loader state to save: the step is the data
position) and lets N ranks each read only their rows of the same global batch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from codelens.data.fsm import TokFSM

EVAL_STREAM = 1_000_003  # offsets the eval seeds from the training seeds
INIT_STREAM = 2_000_003  # offsets the codebook-initialisation seeds from both


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_000_007 + index)


class BatchSource(Protocol):
    batch_size: int

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Int[Tensor, "batch pos"]:
        """Rows ``rank::world`` of the global batch at ``step``."""
        ...

    def eval_batch(self, index: int) -> Int[Tensor, "batch pos"]: ...

    def init_batches(self, n_tokens: int) -> list[Int[Tensor, "batch pos"]]:
        """Training data (never held-out data), distinct rows, about ``n_tokens`` tokens."""
        ...


class FSMBatches:
    """Fresh TokFSM rollouts for every step; eval batches come from a separate stream."""

    def __init__(self, fsm: TokFSM, batch_size: int, seed: int) -> None:
        self.fsm, self.batch_size, self.seed = fsm, batch_size, seed

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Tensor:
        return self.fsm.sample(self.batch_size, _generator(self.seed, step))[0][rank::world]

    def eval_batch(self, index: int) -> Tensor:
        return self.fsm.sample(self.batch_size, _generator(self.seed + EVAL_STREAM, index))[0]

    def init_batches(self, n_tokens: int) -> list[Tensor]:
        out, have = [], 0
        while have < n_tokens:
            out.append(
                self.fsm.sample(self.batch_size, _generator(self.seed + INIT_STREAM, len(out)))[0]
            )
            have += out[-1].numel()
        return out


class BlockBatches:
    """Packed text blocks, in memory or memory-mapped from a token file.

    Shuffled (default): a seeded permutation per epoch, the last ``eval_blocks`` blocks
    held out. ``in_order`` (streaming): the blocks in corpus order, the first
    ``eval_blocks`` held out, one epoch after another. Either way the batch at step s is
    arithmetic on s, so a resumed run starts at its position in O(1), re-reading nothing
    before it, and each rank reads only its own rows of the global batch.
    """

    def __init__(
        self,
        blocks: Int[Tensor, "n pos"] | np.ndarray,
        batch_size: int,
        seed: int,
        eval_blocks: int,
        *,
        in_order: bool = False,
    ) -> None:
        n = len(blocks)
        if n <= eval_blocks:
            raise ValueError(
                f"the corpus makes {n} blocks; need more than the {eval_blocks} held out"
            )
        self._blocks = blocks.numpy() if isinstance(blocks, Tensor) else blocks
        first = eval_blocks if in_order else 0
        self._train = range(first, first + n - eval_blocks)
        held = range(0, eval_blocks) if in_order else range(n - eval_blocks, n)
        self.held_out = self._read(np.arange(held.start, held.stop))
        self.batch_size, self.seed, self.in_order = batch_size, seed, in_order
        self._epoch: tuple[int, np.ndarray] | None = None  # the last epoch's permutation

    def _read(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(self._blocks[rows], dtype=np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = torch.randperm(len(self._train), generator=_generator(self.seed, epoch))
            self._epoch = (epoch, perm.numpy())
        return self._epoch[1]

    def rows(self, step: int) -> np.ndarray:
        """Indices into the blocks of the global batch at ``step``."""
        n = len(self._train)
        positions = step * self.batch_size + np.arange(self.batch_size)
        if self.in_order:
            return self._train.start + positions % n
        out = np.empty(self.batch_size, dtype=np.int64)
        epochs = positions // n
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._order(int(epoch))[positions[mask] % n]
        return self._train.start + out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Tensor:
        """Rows ``rank::world`` of the global batch at ``step`` (read only those)."""
        return self._read(self.rows(step)[rank::world])

    def eval_batch(self, index: int) -> Tensor:
        n = len(self.held_out)
        rows = [(index * self.batch_size + i) % n for i in range(self.batch_size)]
        return self.held_out[rows]

    def init_batches(self, n_tokens: int) -> list[Tensor]:
        """Training blocks without repeats (all of them if too few): a seeded sample, or
        in order the first ones, which the first steps train on as well."""
        n = len(self._train)
        n_rows = min(n, -(-n_tokens // self.held_out.shape[1]))
        if self.in_order:
            picked = np.arange(n_rows)
        else:
            picked = torch.randperm(n, generator=_generator(self.seed + INIT_STREAM, 0))
            picked = picked[:n_rows].numpy()
        return list(self._read(self._train.start + picked).split(self.batch_size))


class StreamingBatches(BlockBatches):
    """Blocks in corpus order, one epoch after another; the first ``eval_blocks`` held out."""

    def __init__(
        self, blocks: Int[Tensor, "n pos"] | np.ndarray, batch_size: int, eval_blocks: int
    ) -> None:
        super().__init__(blocks, batch_size, 0, eval_blocks, in_order=True)
