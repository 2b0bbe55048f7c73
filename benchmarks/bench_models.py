"""Training and inference throughput of every model: images/s of forward + backward + AdamW
step, and of a forward pass under inference mode.

    python benchmarks/bench_models.py                      # 768x512, batch 4, CPU (and CUDA with bf16 autocast)
    python benchmarks/bench_models.py --size 480x320 --models unet,fcn8s,unet_lite0

Same batch, same steps for every model on each device, measured side by side in one process.
Weights do not matter for speed: every model is built from scratch (nothing is downloaded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from datautils import parse_size  # noqa: E402
from models import MODELS, count_parameters, get_model  # noqa: E402


def images_per_s(name: str, device: torch.device, size, batch: int, steps: int, amp: bool) -> float:
    torch.manual_seed(0)
    model = get_model(name).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size[1], size[0], device=device)
    y = torch.randint(0, 23, (batch, size[1], size[0]), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch * steps / _timed(step, steps, device)


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def inference_per_s(name: str, device: torch.device, size, batch: int, steps: int, amp: bool) -> float:
    torch.manual_seed(0)
    model = get_model(name).to(device).eval()
    x = torch.randn(batch, 3, size[1], size[0], device=device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    return batch * steps / _timed(step, steps, device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="768x512")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps on the CPU (x10 on CUDA)")
    p.add_argument("--models", default=",".join(m for m in sorted(MODELS) if m != "single_conv"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    size = parse_size(args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"{args.size}, batch {args.batch}; CPU: {os.cpu_count()} cores, {torch.get_num_threads()} threads"
          + (f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no CUDA device"))
    for name in args.models.split(","):
        row = f"{name:<22} {count_parameters(get_model(name)):>11,} params"
        rates = []
        for dev in devices:
            amp = dev.type == "cuda"
            steps = args.steps * (10 if amp else 1)
            r = images_per_s(name, dev, size, args.batch, steps, amp)
            i = inference_per_s(name, dev, size, args.batch, steps, amp)
            rates.append(r)
            row += f" | {dev.type}{' bf16' if amp else ''}: train {r:7.2f}, infer {i:7.2f} img/s"
        if len(rates) == 2:
            row += f" | GPU/CPU train {rates[1] / rates[0]:.0f}x"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
