"""checkpoint.py, the one home of the model file: every checkpoint format reads back as one
record, the partial loads (--weights, --init-from) follow one rule set, the ONNX metadata schema
round-trips, and no other module reads checkpoint internals."""
import ast

import pytest
import torch

from basics import InputError
from conftest import REPO
from layout import ClassSet
from models import SingleConvolution, get_model

SIX = ClassSet(("ground", "vegetation", "water", "structure", "vehicle", "person-animal"),
               tuple((i, 2 * i, 3 * i) for i in range(6)))


def test_every_checkpoint_format_reads_back_as_one_record(tmp_path):
    from checkpoint import ModelMeta, read_checkpoint, save_checkpoint

    sd = SingleConvolution(num_classes=6).state_dict()
    meta = ModelMeta("single_conv", {}, SIX, train_size=[64, 48], eval_size=[96, 64], config={"lr": 0.1},
                     split={"ids": {"train": ["a", "b"], "val": ["c"], "test": ["d"]}, "seed": 3}, command="x")
    save_checkpoint(tmp_path / "best.pt", model=sd, meta=meta.to_dict(), epoch=4, history={"train_loss": [1.0]},
                    best=0.5, select_metric="miou")
    best = read_checkpoint(tmp_path / "best.pt")
    assert best.meta == meta and best.epoch == 4 and best.score == 0.5 and best.selected_on == "val"
    assert best.meta.split["digest"] == ModelMeta.split_digest(meta.split["ids"])
    assert all(torch.equal(best.weights[k], sd[k]) for k in sd)
    # last.pt also carries the best score so far, but its epoch was not chosen on val
    save_checkpoint(tmp_path / "last.pt", model=sd, meta=meta.to_dict(), epoch=5, best=0.5, optimizer={})
    last = read_checkpoint(tmp_path / "last.pt")
    assert last.selected_on == "last_epoch" and last.score is None and last.epoch == 5
    # older files: run_single_conv.py's model.pt (top-level keys), a meta without config or classes
    save_checkpoint(tmp_path / "model.pt", model=sd, model_name="single_conv", model_kwargs={}, size=[48, 32],
                    classes=SIX.to_dict())
    old = read_checkpoint(tmp_path / "model.pt").meta
    assert (old.model_name, old.classes.names, old.eval_size, old.split) == ("single_conv", SIX.names, [48, 32], None)
    save_checkpoint(tmp_path / "old.pt", model=get_model("unet", base=8, depth=2).state_dict(),
                    meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2}, "train_size": [60, 40]})
    old = read_checkpoint(tmp_path / "old.pt").meta
    assert old.classes.num_classes == 23 and old.eval_size == [60, 40] and old.model_kwargs == {"base": 8, "depth": 2}
    # a bare state dict is weights, not a model of ours: one line saying what to pass
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(InputError, match="bare.pt: not a checkpoint of ours"):
        read_checkpoint(tmp_path / "bare.pt")


@pytest.mark.parametrize("name,kwargs", [("fcn8s", {"base": 8}), ("single_conv", {})])
def test_init_from_takes_every_class_indexed_tensor_by_class_name(tmp_path, name, kwargs):
    """FCN-8s scores classes in three layers: all of them follow the class names."""
    from checkpoint import init_from, save_checkpoint

    order = [4, 0, 5, 2, 1, 3]  # the checkpoint's classes: SIX in another order
    theirs = ClassSet(tuple(SIX.names[i] for i in order), tuple(SIX.colors[i] for i in order))
    torch.manual_seed(0)
    old = get_model(name, num_classes=6, **kwargs)
    save_checkpoint(tmp_path / "ck.pt", model=old.state_dict(),
                    meta={"model_name": name, "model_kwargs": kwargs, "classes": theirs.to_dict()})
    model = get_model(name, num_classes=6, **kwargs)
    line = init_from(model, tmp_path / "ck.pt", SIX)
    assert "rows of 6 of 6 classes taken by name (in another order)" in line
    before, after = old.state_dict(), model.state_dict()
    with torch.device("meta"):
        seven = get_model(name, num_classes=7, **kwargs).state_dict()
    indexed = [k for k in after if seven[k].shape != after[k].shape]
    assert indexed and len(indexed) == (6 if name == "fcn8s" else 2)
    for k in after:
        want = before[k][[order.index(j) for j in range(6)]] if k in indexed else before[k]
        assert torch.equal(after[k], want), k


def test_the_onnx_metadata_schema_round_trips():
    from checkpoint import PRODUCER, onnx_props, read_onnx_props

    props = onnx_props(class_names=SIX.names, class_colors=SIX.colors, model_name="unet", eval_size=(96, 64),
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), int8="static")
    assert props["producer"] == PRODUCER and all(isinstance(v, str) for v in props.values())
    meta = read_onnx_props(props, "m.onnx")
    assert meta["class_names"] == list(SIX.names) and meta["class_colors"] == [list(c) for c in SIX.colors]
    assert meta["eval_size"] == [96, 64] and meta["mean"] == [0.5] * 3 and meta["int8"] == "static"
    assert "producer" not in meta
    with pytest.raises(InputError, match="m.onnx: this ONNX file was not written by export.py"):
        read_onnx_props({k: v for k, v in props.items() if k != "producer"}, "m.onnx")


def test_no_module_but_checkpoint_reads_or_writes_checkpoint_files():
    """torch.load/torch.save and a checkpoint's "meta" are checkpoint.py's alone (the EfficientNet
    port reads the ImageNet weights of its pip package, which are no checkpoint of ours)."""
    offences = []
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "models").glob("*.py")):
        if path.name == "checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
                    and node.attr in ("load", "save") and path.name != "efficientnet_lite.py":
                offences.append(f"{path.name}:{node.lineno}: torch.{node.attr}")
            key = node.slice if isinstance(node, ast.Subscript) else \
                node.args[0] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" and node.args else None
            if isinstance(key, ast.Constant) and key.value == "meta":  # ck["meta"], ck.get("meta")
                offences.append(f"{path.name}:{node.lineno}: a checkpoint's 'meta'")
    assert not offences, offences
