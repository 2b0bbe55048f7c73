
import numpy as np
import pytest
import torch
from PIL import Image

from basics import NUM_CLASSES, mean, std
from datautils import DroneDataset, import_drone_dataset, load_pair, load_photo, parse_size
from demo import make_demo_dataset
from layout import DatasetError, find_dataset, read_split
from transforms import normalize
from conftest import SHARED, real_data_or_skip


def test_demo_dataset_shapes_and_types(demo_root):
    train_set, test_set = import_drone_dataset(demo_root, size=(48, 32), cache=False)
    assert (len(train_set), len(test_set)) == (8, 2)
    x, y = train_set[0]
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    assert y.shape == (32, 48) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < NUM_CLASSES
    val, trainval = import_drone_dataset(demo_root, size=(48, 32), splits=("val", "trainval"), cache=False)
    assert len(val) == 2 and len(trainval) == 10
    assert trainval.ids == read_split("train", demo_root / "splits") + read_split("val", demo_root / "splits")


def test_index_and_colour_masks_agree(demo_root):
    layout = find_dataset(demo_root)
    ids = read_split("train", layout.splits_dir)
    idx = DroneDataset(layout.image_dir, layout.mask_dir, ids, size=(96, 64))
    rgb = DroneDataset(layout.image_dir, demo_root / "RGB_color_image_masks" / "RGB_color_image_masks", ids,
                       size=(96, 64), class_dict=demo_root / "class_dict_seg.csv")
    for i in range(len(ids)):
        assert torch.equal(idx[i][1], rgb[i][1])
        assert torch.equal(idx[i][0], rgb[i][0])


@pytest.mark.parametrize("layout", ["kaggle-archive", "kaggle-folder", "tugraz"])
def test_three_root_layouts(tmp_path, layout):
    base = make_demo_dataset(tmp_path, n=5, size=(48, 32), seed=3, layout=layout, split_counts=(3, 1, 1))
    found = find_dataset(base)
    assert found.kind == layout
    ref = make_demo_dataset(tmp_path / "ref", n=5, size=(48, 32), seed=3, split_counts=(3, 1, 1))
    a = import_drone_dataset(base, size=(24, 16), splits="train", cache=False)
    b = import_drone_dataset(ref, size=(24, 16), splits="train", cache=False)
    assert len(a) == 3
    for i in range(3):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    if layout == "tugraz":  # the download's parent folder works too
        assert find_dataset(tmp_path).kind == "tugraz"


