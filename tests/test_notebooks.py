"""The tutorial notebooks (docs/notebooks/) run top to bottom with a kernel from the project venv: 01 on a run it
makes itself, 02 and 03 on the demo run, so an API change that breaks a notebook fails here. They are stored
without outputs (a test checks that too, so a commit never carries a run's images or paths)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "docs" / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
pytestmark = pytest.mark.slow


def test_the_three_tutorials_exist_and_are_stored_without_outputs():
    assert ALL == ["01_pipeline.ipynb", "02_concepts.ipynb", "03_patients.ipynb"]
    for name in ALL:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"


@pytest.mark.parametrize("name", ALL)
def test_a_notebook_runs_top_to_bottom(name, demo_run, tmp_path, monkeypatch):
    run, _ = demo_run
    monkeypatch.setenv("CYTOSAE_RUN", str(run))
    monkeypatch.setenv("CYTOSAE_NOTEBOOK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if o.output_type == "execute_result" and "text/html" in o.get("data", {})]
    assert html, f"{name} displayed no rich view"
    if name != "03_patients.ipynb":  # a latent card or an image view, with inline thumbnails
        assert any("data:image/png;base64," in h for h in html)
