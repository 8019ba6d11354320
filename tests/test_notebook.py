"""examples/quickstart.ipynb runs top to bottom on a tiny random pipeline."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "execute_result" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the generated image and the grid of three samples
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1 compiled program(s) for 3 samples" in printed
