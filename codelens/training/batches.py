"""Batch sources whose batch at step s is a pure function of (seed, s).

That makes resuming exact (no data-loader state to save: the step is the data
position) and lets N ranks each take their rows of the same global batch.
Streaming text is the exception: it is read in order and, on resume, the blocks
already consumed are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

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

    def batch(self, step: int) -> Int[Tensor, "batch pos"]: ...

    def eval_batch(self, index: int) -> Int[Tensor, "batch pos"]: ...

    def init_batches(self, n_tokens: int) -> list[Int[Tensor, "batch pos"]]:
        """Training data (never held-out data), distinct rows, about ``n_tokens`` tokens."""
        ...


class FSMBatches:
    """Fresh TokFSM rollouts for every step; eval batches come from a separate stream."""

    def __init__(self, fsm: TokFSM, batch_size: int, seed: int) -> None:
        self.fsm, self.batch_size, self.seed = fsm, batch_size, seed

    def batch(self, step: int) -> Tensor:
        return self.fsm.sample(self.batch_size, _generator(self.seed, step))[0]

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
    """Packed text blocks in memory: a seeded shuffle per epoch; the last blocks are held out."""

    def __init__(self, blocks: Tensor, batch_size: int, seed: int, eval_blocks: int) -> None:
        if len(blocks) <= eval_blocks:
            raise ValueError(
                f"the corpus makes {len(blocks)} blocks; need more than the {eval_blocks} held out"
            )
        self.train, self.held_out = blocks[:-eval_blocks], blocks[-eval_blocks:]
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> Tensor:
        n = len(self.train)
        start = step * self.batch_size
        rows = []
        while len(rows) < self.batch_size:
            epoch, offset = divmod(start + len(rows), n)
            order = torch.randperm(n, generator=_generator(self.seed, epoch))
            rows.extend(order[offset : offset + self.batch_size - len(rows)].tolist())
        return self.train[rows]

    def eval_batch(self, index: int) -> Tensor:
        n = len(self.held_out)
        rows = [(index * self.batch_size + i) % n for i in range(self.batch_size)]
        return self.held_out[rows]

    def init_batches(self, n_tokens: int) -> list[Tensor]:
        """A seeded sample of training blocks without repeats (all of them if too few)."""
        n_rows = min(len(self.train), -(-n_tokens // self.train.shape[1]))
        order = torch.randperm(len(self.train), generator=_generator(self.seed + INIT_STREAM, 0))
        return list(self.train[order[:n_rows]].split(self.batch_size))


class StreamingBatches:
    """Blocks read in order from a stream (corpora larger than memory); eval blocks come first."""

    def __init__(self, blocks: Iterator[Tensor], batch_size: int, eval_blocks: int) -> None:
        self._blocks = iter(blocks)
        self.held_out = torch.stack([next(self._blocks) for _ in range(eval_blocks)])
        self.batch_size = batch_size
        self._next_step = 0
        self._peeked: list[Tensor] = []  # read ahead for initialisation, still to train on

    def batch(self, step: int) -> Tensor:
        while self._next_step < step:  # resuming: skip what earlier steps consumed
            self._take()
            self._next_step += 1
        if step != self._next_step:
            raise ValueError(f"a stream cannot go back to step {step}")
        self._next_step += 1
        return self._take()

    def _take(self) -> Tensor:
        rows = self._peeked[: self.batch_size]
        del self._peeked[: self.batch_size]
        try:
            rows += [next(self._blocks) for _ in range(self.batch_size - len(rows))]
        except StopIteration:
            raise ValueError("the data stream ran out of blocks before the last step") from None
        return torch.stack(rows)

    def init_batches(self, n_tokens: int) -> list[Tensor]:
        """The next blocks of the stream (kept to be trained on as well), fewer if it ends."""
        if self._next_step or self._peeked:
            raise ValueError("init_batches must come before the first training batch")
        have = 0
        for block in self._blocks:
            self._peeked.append(block)
            have += block.numel()
            if have >= n_tokens:
                break
        return list(torch.stack(self._peeked).split(self.batch_size)) if self._peeked else []

    def eval_batch(self, index: int) -> Tensor:
        n = len(self.held_out)
        rows = [(index * self.batch_size + i) % n for i in range(self.batch_size)]
        return self.held_out[rows]
