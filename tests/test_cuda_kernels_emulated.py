"""The CUDA kernels of csrc/cuda/*.cuh, run on the CPU: the same kernel source compiled as plain C++ against
tests/cuda_emulator/emulator.h (a block's threads are OS threads, __syncthreads a real barrier, __shared__ memory
really shared, blocks in a shuffled order), checked against PyTorch in float64.

This is what can be known about the kernels' logic without a GPU (indexing, the chunk/row-group/tree merges, the
vectorised and 32/64-bit elementwise paths, NaN handling). It says nothing about speed, and the operators' host code
(.cu: layouts, streams, checks) runs only on a GPU: tests/test_ext.py with device=cuda.
"""
import collections
import ctypes
import hashlib
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from resnet_fused.plan import ShortcutMode

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests/cuda_emulator/kernels.cpp", ROOT / "tests/cuda_emulator/emulator.h",
           *sorted((ROOT / "csrc/cuda").glob("*.cuh")), ROOT / "csrc/constants.h"]
CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROWS = 256  # kRowsPerChunk (csrc/constants.h; test_constants_agree)
NONE, IDENTITY, PAD_A, PROJ_B = (int(m) for m in ShortcutMode)
i64, f64 = ctypes.c_int64, ctypes.c_double


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the kernel emulator")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    lib = tmp_path_factory.mktemp("cuda_emulator") / f"kernels-{digest}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           str(SOURCES[0]), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"the CUDA kernels do not compile for the host:\n{proc.stderr[-4000:]}"
    return ctypes.CDLL(str(lib))


def test_constants_agree():
    """csrc/constants.h's shortcut numbering is resnet_fused.plan.ShortcutMode's; its chunk is the tests' ROWS."""
    text = (ROOT / "csrc/constants.h").read_text()
    body = re.search(r"enum ShortcutMode[^{]*\{([^}]*)\}", text).group(1)
    enum = dict((k, int(v)) for k, v in re.findall(r"k(\w+) = (\d+)", body))
    assert enum == {"None": 0, "Identity": 1, "PadA": 2, "ProjB": 3}
    assert [enum[k] for k in ("None", "Identity", "PadA", "ProjB")] == [int(m) for m in ShortcutMode]
    assert int(re.search(r"kRowsPerChunk = (\d+);", text).group(1)) == ROWS


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def close(actual, expected, dtype):
    """The kernel against float64 math on the same (rounded) inputs, rounded to the kernel's output dtype."""
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5)}[dtype]
    torch.testing.assert_close(actual.double(), expected.to(dtype).double(), equal_nan=True, **tol)


def close_sum(actual, terms, dtype):
    """A per-channel sum over rows ([P, C] terms) against float64: rounding grows with the sum of |terms| (summing
    in the accumulation dtype), not with the result, which cancels towards zero."""
    bound = 16 * torch.finfo(dtype).eps * terms.abs().sum(0) + 1e-30
    err = (actual.double() - terms.sum(0)).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}.."


# ---- bn_stats --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,c", [(1, 3), (7, 1), (49, 24), (256, 33), (257, 16), (2000, 40), (4100, 5)])
def test_bn_stats_kernels(emu, dtype, p, c):
    """Chunk kernel (32 channels x 8 row groups) + tree merge kernel: mean and biased variance per channel; the row
    counts cover one partial chunk, chunks not a multiple of the 8 merge runs (17), and channels past one block."""
    gen = torch.Generator().manual_seed(p * 100 + c)
    x = rand((p, c), dtype, gen, scale=2.0, offset=0.5)
    acc = acc_of(dtype)
    mean, var = torch.full((c,), float("nan"), dtype=acc), torch.full((c,), float("nan"), dtype=acc)
    assert emu.emu_bn_stats(CODE[dtype], ptr(x), i64(p), i64(c), ptr(mean), ptr(var)) == 0
    xd = x.double()
    close(mean, xd.mean(0), acc)
    close(var, xd.var(0, unbiased=False), acc)


