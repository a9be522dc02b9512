"""The walkthroughs in notebooks/ run top to bottom; their cells assert what they show.

Each notebook runs from an in-memory copy (the committed file, with its saved outputs, is never
rewritten) in a kernel of this very Python, with notebooks/ as its working directory, the way a
reader opens it. The executed copy is written to the test's temporary folder for inspection.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def execute_notebook(nb: nbformat.NotebookNode, cwd: Path, record_timing: bool = True) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in place, in a fresh kernel of ``sys.executable``.

    The kernel spec is ipykernel's own for this interpreter, not whatever ``python3`` spec a user
    or system folder holds, and the repository root is on the kernel's ``PYTHONPATH`` so that
    fxoto imports from this tree whether or not it is installed. ``record_timing`` keeps each
    cell's start and end times in its metadata.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "2")  # as tests/conftest.py: the CI machine has 2 cores
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiets the debugger's frozen-modules notice
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, record_timing=record_timing, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return nb


def _text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_the_five_walkthroughs_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_search_space.ipynb",
        "02_train_and_construct.ipynb",
        "03_bring_your_own_network.ipynb",
        "04_operations_and_channels.ipynb",
        "05_language_model.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_outputs(path: Path):
    """Readers on GitHub see the results: every code cell was run and kept its outputs."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom, then save"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    try:
        execute_notebook(nb, cwd=NOTEBOOK_DIR)  # a failing cell raises CellExecutionError
    finally:
        nbformat.write(nb, tmp_path / path.name)
    assert _text(nb.cells[-1]).strip() == sys.executable, "the kernel is not this test's Python"
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "the notebook wrote into notebooks/"
