"""Strip outputs, execution counts and timings from notebooks before committing them.

Usage: ``.venv/bin/python notebooks/strip_outputs.py [NOTEBOOK ...]`` (default: every
``*.ipynb`` beside this script). Executed copies stay out of git; CI executes the
notebook itself (``tests/test_notebook.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Clear ``path``'s code cell outputs in place; True when anything changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None or "execution" in cell.metadata:
            changed = True
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    for path in paths:
        print(f"{path}: {'stripped' if strip(path) else 'already clean'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
