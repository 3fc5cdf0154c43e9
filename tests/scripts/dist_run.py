"""Run a small training job under torchrun, with faults injected (used by test_distributed).

python dist_run.py CONFIG.json [--float64] [--kill-at N] [--nan-at N] [--own-dir] [--report]

--float64    build and train the model in float64

--kill-at N  every rank SIGKILLs itself once step N is done
--nan-at N   rank 1 alone gets a NaN reconstruction loss at step N; each rank that stops
             with NonFiniteLossError writes nonfinite-rank{R}.txt (the step) beside the config
--own-dir    each rank runs in its own directory rank{R}/ (a relative run_dir is then a
             disk the ranks do not share)
--report     each rank writes report-rank{R}.json beside the config: the rows it ran
             in k-means initialisation and in evaluation (`work_counter`), its final
             evaluation, the names of its threads after `train`, and whether the model
             `train` returned has sharded (DTensor) parameters
"""

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from work_counter import counting_work  # noqa: E402

from codelens.model import HookedCodebookTransformer  # noqa: E402
from codelens.training.config import TrainConfig  # noqa: E402
from codelens.training.trainer import NonFiniteLossError, train  # noqa: E402

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--float64", action="store_true")
parser.add_argument("--kill-at", type=int)
parser.add_argument("--nan-at", type=int)
parser.add_argument("--own-dir", action="store_true")
parser.add_argument("--report", action="store_true")
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))
if args.float64:
    torch.set_default_dtype(torch.float64)
config_file = Path(args.config).resolve()
config = TrainConfig.from_dict(json.loads(config_file.read_text()))
if args.own_dir:
    own = config_file.parent / f"rank{rank}"
    own.mkdir(exist_ok=True)
    os.chdir(own)
steps_done = [0]

if args.nan_at is not None and rank == 1:
    clean = HookedCodebookTransformer.reconstruction_loss

    def poisoned(self):
        loss = clean(self)
        return loss * float("nan") if steps_done[0] == args.nan_at else loss

    HookedCodebookTransformer.reconstruction_loss = poisoned


def on_step(done, metrics):
    steps_done[0] = done
    if done == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


try:
    with counting_work() if args.report else contextlib.nullcontext() as work:
        result = train(config, progress=False, on_step=on_step)
    if args.report:
        report = {
            "work": work,
            "final_eval": result.final_eval,
            "threads": sorted(
                Path(f"/proc/self/task/{t}/comm").read_text().strip()
                for t in os.listdir("/proc/self/task")
            ),
            "sharded": any(isinstance(p, DTensor) for p in result.model.parameters()),
        }
        (config_file.parent / f"report-rank{rank}.json").write_text(json.dumps(report))
except NonFiniteLossError as err:
    (config_file.parent / f"nonfinite-rank{rank}.txt").write_text(str(steps_done[0]))
    print(f"rank {rank}: {err}", file=sys.stderr)
