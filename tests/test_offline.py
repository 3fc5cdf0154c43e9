"""The test suite never reaches the hub, even when the shell exported HF_HUB_OFFLINE=0."""

import os
import subprocess
import sys
from pathlib import Path

PROBE = (
    "import conftest, huggingface_hub.constants as c, datasets.config as d; "
    "print(c.HF_HUB_OFFLINE, d.HF_HUB_OFFLINE)"
)


def test_conftest_forces_offline_over_an_exported_zero():
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert out.split() == ["True", "True"]
