"""Synchronized BatchNorm and DDP on CPU: 2 spawned processes (gloo), small shapes. The oracle is one process
that sees the whole (global) batch: with sync_bn, W ranks x their shards must give its outputs, every gradient and
its running statistics."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from resnet_fused import ext
from resnet_fused.distributed import env_from_torchrun, shard_bounds
from resnet_fused.model import FusedResNet
from resnet_fused.reference import ResNet

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, *args, timeout=240):
    """Run fn(rank, world, port, *args) in ``world`` processes; fail (not hang) past ``timeout`` seconds."""
    port = free_port()
    ctx = mp.start_processes(fn, args=(world, port) + args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {timeout} s")


def init(rank, world, port):
    from conftest import fast_interpreter  # a spawned worker does not run conftest
    fast_interpreter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def reference(shortcut, seed=0):
    torch.manual_seed(seed)
    ref = ResNet(depth=8, shortcut=shortcut, widths=(4, 8, 12) if shortcut == "B" else (4, 8, 16))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    return ref


def global_batch(n, hw=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, hw, hw, generator=g) * 2 + 0.5, torch.randint(0, 10, (n,), generator=g)


SHARDS = {2: [(0, 5), (5, 8)]}  # unequal shards: the merge must weight each rank by its count


def _steps(backend, shortcut, steps, lo, hi, denominator, sync=False, reduce=False):
    """SGD steps of a FusedResNet on rows [lo, hi) of every global batch with loss = sum of CE / denominator;
    ``reduce``: gradients summed over the processes (the ranks' shares of one global-batch loss)."""
    model = FusedResNet.from_reference(reference(shortcut), backend=backend, sync_bn=sync, cuda_graphs=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res = dict(outputs=[], grads=[], xgrads=[])
    for step in range(steps):
        x, y = global_batch(8, seed=step)
        xs = x[lo:hi].clone().requires_grad_(True)
        out_ = model(xs)
        F.cross_entropy(out_, y[lo:hi], reduction="sum").div(denominator).backward()
        if reduce:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        res["outputs"].append(out_.detach())
        res["xgrads"].append(xs.grad)
        res["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    res["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return res


def _sync_worker(rank, world, port, backend, shortcut, sync, steps, out):
    init(rank, world, port)
    try:
        lo, hi = SHARDS[world][rank]
        res = _steps(backend, shortcut, steps, lo, hi, 8, sync=sync, reduce=sync)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single(backend, shortcut, steps, lo=0, hi=8):
    """One process on rows [lo, hi) of every global batch: the oracle."""
    return _steps(backend, shortcut, steps, lo, hi, hi - lo)


def _cases():
    """(backend, shortcut): the C++ operators with both shortcuts; the Triton kernels (interpreted: slow) with B,
    whose fused conv2 + projection op syncs two BatchNorms."""
    cases = []
    if ext.available():
        cases += [("cpu", "A"), ("cpu", "B")]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        cases.append(("triton", "B"))
    return cases


TOL = dict(rtol=2e-4, atol=2e-5)


@needs_gloo
@pytest.mark.parametrize("backend,shortcut", _cases())
def test_sync_bn_two_ranks_equal_one_process_with_the_global_batch(tmp_path, backend, shortcut):
    steps = 2
    spawn(_sync_worker, 2, backend, shortcut, True, steps, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = _single(backend, shortcut, steps)
    for step in range(steps):
        for r, (lo, hi) in enumerate(SHARDS[2]):
            torch.testing.assert_close(ranks[r]["outputs"][step], one["outputs"][step][lo:hi], **TOL)
            # x's gradient: the single process's loss is the global mean, the ranks' shares sum to it
            torch.testing.assert_close(ranks[r]["xgrads"][step], one["xgrads"][step][lo:hi], **TOL)
            for name, g in one["grads"][step].items():
                torch.testing.assert_close(ranks[r]["grads"][step][name], g, **TOL,
                                           msg=lambda m: f"step {step} rank {r} grad {name}: {m}")
    for r in range(2):
        for k, v in one["state"].items():  # weights after the steps, running stats (global, unbiased), counters
            torch.testing.assert_close(ranks[r]["state"][k], v, **TOL, msg=lambda m: f"rank {r} {k}: {m}")


@needs_gloo
@pytest.mark.skipif(not ext.available(), reason="needs the C++ extension")
def test_without_sync_bn_each_rank_keeps_its_own_statistics(tmp_path):
    spawn(_sync_worker, 2, "cpu", "A", False, 1, str(tmp_path))
    for r, (lo, hi) in enumerate(SHARDS[2]):
        got = torch.load(tmp_path / f"rank{r}.pt")
        own = _single("cpu", "A", 1, lo, hi)
        torch.testing.assert_close(got["outputs"][0], own["outputs"][0], **TOL)
        for k, v in own["state"].items():
            if "running" in k:
                torch.testing.assert_close(got["state"][k], v, **TOL, msg=lambda m: f"rank {r} {k}: {m}")


def _ddp_worker(rank, world, port, steps, out):
    init(rank, world, port)
    try:
        model = FusedResNet.from_reference(reference("A"), backend="cpu", sync_bn=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for step in range(steps):
            x, y = global_batch(8, seed=step)
            lo, hi = shard_bounds(8, rank, world)
            F.cross_entropy(ddp(x[lo:hi]), y[lo:hi]).backward()  # DDP averages: equal shards give the global mean
            opt.step()
            opt.zero_grad()
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.skipif(not ext.available(), reason="needs the C++ extension")
def test_ddp_with_sync_bn_matches_one_process(tmp_path):
    steps = 3
    spawn(_ddp_worker, 2, steps, str(tmp_path))
    one = _single("cpu", "A", steps)["state"]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in one.items():
            torch.testing.assert_close(got[k], v, **TOL, msg=lambda m: f"rank {r} {k}: {m}")


def test_torchrun_environment_checks():
    assert env_from_torchrun({}) is None
    full = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    e = env_from_torchrun(full)
    assert (e.rank, e.world_size, e.local_rank, e.is_main, e.enabled) == (1, 2, 1, False, True)
    with pytest.raises(ValueError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        env_from_torchrun(dict(RANK="0"))
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        env_from_torchrun({**full, "RANK": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        env_from_torchrun({**full, "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="LOCAL_RANK=3"):
        env_from_torchrun({**full, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"})
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_sync_bn_is_a_no_op_without_a_process_group():
    ref = reference("A")
    a = FusedResNet.from_reference(ref, sync_bn=True, cuda_graphs=False)
    b = FusedResNet.from_reference(ref, cuda_graphs=False)
    x, _ = global_batch(4)
    torch.testing.assert_close(a(x), b(x))
    assert "sync_bn=True" in repr(a)


# ---- the training CLI under torchrun ---------------------------------------------------------------------------------

def _cli(tmp, *args, nproc=None, env=None, timeout=300):
    import subprocess
    import sys
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc else [sys.executable]
    cmd = launcher + ["-m", "resnet_fused.train", "--device", "cpu", "--model", "resnet8", "--no-plot",
                      "--no-progress"] + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=tmp)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@needs_gloo
@pytest.mark.skipif(not ext.available(), reason="needs the C++ extension")
def test_torchrun_training_equals_one_process_with_the_global_batch(tmp_path, mnist_root):
    """2 processes x batch 16 with --sync-bn == 1 process x batch 32 (same seed, same batches and shifts): the same
    weights, running statistics and metrics; rank 0 alone prints and writes; resume with another world size."""
    common = ["--subset", "128", "--epochs", "2", "--lr", "0.02", "--warmup-epochs", "0", "--data-root", mnist_root]
    two = _cli(tmp_path, *common, "--batch-size", "16", "--sync-bn", "--out", "two", "--stop-after-epoch", "1",
               nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("epoch   1/2") == 1 and "global batch 32, sync-BN" in two.stdout
    one = _cli(tmp_path, *common, "--batch-size", "32", "--out", "one")
    assert one.returncode == 0, one.stderr[-2000:]
    first = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and first["config"]["world_size"] == 2
    # the second epoch: resumed as 2 processes, and (another world size) as 1 process with twice the batch
    again = _cli(tmp_path, *common, "--batch-size", "16", "--sync-bn", "--out", "two", "--resume", nproc=2)
    assert again.returncode == 0, again.stderr[-2000:]
    got, want = _weights(tmp_path / "two" / "last.pt"), _weights(tmp_path / "one" / "last.pt")
    # after one step the two agree to ~1e-6 (the order of fp32 sums); 8 steps of small-batch BatchNorm training
    # grow that to ~5e-5 (measured; without --sync-bn the difference is ~5e-2)
    for k, v in want.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=2e-3, atol=5e-4, msg=lambda m: f"{k}: {m}")
    hist_two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["history"]
    hist_one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["history"]
    for a, b in zip(hist_two, hist_one):  # metrics reduced over the ranks: the single process's numbers
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["test_acc"] - b["test_acc"]) < 1e-9
    solo = _cli(tmp_path, *common, "--batch-size", "16", "--sync-bn", "--out", "solo", "--resume",
                str(tmp_path / "two" / "last.pt"), "--epochs", "3", "--stop-after-epoch", "3")
    assert solo.returncode == 0, solo.stderr[-2000:]
    assert "resuming a run of 2 process(es) with 1" in solo.stdout
    assert torch.load(tmp_path / "solo" / "last.pt", weights_only=True)["epoch"] == 3


@needs_gloo
def test_bad_launches_fail_fast_with_one_line(tmp_path, mnist_root):
    data = ["--data-root", mnist_root, "--subset", "64", "--epochs", "1"]
    r = _cli(tmp_path, *data, "--out", "a", env=dict(RANK="0"))
    assert r.returncode == 2 and "incomplete distributed launch" in r.stderr and "WORLD_SIZE" in r.stderr
    # WORLD_SIZE=2 but one process: an error within the timeout, not a hang
    t0 = time.monotonic()
    r = _cli(tmp_path, *data, "--out", "b", env=dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                                     RESNET_FUSED_DIST_TIMEOUT="5"))
    assert r.returncode == 2 and "could not join the run" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    if ext.available():  # a rank without data
        r = _cli(tmp_path, "--data-root", mnist_root, "--subset", "16", "--batch-size", "16", "--out", "c",
                 nproc=2)
        assert r.returncode != 0 and "fewer than one global batch" in r.stderr
    assert not (tmp_path / "b" / "last.pt").exists() and not (tmp_path / "c" / "last.pt").exists()


@needs_gloo
@pytest.mark.skipif(not ext.available(), reason="needs the C++ extension")
def test_resume_after_one_rank_is_killed(tmp_path, mnist_root):
    """SIGKILL one worker mid-run: torchrun stops the run, last.pt holds the last finished epoch, and --resume
    ends where an uninterrupted run ends."""
    import signal
    import subprocess
    import sys
    args = ["-m", "resnet_fused.train", "--device", "cpu", "--model", "resnet8", "--no-plot", "--no-progress",
            "--data-root", mnist_root, "--subset", "768", "--epochs", "4", "--batch-size", "32", "--lr", "0.02",
            "--sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                *args, "--out", out, *extra]
    proc = subprocess.Popen(torchrun("killed"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    assert proc.poll() is None and children, "the run ended before a worker could be killed"
    os.kill(int(children[-1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= done < 4
    r = subprocess.run(torchrun("killed", "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    full = subprocess.run(torchrun("full"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    got, want = _weights(last), _weights(tmp_path / "full" / "last.pt")
    assert torch.load(last, weights_only=True)["epoch"] == 4
    for k, v in want.items():  # the same ranks, batches and operations: the same numbers
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
