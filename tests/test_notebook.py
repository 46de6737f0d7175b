"""notebooks/reload_checkpoint.ipynb runs top to bottom in a real Jupyter kernel."""

import json
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "reload_checkpoint.ipynb"


def test_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.slow
def test_notebook_reloads_the_newest_best_checkpoint(tiny_run, tiny_ckpt, tmp_path, monkeypatch):
    for name in ("ALEXNET_CKPT", "ALEXNET_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's package
    # A non-GUI backend that still returns each figure as a PNG output.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A project trained with a relative --data.data_dir, as the README's commands do, and the
    # notebook run from its notebooks/ folder, where Jupyter starts it: the defaults find
    # ../lightning_logs/ and the run's data.
    project = tmp_path / "project"
    shutil.copytree(tiny_run, project)
    run = project / tiny_ckpt.relative_to(tiny_run).parents[1]
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  data_dir: .*$", "  data_dir: data", config.read_text()))
    (run / "run.json").write_text(json.dumps({"data_dir": "data"}))  # as older runs recorded it
    (project / "notebooks").mkdir()
    nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": project / "notebooks"}},
    ).execute()

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    text = "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs
    )
    assert str(tiny_ckpt.relative_to(tiny_run)) in text  # found by the default search
    assert "'class_names': ['ant', 'bee', 'cat']" in text and "'image_size': 96" in text
    counts = [o["data"]["text/plain"] for o in outputs if "execution_count" in o]
    assert "6" in counts  # 2 validation images for each of the 3 classes
    assert any("image/png" in output.get("data", {}) for output in outputs)
