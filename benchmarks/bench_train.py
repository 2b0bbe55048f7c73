"""Training benchmark: one SingleConvolution epoch with naive loading vs the warm cache.

    python benchmarks/bench_train.py            # the 64 full-size images of bench_data.py
    python benchmarks/bench_train.py --n 64 --size 600x400

Same seed, same batch order, same model start: (1) the blog's naive loader (full decode per
item), (2) our uncached loader (DCT-domain decode per item), (3) the warm cache. Prints the
epoch times and ratios, and checks the losses: (2) and (3) read bit-identical tensors so their
losses must be equal; (1) decodes at full scale, so its loss agrees only to a tolerance.
On a CUDA machine it also times the GPU-resident path against a DataLoader.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench_data import SHARED, BlogNaiveDataset, full_size_copy  # noqa: E402
from datautils import DeviceBatchLoader, DroneDataset, find_dataset, parse_size, read_split  # noqa: E402
from models import SingleConvolution  # noqa: E402
from train import train  # noqa: E402


def one_epoch(loader, device, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = SingleConvolution()
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    hist = train(model, 1, loader, nn.CrossEntropyLoss(), opt, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, hist["train_loss"][0]


def loader_of(ds, batch_size, seed=0):
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", default="600x400")
    p.add_argument("--batch-size", type=int, default=6)
    args = p.parse_args()
    if not (SHARED / "dataset").is_dir():
        print(f"skipped: the real shared copy is not at {SHARED}")
        return 0
    size = parse_size(args.size)
    cpu = torch.device("cpu")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}")
    layout = find_dataset(full_size_copy(args.n))
    ids = read_split("train", layout.splits_dir) + read_split("val", layout.splits_dir)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(size=size, normalize=False, name="bench")
        uncached = DroneDataset(layout.image_dir, layout.mask_dir, ids, **kw)
        cached = DroneDataset(layout.image_dir, layout.mask_dir, ids, cache=True, cache_dir=tmp, num_workers=2, **kw)
        naive = BlogNaiveDataset(layout.image_dir, layout.mask_dir, ids, size)
        t_naive, l_naive = one_epoch(loader_of(naive, args.batch_size), cpu)
        t_unc, l_unc = one_epoch(loader_of(uncached, args.batch_size), cpu)
        t_warm, l_warm = one_epoch(loader_of(cached, args.batch_size), cpu)
        print(f"{len(ids)} full-size photos -> {size[0]}x{size[1]}, batch {args.batch_size}, 1 epoch on CPU")
        print(f"naive (blog) loading : {t_naive:7.2f} s  loss {l_naive:.6f}")
        print(f"uncached (ours)      : {t_unc:7.2f} s  loss {l_unc:.6f}")
        print(f"warm cache           : {t_warm:7.2f} s  loss {l_warm:.6f}")
        print(f"speed-up warm vs naive: {t_naive / t_warm:.2f}x, warm vs uncached: {t_unc / t_warm:.2f}x")
        same = l_unc == l_warm
        close = abs(l_naive - l_warm) / l_warm < 0.01
        print(f"losses: uncached == warm exactly: {same}; naive within 1 % of warm: {close} "
              f"(rel. diff {abs(l_naive - l_warm) / l_warm:.2e})")
        if torch.cuda.is_available():
            gpu = torch.device("cuda")
            one_epoch(DeviceBatchLoader(cached, args.batch_size, True, gpu), gpu)  # warm-up
            dl = DataLoader(cached, batch_size=args.batch_size, shuffle=True, pin_memory=True, num_workers=4,
                            persistent_workers=True)
            t_dl, _ = min(one_epoch(dl, gpu) for _ in range(3))
            res = DeviceBatchLoader(cached, args.batch_size, True, gpu)
            t_res, _ = min(one_epoch(res, gpu) for _ in range(3))
            print(f"GPU {torch.cuda.get_device_name()}: DataLoader epoch {t_dl:.3f} s, GPU-resident epoch "
                  f"{t_res:.3f} s, ratio {t_dl / t_res:.2f}x")
            try:
                print(f"GPU utilisation now: {torch.cuda.utilization()} %")
            except Exception as e:  # needs pynvml
                print(f"GPU utilisation not readable here ({e})")
        else:
            print("GPU-resident path: no CUDA device here, not measured")
        return 0 if same and close else 1


if __name__ == "__main__":
    sys.exit(main())
