"""Run a small training job from a JSON config (used by the resume and DDP tests).

python train_run.py CONFIG.json [SLEEP_PER_STEP]
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from codelens.training.config import TrainConfig  # noqa: E402
from codelens.training.trainer import train  # noqa: E402

torch.set_num_threads(1)
config = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
train(config, progress=False, on_step=lambda step, metrics: time.sleep(pause))