def test_root_resolution_env_and_default(demo_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DRONE_DATA_ROOT", str(demo_root))
    assert find_dataset().root == demo_root.resolve()
    monkeypatch.delenv("DRONE_DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="blog's default"):
        find_dataset()


def test_root_missing_message(tmp_path):
    with pytest.raises(DatasetError) as e:
        find_dataset(tmp_path / "nowhere")
    msg = str(e.value)
    for part in ("nowhere", "tugraz", "Kaggle", "--data-root", "DRONE_DATA_ROOT", "training_set"):
        assert part in msg


def test_root_missing_message_speaks_to_own_data_too(tmp_path):
    """A folder of your own data that holds none of the layouts: the message names the generic
    layout as well as the drone dataset's, and does not say only the drone dataset is missing."""
    (tmp_path / "mine" / "photos").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        find_dataset(tmp_path / "mine")
    first = str(e.value).splitlines()[0]
    assert "No Semantic Drone Dataset" not in first and "images/" in first and "masks/" in first
    assert "classes.csv" in first and str(tmp_path / "mine") in first


def test_photo_without_mask(fresh_demo):
    (fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/003.png").unlink()
    with pytest.raises(DatasetError, match=r"without a mask.*003\.jpg"):
        import_drone_dataset(fresh_demo, cache=False)


def test_mask_without_photo(fresh_demo):
    (fresh_demo / "dataset/semantic_drone_dataset/original_images/003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"without a photo.*003\.png"):
        import_drone_dataset(fresh_demo, cache=False)


def test_split_ids_missing(fresh_demo):
    (fresh_demo / "splits/test.txt").write_text("900\n901\n000\n")
    with pytest.raises(DatasetError, match=r"2 of the 3 ids of the test split.*900, 901.*--eval-split val"):
        import_drone_dataset(fresh_demo, cache=False)


def test_truncated_photo(fresh_demo):
    p = fresh_demo / "dataset/semantic_drone_dataset/original_images/000.jpg"
    p.write_bytes(p.read_bytes()[:200])
    ds = import_drone_dataset(fresh_demo, size=(24, 16), splits="train", cache=False)
    with pytest.raises(DatasetError, match=r"000\.jpg: cannot read this photo"):
        ds[0]


def test_not_an_image(fresh_demo):
    p = fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/000.png"
    p.write_text("not a png")
    ds = import_drone_dataset(fresh_demo, size=(24, 16), splits="train", cache=False)
    with pytest.raises(DatasetError, match=r"000\.png: cannot read this mask"):
        ds[0]


def test_mask_values_out_of_range(fresh_demo):
    p = fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/000.png"
    m = np.asarray(Image.open(p)).copy()
    m[:2, :3] = 23
    Image.fromarray(m).save(p)
    ds = import_drone_dataset(fresh_demo, size=(24, 16), splits="train", cache=False)
    with pytest.raises(DatasetError, match=r"000\.png: mask values must be class ids 0\.\.22, found 23 \(6 pixels"):
        ds[0]


def test_unknown_colour(tmp_path):
    root = make_demo_dataset(tmp_path, n=3, size=(32, 24), mask_form="rgb", split_counts=(3, 0, 0))
    p = root / "RGB_color_image_masks/RGB_color_image_masks/000.png"
    m = np.asarray(Image.open(p)).copy()
    m[0, :5] = (1, 2, 3)
    Image.fromarray(m).save(p)
    ds = import_drone_dataset(root, size=(16, 12), splits="train", cache=False)
    with pytest.raises(DatasetError, match=r"000\.png: colour not in the class dict: RGB\(1, 2, 3\) on 5 pixels"):
        ds[0]


def test_photo_and_mask_sizes_differ(fresh_demo):
    p = fresh_demo / "dataset/semantic_drone_dataset/original_images/000.jpg"
    Image.open(p).resize((50, 32)).save(p)
    ds = import_drone_dataset(fresh_demo, size=(24, 16), splits="train", cache=False)
    with pytest.raises(DatasetError, match=r"000\.jpg is 50x32 but its mask .*000\.png is 48x32"):
        ds[0]


def test_grayscale_rgba_and_exif_rotation_are_accepted(fresh_demo):
    d = fresh_demo / "dataset/semantic_drone_dataset/original_images"
    rgb = Image.open(d / "000.jpg").convert("RGB")
    rgb.convert("L").save(d / "000.jpg")
    (d / "003.jpg").unlink()
    rgb.convert("RGBA").save(d / "003.png")
    # a photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view), its mask
    # drawn on the same stored pixel grid
    src = Image.open(d / "006.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    src.transpose(Image.Transpose.ROTATE_90).save(d / "006.jpg", exif=exif, quality=95)
    m = fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/006.png"
    Image.open(m).transpose(Image.Transpose.ROTATE_90).save(m)
    ds = import_drone_dataset(fresh_demo, size=(48, 32), splits="train", cache=False)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 32, 48) and y.shape == (32, 48)
    upright, _ = load_photo(d / "006.jpg")
    assert upright.shape == (32, 48, 3)
    assert np.abs(upright.astype(int) - np.asarray(src).astype(int)).mean() < 6


def test_parse_size():
    assert parse_size("600x400") == (600, 400)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("600")


def test_normalize_matches_mean_std():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalize(x), ref, atol=1e-6)
    assert torch.equal(normalize(x), normalize(x.float() / 255))


def test_real_shared_copy():
    root = real_data_or_skip()
    val = import_drone_dataset(root, size=(150, 100), splits="val", cache=False)
    assert len(val) == 40
    for i in (0, 17, 39):
        x, y = val[i]
        assert x.shape == (3, 100, 150) and y.shape == (100, 150)
        assert -2.2 < float(x.min()) and float(x.max()) < 2.7
        assert 0 <= int(y.min()) and int(y.max()) <= 22
    with pytest.raises(DatasetError, match="--eval-split val"):
        import_drone_dataset(root, splits="test", cache=False)
    assert read_split("train", SHARED / "splits") == read_split("train")  # the repo ships the same split


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_turned_photo_keeps_its_mask_on_the_same_grid(tmp_path, orientation):
    """Blocks of class colours; photo and mask stored on one grid, the photo flagged by EXIF.
    Loading must turn both, so every block's colour still meets its own class."""
    from basics import CLASS_COLORS
    root = make_demo_dataset(tmp_path / "d", n=1, size=(64, 48), seed=3, split_counts=(1, 0, 0))
    rng = np.random.default_rng(orientation)
    labels = rng.integers(0, 23, (6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # 48×64
    photo = np.asarray(CLASS_COLORS, np.uint8)[labels]
    exif = Image.Exif()
    exif[0x0112] = orientation
    d = root / "dataset/semantic_drone_dataset"
    Image.fromarray(photo).save(d / "original_images/000.jpg", exif=exif, quality=98)
    Image.fromarray(labels).save(d / "label_images_semantic/000.png")
    img, msk = load_pair(d / "original_images/000.jpg", d / "label_images_semantic/000.png", None)
    assert img.shape[:2] == msk.shape
    if orientation in (6, 8):
        assert msk.shape == (64, 48)  # upright: turned by a quarter
    colours = torch.tensor(CLASS_COLORS, dtype=torch.float32)
    nearest = torch.cdist(torch.tensor(img.reshape(-1, 3), dtype=torch.float32), colours).argmin(1).reshape(msk.shape)
    assert float((nearest == torch.tensor(msk, dtype=torch.long)).float().mean()) > 0.9
