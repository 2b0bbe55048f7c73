"""Data-path benchmark: the blog's naive loading vs the preprocessing cache, on full-size photos.

    python benchmarks/bench_data.py            # 64 images, 600x400 and 1200x800
    python benchmarks/bench_data.py --n 128 --sizes 600x400

First builds realistic 6000x4000 inputs from the real 1500x1000 shared copy (photos upscaled ×4
with a little sensor grain, JPEG quality 95, ~8 MB each like the originals; masks upscaled
nearest-neighbour), kept in the cache folder between runs. Then, on the same files and in this
one process: (a) the naive path, a full decode + resize in every __getitem__ as the blog does;
(b) the cold cache build (1 process, and --workers processes; Pillow with DCT-domain `draft`
decoding, and torchvision's libjpeg-turbo `decode_jpeg`); (c) a warm-cache epoch through a
DataLoader. Prints images/s, the ratios, and the peak RSS of a warm epoch at 64 and 256 images.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from datautils import DroneDataset, parse_size  # noqa: E402
from cache import default_cache_dir  # noqa: E402
from layout import find_dataset, read_split  # noqa: E402
from transforms import normalize  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "drone-1500x1000"


class BlogNaiveDataset(Dataset):
    """The blog's loader: open the full photo, decode all of it, resize, on every access."""

    def __init__(self, img_dir: Path, mask_dir: Path, ids: list[str], size: tuple[int, int]):
        self.img_dir, self.mask_dir, self.ids, self.size = img_dir, mask_dir, ids, size

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img = Image.open(self.img_dir / f"{self.ids[i]}.jpg").convert("RGB").resize(self.size, Image.Resampling.BILINEAR)
        msk = Image.open(self.mask_dir / f"{self.ids[i]}.png").resize(self.size, Image.Resampling.NEAREST)
        x = normalize(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
        return x, torch.from_numpy(np.asarray(msk).astype(np.int64))


def _upscale_one(job):
    src_img, src_msk, dst_img, dst_msk, seed = job
    img = Image.open(src_img).convert("RGB")
    big = img.resize((img.width * 4, img.height * 4), Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed).integers(-5, 6, (big.height, big.width, 1), dtype=np.int16)
    big = Image.fromarray(np.clip(np.asarray(big, np.int16) + grain, 0, 255).astype(np.uint8))
    tmp = dst_img.with_suffix(".tmp.jpg")
    big.save(tmp, quality=95)
    os.replace(tmp, dst_img)
    msk = Image.open(src_msk)
    msk.resize((msk.width * 4, msk.height * 4), Image.Resampling.NEAREST).save(dst_msk)


def full_size_copy(n: int, workers: int = 2, source: Path = SHARED) -> Path:
    """A Kaggle-layout copy of n shared images at 6000x4000 (90 % train ids, 10 % val), cached."""
    root = default_cache_dir() / f"bench-fullsize-v1-n{n}"
    sds = root / "dataset" / "semantic_drone_dataset"
    done = root / "COMPLETE"
    if done.exists():
        return root
    layout = find_dataset(source)
    n_val = max(1, n // 10)
    train_ids = read_split("train", layout.splits_dir)[: n - n_val]
    val_ids = read_split("val", layout.splits_dir)[:n_val]
    for d in ("original_images", "label_images_semantic"):
        (sds / d).mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    jobs = [(layout.image_dir / f"{i}.jpg", layout.mask_dir / f"{i}.png", sds / "original_images" / f"{i}.jpg",
             sds / "label_images_semantic" / f"{i}.png", k) for k, i in enumerate(train_ids + val_ids)
            if not (sds / "original_images" / f"{i}.jpg").exists()]
    import multiprocessing as mp
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_upscale_one, jobs), total=len(jobs), desc="writing 6000x4000 copy"):
            pass
    (root / "splits" / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (root / "splits" / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    (root / "splits" / "test.txt").write_text("")
    done.write_text("ok\n")
    return root


def epoch_images_per_s(dataset, batch_size: int = 6, seed: int = 0) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t = time.perf_counter()
    n = sum(x.shape[0] for x, _ in tqdm(loader, leave=False, desc="epoch"))
    return n / (time.perf_counter() - t)


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_probe(n: int, size: tuple[int, int]) -> None:
    """Child process: warm-cache epochs over n images; print RSS after loading, after, and peak (MB)."""
    ids = (read_split("train") + read_split("val"))[:n]
    layout = find_dataset(SHARED)
    ds = DroneDataset(layout.image_dir, layout.mask_dir, ids, size=size, cache=True, num_workers=2, name=f"rss{n}")
    before = _rss_mb()
    for _ in range(2):
        epoch_images_per_s(ds)
    print(f"{before:.1f} {_rss_mb():.1f} {_rss_mb('VmHWM'):.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="number of full-size images")
    p.add_argument("--sizes", default="600x400,1200x800")
    p.add_argument("--workers", type=int, default=2, help="processes for the parallel cache build")
    p.add_argument("--rss-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (SHARED / "dataset").is_dir():
        print(f"skipped: the real shared copy is not at {SHARED}")
        return 0
    if args.rss_probe:
        rss_probe(args.rss_probe, parse_size(args.sizes.split(",")[0]))
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    root = full_size_copy(args.n, args.workers)
    layout = find_dataset(root)
    ids = read_split("train", layout.splits_dir) + read_split("val", layout.splits_dir)
    mb = np.mean([os.path.getsize(layout.image_dir / f"{i}.jpg") for i in ids]) / 1e6
    print(f"{len(ids)} photos at {Image.open(layout.image_dir / f'{ids[0]}.jpg').size}, mean JPEG {mb:.1f} MB: {root}")
    for size in (parse_size(s) for s in args.sizes.split(",")):
        print(f"\n== {size[0]}x{size[1]} ==")
        naive = epoch_images_per_s(BlogNaiveDataset(layout.image_dir, layout.mask_dir, ids, size))
        naive_epoch = len(ids) / naive
        print(f"(a) naive full decode per item : {naive:8.2f} img/s  (epoch {naive_epoch:.1f} s)")
        builds = {}
        for decoder, workers in [("pil", w) for w in sorted({1, args.workers})] + [("torchvision", 1)]:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                DroneDataset(layout.image_dir, layout.mask_dir, ids, size=size, cache=True, cache_dir=tmp,
                             num_workers=workers, decoder=decoder, name="bench")
                builds[decoder, workers] = time.perf_counter() - t
            print(f"(b) cold build, {decoder:<11} {workers} proc: {builds[decoder, workers]:8.2f} s "
                  f"= {builds[decoder, workers] / naive_epoch:.3f}x one naive epoch")
        faster = "Pillow+draft" if builds["pil", 1] < builds["torchvision", 1] else "torchvision"
        print(f"    decoders, 1 proc: Pillow+draft {len(ids) / builds['pil', 1]:.1f} img/s, torchvision "
              f"decode_jpeg {len(ids) / builds['torchvision', 1]:.1f} img/s: {faster} is faster here "
              "(the cache's default decoder is Pillow+draft)")
        with tempfile.TemporaryDirectory() as tmp:
            ds = DroneDataset(layout.image_dir, layout.mask_dir, ids, size=size, cache=True, cache_dir=tmp,
                              num_workers=args.workers, name="bench")
            warm = max(epoch_images_per_s(ds, seed=s) for s in range(3))
        print(f"(c) warm-cache epoch           : {warm:8.2f} img/s")
        print(f"ratio warm/naive images/s      : {warm / naive:8.1f}x   (target >= 100x at 600x400)")
        print(f"ratio build(1 proc)/naive epoch: {builds['pil', 1] / naive_epoch:8.3f}    (target <= 0.6)")
    print("\n== peak RSS of a warm epoch (600x400, cache from the shared 1500x1000 copy) ==")
    for n in (64, 256):
        for _ in range(2):  # the first run may build the cache; the second measures a warm one
            out = subprocess.run([sys.executable, __file__, "--rss-probe", str(n), "--sizes", "600x400"],
                                 capture_output=True, text=True, check=True).stdout.split()
        before, after, peak = map(float, out[-3:])
        print(f"{n:4d} images: RSS {before:7.1f} MB after loading, {after:7.1f} MB after 2 warm epochs "
              f"(growth {after - before:+.1f} MB), process peak {peak:7.1f} MB; cache file "
              f"{n * 600 * 400 * 4 / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
