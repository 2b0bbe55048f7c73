"""The blog's own cells run as written: its star imports give the names it uses, on data found
through $DRONE_DATA_ROOT as a blog reader would point at it."""
import pytest

from basics import InputError
from demo import make_demo_dataset

# the blog's cells, in its order, verbatim (the last line's value is the figure a notebook shows)
BLOG_CELLS = '''
from basics import *
from datautils import *
from metrics import *
from evaluate import *
from train import *
from models import *

batch_size = 6
train_set, test_set = import_drone_dataset()
train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
model = SingleConvolution().to(device)
print(summary(model, (3, 600, 400)))

history = train(
    model = model,
    epochs = 5,
    train_loader = train_loader,
    loss_func = nn.CrossEntropyLoss(),
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
)
evaluator = ModelEvaluation(model, test_set, pixel_accuracy)
evaluator.show_qualitative(8)
'''


@pytest.fixture
def blog_data(tmp_path, monkeypatch):
    # the blog's show_qualitative(8) needs a ninth test image; small photos, resized to 600x400 by the loader
    root = make_demo_dataset(tmp_path / "data", n=17, size=(120, 80), seed=3, split_counts=(6, 2, 9))
    monkeypatch.setenv("DRONE_DATA_ROOT", str(root))
    return root


def test_the_blogs_cells_run_as_written(blog_data, capsys):
    *body, last = BLOG_CELLS.strip().splitlines()
    ns: dict = {}
    exec("\n".join(body), ns)
    figure = eval(last, ns)
    printed = capsys.readouterr().out
    assert "Total params: 644" in printed and "None" not in printed  # the table, not torchsummary's None
    history = ns["history"]
    assert len(history["train_loss"]) == 5 and len(history["train_acc"]) == 5  # really filled (the blog's stayed empty)
    assert all(0.0 <= a <= 1.0 for a in history["train_acc"])
    assert len(ns["test_set"]) == 9 and figure.axes  # the blog's image 8, as a figure
    for name in ("torch", "nn", "DataLoader", "summary", "device", "tqdm", "time", "np"):
        assert name in ns, name


def test_show_qualitative_beyond_the_dataset_says_so_in_one_line(blog_data):
    from datautils import import_drone_dataset
    from evaluate import ModelEvaluation
    from models import SingleConvolution

    test_set = import_drone_dataset(splits="test", size=(60, 40))
    evaluator = ModelEvaluation(SingleConvolution(), test_set)
    with pytest.raises(InputError) as e:
        evaluator.show_qualitative(9)
    assert str(e.value) == "show_qualitative(9): the dataset has 9 images, so an index is 0 to 8 (9 is not)"
    with pytest.raises(InputError, match="12 is not"):
        evaluator.show_qualitative([0, 12])


def test_the_readme_shows_the_blogs_cells_as_they_run_here():
    import re

    from conftest import REPO
    section = (REPO / "README.md").read_text().split("## Using it from a notebook", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block.strip() == BLOG_CELLS.strip()
