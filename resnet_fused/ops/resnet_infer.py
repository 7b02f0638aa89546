"""resnet_infer: a whole BasicBlock ResNet's inference in one launch, BatchNorm folded, logits out.

The network, BatchNorm folded (plan.FoldedPlan: W' = W * gamma/sqrt(var+eps), b = beta - mean * that):
    a = relu(conv3x3(x, W'_stem) + b_stem)
    per BasicBlock:   h = relu(conv3x3_s(a, W'_1) + b_1)
                      a = relu(conv3x3(h, W'_2) + b_2 + shortcut(a))
                      shortcut: none | a (identity) | a[::s, ::s] zero-padded in channels (option A)
                                | conv1x1_s(a, W'_proj) (option B; its folded shift is in b_2)
    logits = mean_{h,w}(a) @ fc.weight^T + fc.bias                      (fp32, as pool_linear)

One launch does all of it. Each program takes images one at a time (a persistent loop over the batch: images
pid, pid + P, ...) and runs the whole network on the image: every activation goes to a scratch region of that
program (three buffers of the largest activation, NHWC, in the compute dtype, as the per-layer path stores them),
written and read back by the same program a moment later (so it stays near the SM: L1/L2), with a barrier between
layers (every thread's stores before it are visible to every thread of the program after it). Only the logits
leave. Against the per-layer path (one conv_bn_act launch per conv, each activation written to and read from
memory by other programs, then pool_linear): one launch instead of 2 per block + 2, no activation traffic beyond
the program's own scratch.

The network is a compile-time structure: up to 4 stages, each a first block (input width, stride, shortcut,
option A's channel offset: constexprs) followed by a run of identical stride-1 blocks (identity or no shortcut)
whose count is a runtime loop; widths are constexprs (padded to powers of two in the tiles). Weights come packed
by the host (``pack``): every conv as a [KH*KW*C_in, C_out] matrix, row (kh*KW + kw)*C_in + c, in network order
(stem; per block conv1, conv2, projection), one int64 (weight offset, bias offset) row per conv in ``table``.

The plain per-layer path (TritonBackend.eval_features + head) stays the fallback and the oracle: FusedResNet uses
this op only when asked (``model.whole_network_inference``, see backends/triton.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import custom_op
from .launch import device_guard, dot_precision, gpu_target, next_pow2, sm_count
from .tl_helpers import relu

MAX_STAGES = 4
MAX_WIDTH, MAX_CLASSES = 512, 256
# The kernels take 16 input channels (or 16 of the flat taps x channels) per dot and 16 classes per step of the
# classifier: literals in the code (a module-level constexpr is not arithmetic under the interpreter).


@triton.jit
def _gather(src, s_h, s_w, s_c, H, W, ih, iw, ok, c):
    """A [BM, BK] tile of src at rows (ih, iw) (per row or per element) and channels c, zero outside the image
    and where not ok."""
    ok = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(src + ih * s_h + iw * s_w + c * s_c, mask=ok, other=0.0)


@triton.jit
def _conv(dst, src, s_h, s_w, s_c, H, W, OH, OW, w_ptr, b_ptr,
          res, RH, RW, pw_ptr,
          CIN: tl.constexpr, COUT: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
          RES: tl.constexpr, RC: tl.constexpr, PF: tl.constexpr, RS: tl.constexpr,
          BM: tl.constexpr, PRECISION: tl.constexpr):
    """dst[OH, OW, COUT] (NHWC, one image) = relu(conv_KSxKS_STRIDE(src) + bias + shortcut), pad KS // 2.
    RES: 0 none, 1 identity (res [OH, OW, COUT]), 2 option A (res [RH, RW, RC] at (oh*RS, ow*RS), channel
    n - PF), 3 option B (res [RH, RW, RC] through the 1x1 weight pw [RC, COUT] at stride RS)."""
    dt = dst.dtype.element_ty
    offs_n = tl.arange(0, BN)
    n_ok = offs_n < COUT
    offs_k = tl.arange(0, 16)
    bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
    M = OH * OW
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        oh = offs_m // OW
        ow = offs_m % OW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # runtime loops over the reduction (one dot per call site: the whole network inlines ~16 of them, so the
        # kernel compiles in reasonable time; unrolled taps x channel slices made it ~15x larger)
        if CIN % 16 == 0:  # 16 channels of one tap per step: per-row offsets, contiguous channels
            for k0 in range(0, KS * KS * CIN, 16):
                tap = k0 // CIN
                c = tl.max_contiguous(tl.multiple_of(k0 % CIN + offs_k, 16), 16)  # 16 channels of one tap
                ih = oh * STRIDE - KS // 2 + tap // KS
                iw = ow * STRIDE - KS // 2 + tap % KS
                a = _gather(src, s_h, s_w, s_c, H, W, ih[:, None], iw[:, None], m_ok[:, None], c[None, :])
                b = tl.load(w_ptr + (k0 + offs_k)[:, None] * COUT + offs_n[None, :], mask=n_ok[None, :],
                            other=0.0)
                acc = tl.dot(a.to(dt), b.to(dt), acc, input_precision=PRECISION)
        else:  # few or odd input channels (the stem): the flat reduction index k = tap * CIN + c
            for k0 in range(0, KS * KS * CIN, 16):
                kk = k0 + offs_k
                tap = kk // CIN
                k_ok = kk < KS * KS * CIN
                ih = oh[:, None] * STRIDE - KS // 2 + (tap // KS)[None, :]
                iw = ow[:, None] * STRIDE - KS // 2 + (tap % KS)[None, :]
                a = _gather(src, s_h, s_w, s_c, H, W, ih, iw, m_ok[:, None] & k_ok[None, :], (kk % CIN)[None, :])
                b = tl.load(w_ptr + kk[:, None] * COUT + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
                acc = tl.dot(a.to(dt), b.to(dt), acc, input_precision=PRECISION)
        if RES == 3:  # option B: the 1x1 projection of the block input, into the same accumulator
            for c0 in range(0, RC, 16):
                c = c0 + offs_k
                a = _gather(res, RW * RC, RC, 1, RH, RW, (oh * RS)[:, None], (ow * RS)[:, None],
                            m_ok[:, None] & (c < RC)[None, :], c[None, :])
                b = tl.load(pw_ptr + c[:, None] * COUT + offs_n[None, :], mask=(c < RC)[:, None] & n_ok[None, :],
                            other=0.0)
                acc = tl.dot(a.to(dt), b.to(dt), acc, input_precision=PRECISION)
        acc += bias[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if RES == 1:
            acc += tl.load(res + offs_m[:, None] * COUT + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        elif RES == 2:
            rc = offs_n - PF
            rmask = m_ok[:, None] & ((rc >= 0) & (rc < RC))[None, :]
            rrow = (oh * RS) * RW + ow * RS
            acc += tl.load(res + rrow[:, None] * RC + rc[None, :], mask=rmask, other=0.0).to(tl.float32)
        tl.store(dst + offs_m[:, None] * COUT + offs_n[None, :], relu(acc).to(dt), mask=mask)


@triton.jit
def _block(o, h, a, H, W, OH, OW, w_ptr, b_ptr, tab_ptr, li,
           CIN: tl.constexpr, C: tl.constexpr, BN: tl.constexpr, STRIDE: tl.constexpr, MODE: tl.constexpr,
           PF: tl.constexpr, BM: tl.constexpr, PRECISION: tl.constexpr):
    """One BasicBlock of one image: h = conv1(a), o = conv2(h) + shortcut(a); the convs' table rows from li.
    Returns the next block's table row."""
    w1 = tl.multiple_of(tl.load(tab_ptr + 2 * li), 16)  # pack() aligns every matrix to 16 elements
    b1 = tl.load(tab_ptr + 2 * li + 1)
    _conv(h, a, W * CIN, CIN, 1, H, W, OH, OW, w_ptr + w1, b_ptr + b1, a, H, W, w_ptr,
          CIN, C, BN, 3, STRIDE, 0, CIN, 0, 1, BM, PRECISION)
    tl.debug_barrier()
    w2 = tl.multiple_of(tl.load(tab_ptr + 2 * li + 2), 16)
    b2 = tl.load(tab_ptr + 2 * li + 3)
    if MODE == 3:
        wp = tl.multiple_of(tl.load(tab_ptr + 2 * li + 4), 16)
        nxt = li + 3
    else:
        wp = w2
        nxt = li + 2
    _conv(o, h, OW * C, C, 1, OH, OW, OH, OW, w_ptr + w2, b_ptr + b2, a, H, W, w_ptr + wp,
          C, C, BN, 3, 1, MODE, CIN, PF, STRIDE, BM, PRECISION)
    tl.debug_barrier()
    return nxt


