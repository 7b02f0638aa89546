"""@triton.jit helpers shared by the fused ops' kernels: index width, a NaN-keeping ReLU, and the cross-program
reductions that the last program of a launch finishes (``last_to_finish`` with the counters of semaphores.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ix(v, INDEX64: tl.constexpr):
    """An index as the kernel's index type: int64 when INDEX64 (some operand offset may pass 2**31 - 1, see
    index64()), else unchanged (int32): 32-bit address products and row divisions."""
    if INDEX64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def relu(v):
    """max(v, 0) that keeps NaN, as torch.relu does (Triton's default maximum turns NaN into 0)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def last_to_finish(cnt_ptr, n):
    """Whether this program is the last of the n programs that share the int32 counter at cnt_ptr to get here
    (then it resets the counter to 0, as every launch expects to find it). What the other programs stored before
    they got here is visible to the last one: every thread's stores precede the barrier, the barrier precedes the
    counter's acquire-release atomic; the last program reads those stores with ld.global.cg (not through L1)."""
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def tile_stats_merge(part_ptr, M, N, T, TILE, offs_c, c_ok, BLOCK_T: tl.constexpr):
    """Channel mean and biased variance from per-tile (mean, M2) partials part[t, 0:2, c] of T tiles of TILE rows
    (the last has M - (T-1)*TILE): Chan's parallel formula, tiles in order (deterministic; no E[y^2] - E[y]^2
    cancellation). Loads bypass L1 (.cg): other programs of the launch wrote the partials (last_to_finish)."""
    total = tl.zeros(offs_c.shape, dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (offs_t < T)[:, None] & c_ok[None, :]
        cnt = tl.minimum(M - offs_t * TILE, TILE).to(tl.float32)
        mt = tl.load(part_ptr + offs_t[:, None] * 2 * N + offs_c[None, :], mask=mask, other=0.0,
                     cache_modifier=".cg")
        total += tl.sum(tl.where(mask, cnt[:, None] * mt, 0.0), axis=0)
    mean = total / M
    m2 = tl.zeros(offs_c.shape, dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (offs_t < T)[:, None] & c_ok[None, :]
        cnt = tl.minimum(M - offs_t * TILE, TILE).to(tl.float32)
        base = part_ptr + offs_t[:, None] * 2 * N + offs_c[None, :]
        mt = tl.load(base, mask=mask, other=0.0, cache_modifier=".cg")
        m2t = tl.load(base + N, mask=mask, other=0.0, cache_modifier=".cg")
        d = mt - mean[None, :]
        m2 += tl.sum(tl.where(mask, m2t + cnt[:, None] * d * d, 0.0), axis=0)
    return mean, m2 / M


@triton.jit
def tile_sums(part_ptr, N, T, offs_c, c_ok, ROWS: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """The sums over T tiles, in order, of the first K (2 or 3) of the ROWS rows of partials part[t, row, c] (a
    third sum of zeros when K == 2); .cg loads, as in tile_stats_merge."""
    s0 = tl.zeros(offs_c.shape, dtype=tl.float32)
    s1 = tl.zeros(offs_c.shape, dtype=tl.float32)
    s2 = tl.zeros(offs_c.shape, dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (offs_t < T)[:, None] & c_ok[None, :]
        base = part_ptr + offs_t[:, None] * ROWS * N + offs_c[None, :]
        s0 += tl.sum(tl.load(base, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        s1 += tl.sum(tl.load(base + N, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        if K > 2:
            s2 += tl.sum(tl.load(base + 2 * N, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return s0, s1, s2
