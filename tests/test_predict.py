"""predict.py over a folder: palette masks, the pipeline, skip/resume, bad photos, and the strip upsampler."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import predict
from basics import CLASS_COLORS, InputError
from layout import DRONE_CLASSES, DatasetError
from datautils import load_mask, load_photo, save_mask
from transforms import normalize
from evaluate import upsample_labels
from models import SingleConvolution
from checkpoint import save_checkpoint


def test_palette_mask_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 23, (37, 53)).astype(np.uint8)
    save_mask(ids, tmp_path / "m.png")
    back, size = load_mask(tmp_path / "m.png")
    assert size == (53, 37) and np.array_equal(back, ids)
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P"  # one file: the ids are the pixels, the colours are the palette
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(CLASS_COLORS, np.uint8)[ids])
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary file left


def _ignored_first(n=4):
    from layout import ClassSet

    return ClassSet(("unlabelled",) + tuple(f"c{i}" for i in range(n)),
                    ((0, 0, 0), (128, 64, 128), (0, 102, 0), (28, 42, 168), (70, 70, 70))[:n + 1],
                    (True,) + (False,) * n)


def test_palette_masks_read_back_as_ids_whatever_the_class_file(tmp_path):
    """A class file whose first row is ignored: predicted ids 0..3 are rows 1..4. save_mask's
    palette PNG must read back as those ids (not as rows: [255 0 1 2]), with that class file and
    without one; 255 (ignored) stays 255."""
    classes = _ignored_first()
    ids = np.random.default_rng(1).integers(0, 4, (9, 11)).astype(np.uint8)
    ids[0, :3] = 255
    save_mask(ids, tmp_path / "m.png", classes.colors)
    for colors in (classes, None):
        back, _ = load_mask(tmp_path / "m.png", colors=colors)
        assert np.array_equal(back, ids)
    rgb = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    assert np.array_equal(rgb[ids != 255], np.asarray(classes.colors, np.uint8)[ids[ids != 255]])


def test_a_palette_mask_of_other_tools_is_read_by_its_colours(tmp_path):
    """A P-mode colour mask (another tool's) whose palette lists the class colours in another
    order than classes.csv: its pixels are palette indices, so only the colours say the class.
    A palette of plain greys (index i shown as grey i) holds class-file rows, as an 8-bit mask."""
    classes = _ignored_first()
    rows = np.random.default_rng(2).integers(0, 5, (8, 10)).astype(np.uint8)  # class-file rows
    order = [3, 0, 4, 1, 2]  # palette entry k holds the colour of row order[k]
    inverse = np.argsort(order).astype(np.uint8)
    im = Image.fromarray(inverse[rows], "L").convert("P")
    im.putpalette(np.asarray([classes.row_colors[r] for r in order], np.uint8).tobytes())
    im.save(tmp_path / "shuffled.png")
    back, _ = load_mask(tmp_path / "shuffled.png", colors=classes)
    assert np.array_equal(back, classes.row_to_id()[rows])
    Image.fromarray(rows, "L").convert("P").save(tmp_path / "grey.png")  # a greyscale palette: the values are rows
    back, _ = load_mask(tmp_path / "grey.png", colors=classes)
    assert np.array_equal(back, classes.row_to_id()[rows])
    bad = Image.fromarray(rows, "L").convert("P")
    bad.putpalette(bytes([9, 9, 9] * 5))
    bad.save(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match="bad.png.*RGB\\(9, 9, 9\\)"):
        load_mask(tmp_path / "bad.png", colors=classes)


def test_a_padded_palette_is_read_by_its_colours_also_where_one_index_is_used(tmp_path):
    """Another tool's palette: black, then the first class's colour, padded with black to 256
    entries. A tile of only index 0 (all background) is the same colours as any other tile, not
    class-file rows; index 255, a padding entry, is void, not the black class."""
    from layout import ClassSet
    classes = ClassSet(("building", "background", "road"), ((128, 0, 0), (0, 0, 0), (50, 50, 50)))
    palette = bytes([0, 0, 0, 128, 0, 0, 50, 50, 50]) + bytes(3 * 253)
    for name, values, want in (("empty", [[0, 0], [0, 0]], [[1, 1], [1, 1]]),
                               ("mixed", [[0, 1], [2, 255]], [[1, 0], [2, 255]])):
        im = Image.fromarray(np.asarray(values, np.uint8), "L").convert("P")
        im.putpalette(palette)
        im.save(tmp_path / f"{name}.png")
        back, _ = load_mask(tmp_path / f"{name}.png", colors=classes)
        assert back.tolist() == want, name


def _smooth_logits(c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, max(2, h // 8), max(2, w // 8), generator=g) * 3
    return F.interpolate(coarse, size=(h, w), mode="bilinear")[0] + 0.05 * torch.randn(c, h, w, generator=g)


@pytest.mark.parametrize("shape,size", [((23, 40, 60), (400, 600)), ((23, 40, 60), (137, 251)),
                                        ((7, 33, 17), (20, 9)), ((23, 40, 60), (40, 60)), ((5, 1, 9), (6, 31))])
def test_upsample_labels_matches_interpolate_at_any_ratio(shape, size):
    logits = _smooth_logits(*shape, seed=sum(size))
    want = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    got = upsample_labels(logits, size)
    assert got.dtype == torch.uint8 and got.shape == size
    diff = got.long() != want.argmax(0)
    top2 = want.topk(2, dim=0).values
    assert bool(((top2[0] - top2[1])[diff] < 1e-4).all())  # only near-ties may differ
    assert torch.equal(got, upsample_labels(logits, size, strip=7))  # strips change nothing


RATIOS = [2, 3, 4, 5, 5 / 3, 10]


def _assert_argmax_of_interpolate(logits, size):
    """Labels equal F.interpolate + argmax, whose tie rule is argmax's: an exact tie goes to the
    lower class id. Pixels may differ only where two classes' interpolated scores lie within float
    rounding of each other (the two sides round differently there)."""
    got = upsample_labels(logits, size)
    want = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    diff = got.long() != want.argmax(0)
    top2 = want.topk(2, dim=0).values
    assert bool(((top2[0] - top2[1])[diff] <= 1e-5 * top2[0][diff].abs().clamp(min=1)).all())
    assert int(diff.sum()) <= max(8, diff.numel() // 1000)  # and such pixels are rare
    return got, want.argmax(0)


@pytest.mark.parametrize("ratio", RATIOS)
def test_upsample_labels_with_bf16_ties(ratio):
    # bf16 logits (the CUDA autocast path) tie exactly all the time, also at the logit columns an odd
    # ratio puts output pixels on
    logits = _smooth_logits(23, 24, 36, seed=7).bfloat16().float()
    _assert_argmax_of_interpolate(logits, (round(24 * ratio), round(36 * ratio)))


@pytest.mark.parametrize("ratio", RATIOS)
def test_upsample_labels_with_relu_zero_ties(ratio):
    # SingleConvolution ends in a ReLU: many classes are exactly 0 at many pixels
    logits = F.relu(_smooth_logits(23, 24, 36, seed=8) - 1.0)
    got, want = _assert_argmax_of_interpolate(logits, (round(24 * ratio), round(36 * ratio)))
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("ratio", [3, 5])
@pytest.mark.parametrize("low_left", [True, False])
def test_an_exact_tie_on_a_logit_column_goes_to_the_lower_class(ratio, low_left):
    # classes 1 and 2 tie exactly at the middle column, where an odd ratio puts an output pixel;
    # the left class wins the segment before it, the right one the segment after
    left, right = (1, 2) if low_left else (2, 1)
    logits = torch.zeros(3, 1, 3)
    logits[left, 0, :] = torch.tensor([2.0, 1.0, 0.0])
    logits[right, 0, :] = torch.tensor([0.0, 1.0, 2.0])
    got = upsample_labels(logits, (1, 3 * ratio))
    want = F.interpolate(logits[None], size=(1, 3 * ratio), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(got.long(), want)
    assert got[0, 3 * ratio // 2] == 1  # the pixel on the tie: the lower class id


def test_upsample_labels_finds_a_class_that_wins_only_between_two_columns():
    # class 0 wins on the left column, 1 on the right, class 2 (second at both ends) in the middle
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [3.0, 3.0]]).view(3, 1, 2)
    got = upsample_labels(logits, (1, 40))
    want = F.interpolate(logits[None], size=(1, 40), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(got.long(), want) and 2 in got.tolist()[0]


def _photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "flight"
    folder.mkdir()
    for name, (w, h) in (("a", (96, 64)), ("b", (96, 64)), ("c", (120, 80)), ("d", (64, 96))):  # d: portrait
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("not a photo")
    torch.manual_seed(0)
    model = SingleConvolution()
    save_checkpoint(tmp_path / "m.pt", model=model.state_dict(), model_name="single_conv", model_kwargs={},
                    size=[48, 32])
    return folder, model.eval()


def _expected(model, path, size):
    full, (fw, fh) = load_photo(path)
    w, h = size if fw >= fh else size[::-1]
    small, _ = load_photo(path, (w, h))
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(small.transpose(2, 0, 1).copy())[None]))[0]
    return upsample_labels(logits, (fh, fw)).numpy()


def test_predict_folder_writes_masks_reports_bad_photos_and_goes_on(tmp_path, capsys):
    folder, model = _photos(tmp_path)
    out = tmp_path / "out"
    rc = predict.main(["--checkpoint", str(tmp_path / "m.pt"), "--input", str(folder), "--out", str(out),
                       "--batch-size", "2"])
    assert rc == 1  # one photo failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 photo(s) failed" in err
    for name in "abcd":
        photo = folder / f"{name}.jpg"
        labels, size = load_mask(out / f"{name}_mask.png")
        assert size == Image.open(photo).size  # full size, portrait included
        assert np.array_equal(labels, _expected(model, photo, (48, 32)))
        assert Image.open(out / f"{name}_overlay.jpg").size == size
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}_mask.png" for n in "abcd"] + [f"{n}_overlay.jpg" for n in "abcd"])  # nothing half-written


def test_batches_and_threads_do_not_change_the_masks(tmp_path):
    folder, model = _photos(tmp_path)
    (folder / "broken.jpg").unlink()
    photos = predict.list_photos(folder)
    one = predict.predict_folder(model, photos, tmp_path / "one", (48, 32), batch_size=1, workers=1,
                                 overlay=False, progress=False)
    many = predict.predict_folder(model, photos, tmp_path / "many", (48, 32), batch_size=4, workers=3,
                                  overlay=False, progress=False)
    assert len(one["written"]) == len(many["written"]) == 4 and not many["failed"]
    for p in photos:
        a = np.asarray(Image.open(tmp_path / "one" / f"{p.stem}_mask.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "many" / f"{p.stem}_mask.png")))
    assert not list((tmp_path / "many").glob("*_overlay.jpg"))  # --no-overlay


def test_skip_existing_continues_an_interrupted_folder(tmp_path):
    folder, model = _photos(tmp_path)
    (folder / "broken.jpg").unlink()
    args = ["--checkpoint", str(tmp_path / "m.pt"), "--input", str(folder), "--out", str(tmp_path / "o")]
    assert predict.main(args) == 0
    (tmp_path / "o" / "c_overlay.jpg").unlink()  # as if the run was killed while writing c
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    calls = []
    real = predict._read
    predict._read = lambda path, size: calls.append(path.name) or real(path, size)
    try:
        assert predict.main(args + ["--skip-existing"]) == 0
    finally:
        predict._read = real
    assert calls == ["c.jpg"]  # only the photo with a missing output is predicted again
    assert (tmp_path / "o" / "c_overlay.jpg").exists()
    assert all((tmp_path / "o" / n).stat().st_mtime_ns == t for n, t in stamps.items() if not n.startswith("c"))


def test_predict_rejects_bad_options(tmp_path, capsys):
    folder, _ = _photos(tmp_path)
    args = ["--checkpoint", str(tmp_path / "m.pt"), "--input", str(folder), "--out", str(tmp_path / "o")]
    assert predict.main(args + ["--quality", "0"]) == 2
    assert "--quality 0" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(tmp_path / "m.pt"), "--input", str(tmp_path / "none"),
                         "--out", str(tmp_path / "o")]) == 2


def test_scoring_against_larger_masks_uses_the_strip_upsampler(demo_root, monkeypatch):
    import evaluate
    from datautils import import_drone_dataset
    from evaluate import ModelEvaluation, resize_predictor
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 23, 3, padding=1)
    big = import_drone_dataset(demo_root, (96, 64), "val", normalize=False, cache=False)
    full = ModelEvaluation(model, big, device="cpu", predict=resize_predictor((48, 32)))  # full-size logits
    full.evaluate_all(progress=False)
    calls = []
    real = evaluate.upsample_labels
    monkeypatch.setattr(evaluate, "upsample_labels", lambda lg, size: calls.append(size) or real(lg, size))
    strips = ModelEvaluation(model, big, device="cpu", predict=resize_predictor((48, 32), upsample=False))
    strips.evaluate_all(progress=False)
    assert calls and set(calls) == {(64, 96)}
    assert torch.equal(full.confusion, strips.confusion)


def test_two_photos_with_one_stem_are_refused_by_name(tmp_path, capsys):
    folder, _ = _photos(tmp_path)
    (folder / "broken.jpg").unlink()
    Image.open(folder / "a.jpg").save(folder / "a.png")  # a.jpg and a.png would both write a_mask.png
    out = tmp_path / "out"
    rc = predict.main(["--checkpoint", str(tmp_path / "m.pt"), "--input", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(folder / "a.jpg") in err and str(folder / "a.png") in err
    assert not out.exists() or not list(out.iterdir())


def test_stems_that_differ_only_in_case_are_refused(tmp_path):
    """a.jpg and A.JPG write a_mask.png and A_mask.png: one file on a case-insensitive file system
    (Windows, macOS), so one result would be lost without a word."""
    folder, _ = _photos(tmp_path)
    Image.open(folder / "b.jpg").save(folder / "A.JPG")
    with pytest.raises(InputError, match="would write the same") as e:
        predict.list_photos(folder)
    assert str(folder / "A.JPG") in str(e.value) and str(folder / "a.jpg") in str(e.value)


def test_a_checkpoint_holding_pickled_objects_gives_one_line_and_exit_2(tmp_path, capsys):
    import argparse

    folder, model = _photos(tmp_path)
    bad = tmp_path / "pickled.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, bad)
    rc = predict.main(["--checkpoint", str(bad), "--input", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err


class _Counting(torch.nn.Module):
    """SingleConvolution that runs ``on_call(n)`` before its n-th forward (1-based)."""

    def __init__(self, on_call):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.on_call, self.calls = SingleConvolution(), on_call, 0

    def forward(self, x):
        self.calls += 1
        self.on_call(self.calls)
        return self.net(x)


def test_a_model_failure_and_failed_photos_have_distinct_exit_codes(tmp_path, monkeypatch, capsys):
    folder, _ = _photos(tmp_path)  # holds broken.jpg: exit code 1
    def oom(n):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(predict, "load_model",
                        lambda path, device: (_Counting(oom), (48, 32), {"model_name": "x", "classes": DRONE_CLASSES}))
    rc = predict.main(["--checkpoint", "x.pt", "--input", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == predict.EXIT_MODEL_FAILED == 3 and "out of memory" in err.splitlines()[-1]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_second_ctrl_c_leaves_no_temporary_files(tmp_path, monkeypatch):
    import threading

    from basics import atomic_write

    folder, _ = _photos(tmp_path)
    (folder / "broken.jpg").unlink()
    out = tmp_path / "out"
    holding, release = threading.Event(), threading.Event()

    def slow_write(item, labels, out, *args):  # a writer caught in the middle of writing a mask
        with atomic_write(out / f"{item.path.stem}_mask.png") as tmp:
            tmp.write_bytes(b"half a png")
            holding.set()
            release.wait(30)

    def ctrl_c(n):  # the first Ctrl-C, while the writer holds its temporary file
        if n == 2:
            holding.wait(30)
            raise KeyboardInterrupt

    real_join, pressed = threading.Thread.join, []

    def join(self, timeout=None):  # the second Ctrl-C, while the run waits for its threads
        if not pressed and threading.current_thread() is threading.main_thread():
            pressed.append(True)
            raise KeyboardInterrupt
        return real_join(self, timeout)

    monkeypatch.setattr(predict, "_write", slow_write)
    monkeypatch.setattr(threading.Thread, "join", join)
    try:
        with pytest.raises(KeyboardInterrupt):
            predict.predict_folder(_Counting(ctrl_c), predict.list_photos(folder), out, (48, 32), batch_size=1,
                                   workers=1, progress=False)
        assert pressed and not [p.name for p in out.iterdir() if p.name.startswith(".")]
    finally:
        release.set()


def test_each_queued_result_holds_its_own_logits_not_the_batch(tmp_path, monkeypatch):
    folder, model = _photos(tmp_path)
    (folder / "broken.jpg").unlink()
    seen = []
    real = predict.upsample_labels
    monkeypatch.setattr(predict, "upsample_labels", lambda lg, size: seen.append(lg) or real(lg, size))
    predict.predict_folder(model, predict.list_photos(folder)[:2], tmp_path / "out", (48, 32), batch_size=2,
                           workers=1, overlay=False, progress=False)
    # a view would keep the whole batch alive (552 MB per batch at 1500x1000, batch 4)
    assert len(seen) == 2 and all(lg.untyped_storage().nbytes() == lg.numel() * 4 for lg in seen)
