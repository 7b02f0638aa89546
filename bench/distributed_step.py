"""The distributed training step: time per step and the communication in it.

    python bench/distributed_step.py                       # CPU: 2 processes, gloo, ResNet-20, 28x28, batch 32/rank
    python bench/distributed_step.py --device cuda --world 1   # one GPU, NCCL (world size 1)
    python bench/distributed_step.py --json out.json

Each process runs FusedResNet wrapped in DistributedDataParallel and times, side by side in rotating windows
(medians over windows, the same processes and data):
  * ``ddp+sync-bn``  the full step: sync_bn=True (one all_gather per BatchNorm forward, one all_reduce per BatchNorm
                     backward) and DDP's gradient all-reduce;
  * ``ddp``          sync_bn off, DDP's gradient all-reduce;
  * ``local``        the same model and step without any collective (``ddp.no_sync()``, sync_bn off).
The differences are the communication each adds to the step (``ddp - local``: gradient all-reduce,
``ddp+sync-bn - ddp``: the BatchNorm collectives). Alone, as micro-benchmarks: one all-reduce of all gradients
(fp32) and one BatchNorm all_gather of [mean, var, count]. World size 1 runs no collective (PyTorch skips them), so
on one GPU the figures show the step and the DDP wrapper's own cost.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


from resnet_fused import build_model  # noqa: E402
from common import write_json  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, iters):
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / iters * 1e3


def _worker(rank, world, port, args, out):
    dev = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        steps = {}
        for name, sync_bn in (("ddp+sync-bn", True), ("ddp", False), ("local", False)):
            model = build_model(args.model, impl="fused", sync_bn=sync_bn).to(dev)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                                            else None)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

            def step(ddp=ddp, opt=opt, local=name == "local"):
                if local:
                    with ddp.no_sync():
                        F.cross_entropy(ddp(x), y).backward()
                else:
                    F.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
            for _ in range(args.warmup):
                step()
            steps[name] = step
        ms = {k: [] for k in steps}
        for w in range(args.windows):  # rotating order: drift hits every variant alike
            names = list(steps)
            names = names[w % len(names):] + names[:w % len(names)]
            for k in names:
                dist.barrier()
                ms[k].append(_time(steps[k], dev, args.iters))
        n_grad = sum(p.numel() for p in model.parameters())
        flat = torch.zeros(n_grad, device=dev)
        stats = torch.zeros(2 * 64 + 1, device=dev, dtype=torch.float64)
        parts = [torch.empty_like(stats) for _ in range(world)]
        micro = dict(grad_allreduce_ms=[_time(lambda: dist.all_reduce(flat), dev, 20) for _ in range(5)],
                     bn_allgather_ms=[_time(lambda: dist.all_gather(parts, stats), dev, 50) for _ in range(5)])
        res = dict(rank=rank, step_ms={k: statistics.median(v) for k, v in ms.items()},
                   step_ms_windows=ms, grad_numel=n_grad,
                   micro={k: statistics.median(v) for k, v in micro.items()})
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--world", type=int, default=None, help="processes [2 on CPU, the GPU count on CUDA]")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=None, help="per process [32 on CPU, 512 on CUDA]")
    p.add_argument("--iters", type=int, default=None, help="steps per window [3 on CPU, 20 on CUDA]")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process [1]")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.world = args.world or (torch.cuda.device_count() if cuda else 2)
    args.batch = args.batch or (512 if cuda else 32)
    args.iters = args.iters or (20 if cuda else 3)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(args.world, port, args, out), nprocs=args.world, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(args.world)]
    step = {k: max(r["step_ms"][k] for r in ranks) for k in ranks[0]["step_ms"]}  # the slowest rank sets the pace
    micro = {k: max(r["micro"][k] for r in ranks) for k in ranks[0]["micro"]}
    res = dict(device=args.device, world=args.world, model=args.model, batch_per_process=args.batch,
               global_batch=args.batch * args.world, step_ms=step,
               grad_comm_ms=step["ddp"] - step["local"], sync_bn_comm_ms=step["ddp+sync-bn"] - step["ddp"],
               images_per_s={k: args.batch * args.world / v * 1e3 for k, v in step.items()}, micro=micro,
               grad_numel=ranks[0]["grad_numel"], ranks=ranks, torch=torch.__version__,
               gpu=torch.cuda.get_device_name(0) if cuda else None,
               date=datetime.date.today().isoformat())
    print(f"{args.model}, {args.world} x {args.device} process(es), batch {args.batch}/process "
          f"(global {args.batch * args.world}); median step ms of the slowest rank:")
    for k, v in step.items():
        print(f"  {k:12s} {v:9.2f} ms   {res['images_per_s'][k]:10,.0f} img/s")
    print(f"  gradient all-reduce in the step  {res['grad_comm_ms']:+.2f} ms "
          f"(alone: {micro['grad_allreduce_ms']:.3f} ms for {res['grad_numel']:,} fp32)")
    print(f"  sync-BN collectives in the step   {res['sync_bn_comm_ms']:+.2f} ms "
          f"(one BatchNorm all_gather alone: {micro['bn_allgather_ms']:.3f} ms)")
    if args.json:
        write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
