"""export.py: ONNX graphs of free size that match PyTorch, and predict.py over ONNX Runtime."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import export
import predict
from basics import CLASS_NAMES
from models import get_model
from models.efficientnet_lite import SamePad
from train import save_checkpoint


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    """A small U-Net (pads to its stride, like every U-Net here) as checkpoint and ONNX file."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = get_model("unet", base=8, depth=2).eval()
    ckpt = folder / "unet.pt"
    save_checkpoint(ckpt, model=model.state_dict(),
                    meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2}, "eval_size": [48, 32]})
    assert export.main([str(ckpt), "--out", str(folder / "unet.onnx")]) == 0
    return model, ckpt, folder / "unet.onnx"


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 96, 64), (1, 3, 75, 131)])  # trained size, portrait, odd
def test_onnx_runtime_matches_torch_at_any_size(unet_onnx, shape):
    model, _, path = unet_onnx
    onnx_model = predict.OnnxModel(path)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x)
    got = onnx_model(x)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4


def test_the_class_set_and_normalisation_travel_in_the_metadata(unet_onnx):
    meta = predict.onnx_metadata(unet_onnx[2])
    assert meta["class_names"] == list(CLASS_NAMES) and len(meta["class_colors"]) == len(CLASS_NAMES)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["eval_size"] == [48, 32] and meta["model_name"] == "unet"


def test_same_padding_is_exported_symbolically(tmp_path):
    # EfficientNet's TF "SAME" padding depends on the input size: a graph traced at one size must
    # still pad right at odd and even sizes
    net = nn.Sequential(SamePad(3, 2), nn.Conv2d(3, 4, 3, 2), SamePad(5, 2), nn.Conv2d(4, 5, 5, 2)).eval()
    export.export_onnx(net, tmp_path / "same.onnx", (40, 30), model_name="same")
    onnx_model = predict.OnnxModel(tmp_path / "same.onnx")
    for h, w in ((30, 40), (31, 41), (17, 64)):
        x = torch.randn(1, 3, h, w)
        with torch.inference_mode():
            want = net(x)
        assert torch.allclose(onnx_model(x), want, atol=1e-5), (h, w)


def test_an_export_that_differs_from_torch_fails_and_writes_nothing(tmp_path):
    class Differs(nn.Module):  # another graph under export than in eager mode
        def forward(self, x):
            return x * 2 if torch.compiler.is_exporting() else x

    with pytest.raises(export.ExportMismatch, match="differ"):
        export.export_onnx(Differs(), tmp_path / "bad.onnx", (16, 8))
    assert not list(tmp_path.iterdir())


def test_predict_with_onnx_writes_the_masks_torch_writes(unet_onnx, tmp_path):
    _, ckpt, path = unet_onnx
    rng = np.random.default_rng(0)
    photos = tmp_path / "flight"
    photos.mkdir()
    for name, (w, h) in (("a", (96, 64)), ("b", (64, 96))):  # b: portrait
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"{name}.jpg")
    for engine, model_file in (("torch", ckpt), ("onnx", path)):
        assert predict.main(["--checkpoint", str(model_file), "--input", str(photos), "--out", str(tmp_path / engine),
                             "--tile", "40", "--tta"]) == 0
    for name in "ab":
        a = np.asarray(Image.open(tmp_path / "torch" / f"{name}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "onnx" / f"{name}_mask.png"))
        assert a.shape == b.shape and (a == b).mean() >= 0.999  # float noise may flip a near-tie


@pytest.mark.parametrize("what", ["not_onnx", "foreign_onnx", "pt_as_onnx"])
def test_a_bad_or_foreign_onnx_file_gives_one_line_and_exit_2(unet_onnx, tmp_path, capsys, what):
    import onnx

    bad = tmp_path / "model.onnx"
    if what == "not_onnx":
        bad.write_bytes(b"not a model")
    elif what == "foreign_onnx":  # a valid graph, but not one of ours: no classes, no normalisation
        proto = onnx.load(str(unet_onnx[2]))
        del proto.metadata_props[:]
        onnx.save(proto, str(bad))
    else:
        bad = tmp_path / "copy.onnx"
        bad.write_bytes(unet_onnx[1].read_bytes())
    photos = tmp_path / "p"
    photos.mkdir()
    Image.new("RGB", (64, 48)).save(photos / "a.jpg")
    rc = predict.main(["--checkpoint", str(bad), "--input", str(photos), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err


def test_int8_export_runs_keeps_the_metadata_and_stays_close(unet_onnx, tmp_path):
    model, _, path = unet_onnx
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(1, 3, 32, 48, generator=g).numpy() for _ in range(4)]
    q = export.quantize_onnx(path, tmp_path / "unet.int8.onnx", calib)
    assert [p.name for p in tmp_path.iterdir()] == ["unet.int8.onnx"]  # nothing else left behind
    int8 = predict.OnnxModel(q)
    assert int8.meta["class_names"] == list(CLASS_NAMES) and "static" in int8.meta["int8"]
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.inference_mode():
        want = model(x)
    got = int8(x)
    assert got.shape == want.shape and float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.5
