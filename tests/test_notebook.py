"""The blog notebook runs top to bottom (plain Python, no Jupyter) on generated data, so it cannot rot."""
import json
import os
import re
import subprocess
import sys
import textwrap

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


def test_notebook_runs_top_to_bottom_on_demo_data(tmp_path):
    # as a user runs it: from notebooks/, in a fresh interpreter that finds the modules through the
    # notebook's own first cell (no conftest sys.path), with the settings cell edited as a user would
    _, cells = _code_cells()
    out = tmp_path / "figures"
    edits = {r'DATA_ROOT = "[^"]*"': "DATA_ROOT = None", r"SIZE = \(600, 400\)": "SIZE = (96, 64)",
             r"EPOCHS, BATCH_SIZE, LR = 5,": "EPOCHS, BATCH_SIZE, LR = 1,",
             r'OUT = Path\("outputs/notebook"\)': f"OUT = Path({str(out)!r})"}
    first = cells[0]
    for pattern, text in edits.items():
        first, n = re.subn(pattern, lambda _: text, first)
        assert n == 1, pattern  # the settings cell still has the line a user edits
    program = "\n".join([first] + cells[1:]) + textwrap.dedent("""
        assert len(history["train_loss"]) == 1
        assert 0.0 <= evaluation.metrics["pixel_accuracy"] <= 1.0 and len(scores) == len(test_set)
        print("notebook ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", program], cwd=NOTEBOOK.parent, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "notebook ok" in r.stdout, r.stderr[-3000:]
    assert (out / "qualitative.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert not (NOTEBOOK.parent / "outputs").exists()
