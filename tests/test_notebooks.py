"""The tutorial notebooks: committed without outputs, and each runs top to bottom in smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_tutorials_exist_with_prose_between_code():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("00_quickstart", "01_masking", "02_sinkhorn", "03_prototypes", "04_training_dynamics"):
        assert any(n.startswith(prefix) for n in names), prefix
    for p in NOTEBOOKS:
        cells = json.loads(p.read_text())["cells"]
        kinds = [c["cell_type"] for c in cells]
        assert 10 <= len(cells) <= 25, f"{p.name}: {len(cells)} cells"
        assert kinds[0] == "markdown" and kinds.count("markdown") >= 4, p.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name} has outputs"


def _execute(path: Path, monkeypatch, first_cell: str | None = None):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CAPI_LAB_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    if first_cell:
        nb.cells.insert(0, nbformat.v4.new_code_cell(first_cell))
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        store_widget_state=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # the kernel must not inherit pytest's captured stdout/stderr: training in it stalls on them
    client.execute(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_smoke_mode(path, monkeypatch, tmp_path):
    temp = tmp_path / "kernel_tmp"  # the kernel's temporary folder: whatever a notebook writes there
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    outputs = _execute(path, monkeypatch)
    assert any("smoke mode" in o.get("text", "") for o in outputs)
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)  # interactive figures
    # ...is gone once the kernel stops (a run of 04 left ~100 MB in /tmp each time); torch's compile cache,
    # one folder shared by every run, may stay
    assert sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")) == []


@pytest.mark.slow  # the whole notebook a second time (80 s); CI runs it in its slow tier
@pytest.mark.parametrize("stem", ["03_prototypes", "04_training_dynamics"])
def test_falls_back_without_default_model_or_fashion_mnist(stem, monkeypatch):
    """With the default model's file and Fashion-MNIST both missing, the notebook prints a note and runs on
    random weights / generated images instead of dying."""
    missing = (
        "import capi_lab.data, capi_lab.pretrained\n"
        "from pathlib import Path\n"
        "capi_lab.data.FASHION_MNIST_DIR = Path('/nonexistent/fashion-mnist')\n"
        "capi_lab.pretrained.DEFAULT_MODEL = Path('/nonexistent/default.pt')"
    )
    outputs = _execute(ROOT / "notebooks" / f"{stem}.ipynb", monkeypatch, first_cell=missing)
    text = "".join(o.get("text", "") for o in outputs)
    expected = "randomly initialised" if stem.startswith("03") else "Fashion-MNIST is not installed"
    assert "note:" in text and expected in text
