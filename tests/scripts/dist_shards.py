"""Sharded k-means and evaluation, called directly in each rank of a torchrun launch
(used by test_distributed, which computes the same in one process and compares).

python dist_shards.py OUT_DIR

Every rank builds the same samples and model. It runs `kmeans` on its share of each
case's samples (unequal shares: rank 0 holds the first SPLIT), and `evaluate` on the
whole batches (it runs its own rows). It writes OUT_DIR/kmeans-rank{R}.safetensors and
OUT_DIR/eval-rank{R}.json.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from codelens import CodebookConfig  # noqa: E402
from codelens.training.parallel import Ranks  # noqa: E402

SPLIT = 0.37  # rank 0's share of the samples


def kmeans_cases() -> dict[str, tuple[torch.Tensor, dict]]:
    """name: (samples [G, N, d] in float64, kmeans keyword arguments)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 100, 5, generator=gen, dtype=torch.float64)
    # 4 distinct points for 8 clusters: at least 4 empty, re-seeded at every iteration.
    # Whole numbers, so a centroid (a mean of equal points) is exact in any summation
    # order, and exact ties between equal centroids break alike in one and two processes.
    points = torch.randint(-5, 6, (3, 4, 5), generator=gen).double()
    repeated = points[:, torch.randint(4, (100,), generator=gen)]
    return {
        "random_start": (x, dict(n_clusters=10)),
        "chunked": (x, dict(n_clusters=10, memory_budget_mb=10 * 3 * 10 * 8 / 2**20)),  # 10 samples
        "plus_plus": (x, dict(n_clusters=10, plus_plus=True)),
        "empty_clusters": (repeated, dict(n_clusters=8)),
        "fewer_samples_than_clusters": (x[:, :6], dict(n_clusters=10)),
    }


def eval_setup(dtype: torch.dtype):
    """A tiny model with codebooks and two batches of 8 rows, in ``dtype``."""
    from conftest import tiny_model

    model = tiny_model(codebook=CodebookConfig(n_codes=16, k=2, sites=("attn", "mlp")))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 10, (8, 12), generator=gen) for _ in range(2)]
    return model.to(dtype), batches


def own_share(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    split = round(SPLIT * x.shape[1])
    return x[:, :split] if ranks.rank == 0 else x[:, split:]


def main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from codelens.training.init import kmeans
    from codelens.training.trainer import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    try:
        found = {}
        for name, (x, kwargs) in kmeans_cases().items():
            gen = torch.Generator().manual_seed(3)
            found[name] = kmeans(own_share(x, ranks), generator=gen, ranks=ranks, **kwargs)
        save_file(found, str(out / f"kmeans-rank{ranks.rank}.safetensors"))
        figures = {}
        for dtype in (torch.float32, torch.float64):
            model, batches = eval_setup(dtype)
            figures[str(dtype)] = evaluate(model, batches, micro_batch=3, ranks=ranks)
        (out / f"eval-rank{ranks.rank}.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
