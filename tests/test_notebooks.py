"""The notebooks: jupytext pairs kept in sync, stored without outputs, executed top to bottom."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_explore_segments", "02_train_and_compare", "03_package_serve_score",
            "04_forecast"]


def test_the_notebooks_are_paired_with_percent_scripts() -> None:
    """Check that each notebook has its .py twin and both hold the same cells."""
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        script = path.with_suffix(".py")
        assert script.is_file(), f"{path.name} has no paired {script.name}"
        stored = nbformat.read(path, as_version=4)
        paired = jupytext.read(script)
        assert [(c.cell_type, c.source) for c in stored.cells] == \
            [(c.cell_type, c.source) for c in paired.cells], \
            f"{path.name} and {script.name} differ: run `jupytext --sync {script}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_has_no_outputs(path: Path) -> None:
    """Check that the committed .ipynb is reviewable: no outputs, no execution counts."""
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert [c for c in code if c.get("outputs") or c.get("execution_count")] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """Check that the notebook executes without an error (its cells assert their results)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    figures = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "each notebook shows its findings as plots"
