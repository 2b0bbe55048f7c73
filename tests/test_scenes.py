"""Training from orthomosaics: georeferenced scenes (the generic layout with GeoTIFFs, the
DroneDeploy benchmark's layout) cut once into windows at the training GSD, split by scene, and a
short run whose checkpoint carries its training GSD. Generated scenes in tmp_path only."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

import ortho
import predict
import run_experiment
from checkpoint import load_checkpoint
from datautils import cut_scenes, import_drone_dataset, load_mask, save_mask
from layout import DRONEDEPLOY_CLASSES, IGNORE, DatasetError, find_dataset, read_split, scene_of_window
from test_ortho import _write  # a GeoTIFF from bands, as the orthomosaic tests write them

PIXEL = 0.1  # 10 cm, the benchmark's pixel
# scene ids of the benchmark's official split (splits/dronedeploy/): two train, one val, one test
SCENES = {"1d4fbe33f3_F1BE1D4184INSPIRE": "train", "1df70e7340_4413A67E91INSPIRE": "train",
          "ec09336a6f_06BA0AF311OPENPIPELINE": "val", "12fa5e614f_53197F206FOPENPIPELINE": "test"}
MAGENTA = DRONEDEPLOY_CLASSES.row_names.index("IGNORE")
WINDOW = (200, 150)
LUT = DRONEDEPLOY_CLASSES.row_to_id()  # class-file row -> class id (IGNORE -> 255)


def _rows(w: int, h: int, seed: int, block: int = 40) -> np.ndarray:
    """Class-file rows (h×w) in blocks, the ignored magenta row among them."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, len(DRONEDEPLOY_CLASSES.row_names), (h // block + 1, w // block + 1))
    return np.kron(small, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _alpha(w: int, h: int, border: int) -> np.ndarray:
    """An orthomosaic's nodata border: top rows, left columns and a bottom-right corner."""
    a = np.full((h, w), 255, np.uint8)
    a[:border], a[:, :border], a[-h // 5:, -w // 5:] = 0, 0, 0
    return a


def _scene(root, name: str, w: int, h: int, seed: int, *, images="images", pixel=PIXEL, georef=True,
           suffix="-ortho.tif") -> np.ndarray:
    """A scene GeoTIFF (RGBA, EPSG:32633) whose colours follow its classes; returns its rows."""
    rows = _rows(w, h, seed)
    alpha = _alpha(w, h, max(4, h // 25))
    rows[alpha == 0] = MAGENTA  # the benchmark's labels are magenta where the orthomosaic has no data
    rng = np.random.default_rng(seed + 100)
    colours = np.asarray(DRONEDEPLOY_CLASSES.row_colors, np.int64)[rows] // 2 + rng.integers(0, 100, (h, w, 3))
    bands = np.concatenate([colours.transpose(2, 0, 1).astype(np.uint8), alpha[None]])
    profile = dict(crs="EPSG:32633", transform=Affine(pixel, 0, 500000.0 + 1000 * seed, 0, -pixel, 5e6)) \
        if georef else {}
    _write(root / images / f"{name}{suffix}", bands, georef=False, photometric="RGB", alpha="YES", **profile)
    return rows


def _dd_root(tmp_path, sizes=(1000, 700), **kw) -> tuple:
    """A DroneDeploy-style root: images/<id>-ortho.tif, labels/<id>-label.png (RGB colours incl.
    magenta IGNORE), elevations/<id>-elev.tif (ignored), index.csv; returns (root, rows per scene)."""
    root = tmp_path / "dd"
    (root / "labels").mkdir(parents=True)
    rows = {}
    for i, scene in enumerate(SCENES):
        w, h = (sizes[0] - 37 * i, sizes[1] - 23 * i)  # odd sizes, each its own
        rows[scene] = _scene(root, scene, w, h, seed=i, **kw)
        Image.fromarray(np.asarray(DRONEDEPLOY_CLASSES.row_colors, np.uint8)[rows[scene]]).save(
            root / "labels" / f"{scene}-label.png")
        _write(root / "elevations" / f"{scene}-elev.tif", np.zeros((1, 8, 8), np.float32), georef=False)
    (root / "index.csv").write_text("idx scene_id flight\n" + "".join(f"{i} {s} x\n" for i, s in enumerate(SCENES)))
    return root, rows


@pytest.fixture(scope="module")
def dd(tmp_path_factory):
    return _dd_root(tmp_path_factory.mktemp("scenes"))


def _read(path) -> np.ndarray:
    """A whole (small) raster as H×W×bands."""
    with rasterio.open(path) as src:
        return src.read().transpose(1, 2, 0)


def _windows(layout) -> dict[str, tuple[int, int]]:
    """Window id -> (row, column) of the cut."""
    return {p.stem: tuple(int(v) for v in re.fullmatch(r".*_r(\d+)_c(\d+)", p.stem).groups())
            for p in sorted(layout.image_dir.glob("*.png"))}


def _expected(ids: np.ndarray, r: int, c: int, window=WINDOW) -> np.ndarray:
    """The window (r, c) of a scene's class ids, padded with IGNORE to the window size."""
    (ww, wh), out = window, np.full((window[1], window[0]), IGNORE, np.uint8)
    part = ids[r * wh:(r + 1) * wh, c * ww:(c + 1) * ww]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def test_a_dronedeploy_root_is_cut_exactly_at_its_own_gsd(dd, tmp_path):
    root, rows = dd
    layout = find_dataset(root)
    assert layout.kind == "dronedeploy" and layout.classes() == DRONEDEPLOY_CLASSES
    cut = cut_scenes(layout, WINDOW, cache_dir=tmp_path / "cache")
    assert cut.gsd == pytest.approx(PIXEL) and cut.windows.is_relative_to(tmp_path / "cache")
    windows = _windows(cut)
    for scene, scene_rows in rows.items():
        ids = LUT[scene_rows]
        with_labels = {(r, c) for r in range(-(-ids.shape[0] // WINDOW[1])) for c in range(-(-ids.shape[1] // WINDOW[0]))
                       if (_expected(ids, r, c) != IGNORE).any()}
        mine = {rc for wid, rc in windows.items() if scene_of_window(wid) == scene}
        assert mine == with_labels  # every window with a labelled pixel, none without (the nodata corner)
        with_ortho = _read(root / "images" / f"{scene}-ortho.tif")  # a small scene: whole is fine
        for r, c in sorted(mine)[::3]:
            wid = f"{scene}_r{r:03d}_c{c:03d}"
            mask, _ = load_mask(cut.mask_dir / f"{wid}.png", colors=DRONEDEPLOY_CLASSES)
            assert np.array_equal(mask, _expected(ids, r, c))  # ids and 255 exactly, magenta and padding included
            photo = np.asarray(Image.open(cut.image_dir / f"{wid}.png"))
            assert photo.shape == (WINDOW[1], WINDOW[0], 3)
            labelled = mask != IGNORE
            want = with_ortho[r * 150:(r + 1) * 150, c * 200:(c + 1) * 200, :3]
            assert np.array_equal(photo[:want.shape[0], :want.shape[1]][labelled[:want.shape[0], :want.shape[1]]],
                                  want[labelled[:want.shape[0], :want.shape[1]]])
    classes = (cut.windows / "classes.csv").read_text().splitlines()
    assert classes[0] == "name,r,g,b" and classes[1:] == [f"{n},{r},{g},{b}" for n, (r, g, b) in
                                                          zip(DRONEDEPLOY_CLASSES.names, DRONEDEPLOY_CLASSES.colors)]


def test_at_twice_the_pixel_the_windows_cover_the_scene_with_half_the_pixels(dd, tmp_path):
    root, rows = dd
    cut = cut_scenes(find_dataset(root), WINDOW, 0.2, cache_dir=tmp_path / "cache")
    assert cut.gsd == 0.2
    scene = next(iter(SCENES))
    ids = LUT[rows[scene]][1::2, 1::2]  # nearest: the source pixel under each coarse pixel's centre
    windows = {rc for wid, rc in _windows(cut).items() if scene_of_window(wid) == scene}
    assert max(c for _, c in windows) == 2 and max(r for r, _ in windows) == 2  # 500x350 pixels in 200x150 windows
    for r, c in windows:
        mask, _ = load_mask(cut.mask_dir / f"{scene}_r{r:03d}_c{c:03d}.png", colors=DRONEDEPLOY_CLASSES)
        assert np.array_equal(mask, _expected(ids, r, c))
    # the photo is averaged over each 2x2 block (area), where all four pixels have data
    with_ortho = _read(root / "images" / f"{scene}-ortho.tif").astype(np.float64)
    photo = np.asarray(Image.open(cut.image_dir / f"{scene}_r001_c001.png")).astype(np.float64)
    area = with_ortho[300:600, 400:800, :3].reshape(150, 2, 200, 2, 3).mean((1, 3))
    assert np.abs(photo - area).max() <= 1


def test_windows_of_a_scene_stay_in_its_split(dd, tmp_path):
    root, _ = dd
    cut = cut_scenes(find_dataset(root), WINDOW, cache_dir=tmp_path / "cache")
    scenes = {name: {scene_of_window(w) for w in read_split(name, cut.splits_dir)} for name in ("train", "val", "test")}
    assert scenes == {name: {s for s, n in SCENES.items() if n == name} for name in scenes}  # the official split
    # the generic layout with GeoTIFF scenes, index masks and no split lists: a seeded split by scene
    own = tmp_path / "own"
    (own / "masks").mkdir(parents=True)
    for i in range(5):
        rows = _scene(own, f"farm_{i}", 400 + 9 * i, 300, seed=i, suffix=".tif")
        Image.fromarray(rows).save(own / "masks" / f"farm_{i}.png")  # 8-bit class rows
    (own / "classes.csv").write_text("name,r,g,b,ignore\n" + "".join(
        f"{n},{r},{g},{b},{int(ig)}\n" for n, (r, g, b), ig in zip(*(getattr(DRONEDEPLOY_CLASSES, a) for a in
                                                                     ("row_names", "row_colors", "row_ignored")))))
    assert find_dataset(own).kind == "scenes"
    sets = import_drone_dataset(own, WINDOW, ("train", "val", "test"), cache=False, cache_dir=tmp_path / "cache")
    by_split = [{scene_of_window(i) for i in s.ids} for s in sets]
    assert all(by_split) and sum(len(s) for s in by_split) == 5 and len(set.union(*by_split)) == 5  # disjoint
    assert sorted(sum((s.ids for s in sets), [])) == sorted(p.stem for p in sets[0].img_path.glob("*.png"))
    _, mask = sets[0][0]
    assert set(np.unique(mask.numpy())) <= set(range(6)) | {IGNORE}  # rows read as in the generic layout


def test_label_rasters_are_read_as_the_generic_layout_reads_masks(tmp_path):
    """Class rows (8-bit), save_mask's class-id palette PNG, another tool's palette PNG and an RGB
    GeoTIFF label on the scene's grid: every window's mask is the label's class ids there."""
    own = tmp_path / "own"
    (own / "masks").mkdir(parents=True)
    (own / "classes.csv").write_text("name,r,g,b,ignore\n" + "".join(
        f"{n},{r},{g},{b},{int(ig)}\n" for n, (r, g, b), ig in
        zip(DRONEDEPLOY_CLASSES.row_names, DRONEDEPLOY_CLASSES.row_colors, DRONEDEPLOY_CLASSES.row_ignored)))
    colours = np.asarray(DRONEDEPLOY_CLASSES.row_colors, np.uint8)
    rows = {}
    for i, kind in enumerate(("rows", "ids", "palette", "geotiff")):
        rows[kind] = _scene(own, kind, 401, 299, seed=i, suffix=".tif")
        if kind == "rows":
            Image.fromarray(rows[kind]).save(own / "masks" / "rows.png")
        elif kind == "ids":
            save_mask(LUT[rows[kind]], own / "masks" / "ids.png", DRONEDEPLOY_CLASSES.colors)
        elif kind == "palette":  # another tool's order: palette index k shows row (k + 3) % 7
            order = [(k + 3) % 7 for k in range(7)]
            im = Image.fromarray(np.argsort(order).astype(np.uint8)[rows[kind]], "P")
            im.putpalette(colours[order].reshape(-1).tolist())
            im.save(own / "masks" / "palette.png")
        else:  # an RGB label GeoTIFF with the scene's georeference
            with rasterio.open(own / "images" / "geotiff.tif") as src:
                crs, transform = src.crs, src.transform
            _write(own / "masks" / "geotiff.tif", colours[rows[kind]].transpose(2, 0, 1), georef=False, crs=crs,
                   transform=transform)
    cut = cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")
    for wid, (r, c) in _windows(cut).items():
        mask, _ = load_mask(cut.mask_dir / f"{wid}.png", colors=DRONEDEPLOY_CLASSES)
        assert np.array_equal(mask, _expected(LUT[rows[scene_of_window(wid)]], r, c)), wid
    assert {scene_of_window(w) for w in _windows(cut)} == set(rows)
    # a GeoTIFF label off its scene's grid is refused
    with rasterio.open(own / "images" / "geotiff.tif") as src:
        shifted = src.transform @ Affine.translation(3, 0)
    _write(own / "masks" / "geotiff.tif", colours[rows["geotiff"]].transpose(2, 0, 1), georef=False, crs=crs,
           transform=shifted)
    with pytest.raises(DatasetError, match=re.escape(f"{own / 'masks' / 'geotiff.tif'}: its georeference differs")):
        cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")


def test_the_cut_is_reused_and_cut_again_when_a_scene_changes(dd, tmp_path):
    root, rows = dd
    cache = tmp_path / "cache"
    cut = cut_scenes(find_dataset(root), WINDOW, cache_dir=cache)
    files = {p: p.stat().st_mtime_ns for p in cut.windows.rglob("*") if p.is_file()}
    again = cut_scenes(find_dataset(root), WINDOW, cache_dir=cache)
    assert again == cut and {p: p.stat().st_mtime_ns for p in cut.windows.rglob("*") if p.is_file()} == files
    # another label for one scene: that scene is cut again, the others' windows are kept as they were
    changed = tmp_path / "dd2"
    shutil.copytree(root, changed)
    scene, other = list(SCENES)[:2]
    new_rows = rows[scene].copy()
    new_rows[100:160, 300:400] = 0  # a building
    label = changed / "labels" / f"{scene}-label.png"
    first = cut_scenes(find_dataset(changed), WINDOW, cache_dir=cache)
    kept = {p.name: p.stat().st_ino for p in first.mask_dir.glob(f"{other}_*.png")}
    Image.fromarray(np.asarray(DRONEDEPLOY_CLASSES.row_colors, np.uint8)[new_rows]).save(label)
    second = cut_scenes(find_dataset(changed), WINDOW, cache_dir=cache)
    assert second.windows == first.windows
    mask, _ = load_mask(second.mask_dir / f"{scene}_r000_c001.png", colors=DRONEDEPLOY_CLASSES)
    assert np.array_equal(mask, _expected(LUT[new_rows], 0, 1))
    assert {p.name: p.stat().st_ino for p in second.mask_dir.glob(f"{other}_*.png")} == kept  # linked, not cut
    assert not [p for p in cache.rglob(".*")]  # no temporary folder left behind


def test_a_short_run_stores_its_training_gsd_for_predict(tmp_path, capsys, monkeypatch):
    root, _ = _dd_root(tmp_path, sizes=(200, 150))
    common = ["--data-root", str(root), "--model", "single_conv", "--epochs", "1", "--train-size", "64x64",
              "--crop", "64", "--no-pretrained", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache")]
    assert run_experiment.main(common + ["--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "4 scene(s) as" in said and "at 0.1 m" in said
    assert load_checkpoint(tmp_path / "a" / "best.pt")["meta"]["train_gsd"] == pytest.approx(PIXEL)
    assert ortho.checkpoint_train_gsd(tmp_path / "a" / "best.pt") == pytest.approx(PIXEL)
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["eval_split"] == "test" and m["classes"] == list(DRONEDEPLOY_CLASSES.names)
    assert {scene_of_window(i) for i in m["per_image"]} == {"12fa5e614f_53197F206FOPENPIPELINE"}
    # re-scored: the same windows and split, read back through the checkpoint
    assert run_experiment.main(["--eval-only", "--checkpoint", str(tmp_path / "a" / "best.pt"),
                                *common[:2], "--cache-dir", str(tmp_path / "cache")]) == 0
    # another GSD: stored as given; resuming with another one stops before anything is cut
    assert run_experiment.main(common + ["--train-gsd", "0.2", "--out", str(tmp_path / "b")]) == 0
    assert ortho.checkpoint_train_gsd(tmp_path / "b" / "best.pt") == pytest.approx(0.2)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["train_gsd_m"] == 0.2
    # predict.py runs an orthomosaic at the checkpoint's training GSD, no --gsd needed
    scene = root / "images" / f"{next(iter(SCENES))}-ortho.tif"
    assert predict.main(["--checkpoint", str(tmp_path / "b" / "best.pt"), "--input", str(scene),
                         "--out", str(tmp_path / "maps")]) == 0
    areas = json.loads((tmp_path / "maps" / f"{scene.stem}_areas.json").read_text())
    assert areas["model_grid_size"] == [100, 75] and areas["output_size"] == [200, 150]
    capsys.readouterr()
    assert run_experiment.main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "resume with --train-gsd 0.2" in capsys.readouterr().err
    # int8 calibration on the scene root: windows of the training size at the run's GSD, from the cut it trained on
    import datautils
    import export
    scenes_dir = tmp_path / "cache" / "scenes"
    cuts = sorted(p.name for p in scenes_dir.iterdir() if p.is_dir())
    made, calib = [], []
    real_cut, real_calib = datautils.cut_scenes, export.calibration_inputs
    monkeypatch.setattr(datautils, "cut_scenes", lambda *a, **k: made.append(real_cut(*a, **k)) or made[-1])
    monkeypatch.setattr(export, "calibration_inputs", lambda *a, **k: calib.extend(real_calib(*a, **k)) or calib)
    assert export.main([str(tmp_path / "b" / "best.pt"), "--out", str(tmp_path / "m.onnx"), "--int8",
                        "--calib-root", str(root), "--calib", "3"]) == 0
    assert made and all(c.gsd == 0.2 and c.windows.name in cuts for c in made) and len(calib) == 3
    assert all(x.shape == (1, 3, 64, 64) for x in calib)  # the checkpoint's eval size
    assert sorted(p.name for p in scenes_dir.iterdir() if p.is_dir()) == cuts  # no second cut
    # the README's figure on scenes: the windows of the run too
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import example_figure
    made.clear()
    assert example_figure.main(["--checkpoint", str(tmp_path / "b" / "best.pt"), "--data-root", str(root),
                                "--out", str(tmp_path / "fig.jpg"), "--width", "300",
                                "--cache-dir", str(tmp_path / "cache")]) == 0
    assert made and all(c.gsd == 0.2 and c.windows.name in cuts for c in made)
    assert sorted(p.name for p in scenes_dir.iterdir() if p.is_dir()) == cuts
    # other scene lists than the run's: re-scoring stops, naming the scene lists (not the windows' lists)
    (root / "splits").mkdir()
    for name, ids in (("train", list(SCENES)[:2]), ("val", list(SCENES)[3:]), ("test", list(SCENES)[2:3])):
        (root / "splits" / f"{name}.txt").write_text("".join(f"{s}\n" for s in ids))
    rescore = ["--eval-only", "--checkpoint", str(tmp_path / "a" / "best.pt"), *common[:2], "--cache-dir",
               str(tmp_path / "cache")]
    capsys.readouterr()
    assert run_experiment.main(rescore) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress bars may come before it
    assert err.count("error") == 1 and "scene lists" in last and "pass the split lists of its run" not in last, err
    shutil.rmtree(root / "splits")
    # the scenes replaced by ones of another pixel size (5 cm): re-scoring or resuming at that scale stops
    for i, scene in enumerate(SCENES):
        _scene(root, scene, 200 - 37 * i, 150 - 23 * i, seed=i, pixel=PIXEL / 2)
    for argv in (rescore, common + ["--out", str(tmp_path / "a"), "--resume"]):
        assert run_experiment.main(argv) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]
        assert err.count("error") == 1 and "0.05 m" in last and "0.1 m" in last, err


def test_bad_scenes_stop_with_one_line_naming_the_file(tmp_path, capsys):
    root, _ = _dd_root(tmp_path, sizes=(160, 120))
    scene = list(SCENES)[1]
    label = root / "labels" / f"{scene}-label.png"
    Image.open(label).crop((0, 0, 159, 120)).save(label)  # one column short
    with pytest.raises(DatasetError) as e:
        cut_scenes(find_dataset(root), (64, 64), cache_dir=tmp_path / "cache")
    assert len(str(e.value).splitlines()) == 1 and str(label) in str(e.value) and "159x120" in str(e.value)
    assert run_experiment.main(["--data-root", str(root), "--model", "single_conv", "--epochs", "1", "--train-size",
                                "64x64", "--no-pretrained", "--cache-dir", str(tmp_path / "cache"),
                                "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(label) in err and not (tmp_path / "o").exists()
    assert not list((tmp_path / "cache" / "scenes").glob(".*"))  # nothing half-written
    label.unlink()  # a scene without its label
    with pytest.raises(DatasetError, match=f"{scene}-ortho.tif: scene {scene} has no label raster"):
        cut_scenes(find_dataset(root), (64, 64), cache_dir=tmp_path / "cache")
    Image.new("RGB", (160 - 37, 120 - 23), DRONEDEPLOY_CLASSES.row_colors[MAGENTA]).save(label)  # all IGNORE
    with pytest.raises(DatasetError, match=re.escape(f"{label}: no window of scene {scene} holds a labelled pixel")):
        cut_scenes(find_dataset(root), (64, 64), cache_dir=tmp_path / "cache")
    image = root / "images" / f"{scene}-ortho.tif"
    image.write_bytes(b"not a raster")
    with pytest.raises(DatasetError) as e:
        cut_scenes(find_dataset(root), (64, 64), cache_dir=tmp_path / "cache")
    assert str(e.value).startswith(f"{image}: cannot read this scene raster") and len(str(e.value).splitlines()) == 1


def test_train_gsd_is_for_scenes_only(demo_root, tmp_path, capsys):
    argv = ["--data-root", str(demo_root), "--model", "single_conv", "--epochs", "1", "--train-size", "48x32",
            "--train-gsd", "0.1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    assert run_experiment.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds photos, not georeferenced scenes" in err
    assert not (tmp_path / "o").exists()


def test_scenes_of_other_pixel_sizes_need_a_training_gsd_and_plain_tiffs_work_in_pixels(tmp_path, capsys):
    root, _ = _dd_root(tmp_path, sizes=(160, 120))
    scene = list(SCENES)[2]
    _scene(root, scene, 160 - 37 * 2, 120 - 23 * 2, seed=2, pixel=0.05)  # the same pixels at 5 cm
    with pytest.raises(DatasetError) as e:
        cut_scenes(find_dataset(root), (64, 64), cache_dir=tmp_path / "cache")
    assert len(str(e.value).splitlines()) == 1 and f"{scene}-ortho.tif: 0.05 m" in str(e.value) and \
        "--train-gsd" in str(e.value)
    assert cut_scenes(find_dataset(root), (64, 64), 0.1, cache_dir=tmp_path / "cache").gsd == 0.1
    plain, _ = _dd_root(tmp_path / "plain", sizes=(160, 120), georef=False)
    cut = cut_scenes(find_dataset(plain), (64, 64), cache_dir=tmp_path / "cache")
    assert cut.gsd is None and "no training GSD is stored" in capsys.readouterr().out


# --------------------------------------------------------------------------- review fixes


def _own_root(tmp_path, name: str = "own") -> Path:
    """An empty generic scene root: images/, masks/ and the DroneDeploy classes as classes.csv."""
    own = tmp_path / name
    (own / "masks").mkdir(parents=True)
    (own / "images").mkdir()
    (own / "classes.csv").write_text("name,r,g,b,ignore\n" + "".join(
        f"{n},{r},{g},{b},{int(ig)}\n" for n, (r, g, b), ig in
        zip(DRONEDEPLOY_CLASSES.row_names, DRONEDEPLOY_CLASSES.row_colors, DRONEDEPLOY_CLASSES.row_ignored)))
    return own


def _label_tif(own, scene: str, rows: np.ndarray, **profile):
    """masks/<scene>.tif: one band of class rows on the scene's georeference."""
    with rasterio.open(own / "images" / f"{scene}.tif") as src:
        crs, transform = src.crs, src.transform
    return _write(own / "masks" / f"{scene}.tif", rows[None], georef=False, crs=crs, transform=transform, **profile)


def test_labels_with_overviews_are_read_at_full_resolution_when_shrinking(tmp_path):
    """GDAL reads a shrunken window from an overview even when nearest is asked: an average
    overview of rows 0 and 4 holds 2, a class no pixel has. Labels are read without overviews."""
    from rasterio.enums import Resampling

    own = _own_root(tmp_path)
    _scene(own, "s", 400, 300, seed=0, suffix=".tif")
    rows = np.zeros((300, 400), np.uint8)
    rows[1::2] = 4  # alternating rows of class 0 and class 4
    label = _label_tif(own, "s", rows)
    with rasterio.open(label, "r+") as dst:
        dst.build_overviews([2], Resampling.average)
    cut = cut_scenes(find_dataset(own), WINDOW, 2 * PIXEL, cache_dir=tmp_path / "cache")
    (wid,) = _windows(cut)  # 400x300 at twice the pixel: one 200x150 window
    mask, _ = load_mask(cut.mask_dir / f"{wid}.png", colors=DRONEDEPLOY_CLASSES)
    assert set(np.unique(mask)) <= {0, 4, IGNORE} and (mask == 4).any()
    labelled = mask != IGNORE
    assert np.array_equal(mask[labelled], LUT[rows[1::2, 1::2]][labelled])  # nearest: the odd rows, class 4


def _mercator_y(lat: float) -> float:
    """Web Mercator northing of a latitude (degrees)."""
    return 6378137.0 * np.log(np.tan(np.pi / 4 + np.radians(lat) / 2))


def test_web_mercator_units_become_ground_metres_alike_in_cutting_and_predicting(tmp_path):
    """EPSG:3857 units are metres only at the equator: at 45° a 0.1-unit pixel covers 0.0707 m of
    ground. Cutting (datautils) and predicting (ortho) use the one helper (layout.metres_per_unit)."""
    import datautils
    import layout

    own = _own_root(tmp_path)
    w, h = 240, 180
    rows = _rows(w, h, seed=3)
    colours = np.asarray(DRONEDEPLOY_CLASSES.row_colors, np.uint8)[rows]
    transform = Affine(0.1, 0, 1e6, 0, -0.1, _mercator_y(45.0) + 9.0)  # centred on 45° N
    scene = _write(own / "images" / "merc.tif", colours.transpose(2, 0, 1), georef=False, crs="EPSG:3857",
                   transform=transform, photometric="RGB")
    Image.fromarray(rows).save(own / "masks" / "merc.png")
    want = 0.1 * np.cos(np.radians(45.0))
    with rasterio.open(scene) as src:
        cut_gsd = datautils._raster_gsd(src)
        predict_gsd = ortho._gsd_of(src, ortho._Grid(1.0, 1.0, w, h), ortho._metres_per_unit(src))
        assert cut_gsd == pytest.approx((want, want), rel=1e-4)
        assert (predict_gsd["x"], predict_gsd["y"]) == pytest.approx(cut_gsd, rel=1e-12)
        assert layout.metres_per_unit(src) == pytest.approx((want / 0.1, want / 0.1), rel=1e-4)
    assert cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache").gsd == pytest.approx(want, rel=1e-4)
    # UTM (a Transverse Mercator) keeps its metres; degrees are about 111 km, x shrunk by cos(latitude)
    with rasterio.open(_write(tmp_path / "utm.tif", np.zeros((3, 8, 8), np.uint8))) as src:
        assert layout.metres_per_unit(src) == (1.0, 1.0)
    with rasterio.open(_write(tmp_path / "deg.tif", np.zeros((3, 8, 8), np.uint8), georef=False, crs="EPSG:4326",
                              transform=Affine(1e-6, 0, 15.0, 0, -1e-6, 60.0))) as src:
        assert layout.metres_per_unit(src) == pytest.approx((111_320 * 0.5, 111_320), rel=1e-4)


def test_a_changed_sidecar_file_cuts_the_scenes_again(tmp_path, monkeypatch, capsys):
    """Not only the .tif and the label: every file GDAL reads for them (.aux.xml, world files,
    .ovr) signs the cut; and the cut's key is the resolved root (a relative path finds the same cut)."""
    import dataclasses

    own = _own_root(tmp_path)
    rows = _scene(own, "s", 300, 200, seed=1, suffix=".tif")
    Image.fromarray(rows).save(own / "masks" / "s.png")
    cache = tmp_path / "cache"
    cut = cut_scenes(find_dataset(own), WINDOW, cache_dir=cache)
    monkeypatch.chdir(tmp_path)
    relative = dataclasses.replace(find_dataset(own), root=own.relative_to(tmp_path))
    capsys.readouterr()
    assert cut_scenes(relative, WINDOW, cache_dir=cache).windows == cut.windows
    assert "reused from" in capsys.readouterr().out
    (own / "masks" / "s.png.aux.xml").write_text('<PAMDataset><Metadata><MDI key="note">x</MDI></Metadata>'
                                                 '</PAMDataset>')
    assert cut_scenes(find_dataset(own), WINDOW, cache_dir=cache).windows == cut.windows
    assert "cut in" in capsys.readouterr().out  # a sidecar added: cut again
    with rasterio.open(own / "images" / "s.tif") as src:
        t = src.transform
    # a world file beside the label, on the scene's grid (world files name the centre of the first pixel)
    (own / "masks" / "s.pgw").write_text(f"{t.a}\n0\n0\n{t.e}\n{t.c + t.a / 2}\n{t.f + t.e / 2}\n")
    cut_scenes(find_dataset(own), WINDOW, cache_dir=cache)
    assert "cut in" in capsys.readouterr().out
    cut_scenes(find_dataset(own), WINDOW, cache_dir=cache)
    assert "reused from" in capsys.readouterr().out


def test_label_nodata_is_ignored_not_class_zero(tmp_path):
    """A label GeoTIFF with nodata=0: its 0 pixels carry no label (255), though row 0 is a class;
    a nodata value that is no class row (200) is not read as one. The photo keeps its pixels there."""
    own = _own_root(tmp_path)
    rows = _scene(own, "s", 200, 150, seed=4, suffix=".tif")
    assert (rows == 0).any()
    _label_tif(own, "s", rows, nodata=0)
    cut = cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")
    mask, _ = load_mask(cut.mask_dir / "s_r000_c000.png", colors=DRONEDEPLOY_CLASSES)
    assert np.array_equal(mask, np.where(rows == 0, IGNORE, LUT[rows]))
    scene = _read(own / "images" / "s.tif")
    photo = np.asarray(Image.open(cut.image_dir / "s_r000_c000.png"))
    has_data = scene[..., 3] > 0
    assert np.array_equal(photo[has_data], scene[..., :3][has_data])  # not blacked out where unlabelled
    holes = rows.copy()
    holes[50:60, 50:150] = 200
    _label_tif(own, "s", holes, nodata=200)
    cut = cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")
    mask, _ = load_mask(cut.mask_dir / "s_r000_c000.png", colors=DRONEDEPLOY_CLASSES)
    assert np.array_equal(mask, np.where(holes == 200, IGNORE, LUT[rows]))


def test_a_recut_never_writes_through_a_link_into_the_live_cut_and_leftovers_are_removed(dd, tmp_path):
    import os
    import subprocess

    root = tmp_path / "dd"
    shutil.copytree(dd[0], root)
    cache = tmp_path / "cache"
    cut = cut_scenes(find_dataset(root), WINDOW, cache_dir=cache)
    scene, other = list(SCENES)[:2]
    photos = sorted(cut.image_dir.glob(f"{scene}_*.png"))
    live = {p.name: p.stat().st_ino for p in photos[:-1]}
    photos[-1].unlink()  # one window of an unchanged scene gone: its others were linked before that was noticed
    # leftovers of killed cuts (a dead process's) and of a running one (alive: kept)
    child = subprocess.Popen(["true"])
    child.wait()
    from datautils import _HOST
    dead = [cache / "scenes" / f".{cut.windows.name}.{kind}-{_HOST}-{child.pid}" for kind in ("tmp", "old")]
    alive = cache / "scenes" / f".{cut.windows.name}.tmp-{_HOST}-{os.getppid()}"
    elsewhere = cache / "scenes" / f".{cut.windows.name}.tmp-another-host-{child.pid}"  # may be live there
    for d in (*dead, alive, elsewhere):
        (d / "images").mkdir(parents=True)
    label = root / "labels" / f"{other}-label.png"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # the other scene "changed"
    again = cut_scenes(find_dataset(root), WINDOW, cache_dir=cache)
    assert all((again.image_dir / name).stat().st_ino != ino for name, ino in live.items())  # new files, not links
    assert not any(d.exists() for d in dead) and alive.is_dir() and elsewhere.is_dir()


def test_two_files_of_one_id_stop_with_both_named(tmp_path):
    from layout import list_by_id

    own = _own_root(tmp_path)
    rows = _scene(own, "s", 200, 150, seed=1, suffix=".tif")
    Image.fromarray(rows).save(own / "masks" / "s.png")
    _label_tif(own, "s", rows)
    with pytest.raises(DatasetError) as e:
        cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(own / "masks" / "s.png") in msg and str(own / "masks" / "s.tif") in msg
    # photos too: a.jpg and a.png in one folder are one id
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(DatasetError, match=re.escape(f"{folder / 'a.jpg'} and {folder / 'a.png'}")):
        list_by_id(folder, (".jpg", ".png"))


def test_a_scene_listed_twice_stops(dd, tmp_path):
    root = tmp_path / "dd"
    shutil.copytree(dd[0], root)
    (root / "splits").mkdir()
    for name in ("train", "val", "test"):
        ids = [s for s, n in SCENES.items() if n == name]
        (root / "splits" / f"{name}.txt").write_text("".join(f"{s}\n" for s in ids + ids[:1] * (name == "train")))
    with pytest.raises(DatasetError) as e:
        cut_scenes(find_dataset(root), WINDOW, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(root / "splits" / "train.txt") in msg and "twice" in msg


def test_processes_cutting_the_same_scenes_take_turns(tmp_path):
    """While another holds the cut's lock (an exclusive flock on scenes/NAME.lock), a cut waits."""
    import fcntl
    import os
    import threading

    own = _own_root(tmp_path)
    Image.fromarray(_scene(own, "s", 200, 150, seed=1, suffix=".tif")).save(own / "masks" / "s.png")
    cache = tmp_path / "cache"
    name = cut_scenes(find_dataset(own), WINDOW, cache_dir=cache).windows.name
    fd = os.open(cache / "scenes" / f"{name}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process cutting would hold it
    done = threading.Event()
    worker = threading.Thread(target=lambda: (cut_scenes(find_dataset(own), WINDOW, cache_dir=cache), done.set()))
    worker.start()
    try:
        assert not done.wait(0.5)  # waits for the lock, even to reuse the cut
    finally:
        os.close(fd)
    worker.join(30)
    assert done.is_set()


def test_a_png_labels_transparent_entry_is_its_class_not_no_label(tmp_path):
    """GDAL reads a palette PNG's transparent entry (tRNS) as nodata; the mask reader reads that
    entry as its class row, so the cut must too (not 255)."""
    own = _own_root(tmp_path)
    rows = _scene(own, "s", 200, 150, seed=1, suffix=".tif")
    im = Image.fromarray(rows.astype(np.uint8), mode="L").convert("P")
    colours = [c for c in DRONEDEPLOY_CLASSES.row_colors] + [(i, i, 0) for i in range(7, 256)]
    im.putpalette([v for c in colours for v in c])  # entry = row: read by value or by colour alike
    im.save(own / "masks" / "s.png", transparency=0)
    cut = cut_scenes(find_dataset(own), WINDOW, cache_dir=tmp_path / "cache")
    got = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted(cut.mask_dir.glob("*.png"))])
    assert (got == 0).any()  # row 0's pixels are class 0, as load_mask reads the file
