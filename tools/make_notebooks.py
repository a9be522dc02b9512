"""Run the walkthroughs in notebooks/ and save their outputs; draw the README's picture.

    PYTHONPATH=. .venv/bin/python tools/make_notebooks.py [NAME ...]

Each notebook (all of them, or those whose file name contains one of the NAMEs) is executed top
to bottom in a fresh kernel of this Python, with notebooks/ as its working directory, exactly as
``tests/test_notebooks.py`` runs it, and written back with its outputs. Edit a notebook in
Jupyter, then run this so that the saved outputs come from one clean run. The picture
``docs/img/demosupnet_graph.svg`` (DemoSupNet's dependency graph with its GeZIGs, drawn by
Graphviz) is redrawn too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxoto  # noqa: E402
from fxoto import viz  # noqa: E402
from fxoto.zoo import DemoSupNet, example_input  # noqa: E402
from tests.test_notebooks import NOTEBOOK_DIR, NOTEBOOKS, execute_notebook  # noqa: E402


def draw_readme_picture() -> Path:
    if shutil.which("dot") is None:
        raise SystemExit("Graphviz's dot is needed for the README picture (apt-get install graphviz)")
    space = fxoto.build_space(DemoSupNet(), (example_input("demosupnet"),))
    picture = viz.render(viz.to_dot(space), ROOT / "docs" / "img" / "demosupnet_graph")
    picture.with_suffix(".dot").unlink()  # the SVG is what the README shows
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only the notebooks whose file name contains one of these")
    args = parser.parse_args()
    print(draw_readme_picture().relative_to(ROOT))
    for path in NOTEBOOKS:
        if args.names and not any(name in path.name for name in args.names):
            continue
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        execute_notebook(nb, cwd=NOTEBOOK_DIR, record_timing=False)  # no timestamps in the saved files
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
