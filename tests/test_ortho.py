"""Orthomosaics (ortho.py, through predict.py): generated rasters in tmp_path, a tiny fixed model."""
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image

import ortho
import predict
from checkpoint import ModelMeta, save_checkpoint
from datautils import MASK_EXTS, PHOTO_EXTS, load_mask, load_photo
from layout import ClassSet, find_dataset, list_by_id, read_split
from metrics import ConfusionMatrix
from models import SingleConvolution
from transforms import normalize

W, H, PIXEL = 517, 389, 0.05  # an odd size, 5 cm pixels
CLASSES = ClassSet(("ground", "grass", "roof", "water"), ((128, 64, 128), (0, 102, 0), (70, 70, 70), (28, 42, 168)))
ORIGIN = (500000.0, 5000000.0)
TRANSFORM = Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1])  # north up


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SingleConvolution of 4 classes with fixed weights, saved as run_single_conv.py saves its
    model.pt; the eval size 64x64 makes the windows (many of them on this raster)."""
    return _checkpoint(tmp_path_factory.mktemp("ck") / "model.pt")


def _checkpoint(path, **extra):
    g = torch.Generator().manual_seed(0)
    model = SingleConvolution(num_classes=CLASSES.num_classes)
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(model.conv.weight.shape, generator=g))
        model.conv.bias.zero_()
    meta = ModelMeta("single_conv", {}, CLASSES, train_size=[64, 64], eval_size=[64, 64], extra=extra)
    save_checkpoint(path, model=model.state_dict(), history={}, epoch=1, meta=meta.to_dict())
    return path


def _pixels(seed=0) -> np.ndarray:
    """Smooth colour regions (3×H×W uint8): upsampled noise, so labels form regions, not speckle."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 255, (1, 3, H // 8 + 2, W // 8 + 2)).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=(H, W), mode="bicubic", align_corners=False)
    return big[0].clamp(0, 255).round().to(torch.uint8).numpy()


def _alpha() -> np.ndarray:
    """The nodata border of an orthomosaic: top rows, left columns, a bottom-right corner."""
    a = np.full((H, W), 255, np.uint8)
    a[:20], a[:, :15], a[-150:, -200:] = 0, 0, 0
    return a


