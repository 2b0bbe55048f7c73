"""torchrun and DistributedDataParallel on the CPU (gloo), on generated data."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from datautils import import_drone_dataset
from demo import make_demo_dataset
from evaluate import ModelEvaluation
from metrics import pixel_accuracy
from models import get_model
from checkpoint import load_checkpoint

ARGS = ["--model", "unet", "--base", "8", "--depth", "2", "--train-size", "48x32", "--crop", "32",
        "--batch-size", "2", "--epochs", "3", "--eval-split", "test", "--lr", "0.01"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], args: list[str], env=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                             str(REPO / "run_experiment.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(args, nproc=2, env=None, timeout=300):
    p = _launch(["--standalone", f"--nproc-per-node={nproc}"], args, env)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("ddp"), n=14, size=(48, 32), seed=3, split_counts=(8, 3, 3))


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    """One uninterrupted 2-process run that several tests compare against."""
    out = tmp_path_factory.mktemp("run") / "o"
    rc, stdout, stderr = _run(ARGS + ["--data-root", str(data), "--out", str(out)],
                              env={"DRONE_CACHE_DIR": str(out.parent / "cache")})
    assert rc == 0, stderr[-3000:]
    return out, stdout


def _weights(path):
    return load_checkpoint(path)["model"]


def test_two_processes_train_one_model_write_once_and_evaluate_like_one(two_process_run, data):
    out, stdout = two_process_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["batch_size_per_process"] == 2 and m["global_batch_size"] == 4
    assert m["ranks_in_sync"] is True  # both replicas hold bit-identical weights at the end
    assert stdout.count("report in") == 1 and stdout.count("parameters") == 1  # rank 0 alone speaks
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the 2-process evaluation equals a 1-process evaluation of the saved weights
    model = get_model("unet", base=8, depth=2)
    model.load_state_dict(_weights(out / "best.pt"))
    test = import_drone_dataset(data, (48, 32), "test", normalize=False, cache=False)
    ev = ModelEvaluation(model, test, pixel_accuracy, device="cpu")
    ev.evaluate_all(progress=False)
    assert ev.metrics["pixel_accuracy"] == m["pixel_accuracy"] and ev.metrics["miou"] == m["miou"]
    assert list(m["per_image"].values()) == ev.scores and list(m["per_image"]) == test.ids
    val = import_drone_dataset(data, (48, 32), "val", normalize=False, cache=False)
    ev_val = ModelEvaluation(model, val, pixel_accuracy, device="cpu")
    ev_val.evaluate_all(progress=False)
    assert ev_val.metrics["miou"] == load_checkpoint(out / "best.pt")["best"]  # validation, too


def _two_nodes(args: list[str], tmp_path, tag: str) -> list[tuple[int, str, str]]:
    """Two torchrun agents of one process each on 127.0.0.1 (static rendezvous, node 0 first) that
    share no folder: each has its own --out and --cache-dir, as two machines without a shared disk."""
    port = _free_port()
    nodes = []
    for node in (0, 1):
        disk = tmp_path / f"disk{node}"
        launcher = ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", "--master-addr=127.0.0.1",
                    f"--master-port={port}"]
        nodes.append(_launch(launcher, args + ["--out", str(disk / "o"), "--cache-dir", str(disk / f"cache-{tag}")],
                             {"DRONE_CACHE_DIR": str(disk / "no-cache-here")}))
    results = []
    for n in nodes:
        out, err = n.communicate(timeout=300)
        results.append((n.returncode, out, err))
    return results


def test_two_nodes_without_a_shared_disk_train_resume_and_agree_with_two_processes(two_process_run, data, tmp_path):
    """Stopped after epoch 1 and resumed under torchrun (rank 0 reads last.pt, the others receive
    it), two agents without a shared disk end with the weights of the uninterrupted 2-process run
    to the last bit: the resume test of torchrun on one machine too (the same code path)."""
    common = ARGS + ["--data-root", str(data)]
    results = _two_nodes(common + ["--stop-after-epoch", "1"], tmp_path, "a")  # stops after epoch 1 of 3
    assert [rc for rc, *_ in results] == [0, 0], [err[-2000:] for *_, err in results]
    disk0, disk1 = tmp_path / "disk0" / "o", tmp_path / "disk1" / "o"
    assert load_checkpoint(disk0 / "last.pt")["epoch"] == 1
    # only node 0 holds checkpoints and the report; node 1 built its own cache and read nothing of node 0's
    assert not disk1.exists() or not list(disk1.iterdir())
    assert list((tmp_path / "disk1" / "cache-a").glob("*.bin"))
    results = _two_nodes(common + ["--resume"], tmp_path, "b")  # resume: rank 0 reads last.pt, the others get it
    assert [rc for rc, *_ in results] == [0, 0], [err[-2000:] for *_, err in results]
    m = json.loads((disk0 / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["ranks_in_sync"] is True
    want, got = _weights(two_process_run[0] / "last.pt"), _weights(disk0 / "last.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not disk1.exists() or not list(disk1.iterdir())


def test_a_failing_rank_ends_the_job_with_its_error(data, tmp_path):
    rc, _, err = _run(ARGS + ["--data-root", str(data), "--out", str(tmp_path / "o")], timeout=180,
                      env={"DRONE_CACHE_DIR": str(tmp_path / "cache"), "DRONE_SEG_FAIL_RANK": "1"})
    assert rc != 0
    assert "error (rank 1 of 2): DRONE_SEG_FAIL_RANK=1" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


# ----------------------------------------------------------------------------- sync-bn equivalence


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 23, 1))


def _batches(b: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(steps * 2 * b, 3, 12, 16, generator=g)
    y = torch.randint(0, 23, (steps * 2 * b, 12, 16), generator=g)
    return x, y


def _rank_main(rank: int, world: int, init: str, b: int, steps: int, out: str, sync_bn: bool = True) -> None:
    import torch.distributed as dist

    from distributed import unwrap, wrap_ddp
    from train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = wrap_ddp(_net(), torch.device("cpu"), sync_bn=sync_bn)
    x, y = _batches(b, steps)
    # step k: rank r takes samples [2bk + rb, 2bk + (r+1)b), the halves of the 1-process batch k
    mine = [(x[2 * b * k + rank * b:2 * b * k + (rank + 1) * b], y[2 * b * k + rank * b:2 * b * k + (rank + 1) * b])
            for k in range(steps)]
    train(model, 1, mine, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), 0.1, momentum=0.9), device="cpu",
          amp=False, progress=False)
    if rank == 0:
        torch.save(unwrap(model).state_dict(), out)
    dist.barrier()  # leave together: gloo aborts a process whose peer tears down mid-use
    dist.destroy_process_group()


def test_sync_bn_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    from train import train

    b, steps = 2, 4
    for sync in (True, False):
        init = f"file://{tmp_path / f'rendezvous-{sync}'}"
        torch.multiprocessing.spawn(_rank_main, args=(2, init, b, steps, str(tmp_path / f"ddp-{sync}.pt"), sync),
                                    nprocs=2)
    single = _net()
    x, y = _batches(b, steps)
    batches = [(x[2 * b * k:2 * b * (k + 1)], y[2 * b * k:2 * b * (k + 1)]) for k in range(steps)]
    train(single, 1, batches, nn.CrossEntropyLoss(), torch.optim.SGD(single.parameters(), 0.1, momentum=0.9), device="cpu",
          amp=False, progress=False)
    ddp = torch.load(tmp_path / "ddp-True.pt", weights_only=True)
    for k, v in single.state_dict().items():
        # float32 sums in another order: equal within 1e-5 after 4 SGD steps (Adam would turn float noise
        # in a near-zero gradient into full-size steps, so SGD keeps the comparison about the gradients)
        assert torch.allclose(ddp[k].float(), v.float(), atol=1e-5, rtol=1e-5), k
    # and what sync-bn exists for: plain batch norm normalises each rank by its own half of the batch, so
    # the same 2 x 2 run fails the comparison that the sync-bn run passes
    plain = torch.load(tmp_path / "ddp-False.pt", weights_only=True)
    far = [k for k, v in single.state_dict().items()
           if v.is_floating_point() and not torch.allclose(plain[k], v, atol=1e-5, rtol=1e-5)]
    assert "1.running_var" in far and "0.weight" in far


def test_gpu_resident_loader_shards_each_epoch_like_a_distributed_sampler(data):
    from datautils import DeviceBatchLoader

    ds = import_drone_dataset(data, (48, 32), "train", normalize=False, cache=True)  # 8 images
    ranks = [DeviceBatchLoader(ds, 3, True, torch.device("cpu"), rank=r, world=3, seed=5) for r in range(3)]
    orders = [r._order().tolist() for r in ranks]
    assert [len(o) for o in orders] == [3, 3, 3] and len({len(r) for r in ranks}) == 1  # padded to equal shares
    assert sorted(set(sum(orders, []))) == list(range(8))  # every image in some share
    again = [r._order().tolist() for r in ranks]
    assert again == orders  # the order comes from the seed and the epoch, not the global generator
    for r in ranks:
        r.set_epoch(1)
    assert [r._order().tolist() for r in ranks] != orders  # reshuffled per epoch


def test_a_budget_under_torchrun_follows_the_slowest_clock(data, tmp_path):
    """Rank 1's clock runs three times as fast as rank 0's: without agreeing on the time, the
    ranks would take different rates and stop at different steps (a hang, or replicas that differ)."""
    wrapper = tmp_path / "fast_clock_on_rank1.py"
    wrapper.write_text(
        "import os, runpy, sys, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    real = time.perf_counter\n"
        "    t0 = real()\n"
        "    time.perf_counter = lambda: t0 + 3 * (real() - t0)\n"
        f"sys.argv[0] = {str(REPO / 'run_experiment.py')!r}\n"
        "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = tmp_path / "o"
    args = [a for a in ARGS if a not in ("--epochs", "3")] + ["--time-limit", "0.05", "--data-root", str(data),
                                                              "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DRONE_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(wrapper), *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["ranks_in_sync"] is True and m["time_limit"] == 0.05
    assert m["steps_run"] >= 1 and "budget minutes" in p.stdout  # both ranks stopped at the same step
