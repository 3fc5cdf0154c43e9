"""Every example notebook runs top to bottom, offline, in a kernel of this Python.

The kernel is started from a temporary "python3" kernelspec that points at
``sys.executable`` and is put first on ``JUPYTER_PATH``, so the notebooks run in the same
environment as the tests whatever other kernelspecs are installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL = "python3"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch) -> dict[str, str]:
    """A kernelspec for this interpreter first on JUPYTER_PATH; the kernel's environment."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (codelens tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    jupyter_path = [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in jupyter_path if p))
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        CODELENS_QUICK="1",
        CODELENS_PROGRESS="0",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
    )
    return env


def test_examples_has_notebooks():
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, kernel_env: dict[str, str]):
    nb = nbformat.read(path, as_version=4)
    # One extra cell reports the kernel's environment, to check which Python ran.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env)  # raises CellExecutionError on the first failing cell

    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    kernel_prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert kernel_prefix == sys.prefix, "the notebook ran in another Python environment"
