"""The blog notebook runs top to bottom (plain Python, no Jupyter) on generated data, so it cannot rot."""
import json

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "single_convolution.ipynb"


def _code_cells():
    nb = json.loads(NOTEBOOK.read_text())
    return nb, ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_committed_without_outputs():
    nb, _ = _code_cells()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_top_to_bottom_on_demo_data(tmp_path, monkeypatch):
    _, cells = _code_cells()
    assert "DATA_ROOT =" in cells[0]
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__notebook__"}
    for i, src in enumerate(cells):
        exec(compile(src, f"{NOTEBOOK.name}[code cell {i}]", "exec"), ns)
        if i == 0:  # the one variable a user changes, plus a small size and one epoch to keep the test fast
            ns.update(DATA_ROOT=None, SIZE=(96, 64), EPOCHS=1)
    assert len(ns["history"]["train_loss"]) == 1
    assert 0.0 <= ns["evaluation"].metrics["pixel_accuracy"] <= 1.0 and len(ns["scores"]) == len(ns["test_set"])
    assert (tmp_path / "outputs/notebook/qualitative.png").stat().st_size > 0
    assert (tmp_path / "outputs/notebook/curves.png").stat().st_size > 0