@triton.jit
def _stage(a, h, o, H, W, w_ptr, b_ptr, tab_ptr, li, NB,
           CIN: tl.constexpr, C: tl.constexpr, BN: tl.constexpr, STRIDE: tl.constexpr, MODE: tl.constexpr,
           PF: tl.constexpr, REST: tl.constexpr, BM: tl.constexpr, PRECISION: tl.constexpr):
    """A stage of one image: its first block (constexpr shape), then NB - 1 stride-1 blocks C -> C with shortcut
    REST. The activation ping-pongs between the a and o buffers; returns (a, h, o, OH, OW, next table row)."""
    OH = (H - 1) // STRIDE + 1
    OW = (W - 1) // STRIDE + 1
    li = _block(o, h, a, H, W, OH, OW, w_ptr, b_ptr, tab_ptr, li, CIN, C, BN, STRIDE, MODE, PF, BM, PRECISION)
    a, o = o, a
    for _ in range(1, NB):
        li = _block(o, h, a, OH, OW, OH, OW, w_ptr, b_ptr, tab_ptr, li, C, C, BN, 1, REST, 0, BM, PRECISION)
        a, o = o, a
    return a, h, o, OH, OW, li


@triton.jit
def resnet_infer_kernel(out_ptr,                                  # logits [N, K] (out dtype)
                        scr_ptr,                                  # scratch: [programs, 3, SCR] compute dtype
                        x_ptr, w_ptr, b_ptr, tab_ptr,             # input; packed weights, fp32 biases, table
                        fcw_ptr, fcb_ptr,                         # classifier weight [K, C_last], bias [K]
                        N, H0, W0, x_n, x_h, x_w, x_c, SCR, K, f_k, f_c,
                        NB0, NB1, NB2, NB3,                       # blocks per stage
                        CIN: tl.constexpr, NST: tl.constexpr, REST: tl.constexpr, HAS_B: tl.constexpr,
                        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                        B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                        S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                        M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                        P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                        CL: tl.constexpr, BL: tl.constexpr,               # the last stage's width, padded
                        BM: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    base = scr_ptr + pid.to(tl.int64) * 3 * SCR
    for img in range(pid, N, tl.num_programs(0)):
        tl.debug_barrier()  # the previous image's last reads of the scratch are done
        a = base
        h = base + SCR
        o = base + 2 * SCR
        img64 = tl.cast(img, tl.int64)
        x_img = x_ptr + img64 * x_n
        w0 = tl.load(tab_ptr)
        b0 = tl.load(tab_ptr + 1)
        _conv(a, x_img, x_h, x_w, x_c, H0, W0, H0, W0, w_ptr + w0, b_ptr + b0, a, H0, W0, w_ptr,
              CIN, C0, B0, 3, 1, 0, C0, 0, 1, BM, PRECISION)
        tl.debug_barrier()
        a, h, o, H, W, li = _stage(a, h, o, H0, W0, w_ptr, b_ptr, tab_ptr, 1, NB0,
                                   C0, C0, B0, S0, M0, P0, REST, BM, PRECISION)
        if NST > 1:
            a, h, o, H, W, li = _stage(a, h, o, H, W, w_ptr, b_ptr, tab_ptr, li, NB1,
                                       C0, C1, B1, S1, M1, P1, REST, BM, PRECISION)
        if NST > 2:
            a, h, o, H, W, li = _stage(a, h, o, H, W, w_ptr, b_ptr, tab_ptr, li, NB2,
                                       C1, C2, B2, S2, M2, P2, REST, BM, PRECISION)
        if NST > 3:
            a, h, o, H, W, li = _stage(a, h, o, H, W, w_ptr, b_ptr, tab_ptr, li, NB3,
                                       C2, C3, B3, S3, M3, P3, REST, BM, PRECISION)
        # global average pool of the stored (rounded) activations, in fp32, then the classifier
        offs_c = tl.arange(0, BL)
        c_ok = offs_c < CL
        pooled = tl.zeros((BL,), dtype=tl.float32)
        M = H * W
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            t = tl.load(a + offs_m[:, None] * CL + offs_c[None, :], mask=(offs_m < M)[:, None] & c_ok[None, :],
                        other=0.0)
            pooled += tl.sum(t.to(tl.float32), axis=0)
        pooled = pooled / M
        for k0 in range(0, K, 16):
            offs_k = k0 + tl.arange(0, 16)
            k_ok = offs_k < K
            wt = tl.load(fcw_ptr + offs_k[:, None] * f_k + offs_c[None, :] * f_c, mask=k_ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
            logits = tl.sum(wt * pooled[None, :], axis=1)
            if HAS_B:
                logits += tl.load(fcb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + img64 * K + offs_k, logits.to(out_ptr.dtype.element_ty), mask=k_ok)


# ---- the network's description and its packed weights (host) ---------------------------------------------------

def describe(folded, in_channels: int) -> Optional[List[int]]:
    """The kernel's structure of a FoldedPlan as a list of ints (``spec``), or None when the network does not have
    the form the kernel takes: 3x3 stem (stride 1, pad 1), up to 4 stages of BasicBlocks (3x3 pad-1 convs; the
    first block of a stage any stride and shortcut, the others stride 1, width-preserving, all with the same
    identity-or-none shortcut), widths <= MAX_WIDTH."""
    from ..plan import ShortcutMode
    stem = folded.stem
    if tuple(stem.weight.shape[1:]) != (in_channels, 3, 3) or stem.stride != 1 or stem.padding != 1:
        return None
    stages, rest, width = [], None, stem.weight.shape[0]
    for b in folded.blocks:
        c_out, c_in = b.conv1.weight.shape[0], b.conv1.weight.shape[1]
        if (tuple(b.conv1.weight.shape[2:]) != (3, 3) or tuple(b.conv2.weight.shape) != (c_out, c_out, 3, 3)
                or b.conv1.padding != 1 or b.conv2.padding != 1 or b.conv2.stride != 1 or c_in != width
                or b.conv1.stride != b.stride or c_out > MAX_WIDTH):
            return None
        if b.mode == ShortcutMode.PROJ_B and tuple(b.proj_weight.shape) != (c_out, c_in, 1, 1):
            return None
        repeat = b.stride == 1 and c_in == c_out and b.mode in (ShortcutMode.NONE, ShortcutMode.IDENTITY)
        if stages and repeat and (rest is None or rest == b.mode):
            rest = b.mode
            stages[-1][5] += 1
        else:
            stages.append([c_in, c_out, b.stride, int(b.mode), b.pad_front, 1])
        width = c_out
    if not stages or len(stages) > MAX_STAGES:
        return None
    rest = int(rest if rest is not None else ShortcutMode.IDENTITY)
    spec = [len(stages), rest, stem.weight.shape[0]]
    for s in stages:
        spec += s
    return spec


def pack(folded, dtype):
    """(weights, biases, table) of a FoldedPlan for the kernel: every conv's folded weight as a [KH*KW*C_in, C_out]
    matrix in ``dtype`` (network order: stem; per block conv1, conv2, projection), the fp32 biases, and one int64
    (weight offset, bias offset) row per conv (a projection's bias row points at its conv2's: unused)."""
    mats, biases, rows = [], [], []
    woff = boff = 0

    def add(weight, bias):
        nonlocal woff, boff
        m = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).to(dtype).reshape(-1)
        pad = -m.numel() % 16  # every matrix starts 16-element aligned (32/64 bytes): vector loads
        mats.append(torch.cat([m, m.new_zeros(pad)]) if pad else m)
        rows.append((woff, boff))
        woff += m.numel() + pad
        if bias is not None:
            biases.append(bias.to(torch.float32))
            boff += bias.numel()

    add(folded.stem.weight, folded.stem.bias)
    for b in folded.blocks:
        add(b.conv1.weight, b.conv1.bias)
        add(b.conv2.weight, b.conv2.bias)
        if b.proj_weight is not None:
            rows_b = boff - b.conv2.bias.numel()
            add(b.proj_weight, None)
            rows[-1] = (rows[-1][0], rows_b)
    dev = folded.stem.weight.device
    return torch.cat(mats), torch.cat(biases), torch.tensor(rows, dtype=torch.int64, device=dev).reshape(-1)


def prepare(folded, in_channels: int, dtype):
    """(spec, (weights, biases, table)) for a FoldedPlan, or None when the kernel does not take its network."""
    spec = describe(folded, in_channels)
    return None if spec is None else (spec, pack(folded, dtype))


def _scratch_elems(spec, h, w):
    """Elements of one scratch buffer: the largest activation of one image, rounded up to 64 elements (every
    buffer 16-element aligned, and the kernel's SCR argument specialised as divisible by 16)."""
    biggest = spec[2] * h * w
    for i in range(spec[0]):
        stride, c = spec[3 + 6 * i + 2], spec[3 + 6 * i + 1]
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        biggest = max(biggest, c * h * w)
    return -(-biggest // 64) * 64


def _check(x, weights, biases, table, fc_weight, fc_bias, spec):
    n_stages = spec[0] if spec else 0
    if not 1 <= n_stages <= MAX_STAGES or len(spec) != 3 + 6 * n_stages:
        raise ValueError(f"resnet_infer: spec must be [stages (1-{MAX_STAGES}), rest mode, stem width] + 6 ints per "
                         f"stage, got {spec}")
    if x.dim() != 4 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"resnet_infer: x must be [N, C, H, W] with H, W >= 1, got {tuple(x.shape)}")
    c_last = spec[3 + 6 * (n_stages - 1) + 1]
    if fc_weight.dim() != 2 or fc_weight.shape[1] != c_last or not 1 <= fc_weight.shape[0] <= MAX_CLASSES:
        raise ValueError(f"resnet_infer: the classifier weight must be [K <= {MAX_CLASSES}, {c_last}], got "
                         f"{tuple(fc_weight.shape)}")
    if fc_bias is not None and tuple(fc_bias.shape) != (fc_weight.shape[0],):
        raise ValueError(f"resnet_infer: the classifier bias must be [{fc_weight.shape[0]}], got "
                         f"{tuple(fc_bias.shape)}")
    for t, name in ((weights, "weights"), (biases, "biases"), (table, "table"), (fc_weight, "classifier weight")):
        if t.device != x.device:
            raise ValueError(f"resnet_infer: {name} on {t.device}, the input on {x.device}")


# sm_90's per-SM limits, for kernel_report's compile-only runs (a GPU reports its own)
SM90 = dict(regs=65536, smem=233472, threads=2048, blocks=32)
REG_UNIT, SMEM_RESERVED = 256, 1024  # registers are allocated per warp in units of 256; 1 KB of smem per block


def ctas_per_sm(n_regs, smem, num_warps, limits=SM90) -> int:
    """Blocks of a kernel one SM holds at once: the least of what its registers, shared memory and threads allow
    (the CUDA occupancy calculator's rules)."""
    warp_regs = -(-n_regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = limits["regs"] // max(1, warp_regs * num_warps)
    by_smem = limits["smem"] // (smem + SMEM_RESERVED) if smem else limits["blocks"]
    by_threads = limits["threads"] // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, limits["blocks"]))


def _sm_limits(device):
    if device.type != "cuda":
        return SM90
    p = torch.cuda.get_device_properties(device)
    return dict(regs=getattr(p, "regs_per_multiprocessor", SM90["regs"]),
                smem=getattr(p, "shared_memory_per_multiprocessor", SM90["smem"]),
                threads=getattr(p, "max_threads_per_multi_processor", SM90["threads"]), blocks=SM90["blocks"])


def programs(n, device, kernel=None):
    """Persistent programs for n images: on a GPU as many as its SMs hold at once (from the compiled kernel's
    registers and shared memory: more would only queue a second, partial wave; each program holds one image's
    scratch at a time), else 2 for the interpreter (still a persistent loop when n > 2: tests)."""
    if not gpu_target(device):
        return max(1, min(n, 2))
    per_sm = 4  # without a compiled kernel whose register count is known (kernel_report's compile-only runs)
    if kernel is not None and getattr(kernel, "n_regs", None):
        per_sm = ctas_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps, _sm_limits(device))
    return max(1, min(n, per_sm * sm_count(device)))


_COMPILED = {}  # (device, dtype, constexprs) -> the compiled kernel, for its occupancy (programs())


def _compiled(args, consts, x):
    """The kernel compiled for this launch's specialisation with its register count loaded (on a GPU), or None
    elsewhere (the interpreter; kernel_report compiles without a driver)."""
    if x.device.type != "cuda":
        return None
    key = (x.device, x.dtype, tuple(consts.items()))
    if key not in _COMPILED:
        placeholder = torch.empty(16, dtype=x.dtype, device=x.device)  # aligned, as the real scratch is
        kernel = resnet_infer_kernel.warmup(*[placeholder if a is None else a for a in args], grid=(1,), **consts)
        kernel._init_handles()  # loads the module: n_regs and n_spills become known
        _COMPILED[key] = kernel
    return _COMPILED[key]


@custom_op("resnet_fused::resnet_infer", mutates_args=())
def resnet_infer(x: Tensor, weights: Tensor, biases: Tensor, table: Tensor, fc_weight: Tensor,
                 fc_bias: Optional[Tensor], spec: List[int], out_dtype: torch.dtype) -> Tensor:
    """The logits [N, K] (out_dtype) of the folded network ``spec`` (describe()) with packed weights (pack())
    over x [N, C, H, W] (any strides; the compute dtype)."""
    _check(x, weights, biases, table, fc_weight, fc_bias, spec)
    n, cin, h0, w0 = x.shape
    k = fc_weight.shape[0]
    out = torch.empty((n, k), dtype=out_dtype, device=x.device)
    if n == 0:
        return out
    n_st, rest, c_stem = spec[0], spec[1], spec[2]
    st = [spec[3 + 6 * i: 9 + 6 * i] for i in range(n_st)] + [[0, 16, 1, 0, 0, 1]] * (MAX_STAGES - n_st)
    widths = [s[1] for s in st]
    if c_stem != widths[0] or any(st[i][0] != (c_stem if i == 0 else widths[i - 1]) for i in range(n_st)):
        raise ValueError(f"resnet_infer: stage input widths do not chain in spec {spec}")
    scr = _scratch_elems(spec, h0, w0)
    if scr * 3 >= 2**31:
        raise ValueError(f"resnet_infer: one image's activations ({scr} elements) are too large for the kernel's "
                         f"32-bit scratch offsets")
    reach = sum((d - 1) * abs(st_) for d, st_ in zip(x.shape[1:], x.stride()[1:]))
    if reach >= 2**31:
        raise ValueError(f"resnet_infer: one image of x spans {reach} elements; the kernel's per-image offsets "
                         f"are 32-bit")
    s_n, s_c, s_h, s_w = x.stride()
    bm = max(16, min(64, 8192 // max(16, next_pow2(max(widths)))))
    args = [out, None, x, weights, biases, table, fc_weight, fc_bias if fc_bias is not None else fc_weight,
            n, h0, w0, s_n, s_h, s_w, s_c, scr, k, *fc_weight.stride(), *(s[5] for s in st)]
    consts = dict(CIN=cin, NST=n_st, REST=rest, HAS_B=fc_bias is not None,
                  C0=widths[0], C1=widths[1], C2=widths[2], C3=widths[3],
                  B0=max(16, next_pow2(widths[0])), B1=max(16, next_pow2(widths[1])),
                  B2=max(16, next_pow2(widths[2])), B3=max(16, next_pow2(widths[3])),
                  S0=st[0][2], S1=st[1][2], S2=st[2][2], S3=st[3][2],
                  M0=st[0][3], M1=st[1][3], M2=st[2][3], M3=st[3][3],
                  P0=st[0][4], P1=st[1][4], P2=st[2][4], P3=st[3][4],
                  CL=widths[n_st - 1], BL=max(16, next_pow2(widths[n_st - 1])),
                  BM=bm, PRECISION=dot_precision(x.dtype, x.device), num_warps=4, num_stages=1)
    with device_guard(x):
        grid = programs(n, x.device, _compiled(args, consts, x))
        args[1] = torch.empty(grid * 3 * scr, dtype=x.dtype, device=x.device)  # per-program scratch
        resnet_infer_kernel[(grid,)](*args, **consts)
    return out


@resnet_infer.register_fake
def _(x, weights, biases, table, fc_weight, fc_bias, spec, out_dtype):
    _check(x, weights, biases, table, fc_weight, fc_bias, spec)
    return x.new_empty((x.shape[0], fc_weight.shape[0]), dtype=out_dtype)
