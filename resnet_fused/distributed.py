"""Distributed training pieces: synchronized BatchNorm statistics for FusedResNet, and torchrun's environment.

Synchronized BatchNorm (``FusedResNet(sync_bn=True)``): each BatchNorm's batch statistics are those of the global
batch. The fused kernels produce each rank's biased (mean, var) over its ``n`` values per channel; ``BatchSync``
all-gathers ``[mean, var, n]`` from every rank in **one collective** and merges them exactly (Chan et al.'s
parallel variance):

    N = sum n_i,   mean = sum n_i m_i / N,   var = sum n_i (v_i + (m_i - mean)^2) / N

The merge is done in fp64 on the gathered per-rank moments: unlike a sum / sum-of-squares all-reduce it does not
cancel catastrophically when |mean| >> std, and unlike a Welford pass it needs no per-element work; an all-gather
moves W x (2C + 1) numbers, a few hundred bytes per BatchNorm for ResNet-20. This is what torch.nn.SyncBatchNorm
does too (all_gather + batch_norm_gather_stats_with_counts).

Backward: rank s receives dL_s/dmean and dL_s/dvar of the global statistics from its own part of the network; the
gradient of the sum of all ranks' losses needs their sum, so one all-reduce (sum) of ``[dmean, dvar]`` per
BatchNorm, then the exact derivative of the merge:

    dL/dm_s = n_s/N (G_mean + 2 (m_s - mean) G_var),   dL/dv_s = n_s/N G_var

(SyncBatchNorm all-reduces the same two per-channel sums, written in terms of dy.) With DDP's gradient averaging the
parameters then get the gradient of the mean of the ranks' losses: for equal shards, exactly the gradient of one
process seeing the global batch. The running statistics follow SyncBatchNorm: the global mean and the unbiased
global variance (N / (N - 1)).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def active_group(process_group=None):
    """The process group to synchronise over, or None when there is nothing to synchronise (torch.distributed not
    initialised, or one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _all_gather(t, group):
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl":  # one flat buffer (gloo has no all_gather_into_tensor)
        out = t.new_empty((world,) + tuple(t.shape))
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


class _SyncStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, var, count, total, group):
        c = mean.shape[0]
        local = torch.cat([mean.detach().double(), var.detach().double(),
                           torch.full((1,), float(count), dtype=torch.float64, device=mean.device)])
        everyone = _all_gather(local, group)                      # [W, 2C + 1]: the one collective
        m_i, v_i, n_i = everyone[:, :c], everyone[:, c:2 * c], everyone[:, 2 * c:]
        g_mean = (n_i * m_i).sum(0) / total
        g_var = (n_i * (v_i + (m_i - g_mean) ** 2)).sum(0) / total
        ctx.save_for_backward(mean, g_mean)
        ctx.share, ctx.group = count / total, group
        return g_mean.to(mean.dtype), g_var.to(var.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        mean, g_mean = ctx.saved_tensors
        c = mean.shape[0]
        zeros = torch.zeros(c, dtype=torch.float64, device=mean.device)
        g = torch.cat([grad_mean.double() if grad_mean is not None else zeros,
                       grad_var.double() if grad_var is not None else zeros])
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)  # every rank's loss depends on these statistics
        gm, gv = g[:c], g[c:]
        d_mean = ctx.share * (gm + 2.0 * (mean.double() - g_mean) * gv)
        d_var = ctx.share * gv
        return d_mean.to(mean.dtype), d_var.to(mean.dtype), None, None, None


class BatchSync:
    """The synchronisation of one forward: the group, and the global batch from one all-gather of every rank's
    (batch, height, width) at the start of the step (one host read per step, none per BatchNorm). Calling it on a
    BatchNorm's local statistics gives the global ones and the global count."""

    def __init__(self, group, x: torch.Tensor):
        dev = x.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        sizes = _all_gather(torch.tensor([x.shape[0], x.shape[2], x.shape[3]], device=dev), group).tolist()
        if len({(h, w) for _, h, w in sizes}) != 1:
            raise ValueError(f"sync_bn: every rank must feed images of one size, got (batch, H, W) per rank "
                             f"{[tuple(s) for s in sizes]}")
        self.group = group
        self.batch = x.shape[0]
        self.total_batch = sum(n for n, _, _ in sizes)

    def __call__(self, mean, var, y):
        """(global mean, global biased var, global count) for statistics of y's channels over this rank's y."""
        hw = y.shape[2] * y.shape[3]
        count, total = self.batch * hw, self.total_batch * hw
        g_mean, g_var = _SyncStats.apply(mean, var, count, total, self.group)
        return g_mean, g_var, total


# ---- torchrun's environment ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


_NEEDED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_from_torchrun(environ=None) -> Optional[DistEnv]:
    """The launch described by torchrun's variables, None for a plain single-process run. Raises ValueError, naming
    the variable, when they are partial or inconsistent."""
    env = os.environ if environ is None else environ
    present = [k for k in _NEEDED if k in env]
    if not present:
        return None
    missing = [k for k in _NEEDED if k not in env]
    if missing:
        raise ValueError(f"incomplete distributed launch: {', '.join(present)} set but {', '.join(missing)} "
                         f"missing; launch with torchrun (e.g. torchrun --nproc_per_node=2 -m resnet_fused.train "
                         f"...) or unset them for a single-process run")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK={env['RANK']!r} "
                         f"WORLD_SIZE={env['WORLD_SIZE']!r} LOCAL_RANK={env['LOCAL_RANK']!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent distributed launch: RANK={rank} is not in [0, WORLD_SIZE={world})")
    if local < 0 or local > rank:
        raise ValueError(f"inconsistent distributed launch: LOCAL_RANK={local} with RANK={rank}")
    local_world = env.get("LOCAL_WORLD_SIZE")
    if local_world is not None and not 0 <= local < int(local_world):
        raise ValueError(f"inconsistent distributed launch: LOCAL_RANK={local} is not in "
                         f"[0, LOCAL_WORLD_SIZE={local_world})")
    return DistEnv(rank, world, local)


def shard_bounds(n: int, rank: int, world: int):
    """[lo, hi) of rank's part of n items split as evenly as possible (the first n % world ranks one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
