"""export.py: ONNX graphs of free size that match PyTorch, and predict.py over ONNX Runtime."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import export
import ortho
import predict
from basics import CLASS_NAMES, mean as MEAN, std as STD
from models import get_model
from models.efficientnet_lite import SamePad
from checkpoint import save_checkpoint


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


# ----------------------------------------------------------------------------- own data, own classes, sizes

FIVE = [("road", (200, 40, 40)), ("field", (40, 180, 40)), ("pond", (30, 60, 220)), ("house", (250, 250, 0)),
        ("car", (255, 0, 255))]


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """A U-Net checkpoint of 5 own classes and colours (evaluation size 48×32)."""
    folder = tmp_path_factory.mktemp("five")
    torch.manual_seed(3)
    model = get_model("unet", num_classes=len(FIVE), base=8, depth=2).eval()
    ckpt = folder / "five.pt"
    classes = {"names": [n for n, _ in FIVE], "colors": [list(c) for _, c in FIVE]}
    save_checkpoint(ckpt, model=model.state_dict(), meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2},
                                                          "eval_size": [48, 32], "classes": classes,
                                                          "train_gsd": 0.05})  # as scenes' training writes it
    return model, ckpt


def _own_data(root, n=6, splits=False):
    """Own data in the generic layout (images/, masks/, classes.csv), a sidecar file beside
    every photo (as cameras and labelling tools leave them), split lists only with ``splits``."""
    rng = np.random.default_rng(4)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = [f"{i:03d}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, len(FIVE), (32, 48), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
        for ext in ("json", "txt", "aux.xml"):  # "001.*" matches these too
            (root / "images" / f"{i}.{ext}").write_text("{}")
    (root / "classes.csv").write_text("name,r,g,b\n" + "".join(f"{n},{r},{g},{b}\n" for n, (r, g, b) in FIVE))
    if splits:
        (root / "splits").mkdir()
        (root / "splits" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:4]))
    return root


def test_own_classes_and_the_eval_size_travel_in_the_metadata_whatever_size_is_checked(five, tmp_path, capsys):
    """One export, checked at another --size than the checkpoint's evaluation size: the metadata
    keeps the evaluation size (predict runs .onnx and .pt at the same scale) and the own classes,
    which colour the masks predicted with either file."""
    model, ckpt = five
    out = tmp_path / "five.onnx"
    assert export.main([str(ckpt), "--out", str(out), "--size", "64x40"]) == 0
    assert "64x40" in capsys.readouterr().out  # checked at --size
    assert predict.OnnxModel(out).meta["eval_size"] == [48, 32]  # predict runs at the checkpoint's size
    assert predict.load_model(out, torch.device("cpu"))[1] == predict.load_model(ckpt, torch.device("cpu"))[1]
    meta = predict.onnx_metadata(out)
    assert meta["train_gsd"] == 0.05 and ortho.checkpoint_train_gsd(out) == 0.05  # orthomosaics run at it
    assert meta["class_names"] == [n for n, _ in FIVE] and meta["class_colors"] == [list(c) for _, c in FIVE]
    photos = tmp_path / "flight"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(photos / "a.jpg")
    for engine, model_file in (("torch", ckpt), ("onnx", out)):
        assert predict.main(["--checkpoint", str(model_file), "--input", str(photos), "--out",
                             str(tmp_path / engine), "--no-overlay"]) == 0
        im = Image.open(tmp_path / engine / "a_mask.png")
        assert im.mode == "P" and im.getpalette()[:15] == [v for _, c in FIVE for v in c]
        assert int(np.asarray(im).max()) < len(FIVE)
    a, b = (np.asarray(Image.open(tmp_path / e / "a_mask.png")) for e in ("torch", "onnx"))
    assert (a == b).mean() >= 0.999


def test_int8_calibrates_on_own_data_without_split_lists(five, tmp_path, capsys):
    _, ckpt = five
    data = _own_data(tmp_path / "own")
    out = tmp_path / "m.onnx"
    rc = export.main([str(ckpt), "--out", str(out), "--int8", "--calib-root", str(data), "--calib", "3"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx", "own"]
    assert predict.OnnxModel(tmp_path / "m.int8.onnx").meta["class_names"] == [n for n, _ in FIVE]


def test_calibration_photos_are_the_train_photos_never_a_sidecar(tmp_path):
    from datautils import load_photo
    from transforms import normalize

    data = _own_data(tmp_path / "own", splits=True)
    got = export.calibration_inputs(data, (48, 32), n=4)
    want = [normalize(torch.from_numpy(load_photo(data / "images" / f"{i:03d}.jpg", (48, 32))[0]
                                       .transpose(2, 0, 1).copy()))[None].numpy() for i in range(4)]
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_calibration_on_data_without_lists_uses_the_runs_own_train_photos(tmp_path):
    """A model trained with --split-seed 3 calibrates on its own train photos, not on seed 0's
    train photos (some of which were its val and test photos)."""
    from datautils import load_photo
    from transforms import normalize

    data = _own_data(tmp_path / "own")
    run_train = ["004", "002", "005"]
    got = export.calibration_inputs(data, (48, 32), n=3, run_split={"train": run_train, "val": ["000"]})
    want = [normalize(torch.from_numpy(load_photo(data / "images" / f"{i}.jpg", (48, 32))[0]
                                       .transpose(2, 0, 1).copy()))[None].numpy() for i in run_train]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bad", ["no_dataset", "no_train_list"])
def test_a_bad_calibration_dataset_writes_no_file_at_all(five, tmp_path, capsys, bad):
    _, ckpt = five
    if bad == "no_dataset":
        data = tmp_path / "nothing"
        data.mkdir()
    else:  # split lists, but not the train one
        data = _own_data(tmp_path / "own", splits=True)
        (data / "splits" / "train.txt").rename(data / "splits" / "val.txt")
    out = tmp_path / "out" / "m.onnx"
    rc = export.main([str(ckpt), "--out", str(out), "--int8", "--calib-root", str(data)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and str(data) in err.splitlines()[0], err
    if bad == "no_train_list":
        assert len(err.splitlines()) == 1  # (a missing dataset adds the layouts it looked for)
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no fp32 file written before the failure


def test_export_onnx_leaves_the_callers_model_where_and_as_it_was(tmp_path, monkeypatch):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = get_model("unet", base=4, depth=2).to(device).train()
    params = {k: p for k, p in model.named_parameters()}
    moved = []
    real = nn.Module._apply

    def spy(self, fn, *a, **kw):  # .cpu(), .to(), .cuda() all run through _apply
        if any(self is m for m in model.modules()):
            moved.append(type(self).__name__)
        return real(self, fn, *a, **kw)
    monkeypatch.setattr(nn.Module, "_apply", spy)
    export.export_onnx(model, tmp_path / "m.onnx", (24, 16))
    assert not moved  # not moved, not even for the time of the export
    assert all(m.training for m in model.modules())  # still training
    assert all(p is params[k] and p.device.type == device.type for k, p in model.named_parameters())


def test_padding_below_half_the_stride_agrees_between_onnx_and_eager(unet_onnx):
    # eager PadToStride replicates where reflection cannot (padding >= the side): the graph must too
    model, _, path = unet_onnx  # stride 4
    onnx_model = predict.OnnxModel(path)
    for h, w in ((1, 1), (2, 2), (1, 6), (3, 2), (2, 7), (3, 5), (5, 3)):
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
        with torch.inference_mode():
            want = model(x)
        got = onnx_model(x)
        assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4, (h, w)


def test_predict_normalises_with_the_onnx_metadatas_mean_and_std(tmp_path):
    # a model whose logits are its input's channels: the mask is the channel largest after
    # normalisation, which differs between ImageNet's statistics and these
    mean, std = [0.3, 0.6, 0.2], [0.1, 0.4, 0.3]
    net = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    path = tmp_path / "own.onnx"
    export.export_onnx(net, path, (48, 32), class_names=["r", "g", "b"], class_colors=[(255, 0, 0), (0, 255, 0),
                       (0, 0, 255)], mean=mean, std=std)
    assert predict.onnx_metadata(path)["mean"] == mean and predict.onnx_metadata(path)["std"] == std
    photos = tmp_path / "flight"
    photos.mkdir()
    pixels = np.random.default_rng(6).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "a.png")  # lossless, at the evaluation size: no resizing
    assert predict.main(["--checkpoint", str(path), "--input", str(photos), "--out", str(tmp_path / "out"),
                         "--no-overlay"]) == 0
    want = ((pixels / 255 - np.array(mean)) / np.array(std)).argmax(-1)
    got = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    imagenet = ((pixels / 255 - np.array(MEAN)) / np.array(STD)).argmax(-1)
    assert (want != imagenet).mean() > 0.3  # the test tells the two apart
    assert (got == want).mean() >= 0.999
