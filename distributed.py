"""Training on several processes with torchrun: the process group, sharding, and what only rank 0 does.

    torchrun --nproc-per-node=2 run_experiment.py --model unet --demo --epochs 3
    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 run_experiment.py ...

Without torchrun (no RANK/WORLD_SIZE in the environment) every function here is a no-op and a
script runs exactly as before. Under torchrun each process trains a DistributedDataParallel
replica: NCCL and one GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU.

Holds: starting and closing the group, ``main_first`` (rank 0 does a thing, e.g. building the
cache, before the others), ``Shard`` (a rank's share of an evaluation split), summing and
gathering results, and ``SyncBatchNorm2d`` (batch statistics over all processes; torch's own
SyncBatchNorm refuses CPU tensors, this one works on gloo too). Not here: the training loop
(train.py), which calls these.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

from basics import InputError, get_device

T = TypeVar("T")

__all__ = ["init_distributed", "close_distributed", "is_distributed", "rank", "local_rank", "world_size", "is_main",
           "barrier", "main_first", "from_main", "Shard", "all_reduce_sum", "all_reduce_max", "gather_objects", "SyncBatchNorm2d", "convert_sync_bn",
           "wrap_ddp", "unwrap", "ranks_agree", "broadcast_buffers", "say", "run_facts"]


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's place on its own machine (torchrun's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, saves and writes reports."""
    return rank() == 0


def say(*args, **kwargs) -> None:
    """print, on rank 0 only (everywhere in one process)."""
    if is_main():
        print(*args, **kwargs)


def run_facts(batch_size: int, model: nn.Module) -> dict:
    """What metrics.json records about the processes: their number, the batch per process and in
    all, and whether the replicas ended identical (a collective: every rank must call it)."""
    return {"world_size": world_size(), "batch_size_per_process": batch_size,
            "global_batch_size": batch_size * world_size(), "ranks_in_sync": ranks_agree(model)}


def init_distributed(device_name: str | None = None) -> torch.device:
    """Join torchrun's process group when launched by torchrun and return this process's device:
    ``cuda:LOCAL_RANK`` with NCCL when CUDA is used, the CPU with gloo otherwise. Without
    torchrun: just the device ``device_name`` names."""
    device = get_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if os.environ.get("DRONE_SEG_FAIL_RANK") == str(dist.get_rank()):  # the failure path, for tests
        raise InputError(f"DRONE_SEG_FAIL_RANK={dist.get_rank()}: this rank was told to fail")
    return device


def close_distributed(ok: bool = True) -> None:
    """Leave the process group. After a successful run every rank first meets the others, so no
    rank tears its connections down while a peer still uses them (gloo aborts then); after a
    failure it leaves at once (waiting would hang: the others may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The first process of each machine (LOCAL_RANK 0) runs the block while the others wait at a
    barrier, then they run it: e.g. the decode-once cache is built once per machine and opened,
    finished, by that machine's other processes. Per machine, not once in all: machines need not
    share a disk (on a shared one, the cache's locking lets two builders work side by side)."""
    first = local_rank() == 0
    if not first:
        barrier()
    try:
        yield
    finally:  # also when a first process fails: the others then meet the same error, or torchrun ends them
        if first:
            barrier()


def from_main(read: Callable[[], T]) -> T:
    """``read()`` on rank 0 alone (e.g. loading a checkpoint from rank 0's --out), its result
    given to every rank: the other machines need not see rank 0's disk. An error on rank 0 is
    raised on every rank, so all stop with the same message. In one process: just ``read()``."""
    if not is_distributed():
        return read()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", read())
        except Exception as e:  # every rank must leave the broadcast, then all raise it
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


class Shard(Subset):
    """This rank's share of an evaluation split: items rank, rank + W, rank + 2W, … (no padding,
    so summed over ranks every item counts exactly once)."""

    def __init__(self, dataset, rank_: int | None = None, world: int | None = None):
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        super().__init__(dataset, range(self.rank, len(dataset), self.world))
        self.ids = [dataset.ids[i] for i in self.indices] if hasattr(dataset, "ids") else None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over all processes, in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _SumOverRanks(torch.autograd.Function):
    """Sum over processes whose gradient is the sum over processes of the incoming gradients:
    every rank's loss depends on every rank's input through the sum."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across processes.

    Mean and variance come from two all-reduces that autograd sees through (their backward sums
    the gradients over processes too), so gradients flow as if one process held the whole batch; running statistics get the unbiased variance, as BatchNorm2d's do. Works on
    any backend (gloo included). In one process, or in eval mode, it is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        c = x.shape[1]
        count = all_reduce(torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device))
        mean = all_reduce(x.sum((0, 2, 3))) / count
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """--sync-bn: torch's SyncBatchNorm on CUDA (fused kernels), :class:`SyncBatchNorm2d` on the
    CPU, where torch's refuses to run. Weights, running statistics and train/eval state are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False, find_unused: bool = False
             ) -> nn.Module:
    """The model as a DistributedDataParallel replica (with --sync-bn, batch norm over all
    processes; ``find_unused`` when some parameters get no gradient for a while, e.g. a frozen
    encoder); unchanged in one process."""
    if not is_distributed():
        return model
    if sync_bn:
        model = convert_sync_bn(model, device)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics). Without sync-bn each
    replica updates them from its own batches, so after an epoch they differ slightly; validation
    and checkpoints must all use the ones rank 0 saves."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b, 0)


def ranks_agree(model: nn.Module) -> bool:
    """True when every process holds bit-identical weights and buffers (always, in one process):
    the check that DistributedDataParallel kept the replicas together."""
    import hashlib

    if not is_distributed():
        return True
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_objects(h.hexdigest())
    return all(d == digests[0] for d in digests)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper and/or one that names its model
    ``plain_model`` (``models.Compiled``): what checkpoints and evaluation use."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "plain_model", None), nn.Module):
            model = model.plain_model
        else:
            return model
