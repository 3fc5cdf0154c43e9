"""Count the rows each process runs through the model during k-means initialisation and
evaluation (used by test_distributed, in the test process and under torchrun)."""

import contextlib
from collections.abc import Iterator

from torch import Tensor

from codelens.model import HookedCodebookTransformer
from codelens.training import trainer


@contextlib.contextmanager
def counting_work() -> Iterator[dict[str, int]]:
    """Inside: ``{"init": rows, "eval": rows}``, the rows of every forward of the model
    made inside the trainer's `init_codebooks` and `_evaluate` calls (a row counts once
    per forward that runs it)."""
    seen = {"init": 0, "eval": 0}
    phase: list[str | None] = [None]
    forward = HookedCodebookTransformer.forward
    init_codebooks, evaluate = trainer.init_codebooks, trainer._evaluate

    def counted(self, input, *args, **kwargs):
        if phase[0] is not None and isinstance(input, Tensor):
            seen[phase[0]] += len(input)
        return forward(self, input, *args, **kwargs)

    def within(name, fn):
        def run(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = None

        return run

    HookedCodebookTransformer.forward = counted
    trainer.init_codebooks = within("init", init_codebooks)
    trainer._evaluate = within("eval", evaluate)
    try:
        yield seen
    finally:
        HookedCodebookTransformer.forward = forward
        trainer.init_codebooks, trainer._evaluate = init_codebooks, evaluate
