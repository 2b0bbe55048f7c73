"""Training benchmarks.

    python benchmarks/bench_train.py            # loading: the 64 full-size images of bench_data.py
    python benchmarks/bench_train.py --n 64 --size 600x400
    python benchmarks/bench_train.py --steps    # training steps of unet_lite0: variants side by side

--steps: img/s of the real training step (train_one_epoch: augmentation, normalisation,
forward, loss, backward, AdamW, the per-step train metric) of unet_lite0 on 320x320 crops of
600x400 photos, batch 8, for each variant (see STEP_VARIANTS), in one process, after a warm-up
batch; ratios are against today's recipe before this benchmark (contiguous layout, 2 threads).
Uses the real train photos when the shared copy is there, random photos otherwise (same cost).

Loading:
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
from datautils import DeviceBatchLoader, DroneDataset, parse_size  # noqa: E402
from layout import find_dataset, read_split  # noqa: E402
from models import SingleConvolution  # noqa: E402
from train import train  # noqa: E402
from transforms import Augment  # noqa: E402


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


STEP_VARIANTS = {
    "contiguous": "the model in the default NCHW layout (the recipe before this benchmark)",
    "channels_last": "weights and activations N×H×W×C (oneDNN's preferred layout)",
    "channels_last+bf16": "channels_last with bf16 autocast on the CPU (this CPU has AMX-BF16)",
    "channels_last+compile": "channels_last through torch.compile (inductor); compile time reported apart",
    "channels_last+1thread": "channels_last with torch.set_num_threads(1) instead of 2",
    "channels_last+aug_in_worker": "augmentation in one DataLoader worker process instead of the training process",
    "channels_last+no_step_metric": "no per-step train accuracy (bounds what syncing the metrics less often saves)",
    "channels_last+crop256": "256x256 crops (the early phase of progressive resizing)",
    "channels_last+scale_whole_photo": "the augmentation before: rescale the whole photo, then crop (today: only "
                                       "the window the crop takes is rescaled)",
    "channels_last+crop256+scale_whole_photo": "the same at 256x256 crops",
}


class _ScaleWholePhoto(Augment):
    """The augmentation before the window change: the whole photo rescaled, then cropped."""

    def _scale(self, x, y):
        s = self._draw_scale()
        return self._resize(x, y, (max(1, round(x.shape[-2] * s)), max(1, round(x.shape[-1] * s))))


class _Bf16(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def _step_data(n: int):
    """(photos uint8 N×3×400×600, masks N×400×600, where): the real train photos or random ones."""
    if (SHARED / "dataset").is_dir():
        from datautils import import_drone_dataset

        ds = import_drone_dataset(SHARED, (600, 400), "train", normalize=False)
        x, y = zip(*(ds[i] for i in range(n)))
        return torch.stack(x), torch.stack(y), f"the first {n} real train photos (cached at 600x400)"
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 400, 600), dtype=torch.uint8, generator=g),
            torch.randint(0, 23, (n, 400, 600), generator=g), f"{n} random 600x400 photos (no shared copy here)")


def bench_steps(batches: int, batch_size: int, variants: list[str]) -> int:
    from torch.utils.data import TensorDataset
    from torch.utils.data import default_collate

    from metrics import pixel_accuracy
    from models import Compiled, get_model
    from train import train_one_epoch

    x, y, where = _step_data(batches * batch_size + batch_size)
    data = TensorDataset(x, y)
    threads = torch.get_num_threads()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads; data: {where}")
    print(f"unet_lite0, batch {batch_size}, {batches} timed steps after one warm-up step per variant")
    results = {}
    for name in variants:
        torch.manual_seed(0)
        crop = (256, 256) if "crop256" in name else (320, 320)
        augment = (_ScaleWholePhoto if "scale_whole_photo" in name else Augment)(crop)
        model = get_model("unet_lite0", num_classes=23)
        if "channels_last" in name:
            model = model.to(memory_format=torch.channels_last)
        net = _Bf16(model) if "bf16" in name else Compiled(model) if "compile" in name else model
        opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
        loss = nn.CrossEntropyLoss(ignore_index=255)
        metric = (lambda out, mask: 0.0) if "no_step_metric" in name else pixel_accuracy
        in_worker = "aug_in_worker" in name
        collate = (lambda b: augment(*default_collate(b))) if in_worker else None

        def loader(first, count):
            sub = torch.utils.data.Subset(data, range(first, first + count))
            return DataLoader(sub, batch_size=batch_size, collate_fn=collate, num_workers=1 if in_worker else 0)

        if "1thread" in name:
            torch.set_num_threads(1)
        try:
            t = time.perf_counter()
            train_one_epoch(net, loader(0, batch_size), loss, opt, metric, device="cpu", progress=False,
                            augment=None if in_worker else augment)
            warm = time.perf_counter() - t
            t = time.perf_counter()
            train_one_epoch(net, loader(batch_size, batches * batch_size), loss, opt, metric, device="cpu",
                            progress=False, augment=None if in_worker else augment)
            dt = time.perf_counter() - t
        finally:
            torch.set_num_threads(threads)
        ips = batches * batch_size / dt
        results[name] = ips
        extra = f", warm-up step {warm:.1f} s" if "compile" in name else ""
        if "compile" in name and getattr(net, "failed", None):
            extra += f" (compile FAILED, ran eager: {net.failed[:80]})"
        ratio = ips / results[variants[0]]
        print(f"{name:30s} {ips:6.2f} img/s  {ratio:5.2f}x{extra}  ({STEP_VARIANTS[name]})", flush=True)
    if "channels_last+crop256" in results and "channels_last" in results:
        px = results["channels_last+crop256"] * 256 * 256 / (results["channels_last"] * 320 * 320)
        print(f"crop 256 vs 320 (channels_last): pixels/s ratio {px:.2f}x")
    for crop in ("", "+crop256"):
        new, old = results.get(f"channels_last{crop}"), results.get(f"channels_last{crop}+scale_whole_photo")
        if new and old:
            print(f"rescaling the crop's window vs the whole photo{crop or ' (crop 320)'}: {new / old:.2f}x img/s")
    if "channels_last" in results:
        _time_normalisation(x[:batch_size], batch_size / results["channels_last"])
    return 0


def _time_normalisation(photos: torch.Tensor, step_s: float, reps: int = 20) -> None:
    """What moving normalisation could save: its cost on one batch against a training step."""
    from transforms import normalize

    where = {"320x320 crops (the recipe: on the training device, after augmentation)":
             photos[..., :320, :320].contiguous(),
             "whole 600x400 photos (as a loader normalising before augmentation would)": photos}
    for label, batch in where.items():
        normalize(batch)
        t = time.perf_counter()
        for _ in range(reps):
            normalize(batch)
        ms = (time.perf_counter() - t) / reps * 1e3
        print(f"normalising one batch of {label}: {ms:.1f} ms = {ms / (step_s * 10):.2f} % of a channels_last step")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", default="600x400")
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--steps", action="store_true", help="benchmark training-step variants of unet_lite0")
    p.add_argument("--batches", type=int, default=6, help="--steps: timed steps per variant")
    p.add_argument("--step-batch-size", type=int, default=8, help="--steps: batch size")
    p.add_argument("--variants", default=",".join(STEP_VARIANTS),
                   help="--steps: comma-separated, from " + ", ".join(STEP_VARIANTS))
    args = p.parse_args()
    if args.steps:
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in STEP_VARIANTS]
        if unknown:
            p.error(f"unknown variants {unknown}; choose from {', '.join(STEP_VARIANTS)}")
        return bench_steps(args.batches, args.step_batch_size, names)
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