def _write(path, bands: np.ndarray, georef: bool = True, **profile):
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=len(bands), dtype=bands.dtype.name,
              tiled=True, blockxsize=256, blockysize=256, **profile)
    if georef:
        kw.update(crs="EPSG:32633", transform=TRANSFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio warns about a raster without georeference: that is the point
        with rasterio.open(path, "w", **kw) as d:
            d.write(bands)
    return path


@pytest.fixture(scope="module")
def ortho_tif(tmp_path_factory):
    """A GeoTIFF in EPSG:32633, 517x389, RGBA: alpha 0 on the nodata border."""
    return _write(tmp_path_factory.mktemp("in") / "ortho.tif", np.concatenate([_pixels(), _alpha()[None]]),
                  photometric="RGB", alpha="YES")


def _predict(checkpoint, src, out, *extra):
    return predict.main(["--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), *extra])


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as d:
            return d.read(1), d.profile, d.colormap(1), d.tags(ns="IMAGE_STRUCTURE"), d.bounds, d.overviews(1)


def _whole(checkpoint, pixels):
    """The labels of one whole-raster prediction (no windows)."""
    model, _, _ = predict.load_model(checkpoint, torch.device("cpu"))
    with torch.inference_mode():
        return model(normalize(torch.from_numpy(pixels)[None]))[0].argmax(0).numpy()


def test_class_map_on_the_input_ground_with_nodata_and_colours(checkpoint, ortho_tif, tmp_path):
    assert _predict(checkpoint, ortho_tif, tmp_path) == 0
    labels, prof, cmap, structure, bounds, overviews = _read(tmp_path / "ortho_classes.tif")
    with rasterio.open(ortho_tif) as src:
        assert prof["crs"] == src.crs and prof["transform"] == src.transform and bounds == src.bounds
        valid = src.dataset_mask() > 0
    assert prof["dtype"] == "uint8" and prof["nodata"] == ortho.NODATA and (prof["width"], prof["height"]) == (W, H)
    assert np.array_equal(labels == ortho.NODATA, ~valid)  # nodata exactly where the input has none
    assert set(np.unique(labels[valid])) <= set(range(CLASSES.num_classes))
    assert all(cmap[k][:3] == CLASSES.colors[k] for k in range(CLASSES.num_classes))
    assert prof["tiled"] and structure["COMPRESSION"] == "DEFLATE"
    if structure.get("LAYOUT") is not None:  # GDAL with the COG driver: a COG with overviews
        assert structure["LAYOUT"] == "COG" and overviews
    areas = json.loads((tmp_path / "ortho_areas.json").read_text())
    counts = np.bincount(labels[valid], minlength=CLASSES.num_classes)
    assert [c["pixels"] for c in areas["classes"]] == counts.tolist()
    assert [c["area_m2"] for c in areas["classes"]] == pytest.approx((counts * PIXEL ** 2).tolist())
    assert sum(c["percent"] for c in areas["classes"]) == pytest.approx(100)
    rows = list(csv.DictReader((tmp_path / "ortho_areas.csv").open()))
    assert [r["class"] for r in rows] == list(CLASSES.names) and float(rows[1]["area_m2"]) == pytest.approx(
        counts[1] * PIXEL ** 2, abs=1e-3)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_blended_windows_equal_one_whole_prediction_and_leave_no_seam(checkpoint, ortho_tif, tmp_path):
    model, _, info = predict.load_model(checkpoint, torch.device("cpu"))
    whole = _whole(checkpoint, _pixels())
    valid = _alpha() > 0
    res = {}
    for overlap in (0.25, 0.0):  # blended, and pasted side by side
        r = ortho.predict_raster(model, ortho_tif, tmp_path / str(overlap), classes=info["classes"], tile=(64, 64),
                                 overlap=overlap, progress=False)
        labels = _read(tmp_path / str(overlap) / "ortho_classes.tif")[0]
        edges = ortho.window_edges(W, 64, overlap), ortho.window_edges(H, 64, overlap)
        # the seam: disagreement across the window borders beyond what the one whole-raster
        # prediction has across the same lines (the scene's own edges cross them too)
        seam = ortho.seam_score(labels, *edges, valid)["excess"] - ortho.seam_score(whole, *edges, valid)["excess"]
        res[overlap] = ((labels != whole)[valid].mean(), seam, r)
    (blend_diff, blend_seam, r), (paste_diff, paste_seam, _) = res[0.25], res[0.0]
    assert blend_diff < 0.002 < paste_diff  # blended: the whole-raster labels but at a few near-ties
    assert abs(blend_seam) < 0.01 < 0.1 < paste_seam  # pasted windows disagree along their borders
    assert r["windows_run"] < r["windows"]  # the windows inside the nodata corner were skipped
    # memory: the overlap band and one chunk of windows, whatever the raster's height
    tall = _write(tmp_path / "tall.tif", np.concatenate([np.concatenate([_pixels(), _pixels()], 1),
                                                         np.full((1, 2 * H, W), 255, np.uint8)]),
                  photometric="RGB", alpha="YES")
    r_tall = ortho.predict_raster(model, tall, tmp_path / "tall", classes=info["classes"], tile=(64, 64), progress=False)
    assert r_tall["accumulator_peak_bytes"] <= 1.1 * r["accumulator_peak_bytes"] < 0.2 * 4 * 4 * W * H


def test_resampled_class_map_is_the_interpolated_blend(checkpoint, ortho_tif, tmp_path):
    # the model at 10 cm, the class map at the raster's 5 cm: labels strip by strip and block by
    # block (with the row and column their neighbours hold) must be those of the whole blend of
    # scores on the model grid, bilinearly interpolated at once
    from rasterio.vrt import WarpedVRT

    model, _, info = predict.load_model(checkpoint, torch.device("cpu"))
    r = ortho.predict_raster(model, ortho_tif, tmp_path, classes=info["classes"], tile=(64, 48), gsd=0.1,
                             batch_size=3, progress=False)
    (mw, mh), (ow, oh) = r["model_grid_size"], r["output_size"]
    assert (mw, mh, ow, oh) == (259, 195, W, H)
    with rasterio.open(ortho_tif) as src:  # the model grid's pixels, as ortho reads them
        vrt = WarpedVRT(src, transform=src.transform @ Affine.scale(W / mw, H / mh), width=mw, height=mh,
                        resampling=rasterio.enums.Resampling.average)
        x = normalize(torch.from_numpy(vrt.read([1, 2, 3]))[None])
    scores, weights = torch.zeros(CLASSES.num_classes, mh, mw), torch.zeros(mh, mw)
    window = ortho.blend_window(48, 64)
    with torch.inference_mode():
        for y in ortho.window_starts(mh, 48, 0.25):
            for x0 in ortho.window_starts(mw, 64, 0.25):
                scores[:, y:y + 48, x0:x0 + 64] += model(x[:, :, y:y + 48, x0:x0 + 64])[0] * window
                weights[y:y + 48, x0:x0 + 64] += window
    want = torch.nn.functional.interpolate((scores / weights)[None], size=(oh, ow), mode="bilinear",
                                           align_corners=False)[0].argmax(0).numpy()
    got = _read(tmp_path / "ortho_classes.tif")[0]
    ok = got != 255
    assert (got != want)[ok].mean() < 1e-4  # a near-tie may round the other way


@pytest.mark.parametrize("gsd", [0.1, 0.025])
def test_gsd_resamples_and_out_gsd_follows(checkpoint, ortho_tif, tmp_path, gsd):
    tile = ("--tile", "128")  # fewer windows on the 2x finer grid: a fast test
    assert _predict(checkpoint, ortho_tif, tmp_path / "a", "--gsd", str(gsd), "--out-gsd", str(gsd), *tile) == 0
    labels, prof, _, _, bounds, _ = _read(tmp_path / "a" / "ortho_classes.tif")
    f = gsd / PIXEL  # 2: half the pixels a side; 0.5: twice
    assert (prof["width"], prof["height"]) == (int(np.ceil(W / f)), int(np.ceil(H / f)))
    assert prof["transform"].a == pytest.approx(gsd) and prof["transform"].e == pytest.approx(-gsd)
    assert (prof["transform"].c, prof["transform"].f) == ORIGIN
    with rasterio.open(ortho_tif) as src:  # the same ground, up to the last partial pixel
        assert all(abs(a - b) < gsd for a, b in zip(bounds, src.bounds))
    # the model at the GSD, the class map at the raster's own pixel (the default --out-gsd)
    assert _predict(checkpoint, ortho_tif, tmp_path / "b", "--gsd", str(gsd), *tile) == 0
    native, prof_b = _read(tmp_path / "b" / "ortho_classes.tif")[:2]
    assert (prof_b["width"], prof_b["height"], prof_b["transform"]) == (W, H, TRANSFORM)
    a = native[::2, ::2] if f == 2 else native  # the two class maps on the coarser of their grids
    b = labels[::2, ::2] if f == 0.5 else labels
    a, b = a[:min(len(a), len(b)), :min(a.shape[1], b.shape[1])], b[:min(len(a), len(b)), :min(a.shape[1], b.shape[1])]
    ok = (a != 255) & (b != 255)
    assert (a == b)[ok].mean() > 0.9  # one prediction at two pixel sizes


def test_the_checkpoint_training_gsd_is_the_default(ortho_tif, tmp_path):
    ck = _checkpoint(tmp_path / "gsd.pt", train_gsd=0.1)
    assert ortho.checkpoint_train_gsd(ck) == 0.1
    assert _predict(ck, ortho_tif, tmp_path / "a") == 0
    areas = json.loads((tmp_path / "a" / "ortho_areas.json").read_text())
    assert areas["model_grid_size"] == [259, 195] and areas["output_size"] == [W, H]
    assert areas["model_gsd"]["x"] == pytest.approx(0.1, rel=0.01)
    assert _predict(ck, ortho_tif, tmp_path / "b", "--gsd", "0.05") == 0  # --gsd wins
    assert json.loads((tmp_path / "b" / "ortho_areas.json").read_text())["model_grid_size"] == [W, H]


def _polygon_area(rings) -> float:
    def ring(r):
        p = np.asarray(r, np.float64)
        p -= p[0]  # map coordinates are large: products of them would cancel a 5 cm pixel away
        return 0.5 * abs(np.dot(p[:-1, 0], p[1:, 1]) - np.dot(p[1:, 0], p[:-1, 1]))
    return ring(rings[0]) - sum(ring(r) for r in rings[1:])


def test_polygons_cover_each_class_with_its_pixel_area(checkpoint, ortho_tif, tmp_path):
    assert _predict(checkpoint, ortho_tif, tmp_path, "--vector") == 0
    labels = _read(tmp_path / "ortho_classes.tif")[0]
    gj = json.loads((tmp_path / "ortho_polygons.geojson").read_text())
    assert gj["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    area = np.zeros(CLASSES.num_classes)
    for feat in gj["features"]:
        k = feat["properties"]["class_id"]
        assert feat["properties"]["class"] == CLASSES.names[k]
        a = _polygon_area(feat["geometry"]["coordinates"])
        assert feat["properties"]["area_m2"] == pytest.approx(a)
        area[k] += a
    counts = np.bincount(labels[labels != 255], minlength=CLASSES.num_classes)
    assert area == pytest.approx(counts * PIXEL ** 2, rel=1e-9)


@pytest.mark.parametrize("nodata", [None, 0])
def test_a_raster_without_georeference_works_in_pixels(checkpoint, tmp_path, nodata):
    pixels = _pixels(seed=1)
    if nodata is not None:  # a nodata value instead of alpha: black where there is no data
        pixels[:, :, :30] = 0
    src = _write(tmp_path / "photo.tif", pixels, georef=False, nodata=nodata)
    assert _predict(checkpoint, src, tmp_path / "out", "--vector") == 0
    labels, prof = _read(tmp_path / "out" / "photo_classes.tif")[:2]
    assert prof["crs"] is None and (prof["width"], prof["height"]) == (W, H)
    assert (labels[:, :30] == 255).all() == (nodata is not None) and (labels[:, 30:] != 255).all()
    if nodata is None:
        assert (labels != _whole(checkpoint, pixels)).mean() < 0.002
    areas = json.loads((tmp_path / "out" / "photo_areas.json").read_text())
    assert areas["pixel_units"] == "pixels" and areas["total_area_m2"] is None
    assert all(c["area_m2"] is None for c in areas["classes"]) and sum(c["pixels"] for c in areas["classes"]) == (
        labels != 255).sum()
    gj = json.loads((tmp_path / "out" / "photo_polygons.geojson").read_text())
    assert "crs" not in gj and sum(f["properties"]["pixels"] for f in gj["features"]) == (labels != 255).sum()
    assert all(f["properties"]["area_m2"] is None for f in gj["features"])


def test_a_tiff_photo_without_georeference_stays_a_photo(checkpoint, tmp_path, capsys):
    """A camera photo saved as TIFF has no ground: predicted as a photo at the model's size (as
    before rasters had a path of their own), not at its own pixels; a raster option forces the
    raster path."""
    src = _write(tmp_path / "photo.tif", _pixels(seed=2), georef=False)
    assert _predict(checkpoint, src, tmp_path / "out") == 0
    assert "no georeference, so predicted as photos" in capsys.readouterr().out
    assert (tmp_path / "out" / "photo_mask.png").is_file() and not (tmp_path / "out" / "photo_classes.tif").exists()
    assert _predict(checkpoint, src, tmp_path / "raster", "--out-gsd", "1") == 0
    assert (tmp_path / "raster" / "photo_classes.tif").is_file()
    # a geotransform without a CRS (a world file, a local grid) lies on the ground: the raster path
    local = _write(tmp_path / "grid" / "local.tif", _pixels(seed=3), georef=False, transform=TRANSFORM)
    assert _predict(checkpoint, local, tmp_path / "grid_out") == 0
    assert (tmp_path / "grid_out" / "local_classes.tif").is_file()
    # a folder of both: refused by name, nothing predicted at the wrong scale
    (tmp_path / "grid" / "photo.tif").write_bytes(src.read_bytes())
    capsys.readouterr()
    assert _predict(checkpoint, tmp_path / "grid", tmp_path / "mixed") == predict.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "local.tif" in err and "photo.tif" in err and not (tmp_path / "mixed").exists()


def test_bad_rasters_and_options_stop_with_one_line(checkpoint, ortho_tif, tmp_path, capsys):
    gray = _write(tmp_path / "gray.tif", _pixels()[:1])
    assert _predict(checkpoint, gray, tmp_path / "o") == predict.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "gray.tif" in err and "RGB" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    deep = _write(tmp_path / "deep.tif", _pixels().astype(np.uint16))
    assert _predict(checkpoint, deep, tmp_path / "o") == predict.EXIT_BAD_INPUT
    assert "deep.tif" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.tif", _pixels())
    (mixed / "b.jpg").write_bytes(b"")
    assert _predict(checkpoint, mixed, tmp_path / "o") == predict.EXIT_BAD_INPUT
    assert "folder of their own" in capsys.readouterr().err
    assert _predict(checkpoint, ortho_tif, tmp_path / "o", "--gsd", "-1") == predict.EXIT_BAD_INPUT
    assert "--gsd" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing predicted


def _onnx(path, checkpoint, **extra):
    """The fixed SingleConvolution as an ONNX graph (Conv, Relu) with export.py's metadata, built
    directly: the same model for ONNX Runtime in a fraction of an export's time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from checkpoint import load_checkpoint, onnx_props

    sd = load_checkpoint(checkpoint)["model"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["z"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["z"], ["logits"])],
        "single_conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES.num_classes, "H", "W"])],
        [numpy_helper.from_array(sd["conv.weight"].numpy(), "w"), numpy_helper.from_array(sd["conv.bias"].numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = onnx_props(class_names=CLASSES.names, class_colors=CLASSES.colors, model_name="single_conv",
                       eval_size=[64, 64], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **extra)
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def test_an_onnx_model_predicts_the_same_class_map(checkpoint, ortho_tif, tmp_path):
    assert _predict(checkpoint, ortho_tif, tmp_path / "pt") == 0
    model = _onnx(tmp_path / "m.onnx", checkpoint)
    assert _predict(model, ortho_tif, tmp_path / "onnx") == 0  # predict.py's .onnx path: ONNX Runtime
    pt, onnx_labels = (_read(tmp_path / d / "ortho_classes.tif")[0] for d in ("pt", "onnx"))
    assert (pt != onnx_labels).mean() < 0.001  # float rounding may flip a near-tie
    # the training GSD travels in the ONNX metadata too
    assert ortho.checkpoint_train_gsd(_onnx(tmp_path / "gsd.onnx", checkpoint, train_gsd=0.1)) == 0.1


def _gsd_sweep():
    tools = str(Path(__file__).resolve().parents[1] / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import gsd_sweep
    return gsd_sweep


def _random_conv(num_classes: int) -> SingleConvolution:
    model = SingleConvolution(num_classes=num_classes)
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(model.conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


def test_gsd_sweep_scenes_lie_on_their_labels_and_score_as_the_photos(demo_root, tmp_path):
    """tools/gsd_sweep.py: each val photo becomes a georeferenced scene (its pixel, a nodata
    border) with its label raster on the same grid; at the scene's own pixel the sweep's
    confusion matrix is that of the model run on each whole scene (labels one pixel off, or the
    border scored, would change it)."""
    gsd_sweep = _gsd_sweep()
    layout = find_dataset(demo_root)
    classes = layout.classes()
    pairs, got, ids = gsd_sweep.make_scenes(demo_root, "val", tmp_path / "scenes", gsd=0.5, border=8)
    assert got.names == classes.names and ids == read_split("val", layout.splits_dir) and len(pairs) == 2
    photos, masks = list_by_id(layout.image_dir, PHOTO_EXTS), list_by_id(layout.mask_dir, MASK_EXTS)
    model = _random_conv(classes.num_classes)
    direct, shifted = ConfusionMatrix(classes.num_classes), ConfusionMatrix(classes.num_classes)
    for i, (tif, png) in zip(ids, pairs):
        rgb, _ = load_photo(photos[i])
        mask, _ = load_mask(masks[i], size=(rgb.shape[1], rgb.shape[0]), colors=classes)
        with rasterio.open(tif) as d:
            assert d.crs.is_projected and d.res == (0.5, 0.5) and (d.width, d.height) == (96 + 16, 64 + 16)
            bands = d.read()
        assert (bands[3, 8:-8, 8:-8] == 255).all() and bands[3, :8].max() == 0 and bands[3, :, -8:].max() == 0
        assert np.array_equal(bands[:3, 8:-8, 8:-8], rgb.transpose(2, 0, 1))
        label = np.asarray(Image.open(png))
        assert np.array_equal(label[8:-8, 8:-8], mask) and (label[:8] == 255).all()
        with torch.inference_mode():  # the model on the whole scene: the photo in its black nodata border
            labels = model(normalize(torch.from_numpy(bands[:3].copy())[None]))[0].argmax(0)[8:-8, 8:-8]
        direct.update(labels, torch.from_numpy(mask))
        shifted.update(labels, torch.from_numpy(np.roll(mask, 1, 1)))
    want = direct.compute(classes.names)
    rows = gsd_sweep.gsd_sweep(model, pairs, classes, 0.5, [1.0, 2.0], tmp_path, tile=(48, 32),
                               stats=(ortho.MEAN, ortho.STD), reference=2.0)
    assert [r["gsd_m"] for r in rows] == [0.5, 1.0]
    # pixel by pixel: the blended class maps give the whole photos' confusion matrix (blending may
    # flip a rare near-tie), where labels one pixel off would move a large share of the counts
    off = (torch.tensor(rows[0]["confusion"]) - direct.mat).abs().sum().item() / want["pixels"]
    assert off < 0.002 < 10 * 0.002 < (shifted.mat - direct.mat).abs().sum().item() / want["pixels"]
    assert rows[1]["reference"] and rows[1]["miou_vs_reference_ci"] == [0.0, 0.0]
    assert rows[0]["miou_vs_reference"] == pytest.approx(rows[0]["miou"] - rows[1]["miou"])
    lo, hi = rows[0]["miou_vs_reference_ci"]
    assert lo <= hi and (lo, hi) != (0.0, 0.0)
    with pytest.raises(ortho.InputError, match="reference"):
        gsd_sweep.gsd_sweep(model, pairs, classes, 0.5, [1.0], tmp_path, tile=(48, 32),
                            stats=(ortho.MEAN, ortho.STD), reference=2.5)
    assert rows[0]["miou_ci"][0] <= rows[0]["miou"] <= rows[0]["miou_ci"][1]
    assert rows[0]["model_grid_of_first_scene"] == [112, 80] and rows[1]["model_grid_of_first_scene"] == [56, 40]
    assert sum(rows[0]["per_class_pixels"].values()) == want["pixels"] == 2 * 96 * 64
    assert abs(rows[0]["pixel_accuracy"] - want["pixel_accuracy"]) < 1e-3
    assert abs(rows[0]["miou"] - want["miou"]) < 1e-2
    assert sum(rows[1]["per_class_pixels"].values()) == want["pixels"]  # scored on the labels' own grid
    assert [r["best"] for r in rows] == [rows[0]["miou"] > rows[1]["miou"], rows[1]["miou"] > rows[0]["miou"]]


def test_gsd_sweep_remakes_scenes_whose_sources_changed(fresh_demo, tmp_path):
    """A scene is reused only while its photo, mask, classes, pixel and border are unchanged."""
    gsd_sweep = _gsd_sweep()
    layout = find_dataset(fresh_demo)
    pairs, _, ids = gsd_sweep.make_scenes(fresh_demo, "val", tmp_path / "s", gsd=0.5, border=4)
    mask = list_by_id(layout.mask_dir, MASK_EXTS)[ids[0]]
    before = np.asarray(Image.open(pairs[0][1])).copy()
    with Image.open(mask) as im:
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(mask)
    pairs, _, _ = gsd_sweep.make_scenes(fresh_demo, "val", tmp_path / "s", gsd=0.5, border=4)
    assert np.array_equal(np.asarray(Image.open(pairs[0][1]))[4:-4, 4:-4], before[4:-4, 4:-4][:, ::-1])
    pairs, _, _ = gsd_sweep.make_scenes(fresh_demo, "val", tmp_path / "s", gsd=0.25, border=4)
    with rasterio.open(pairs[0][0]) as d:
        assert d.res == (0.25, 0.25)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    with pytest.raises(ortho.InputError, match="did not write"):
        gsd_sweep.make_scenes(fresh_demo, "val", tmp_path / "other", gsd=0.5)


def test_gsd_sweep_command_writes_its_table_and_refuses_what_would_mislead(demo_root, tmp_path, capsys):
    gsd_sweep = _gsd_sweep()
    layout = find_dataset(demo_root)
    classes = layout.classes()
    ck = tmp_path / "model.pt"
    meta = ModelMeta("single_conv", {}, classes, train_size=[48, 32], eval_size=[48, 32],
                     config={"ignore_index": 0}, split={"ids": {"train": read_split("train", layout.splits_dir)}})
    save_checkpoint(ck, model=_random_conv(classes.num_classes).state_dict(), history={}, epoch=1, meta=meta.to_dict())
    args = ["--checkpoint", str(ck), "--data-root", str(demo_root), "--scene-gsd", "0.1", "--work", str(tmp_path / "w")]
    assert gsd_sweep.main(args + ["--factors", "1,2.5"]) == 0
    result = json.loads((tmp_path / "w" / "gsd_sweep.json").read_text())
    # the reference: 96-pixel photos, a model evaluated at 48 pixels wide, so x2, added to the factors
    assert result["reference_factor"] == 2.0 and [r["factor"] for r in result["rows"]] == [1.0, 2.0, 2.5]
    assert result["scenes"] == 2 and [r["reference"] for r in result["rows"]] == [False, True, False]
    assert result["ignore_index"] == 0  # the run's --ignore-index, as its own report scored
    assert all(np.isnan(r["per_class_iou"][classes.names[0]]) for r in result["rows"])
    out = capsys.readouterr().out
    assert "| 0.2500 | 2.5 |" in out and "selected on val, reported on val" in out
    assert not list((tmp_path / "w" / "maps").iterdir())  # scored maps are not kept
    for extra, words in ((["--factors", "0,2"], "--factors"), (["--ignore-index", "3"], "trained with 0"),
                         (["--split", "train"], "was trained on")):
        assert gsd_sweep.main(args + extra) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "w" / "gsd_sweep.json").exists()  # a failed rerun leaves no old result
    other = ClassSet(("a", "b"), ((0, 0, 0), (1, 1, 1)))
    save_checkpoint(tmp_path / "two.pt", model=SingleConvolution(num_classes=2).state_dict(), history={}, epoch=1,
                    meta=ModelMeta("single_conv", {}, other, train_size=[48, 32]).to_dict())
    assert gsd_sweep.main(["--checkpoint", str(tmp_path / "two.pt")] + args[2:]) == 2
    assert "other classes" in capsys.readouterr().err


def test_gsd_sweep_on_own_data_without_split_lists_uses_the_checkpoints_split(fresh_demo, tmp_path):
    """Own data without split lists: the photos of the split the run recorded, none else."""
    import shutil
    gsd_sweep = _gsd_sweep()
    layout = find_dataset(fresh_demo)
    classes = layout.classes()
    shutil.rmtree(layout.splits_dir)
    ck = tmp_path / "model.pt"
    ids = sorted(list_by_id(layout.image_dir, PHOTO_EXTS))
    meta = ModelMeta("single_conv", {}, classes, train_size=[24, 16],
                     split={"ids": {"train": ids[:4], "val": ids[4:]}, "seed": 0})
    save_checkpoint(ck, model=_random_conv(classes.num_classes).state_dict(), history={}, epoch=1, meta=meta.to_dict())
    assert gsd_sweep.main(["--checkpoint", str(ck), "--data-root", str(fresh_demo), "--factors", "1",
                           "--work", str(tmp_path / "w")]) == 0
    result = json.loads((tmp_path / "w" / "gsd_sweep.json").read_text())
    assert result["scenes"] == 2
    assert sorted(p.stem for p in (tmp_path / "w" / "scenes" / "images").iterdir()) == ids[4:]
