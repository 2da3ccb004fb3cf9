"""The walkthrough notebook runs from a clean clone, and is committed without outputs.

Why test a notebook: ``notebooks/kvern_walkthrough.ipynb`` explains kvern with
kvern's own modules, so a change to the tokenizer, trie, normalization or
eviction API that breaks it should fail CI, not the next reader. It also
asserts its own claims (the eviction cell checks that LRU drops the shared
system prompt that ``cost_aware`` keeps), so executing it checks them.

The kernel is this interpreter, named by a kernelspec written into a temporary
``JUPYTER_PATH``: a clean machine needs no ``jupyter kernelspec install``, and a
``python3`` kernelspec elsewhere on the machine cannot pick another Python.
The notebook gets the real Llama 3.2 tokenizer the other tests use through
``KVERN_NOTEBOOK_TOKENIZER``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests import assets

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "kvern_walkthrough.ipynb"
KERNEL_NAME = "kvern-walkthrough"


def _write_kernelspec(jupyter_dir: Path) -> None:
    """A kernelspec whose argv is this interpreter, under ``jupyter_dir/kernels``."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kvern (test interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def _outputs(nb: Any) -> list[tuple[Any, Any]]:
    return [(cell, out) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _stream_text(cell: Any) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.mark.slow
def test_walkthrough_executes_with_plots_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama3 = assets.tokenizer_fixture("llama3")
    _write_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("KVERN_NOTEBOOK_TOKENIZER", str(llama3.directory))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=120,  # per cell
        startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.monotonic()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed_s = time.monotonic() - started

    outputs = _outputs(nb)
    assert not [out for _, out in outputs if out.output_type == "error"]
    images = [out for _, out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2, "the trie and the eviction comparison should each draw a figure"
    checks = [c for c in nb.cells if "eviction-check" in c.get("metadata", {}).get("tags", [])]
    assert len(checks) == 1
    assert "eviction check passed" in _stream_text(checks[0])
    printed = "".join(_stream_text(c) for c in nb.cells if c.cell_type == "code")
    assert "token reuse" in printed and "normalized:" in printed
    assert elapsed_s < 90, f"the notebook took {elapsed_s:.0f} s"


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        and (cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)
    ]
    assert not dirty, (
        f"cells {dirty} carry outputs or execution counts; "
        "strip them with: .venv/bin/python notebooks/strip_outputs.py"
    )