def _chan_merge(a, b):
    """portable.cuh's chan_merge on (n, mean, M2) triples, operation for operation (Python floats are doubles)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_b == 0:
        return a
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + (m2_b + delta * delta * (n_a * (n_b / n)))


def _bn_stats_in_order(col, groups=8):
    """bn_stats of one channel as the two kernels compute it, in float64: per chunk, each row group's two-pass
    (mean, M2), merged in group order; each merge thread's run of chunks in order; the runs as a binary tree."""
    p = len(col)
    chunks = []
    for r0 in range(0, p, ROWS):
        rows = col[r0:r0 + ROWS]
        acc = None
        for q in range(groups):
            mine = rows[q::groups]
            n = len(mine)
            m = m2 = 0.0
            if n:
                m = sum(mine, 0.0) / n
                for v in mine:
                    m2 += (v - m) * (v - m)
            acc = (float(n), m, m2) if acc is None else _chan_merge(acc, (float(n), m, m2))
        chunks.append((float(len(rows)), acc[1], acc[2]))
    runs = []
    for ty in range(groups):
        acc = (0.0, 0.0, 0.0)
        for k in range(len(chunks) * ty // groups, len(chunks) * (ty + 1) // groups):
            acc = _chan_merge(acc, chunks[k])
        runs.append(acc)
    step = 1
    while step < groups:
        for ty in range(0, groups, 2 * step):
            runs[ty] = _chan_merge(runs[ty], runs[ty + step])
        step *= 2
    return runs[0][1], runs[0][2] / p


@pytest.mark.parametrize("p", [300, 5000])
def test_bn_stats_kernels_merge_in_their_documented_order_bit_for_bit(emu, p):
    """float64, bit for bit against the order the kernels document (group order within a chunk, chunks in order
    within a run, then a tree): a reordered merge changes only roundings, which only an exact comparison sees."""
    gen = torch.Generator().manual_seed(p)
    c = 3
    x = rand((p, c), torch.float64, gen, scale=3.0, offset=0.7)
    mean, var = torch.full((c,), float("nan"), dtype=torch.float64), torch.full((c,), float("nan"), dtype=torch.float64)
    assert emu.emu_bn_stats(CODE[torch.float64], ptr(x), i64(p), i64(c), ptr(mean), ptr(var)) == 0
    for j in range(c):
        m, v = _bn_stats_in_order(x[:, j].tolist())
        assert (mean[j].item(), var[j].item()) == (m, v), (j, mean[j].item() - m, var[j].item() - v)


def test_bn_stats_kernels_are_stable_far_from_zero(emu):
    """|mean| >> std: two passes per thread and Chan's merge keep the variance (a sum-of-squares form loses it)."""
    gen = torch.Generator().manual_seed(0)
    p, c = 3000, 8
    x = rand((p, c), torch.float32, gen, scale=1e-2, offset=1e3)
    mean, var = torch.empty(c), torch.empty(c)
    assert emu.emu_bn_stats(CODE[torch.float32], ptr(x), i64(p), i64(c), ptr(mean), ptr(var)) == 0
    expected = x.double().var(0, unbiased=False)
    assert ((var.double() - expected).abs() / expected).max() < 1e-3


def test_bn_stats_kernels_propagate_nan(emu):
    x = torch.randn(600, 4)
    x[300, 2] = float("nan")
    mean, var = torch.empty(4), torch.empty(4)
    emu.emu_bn_stats(0, ptr(x), i64(600), i64(4), ptr(mean), ptr(var))
    assert mean.isnan().tolist() == [False, False, True, False] and var.isnan().tolist() == [False, False, True, False]


# ---- scale_shift_add_relu --------------------------------------------------------------------------------------

def ssar_reference(y, sc, sh, r, rs, rt, mode, stride, pad_front, relu):
    """y, r: NHWC tensors; float64 math."""
    v = y.double()
    if sc is not None:
        v = v * sc.double() + sh.double()
    if mode == IDENTITY:
        v = v + r.double()
    elif mode == PROJ_B:
        v = v + r.double() * rs.double() + rt.double()
    elif mode == PAD_A:
        sub = r.double()[:, ::stride, ::stride, :]
        v = v.clone()
        v[..., pad_front:pad_front + r.shape[3]] += sub
    return torch.relu(v) if relu else v  # NaN stays NaN


def run_ssar(emu, y, sc, sh, r, rs, rt, mode, stride, pad_front, relu, max_blocks=65535, force64=False, out=None):
    n, h, w, c = y.shape
    out = torch.empty_like(y) if out is None else out
    rr = r if r is not None else y
    taken = emu.emu_scale_shift_add_relu(
        CODE[y.dtype], ptr(out), ptr(y), ptr(sc), ptr(sh), ptr(rr), ptr(rs), ptr(rt), i64(y.numel()), i64(c), i64(h),
        i64(w), i64(rr.shape[3]), i64(rr.shape[1]), i64(rr.shape[2]), i64(rr.numel()), mode, i64(stride),
        i64(pad_front), int(relu), i64(max_blocks), int(force64))
    assert taken > 0
    return out, taken


def ssar_operands(dtype, mode, c, scaled, gen, n=2, hw=5, cin=None, stride=1):
    acc = acc_of(dtype)
    y = rand((n, hw, hw, c), dtype, gen)
    sc = rand((c,), acc, gen) if scaled else None
    sh = rand((c,), acc, gen) if scaled else None
    r = rs = rt = None
    if mode in (IDENTITY, PROJ_B):
        r = rand((n, hw, hw, c), dtype, gen)
    if mode == PROJ_B:
        rs, rt = rand((c,), acc, gen), rand((c,), acc, gen)
    if mode == PAD_A:
        r = rand((n, (hw - 1) * stride + 1, (hw - 1) * stride + 1, cin), dtype, gen)
    return y, sc, sh, r, rs, rt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [NONE, IDENTITY, PAD_A, PROJ_B])
