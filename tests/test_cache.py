import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from datautils import DeviceBatchLoader, import_drone_dataset, load_photo, make_loader
from cache import CACHE_FORMAT_VERSION
from demo import make_demo_dataset
from transforms import prepare_batch


def _same(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _manifests(cache):
    return sorted(cache.glob("*.json"))


@pytest.mark.parametrize("normalize", [True, False])
def test_cached_equals_uncached_bit_for_bit(demo_root, tmp_path, normalize):
    kw = dict(size=(40, 24), splits="train", normalize=normalize)
    plain = import_drone_dataset(demo_root, cache=False, **kw)
    cached = import_drone_dataset(demo_root, cache=True, cache_dir=tmp_path / "c", **kw)
    assert cached.cache_path is not None and plain.cache_path is None
    _same(plain, cached)
    again = import_drone_dataset(demo_root, cache=True, cache_dir=tmp_path / "c", **kw)  # warm: no rebuild
    assert again.cache_path == cached.cache_path
    _same(plain, again)


def test_parallel_build_equals_serial(demo_root, tmp_path):
    a = import_drone_dataset(demo_root, (40, 24), "train", cache=True, cache_dir=tmp_path / "a", num_workers=0)
    b = import_drone_dataset(demo_root, (40, 24), "train", cache=True, cache_dir=tmp_path / "b", num_workers=2)
    assert open(a.cache_path[0], "rb").read() == open(b.cache_path[0], "rb").read()


def test_cache_dir_from_environment(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DRONE_CACHE_DIR", str(tmp_path / "envcache"))
    ds = import_drone_dataset(demo_root, (40, 24), "val")
    assert ds.cache_path[0].startswith(str(tmp_path / "envcache"))


def test_changed_source_file_rebuilds(fresh_demo, tmp_path):
    c = tmp_path / "c"
    first = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    before, first_path = first[0][1].clone(), first.cache_path
    del first  # releases its file: a data file still open in some process is never deleted
    p = fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/000.png"
    Image.new("L", (48, 32), 9).save(p)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later mtime whatever the clock
    second = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert second.cache_path != first_path
    assert not torch.equal(before, second[0][1]) and bool((second[0][1] == 9).all())
    assert len(list(c.glob("*.bin"))) == 1  # the stale data file is gone


def test_added_and_removed_files_rebuild(fresh_demo, tmp_path):
    c = tmp_path / "c"
    split = fresh_demo / "splits/train.txt"
    first = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert len(first) == 4
    split.write_text(split.read_text() + "012\n")  # an image added to the split
    added = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert len(added) == 5
    _same(added, import_drone_dataset(fresh_demo, (24, 16), "train", cache=False))
    for sub, ext in (("original_images", "jpg"), ("label_images_semantic", "png")):  # one removed
        (fresh_demo / f"dataset/semantic_drone_dataset/{sub}/003.{ext}").unlink()
    split.write_text("".join(f"{i}\n" for i in ("000", "006", "009", "012")))
    removed = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert len(removed) == 4
    _same(removed, import_drone_dataset(fresh_demo, (24, 16), "train", cache=False))


def test_resize_settings_are_part_of_the_cache(fresh_demo, tmp_path):
    c = tmp_path / "c"
    small = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    large = import_drone_dataset(fresh_demo, (48, 32), "train", cache=True, cache_dir=c)
    tv = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c, decoder="torchvision")
    assert len({small.cache_path, large.cache_path, tv.cache_path}) == 3
    assert large[0][0].shape == (3, 32, 48)
    man = json.loads(_manifests(c)[0].read_text())
    assert man["format_version"] == CACHE_FORMAT_VERSION and "settings" in man and len(man["files"]) == 4


def test_truncated_data_file_is_not_trusted(fresh_demo, tmp_path):
    c = tmp_path / "c"
    first = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    data = first.cache_path[0]
    with open(data, "r+b") as f:
        f.truncate(100)
    second = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    _same(second, import_drone_dataset(fresh_demo, (24, 16), "train", cache=False))


def test_build_killed_midway_never_loads_as_valid(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n=30, size=(60, 40), seed=5, split_counts=(30, 0, 0))
    cache = tmp_path / "c"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import cache, datautils
        real = cache._cache_one
        def slow(job):
            time.sleep(0.1)
            real(job)
        cache._cache_one = slow
        datautils.import_drone_dataset({str(root)!r}, (30, 20), "train", cache=True, cache_dir={str(cache)!r})
        print("finished")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(cache.glob("*.partial")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few images in
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout.read() == b""  # killed before finishing
    assert list(cache.glob("*.partial")) and not _manifests(cache)
    ds = import_drone_dataset(root, (30, 20), "train", cache=True, cache_dir=cache)
    _same(ds, import_drone_dataset(root, (30, 20), "train", cache=False))


def test_unusable_cache_folder_falls_back_with_warning(demo_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="not usable.*--cache-dir"):
        ds = import_drone_dataset(demo_root, (40, 24), "val", cache=True, cache_dir=blocker / "cache")
    assert ds.cache_path is None
    _same(ds, import_drone_dataset(demo_root, (40, 24), "val", cache=False))


def test_full_cache_folder_falls_back_with_warning(demo_root, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.warns(RuntimeWarning, match=r"needs .* MB, 0 MB free"):
        ds = import_drone_dataset(demo_root, (40, 24), "val", cache=True, cache_dir=tmp_path / "c")
    assert ds.cache_path is None and len(ds[0]) == 2


def test_decoders_agree_within_tolerance(tmp_path):
    from PIL import ImageFilter

    root = make_demo_dataset(tmp_path, n=4, size=(480, 320), seed=4, split_counts=(4, 0, 0))
    photos = sorted((root / "dataset/semantic_drone_dataset/original_images").glob("*.jpg"))
    for p in photos:  # soften the per-pixel noise texture to look like a photo's detail
        Image.open(p).filter(ImageFilter.GaussianBlur(1.2)).save(p, quality=92)
    for p in photos:
        for size in ((120, 80), (240, 160)):
            a, full_a = load_photo(p, size, decoder="pil")
            b, full_b = load_photo(p, size, decoder="torchvision")
            diff = np.abs(a.astype(int) - b.astype(int))
            assert full_a == full_b == (480, 320)
            assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12  # grey levels of 255
    a = import_drone_dataset(root, (120, 80), "train", cache=False, decoder="pil")
    b = import_drone_dataset(root, (120, 80), "train", cache=False, decoder="torchvision")
    assert torch.equal(a[0][1], b[0][1])  # masks bit-identical


def test_device_batch_loader_covers_every_sample_once(demo_root):
    ds = import_drone_dataset(demo_root, (40, 24), "train", cache=True, normalize=False)
    loader = DeviceBatchLoader(ds, batch_size=3, shuffle=True, device=torch.device("cpu"))
    assert len(loader) == 3
    torch.manual_seed(0)
    seen = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[1:] == (3, 24, 40)
        for xi, yi in zip(x, y):
            match = [i for i in range(len(ds)) if torch.equal(ds[i][0], xi) and torch.equal(ds[i][1], yi)]
            seen += match
    assert sorted(seen) == list(range(len(ds)))
    # normalised on the device exactly as the dataset would normalise one sample
    x, y = prepare_batch(next(iter(DeviceBatchLoader(ds, 2, False, torch.device("cpu")))), torch.device("cpu"))
    plain = import_drone_dataset(demo_root, (40, 24), "train", cache=False)
    assert torch.equal(x[0], plain[0][0]) and torch.equal(y[1], plain[1][1])


def test_make_loader_on_cpu_is_a_dataloader_over_the_cache(demo_root):
    ds = import_drone_dataset(demo_root, (40, 24), "train", cache=True, normalize=False)
    loader = make_loader(ds, 4, shuffle=False, device="cpu")
    x, y = next(iter(loader))
    assert isinstance(loader, torch.utils.data.DataLoader) and x.shape == (4, 3, 24, 40)


def test_datasets_with_other_ids_keep_their_own_files(fresh_demo, tmp_path):
    c = tmp_path / "c"
    split = fresh_demo / "splits/train.txt"
    ids = split.read_text().split()
    a = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    split.write_text("\n".join(ids[:2]) + "\n")  # same folder, same split name, other ids
    b = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert a.cache_path != b.cache_path and os.path.exists(a.cache_path[0])
    split.write_text("\n".join(ids) + "\n")
    a2 = import_drone_dataset(fresh_demo, (24, 16), "train", cache=True, cache_dir=c)
    assert a2.cache_path == a.cache_path  # not rebuilt: b did not replace a's files
    assert os.path.exists(b.cache_path[0])
    _same(a2, import_drone_dataset(fresh_demo, (24, 16), "train", cache=False))
    assert len(b) == 2 and torch.equal(b[1][1], a2[1][1])


_WORKER = """
import sys, time, hashlib
sys.path.insert(0, {repo!r})
import cache, datautils
real = cache._cache_one
def slow(job):
    time.sleep(0.05)
    real(job)
cache._cache_one = slow
ds = datautils.import_drone_dataset({root!r}, (30, 20), "train", cache=True, cache_dir={cache!r})
print("opened", flush=True)
go = {go!r}
while go and not __import__("os").path.exists(go):  # hold the file until the test says so
    time.sleep(0.05)
h = hashlib.sha1()
for i in range(len(ds)):
    x, y = ds[i]
    h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
print(h.hexdigest())
"""


def _digest(ds):
    import hashlib
    h = hashlib.sha1()
    for i in range(len(ds)):
        x, y = ds[i]
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()


def test_concurrent_processes_share_one_cache_safely(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n=12, size=(60, 40), seed=6, split_counts=(12, 0, 0))
    cache = tmp_path / "c"
    # two processes building the same cache at once
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER.format(repo=str(REPO), root=str(root), cache=str(cache),
                                                                       go="")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    want = _digest(import_drone_dataset(root, (30, 20), "train", cache=False))
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split()[-1] == want
    # a reader holds the file while another process rebuilds after a source change
    go = tmp_path / "go"
    reader = subprocess.Popen([sys.executable, "-c", _WORKER.format(repo=str(REPO), root=str(root), cache=str(cache),
                                                                       go=str(go))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "opened"
    m = root / "dataset/semantic_drone_dataset/label_images_semantic" / sorted(
        os.listdir(root / "dataset/semantic_drone_dataset/label_images_semantic"))[0]
    os.utime(m, ns=(time.time_ns(), time.time_ns() + 10**9))  # same content, new identity: rebuild
    rebuilt = import_drone_dataset(root, (30, 20), "train", cache=True, cache_dir=cache)
    assert len(list(cache.glob("*.bin"))) == 2  # the reader's file was left in place
    go.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert out.split()[-1] == want == _digest(rebuilt)


# ----------------------------------------------------------------------------- lock races (forced interleavings)

import cache  # noqa: E402
from datautils import load_pair  # noqa: E402


def _decode_cache(root, folder):
    ds = import_drone_dataset(root, (48, 32), "train", normalize=False, cache=False)
    return cache.DecodeCache(folder, "train-k", {"size": [48, 32]}, ds.pairs, (48, 32)), ds


def _on_first_flock(monkeypatch, action, when=lambda fd, op: True):
    """Run ``action`` at the first flock call that ``when`` accepts, before the lock is taken:
    the moment another process could act between opening a file and locking it."""
    real, fired = cache.fcntl.flock, []

    def flock(fd, op):
        if not fired and when(fd, op):
            fired.append(True)
            action()
        return real(fd, op)
    monkeypatch.setattr(cache.fcntl, "flock", flock)
    return fired


def test_a_reader_never_keeps_a_file_another_builder_removed(fresh_demo, tmp_path, monkeypatch):
    folder = tmp_path / "c"
    a, ds = _decode_cache(fresh_demo, folder)
    first, fd = a.build(load_pair, ds.colors, "pil")
    os.close(fd)  # nobody holds the first build now
    b, _ = _decode_cache(fresh_demo, folder)
    # between the reader's open and its lock, another process builds anew and cleans up the old file
    fired = _on_first_flock(monkeypatch, lambda: os.close(b.build(load_pair, ds.colors, "pil")[1]),
                            when=lambda fd, op: op == cache.fcntl.LOCK_SH)
    data, fd = a.load()
    assert fired and data != first and data.exists()
    assert os.fstat(fd).st_ino == os.stat(data).st_ino  # the file held is the one the path names
    os.close(fd)


def test_a_builders_partial_file_is_never_removed_by_another_builder(fresh_demo, tmp_path, monkeypatch):
    folder = tmp_path / "c"
    a, ds = _decode_cache(fresh_demo, folder)
    b, _ = _decode_cache(fresh_demo, folder)
    # another builder cleans up the moment our build creates its file, before we lock it
    fired = _on_first_flock(monkeypatch, lambda: b.remove_stale(keep=folder / "none"))
    data, fd = a.build(load_pair, ds.colors, "pil")
    assert fired and data.exists()
    monkeypatch.undo()
    again, fd2 = a.load()
    assert again == data
    os.close(fd), os.close(fd2)


def test_stale_builds_are_removed_where_exclusive_locks_need_a_writable_descriptor(fresh_demo, tmp_path, monkeypatch):
    # NFS emulates flock with POSIX locks: LOCK_EX on a read-only descriptor fails with EBADF
    import errno

    real = cache.fcntl.flock

    def nfs_flock(fd, op):
        if op & cache.fcntl.LOCK_EX and cache.fcntl.fcntl(fd, cache.fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)
    monkeypatch.setattr(cache.fcntl, "flock", nfs_flock)
    folder = tmp_path / "c"
    a, ds = _decode_cache(fresh_demo, folder)
    first, fd = a.build(load_pair, ds.colors, "pil")
    os.close(fd)
    second, fd = a.build(load_pair, ds.colors, "pil")
    os.close(fd)
    assert not first.exists() and second.exists()  # the stale build does not leak a split's worth of disk


def test_without_fcntl_the_modules_import_and_the_cache_runs_unlocked_on_posix(demo_root, tmp_path):
    # the fallback for a Python without fcntl (as on Windows): the modules import and build the
    # cache without locks. This runs on POSIX, whose renames of open files succeed; it says nothing
    # of Windows, where the cache is not supported (cache.py's docstring)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
        sys.path.insert(0, {str(REPO)!r})
        from datautils import import_drone_dataset
        ds = import_drone_dataset({str(demo_root)!r}, (48, 32), "train", normalize=False, cache=True,
                                  cache_dir={str(tmp_path / "c")!r})
        assert ds.cache_path is not None and ds.arrays()[0].shape[0] == len(ds)
        print("ok", ds[0][0].shape)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
