"""Training images per second of 1 process vs N DistributedDataParallel processes, side by side.

    python benchmarks/bench_ddp.py                      # CPU: 1 process × all cores vs 2 × half
    python benchmarks/bench_ddp.py --model unet_lite0 --size 320 --batch-size 4

The same model, the same per-process batch and the same number of steps per process; each run
trains through train.train_one_epoch (DDP gradient all-reduce included) on random batches held
in memory, so only compute and communication are measured, not data loading. On the CPU the
cores are split between the processes (threads = cores / processes), so the comparison is fair;
expect correctness there, not speed-up. On a CUDA machine: 1 GPU vs every GPU (NCCL).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


def _worker(rank: int, world: int, init: str, args, threads: int, result: str) -> None:
    from distributed import wrap_ddp
    from models import get_model
    from train import train_one_epoch

    torch.set_num_threads(threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = wrap_ddp(get_model(args.model).to(device), device)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8, generator=g),
                torch.randint(0, 23, (args.batch_size, args.size, args.size), generator=g))
               for _ in range(args.steps + 1)]
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    train_one_epoch(model, batches[:1], nn.CrossEntropyLoss(), opt, device=device, progress=False)  # warm-up
    if world > 1:
        dist.barrier()
    if cuda:
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    train_one_epoch(model, batches[1:], nn.CrossEntropyLoss(), opt, device=device, progress=False)
    if cuda:
        torch.cuda.synchronize(device)
    if world > 1:
        dist.barrier()
    took = time.perf_counter() - t
    if rank == 0:
        Path(result).write_text(str(took))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def images_per_s(world: int, args) -> float:
    cores = os.cpu_count() or 1
    threads = max(1, cores // world)  # the machine's cores shared out: a fair comparison on the CPU
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "t")
        torch.multiprocessing.spawn(_worker, args=(world, f"file://{d}/rdzv", args, threads, result), nprocs=world)
        took = float(Path(result).read_text())
    return world * args.batch_size * args.steps / took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--procs", type=int, default=None, help="processes of the distributed run "
                   "(default: 2 on the CPU, every GPU on CUDA)")
    args = p.parse_args()
    n = args.procs or (torch.cuda.device_count() if args.device == "cuda" else 2)
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch_size} per process, {args.steps} steps; "
          f"{args.device}, {os.cpu_count()} CPU cores" + (f", {torch.cuda.device_count()} GPU(s)"
                                                          if args.device == "cuda" else ""))
    one = images_per_s(1, args)
    print(f"1 process{'' if args.device == 'cuda' else f' × {os.cpu_count()} threads'}: {one:.2f} img/s")
    if n < 2:
        print("one device only: nothing to compare")
        return
    many = images_per_s(n, args)
    threads = "" if args.device == "cuda" else f" × {max(1, (os.cpu_count() or 1) // n)} threads"
    print(f"{n} processes{threads}: {many:.2f} img/s -> {many / one:.2f}x the single process")


if __name__ == "__main__":
    main()