@pytest.mark.parametrize("c", [16, 12, 7])
@pytest.mark.parametrize("relu,scaled", [(True, True), (False, True), (True, False)])
def test_scale_shift_add_relu_kernel(emu, dtype, mode, c, relu, scaled):
    gen = torch.Generator().manual_seed(mode * 1000 + c)
    cin = max(1, c // 2)
    stride = 2 if mode == PAD_A else 1
    y, sc, sh, r, rs, rt = ssar_operands(dtype, mode, c, scaled, gen, cin=cin, stride=stride)
    pad = (c - cin) // 2
    out, taken = run_ssar(emu, y, sc, sh, r, rs, rt, mode, stride, pad, relu)
    close(out, ssar_reference(y, sc, sh, r, rs, rt, mode, stride, pad, relu), dtype)
    vec = 16 // y.element_size()
    assert taken == (vec * 10 + 1 if c % vec == 0 else 11)  # 16-byte vectors where the channels allow, 32-bit indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [IDENTITY, PAD_A, PROJ_B])
def test_scale_shift_add_relu_kernel_paths(emu, dtype, mode):
    """The same result on every path: unaligned operands (scalar loads), a grid smaller than the tensor (several
    grid-stride steps), and the 64-bit index path that only huge tensors take."""
    gen = torch.Generator().manual_seed(7)
    c, stride = 16, 2 if mode == PAD_A else 1
    y, sc, sh, r, rs, rt = ssar_operands(dtype, mode, c, True, gen, n=3, hw=7, cin=8, stride=stride)
    expected = ssar_reference(y, sc, sh, r, rs, rt, mode, stride, 4, True)
    vec = 16 // y.element_size()
    out, taken = run_ssar(emu, y, sc, sh, r, rs, rt, mode, stride, 4, True, max_blocks=2)
    close(out, expected, dtype)
    assert taken == vec * 10 + 1
    out, taken = run_ssar(emu, y, sc, sh, r, rs, rt, mode, stride, 4, True, max_blocks=3, force64=True)
    close(out, expected, dtype)
    assert taken == 10
    # y one element into a larger buffer: not 16-byte aligned, so one element per step
    buf = torch.empty(y.numel() + 1, dtype=dtype)
    y_off = buf[1:].view(y.shape)
    y_off.copy_(y)
    out_off = torch.empty(y.numel() + 1, dtype=dtype)[1:].view(y.shape)
    out, taken = run_ssar(emu, y_off, sc, sh, r, rs, rt, mode, stride, 4, True, out=out_off)
    close(out, expected, dtype)
    assert taken == 11


def test_scale_shift_add_relu_kernel_nan_and_inf(emu):
    gen = torch.Generator().manual_seed(3)
    y, sc, sh, r, rs, rt = ssar_operands(torch.float32, IDENTITY, 16, True, gen)
    y[0, 1, 2, 3] = float("nan")
    y[1, 0, 0, 5] = float("inf")
    y[1, 0, 0, 6] = -float("inf")
    sc = sc.abs() + 0.1
    out, _ = run_ssar(emu, y, sc, sh, r, rs, rt, IDENTITY, 1, 0, True)
    assert out[0, 1, 2, 3].isnan() and out[1, 0, 0, 5] == float("inf") and out[1, 0, 0, 6] == 0
    close(out, ssar_reference(y, sc, sh, r, rs, rt, IDENTITY, 1, 0, True), torch.float32)


# ---- scale_shift_add_relu backward -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [NONE, IDENTITY, PAD_A, PROJ_B])
@pytest.mark.parametrize("p,c", [(25, 7), (600, 40)])
def test_scale_shift_add_relu_backward_kernel(emu, dtype, mode, p, c):
    gen = torch.Generator().manual_seed(p + c + mode)
    acc = acc_of(dtype)
    go, y = rand((p, c), dtype, gen), rand((p, c), dtype, gen)
    out = rand((p, c), dtype, gen)
    out[3, 0] = float("nan")  # a NaN output passes its gradient (threshold_backward)
    sc = rand((c,), acc, gen)
    r = rand((p, c), dtype, gen) if mode == PROJ_B else None
    rs = rand((c,), acc, gen) if mode == PROJ_B else None
    chunks = max(1, -(-p // ROWS))
    gy = torch.full_like(y, float("nan"))
    gr = torch.full_like(y, float("nan")) if mode != NONE else None
    part = torch.full((chunks, 3, c), float("nan"), dtype=acc)
    assert emu.emu_scale_shift_add_relu_backward(CODE[dtype], ptr(gy), ptr(gr), ptr(part), ptr(go), ptr(out), ptr(y),
                                                 ptr(sc), ptr(r), ptr(rs), i64(p), i64(c), mode, 1) == 0
    g = torch.where(out.double() <= 0, 0.0, go.double())
    close(gy, g * sc.double(), dtype)
    sums = part.double().sum(0)
    close_sum(sums[0], g * y.double(), acc)
    close_sum(sums[1], g, acc)
    if mode == PROJ_B:
        close_sum(sums[2], g * r.double(), acc)
        close(gr, g * rs.double(), dtype)
    elif mode != NONE:
        close(gr, g, dtype)


# ---- bn_finalize -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("run", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c", [3, 300])
@pytest.mark.parametrize("cumulative", [False, True])
def test_bn_finalize_kernel(emu, acc, run, c, cumulative):
    """One block of 256 threads for any C (300: threads take several channels); running statistics as BatchNorm's,
    num_batches_tracked bumped exactly once."""
    gen = torch.Generator().manual_seed(c)
    mean, var = rand((c,), acc, gen), rand((c,), acc, gen).abs()
    rm, rv = rand((c,), run, gen), rand((c,), run, gen).abs()
    rm0, rv0 = rm.double().clone(), rv.double().clone()
    nbt = torch.tensor([4], dtype=torch.int64)
    invstd = torch.empty(c, dtype=acc)
    count, momentum, eps = 98, 0.1, 1e-5
    assert emu.emu_bn_finalize(CODE[acc], CODE[run], ptr(invstd), ptr(rm), ptr(rv),
                               ctypes.cast(nbt.data_ptr(), ctypes.POINTER(ctypes.c_int64)), ptr(mean), ptr(var),
                               i64(c), i64(count), f64(momentum), int(cumulative), f64(eps)) == 0
    f = 1 / 5 if cumulative else momentum
    assert nbt.item() == 5
    close(rm, (1 - f) * rm0 + f * mean.double(), run)
    close(rv, (1 - f) * rv0 + f * var.double() * count / (count - 1), run)
    close(invstd, 1 / (var.double() + eps).sqrt(), acc)


# ---- batch_norm_add_relu backward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("p,c", [(25, 7), (700, 40)])
def test_bnar_backward_reduce_kernel(emu, dtype, proj, p, c):
    gen = torch.Generator().manual_seed(p * c + proj)
    acc = acc_of(dtype)
    go, out = rand((p, c), dtype, gen), rand((p, c), dtype, gen)
    y, r = rand((p, c), dtype, gen, offset=3.0), rand((p, c), dtype, gen, offset=-2.0)
    mean, rmean = rand((c,), acc, gen, offset=3.0), rand((c,), acc, gen, offset=-2.0)
    chunks = -(-p // ROWS)
    part = torch.full((chunks, 3, c), float("nan"), dtype=acc)
    assert emu.emu_bnar_backward_reduce(CODE[dtype], int(proj), ptr(part), ptr(go), ptr(out), ptr(y), ptr(mean),
                                        ptr(r), ptr(rmean), i64(p), i64(c), 1) == 0
    g = torch.where(out.double() <= 0, 0.0, go.double())
    sums = part.double().sum(0)
    close_sum(sums[0], g, acc)
    close_sum(sums[1], g * (y.double() - mean.double()), acc)
    if proj:
        close_sum(sums[2], g * (r.double() - rmean.double()), acc)
    else:
        assert (sums[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dr_mode", [0, 1, 2])
@pytest.mark.parametrize("c,max_blocks,force64", [(16, 65535, False), (16, 2, False), (12, 65535, False),
                                                  (7, 3, False), (16, 3, True)])
def test_bnar_backward_write_kernel(emu, dtype, dr_mode, c, max_blocks, force64):
    gen = torch.Generator().manual_seed(c * 10 + dr_mode)
    acc = acc_of(dtype)
    p = 3 * 7 * 7
    go, out, y, r = (rand((p, c), dtype, gen) for _ in range(4))
    coef = rand((6, c), acc, gen)
    dy = torch.full_like(y, float("nan"))
    dr = torch.full_like(y, float("nan"))
    taken = emu.emu_bnar_backward_write(CODE[dtype], ptr(dy), ptr(dr), ptr(go), ptr(out), ptr(y), ptr(r), ptr(coef),
                                        i64(p * c), i64(c), dr_mode, 1, i64(max_blocks), int(force64))
    vec = 16 // y.element_size()
    assert taken == (10 if force64 else vec * 10 + 1 if c % vec == 0 else 11)
    g = torch.where(out.double() <= 0, 0.0, go.double())
    k = coef.double()
    close(dy, k[0] * g + k[1] + k[2] * y.double(), dtype)
    if dr_mode == 1:
        close(dr, g, dtype)
    elif dr_mode == 2:
        close(dr, k[3] * g + k[4] + k[5] * r.double(), dtype)
    else:
        assert dr.isnan().all()  # not written


# ---- the operators' host code over the emulated kernels, in a whole network -------------------------------------
# A training step of the extension's backend on a torchvision ResNet (the path backend "cuda" takes: ATen's
# convolutions, and bn_stats, bn_finalize, batch_norm_add_relu -> scale_shift_add_relu, batch_norm_add_relu_backward)
# with those operators' CPU kernels replaced for the test by the .cu host code mirrored here in Python over the
# emulated CUDA kernels. The step must match torchvision's against float64 as the CPU kernels' does: what the
# kernels' logic does to a whole network (every shortcut kind, odd channel counts), short of a GPU.

def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _vec(v, like, fill=None):
    """layout.h's channel_vec: the per-channel vector in the accumulation dtype, a fill, or None."""
    acc = acc_of(like.dtype)
    if v is not None:
        return v.to(acc).contiguous()
    return None if fill is None else torch.full((like.shape[1],), fill, dtype=acc)


class EmulatedCudaOps:
    """resnet_fused_cuda.cu's and batch_norm_add_relu_cuda.cu's host code in Python: the same operand layouts,
    kernels and launch parameters, the kernels run by the emulator."""

    def __init__(self, emu):
        self.emu = emu
        self.calls = collections.Counter()

    def bn_stats(self, x):
        self.calls["bn_stats"] += 1
        xn, c = _nhwc(x), x.shape[1]
        mean, var = (torch.empty(c, dtype=acc_of(x.dtype)) for _ in range(2))
        assert self.emu.emu_bn_stats(CODE[x.dtype], ptr(xn), i64(xn.numel() // c), i64(c), ptr(mean), ptr(var)) == 0
        return mean, var

    def bn_finalize(self, mean, var, running_mean, running_var, num_batches_tracked, count, momentum, cumulative,
                    eps):
        self.calls["bn_finalize"] += 1
        acc = torch.float64 if mean.dtype == torch.float64 else torch.float32
        m, v = mean.to(acc).contiguous(), var.to(acc).contiguous()
        invstd = torch.empty_like(m)
        nbt = ctypes.cast(num_batches_tracked.data_ptr(), ctypes.POINTER(ctypes.c_int64))
        assert self.emu.emu_bn_finalize(CODE[acc], CODE[running_mean.dtype], ptr(invstd), ptr(running_mean),
                                        ptr(running_var), nbt, ptr(m), ptr(v), i64(m.numel()), i64(count),
                                        f64(momentum), int(cumulative), f64(eps)) == 0
        return invstd

    def scale_shift_add_relu(self, y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front,
                             relu):
        self.calls["scale_shift_add_relu"] += 1
        yn = _nhwc(y)
        r = _nhwc(residual) if mode != NONE else yn
        out = torch.empty_like(yn)
        sc, sh, rs, rt = (_vec(v, y) for v in (scale, shift, res_scale, res_shift))
        n, c, h, w = y.shape
        assert self.emu.emu_scale_shift_add_relu(
            CODE[y.dtype], ptr(out), ptr(yn), ptr(sc), ptr(sh), ptr(r), ptr(rs), ptr(rt), i64(y.numel()), i64(c),
            i64(h), i64(w), i64(r.shape[1]), i64(r.shape[2]), i64(r.shape[3]), i64(r.numel()), mode,
            i64(res_stride), i64(pad_front), int(relu), i64(65535), 0) > 0
        return out

    @staticmethod
    def _coefficients(y, mean, invstd, weight, sum_g, sum_gxc, p):
        """bn_add_relu_grads.h's coefficients(): (s, a, b, d weight) of dy = s*g + a + b*y."""
        acc = acc_of(y.dtype)
        m, inv = mean.to(acc), invstd.to(acc)
        s = inv * _vec(weight, y, 1.0)
        k = s * inv * inv * sum_gxc / p
        return s, k * m - s * sum_g / p, -k, inv * sum_gxc

    def batch_norm_add_relu_backward(self, grad_out, out, y, mean, invstd, weight, residual, res_mean, res_invstd,
                                     res_weight, mode, res_stride, pad_front, relu):
        self.calls["batch_norm_add_relu_backward"] += 1
        assert mode in (NONE, IDENTITY, PROJ_B), "the torchvision networks use no option A"
        go, o, yn = _nhwc(grad_out), _nhwc(out), _nhwc(y)
        proj = mode == PROJ_B
        r = _nhwc(residual) if proj else yn
        c = y.shape[1]
        p = y.numel() // c
        acc = acc_of(y.dtype)
        m = mean.to(acc).contiguous()
        rm = res_mean.to(acc).contiguous() if proj else m
        part = torch.empty((-(-p // ROWS), 3, c), dtype=acc)
        assert self.emu.emu_bnar_backward_reduce(CODE[y.dtype], int(proj), ptr(part), ptr(go), ptr(o), ptr(yn),
                                                 ptr(m), ptr(r), ptr(rm), i64(p), i64(c), int(relu)) == 0
        sums = part.sum(0)
        cy = self._coefficients(y, mean, invstd, weight, sums[0], sums[1], p)
        cr = self._coefficients(y, res_mean, res_invstd, res_weight, sums[0], sums[2], p) if proj else cy
        coef = torch.stack([*cy[:3], *cr[:3]]).contiguous()
        dy, gr = torch.empty_like(yn), torch.empty_like(yn)
        dr_mode = 2 if proj else 1 if mode != NONE else 0
        assert self.emu.emu_bnar_backward_write(CODE[y.dtype], ptr(dy), ptr(gr), ptr(go), ptr(o), ptr(yn), ptr(r),
                                                ptr(coef), i64(y.numel()), i64(c), dr_mode, int(relu), i64(65535),
                                                0) > 0
        empty = torch.empty(0, dtype=acc)
        dres = gr if mode != NONE else empty
        dw = cy[3].to(weight.dtype) if weight is not None else empty
        drw = cr[3].to(res_weight.dtype) if proj and res_weight is not None else empty
        return dy, dw, sums[0].clone(), dres, drw, sums[0].clone() if proj else empty


@pytest.fixture
def emulated_cuda_ops(emu):
    """The CPU kernels of those operators replaced by EmulatedCudaOps for the test (restored after it)."""
    from resnet_fused import ext
    if not ext.available():
        pytest.skip("the C++ extension is not built")
    ops = EmulatedCudaOps(emu)
    lib = torch.library.Library("resnet_fused", "IMPL")
    for name in ("bn_stats", "bn_finalize", "scale_shift_add_relu", "batch_norm_add_relu_backward"):
        lib.impl(name, getattr(ops, name), "CPU")
    try:
        yield ops
    finally:
        lib._destroy()


@pytest.mark.parametrize("block,stem,size,batch", [("basic", (7, 2, 3), 64, 2), ("bottleneck", (7, 2, 3), 64, 2),
                                                   ("basic", (3, 1, 1), 13, 3)])
def test_a_torchvision_training_step_through_the_emulated_cuda_operators(emulated_cuda_ops, block, stem, size,
                                                                           batch):
    """Logits, every gradient and every running statistic of one step within twice torchvision's fp32 error
    against float64 (tests/parity.py), the CUDA kernels' logic doing every BatchNorm of the network. Four float64
    steps from 1e-6-perturbed weights count as PyTorch runs (parity.one_step_errors' ``conditioning``): the
    kernels sum in 256-row chunks, in another order than the CPU operators, and the basic/64x64 case's
    layer2.1.bn1 bias gradient (magnitude 0.019) then lands 3.7e-8 from float64 where torchvision's fp32 step
    happened to land 1.4e-8 (the CPU kernels: 2.8e-8; the perturbed runs move it by 1.4e-7)."""
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from parity import assert_within_twice_pytorch, one_step_errors
    from resnet_fused import FusedResNet
    from tv_models import narrow_tv
    ref = narrow_tv({"basic": BasicBlock, "bottleneck": Bottleneck}[block], stem=stem, maxpool=stem[1] == 2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    errs = one_step_errors(ref.train(), x, y, "cpu", both_layouts=True, conditioning=4,
                           convert=lambda r, b: FusedResNet.from_torchvision(r, backend=b))
    assert_within_twice_pytorch(errs, flipped=1e-4)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    assert emulated_cuda_ops.calls["bn_stats"] == emulated_cuda_ops.calls["bn_finalize"] == convs
    blocks = sum(isinstance(m, (BasicBlock, Bottleneck)) for m in ref.modules())
    assert emulated_cuda_ops.calls["batch_norm_add_relu_backward"] >= blocks + 1
    assert emulated_cuda_ops.calls["scale_shift_add_relu"] >= blocks + 1
