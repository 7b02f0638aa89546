"""The extension backends ("cpu", "cuda"): ATen/cuDNN/oneDNN convolutions + the C++/CUDA operators of
resnet_fused._C, channels_last throughout (oneDNN's convolutions are up to 4x faster in it on CPU, and the C++
operators work on NHWC rows in place).

Training, per conv: ATen's convolution, then bn_stats (the batch statistics) and bn_finalize (the running update,
invstd) outside autograd; batch_norm_add_relu applies BN + shortcut + ReLU and its backward carries the gradient
through the statistics itself, so one backward operator per BatchNorm.
Inference: the folded plan. On fp32 CPU tensors every 3x3 stride-1 convolution whose channel counts are multiples
of 8 (up to 256x256) is conv3x3_winograd (F(4x4, 3x3) or F(2x2, 3x3); bias, shortcut and ReLU in its output
transform), the stems and (at small batches) the small strided convolutions conv2d_direct, the others oneDNN
primitives with bias/add/ReLU post-ops (in bf16, where the CPU has AVX512_BF16, the same in bf16; conv2d_direct
in fp32 on the bf16 activations),
the batch run in slices whose largest activation stays in cache; elsewhere ATen's convolution +
scale_shift_add_relu. oneDNN's ReLU post-op turns NaN into 0 and Winograd's transforms turn an Inf into NaN:
with a non-finite input or weight the ATen convolutions run instead, so NaN/Inf come out as in PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ext
from ..capture_state import capturing
from ..plan import ShortcutMode, to_channels_last
from ..torchvision_resnet import ChainPlan
from .base import Backend, compute_dtype

# oneDNN convolutions with bias, residual add and ReLU fused as post-ops: the primitives torch.compile's CPU backend
# uses (checked once here: the check itself must not be traced)
_HAS_ONEDNN_POST_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
# conv3x3_winograd: this extension build and this CPU run it (x86-64 with AVX2 + FMA)
_WINOGRAD = ext.winograd_supported()
# the CPU inference operators as OpOverloads (a few microseconds less per call than through the packet)
_WINOGRAD_OP = torch.ops.resnet_fused.conv3x3_winograd.default if _WINOGRAD else None
# bf16 inference (a bf16 model, or fp32 under torch.autocast("cpu", torch.bfloat16)) takes the same fast path where
# the CPU has AVX512_BF16: Winograd in bf16, the other convolutions oneDNN's bf16 primitives with post-ops
_WINOGRAD_BF16 = _WINOGRAD and hasattr(torch.ops.resnet_fused, "conv3x3_winograd_bf16_supported") \
    and ext.winograd_bf16_supported()
_DIRECT_OP = (torch.ops.resnet_fused.conv2d_direct.default
              if _WINOGRAD and hasattr(torch.ops.resnet_fused, "conv2d_direct") else None)
# the activation size CPU inference keeps per batch slice
CPU_EVAL_SLICE_BYTES = int(1.6 * 2**20)


def _onednn_conv(x, w, b, stride, pad, relu=False, add=None):
    """relu?(conv2d(x, w, b) + add?) as one oneDNN primitive (no separate pass over the output for add/ReLU)."""
    s, p, d = [stride, stride], [pad, pad], [1, 1]
    if add is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, w, b, p, s, d, 1, "add", None,
                                                              "relu" if relu else None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, p, s, d, 1, "relu" if relu else "none", [], "")


def _aten_conv(x, w, b, stride, pad, relu=False, add=None):
    """The same with ATen's convolution and the C++ fused add + ReLU (CUDA, fp64, low precision, non-finite)."""
    y = F.conv2d(x, w, b, stride, pad)
    if add is not None:
        return torch.ops.resnet_fused.scale_shift_add_relu(y, None, None, add, None, None, mode=ShortcutMode.IDENTITY,
                                                           res_stride=1, pad_front=0, relu=relu)
    return torch.relu_(y) if relu else y


def _surely_finite(x):
    """Whether every element of x is finite, by one reduction: a NaN or an infinity makes the sum non-finite (so do
    finite values whose sum overflows: then the exact path runs, which is only slower). torch.isfinite(x).all() is
    five passes (~33 us of a 0.5 ms batch-1 ResNet-20 forward on the 2-core machine)."""
    return math.isfinite(x.sum(dtype=torch.float32).item())


def _train_conv(x, w, stride, padding):
    """ATen's convolution for training. On CPU a strided 1x1 convolution (option B's projection) runs as the 1x1
    convolution of the subsampled input, the same numbers: oneDNN (checked with PyTorch 2.14.1 on an AVX2 CPU)
    returns a wrong, run-to-run different weight gradient for channels_last 1x1 stride-2 convolutions with fewer
    than 7 input channels (tests/test_ext.py::test_strided_projection_weight_grad)."""
    if x.device.type == "cpu" and w.shape[2:] == (1, 1) and stride > 1 and padding == 0:
        x, stride = x[:, :, ::stride, ::stride], 1
    return F.conv2d(x, w, None, stride, padding)


# conv3x3_winograd's transformed weights ((m+2)^2 x C_in x C_out fp32) must stay cache-sized. Measured per layer
# (one 3x3 conv with bias + ReLU, channels_last, 2 threads): F(2x2, 3x3) is 1.6-2.0x faster than oneDNN's direct
# convolution with post-ops at 64-256 channels and 2-4x slower at 512 (16 MB of transforms per 512x512 layer; the
# 2-core AVX-512 machine); F(4x4, 3x3) is 1.1-1.5x faster than F(2x2) up to 128x128 channels (16-64 channels at
# batch 32, 64-128 at 224x224 inputs) and slower at 256x256 (9 MB of transforms) and on images with few 4x4 tiles
# (batch 1 at 7x7: 4 tiles, 30% of them padding; the 2-core AVX2 machine of 2026-12-03's third session). With the
# AVX-512 GEMM and transforms F(4x4) at 256x256 (14x14, batch 1) measured 414 us once and 2,646 us minutes later
# (F(2x2) 478 / 557, oneDNN 713 / 715): each block of a few tiles streams its 9.4 MB of transforms, so it runs at
# the speed of whatever share of the L3 the machine's neighbours leave; 512x512 likewise (F(2x2) 2.2-4.6 ms against
# oneDNN's 1.1-1.4 at batch 1, 7x7; the 2-core Zen 5 machine of the fourth session)
WINOGRAD_MAX_CHANNEL_PRODUCT = 256 * 256
WINOGRAD_F4_MAX_CHANNEL_PRODUCT = 128 * 128
WINOGRAD_F4_MIN_TILES = 16  # F(4x4) only where the input has at least this many 4x4 output tiles


@dataclass(frozen=True)
class WinogradWeights:
    """A 3x3 conv's transformed weights: F(2x2, 3x3)'s, and F(4x4, 3x3)'s where its channels allow; the fp32 bias
    the operator takes (the folded conv's own in fp32)."""
    f2: torch.Tensor
    f4: torch.Tensor | None
    bias: torch.Tensor

    def pick(self, x):
        """The transform for input x: F(4x4) where it has one and x has enough 4x4 tiles."""
        tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
        return self.f4 if self.f4 is not None and tiles >= WINOGRAD_F4_MIN_TILES else self.f2


def _winograd_fits(conv):
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.in_channels % 8 == 0
            and conv.out_channels % 8 == 0
            and conv.in_channels * conv.out_channels <= WINOGRAD_MAX_CHANNEL_PRODUCT)


def _winograd_weights(folded, f2_dtype=torch.float32):
    """conv3x3_winograd's transformed weights per folded 3x3 conv that fits (absent where it does not). For bf16
    activations F(2x2)'s operand is bf16 (the vdpbf16ps GEMM, about as accurate as a bf16 direct convolution) and
    F(4x4)'s stays fp32 (in bf16 its transforms cost ~10x a bf16 convolution's rounding; tests/test_winograd.py)."""
    out = {}
    for fc in folded.convs():
        if _winograd_fits(fc.module):
            f4 = fc.module.in_channels * fc.module.out_channels <= WINOGRAD_F4_MAX_CHANNEL_PRODUCT
            out[id(fc)] = WinogradWeights(ext.winograd_weight(fc.weight, 2, f2_dtype),
                                          ext.winograd_weight(fc.weight, 4) if f4 else None, fc.bias.float())
    return out


def _winograd_weights_bf16(folded):
    return _winograd_weights(folded, torch.bfloat16)


# conv2d_direct (bias + shortcut + ReLU) against oneDNN's convolution with post-ops and ATen's + ReLU, measured on
# the same machine. Its AVX2 path: 1.2-4x faster for the stems (1 or 3 input channels: 28x28 3x3 at batch 1-32,
# 224x224 7x7/2 at batch 1-4) and 1.3-3x faster for the MNIST nets' stride-2 3x3 convolutions (16->32, 32->64) up to
# batch 4 (oneDNN's per-call setup, 60-80 us, dominates there), on par at batch 16-32; from 64->128 channels on (its
# weights streamed once per 6-pixel tile) 1.0-2.8x slower. Its AVX-512 path (the 2-core Zen 5 machine, 2 threads,
# both in one process): at batch 1 on par with oneDNN or faster for every torchvision ResNet convolution that
# Winograd does not take (3x3/2 64->128 at 56x56 313 vs 447 us, 256->512 at 14x14 420 vs 784; 512x512 3x3 at 7x7 951
# vs 2,162; 1x1 2048->512 at 7x7 447 vs 1,545, 64->128/2 at 56x56 45 vs 69; the 1x1s at 14-56 0.8-1.1x), the MNIST
# strided 3x3s 1.3-1.8x faster at batch 8 and 32 (16->32: 47 vs 87 us, 196 vs 252; 32->64 at 32: 166 vs 242), the
# stems 1.1-8x; from 64->128 channels at batch 32 oneDNN is faster (1.1-1.5x; 2x for the 1x1s)
DIRECT_MAX_BATCH = 8  # past this batch only the stems (fewer than 8 input channels) and the small 3x3s
DIRECT_MAX_CHANNEL_PRODUCT = 64 * 64  # the small 3x3s: up to these channels
# conv2d_direct's AVX-512 path runs here (decided once: RESNET_FUSED_CPU_ISA set later only changes the kernels)
_DIRECT_WIDE = _DIRECT_OP is not None and str(torch.ops.resnet_fused.cpu_isa()).startswith("avx512")


def _direct_fits(conv):
    """Whether conv2d_direct can run conv (and, with its AVX2 path only, whether it ever pays: stems, small 3x3s)."""
    fits = (conv.groups == 1 and conv.dilation == (1, 1) and conv.out_channels % 8 == 0
            and conv.padding[0] == conv.padding[1] and conv.stride[0] == conv.stride[1]
            and isinstance(conv.padding[0], int))
    return fits and (_DIRECT_WIDE or conv.in_channels < 8 or _direct_small(conv))


def _direct_small(conv):
    return conv.kernel_size != (1, 1) and conv.in_channels * conv.out_channels <= DIRECT_MAX_CHANNEL_PRODUCT


def _direct_takes(conv, batch, shortcut):
    """Whether conv2d_direct is the faster path for conv at this batch (measured above); ``shortcut``: whether an
    identity shortcut is added (the AVX-512 path only: its AVX2 one was measured without)."""
    if _DIRECT_WIDE and batch <= DIRECT_MAX_BATCH:
        return True
    small = _direct_small(conv) and (_DIRECT_WIDE or batch <= DIRECT_MAX_BATCH)
    return not shortcut and (conv.in_channels < 8 or small)


@dataclass(frozen=True)
class DirectWeights:
    """conv2d_direct's packed fp32 weight and fp32 bias (None: a projection's) for one folded convolution."""
    weight: torch.Tensor
    bias: torch.Tensor | None


def _direct_weights(folded):
    """conv2d_direct's operands per folded convolution it can run (absent where it cannot), keyed by id(); with the
    AVX-512 path also each 1x1 projection's, keyed by id(weight). fp32 also for a bf16 plan: there the convolution
    runs in fp32 on the bf16 activation and rounds its output to bf16 (oneDNN's bf16 primitives spend 60-80 us of
    setup per call at batch 1, and ran the 1-channel stem slowly)."""
    out = {id(fc): DirectWeights(ext.direct_weight(fc.weight), fc.bias.float())
           for fc in folded.convs() if _direct_fits(fc.module)}
    if _DIRECT_WIDE:
        out.update({id(b.proj_weight): DirectWeights(ext.direct_weight(b.proj_weight), None) for b in folded.blocks
                    if b.proj_weight is not None and b.proj_weight.shape[0] % 8 == 0})
    return out


class ExtensionBackend(Backend):
    def __init__(self, device_type: str):
        self.device_type = self.name = device_type

    def check(self, x):
        ext.require(self.device_type)
        if x.device.type != self.device_type:
            raise RuntimeError(f"backend {self.name!r} runs on {'CPU' if self.name == 'cpu' else 'CUDA'} tensors, "
                               f"got an input on {x.device}; move the model or pick backend='auto'")

    def features(self, model, x, sync=None):
        x = to_channels_last(x)
        if isinstance(model.plan, ChainPlan):  # a torchvision ResNet
            return self.chain_train_features(model, x, sync) if model.training else self.chain_eval_features(model, x)
        if model.training:
            return self.train_features(model, x, sync)
        slices = self._eval_slices(model, x)
        if len(slices) == 1:  # no copy through torch.cat
            return self.eval_features(model, slices[0])
        return torch.cat([self.eval_features(model, c) for c in slices])

    # ---- training ----------------------------------------------------------------------------------------------

    @staticmethod
    def _conv_stats(a, cb, sync=None):
        """conv (ATen), then y's batch statistics and the running update outside autograd. With ``sync`` (sync_bn
        across processes) the statistics are the global batch's, and differentiable (bn_stats' VJP + the sync's)."""
        y = _train_conv(a, cb.conv.weight, cb.stride, cb.padding)
        bn = cb.bn
        count = y.shape[0] * y.shape[2] * y.shape[3]
        if sync is not None:
            mean, var = torch.ops.resnet_fused.bn_stats(y)
            mean, var, count = sync(mean, var, y)
        with torch.no_grad():
            if sync is None:
                mean, var = torch.ops.resnet_fused.bn_stats(y)
            if bn.track_running_stats and bn.running_mean is not None:
                invstd = torch.ops.resnet_fused.bn_finalize(
                    mean.detach(), var.detach(), bn.running_mean, bn.running_var, bn.num_batches_tracked,
                    count=count, momentum=0.0 if bn.momentum is None else float(bn.momentum),
                    cumulative=bn.momentum is None, eps=bn.eps)
            else:
                invstd = torch.rsqrt(var + bn.eps)
        if sync is not None:
            invstd = torch.rsqrt(var + bn.eps)  # the same numbers, with the gradient through the statistics
        return y, dict(mean=mean, invstd=invstd, weight=bn.weight, bias=bn.bias)

    @staticmethod
    def _affine(st):
        """(scale, shift) of a BatchNorm from its statistics, as differentiable PyTorch ops (the sync_bn path)."""
        scale = st["invstd"] if st["weight"] is None else st["invstd"] * st["weight"]
        shift = -st["mean"] * scale
        return scale, shift if st["bias"] is None else shift + st["bias"]

    def _bn_add_relu(self, y, st, mode=ShortcutMode.NONE, residual=None, rst=None, res_stride=1, pad_front=0,
                     sync=None):
        """BN(y) + shortcut + ReLU. One operator whose VJP includes the statistics' gradient (local statistics);
        with sync_bn, scale_shift_add_relu on the global statistics and autograd through them."""
        if sync is None:
            r = rst or dict(mean=None, invstd=None, weight=None, bias=None)
            return torch.ops.resnet_fused.batch_norm_add_relu(
                y, **st, residual=residual, res_mean=r["mean"], res_invstd=r["invstd"], res_weight=r["weight"],
                res_bias=r["bias"], mode=mode, res_stride=res_stride, pad_front=pad_front, relu=True)
        scale, shift = self._affine(st)
        rs, rt = self._affine(rst) if rst is not None else (None, None)
        return torch.ops.resnet_fused.scale_shift_add_relu(y, scale, shift, residual, rs, rt, mode=mode,
                                                           res_stride=res_stride, pad_front=pad_front, relu=True)

    def train_features(self, model, x, sync=None):
        y, st = self._conv_stats(x, model.plan.stem, sync)
        a = self._bn_add_relu(y, st, sync=sync)
        for b in model.plan.blocks:
            y1, st1 = self._conv_stats(a, b.conv1, sync)
            h = self._bn_add_relu(y1, st1, sync=sync)
            y2, st2 = self._conv_stats(h, b.conv2, sync)
            if b.mode == ShortcutMode.PROJ_B:
                r, rst = self._conv_stats(a, b.proj, sync)
                a = self._bn_add_relu(y2, st2, b.mode, r, rst, res_stride=b.stride, sync=sync)
            else:
                a = self._bn_add_relu(y2, st2, b.mode, None if b.mode == ShortcutMode.NONE else a,
                                      res_stride=b.stride, pad_front=b.pad_front, sync=sync)
        return a

    # ---- inference ---------------------------------------------------------------------------------------------

    @staticmethod
    def _eval_slices(model, x):
        """CPU inference runs the network on slices of the batch whose largest activation (~1.6 MB) stays in the
        caches from one layer to the next instead of streaming through memory at every layer (samples are
        independent in eval mode: the same numbers). One slice elsewhere (CUDA, torch.compile)."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return (x,)
        per_image = x.shape[2] * x.shape[3] * max(model.conv1.out_channels, x.shape[1]) * x.element_size()
        rows = max(1, CPU_EVAL_SLICE_BYTES // per_image)
        if x.shape[0] <= rows:
            return (x,)
        slices = -(-x.shape[0] // rows)
        return x.split(-(-x.shape[0] // slices))  # equal slices (256 images: 8 x 32, not 8 x 31 + 8)

    @staticmethod
    def _eval_conv(model, folded, x, dtype):
        """(conv, project): conv(a, folded_conv, mode, add, ...) = relu(conv(a) + bias + shortcut) by the fastest
        path that keeps PyTorch's numbers (Winograd, conv2d_direct, oneDNN post-ops, or ATen + the C++ add/ReLU);
        project(a, w, stride) the plain 1x1 convolution of a projection shortcut by the same rules."""
        # the fast path's NaN check reads x on the host: not under torch.compile or a (CPU-emulated) graph capture
        fp32 = dtype == torch.float32
        fast_dtype = fp32 or (dtype == torch.bfloat16 and _WINOGRAD_BF16)
        onednn = (_HAS_ONEDNN_POST_OPS and x.device.type == "cpu" and fast_dtype
                  and not torch.compiler.is_compiling() and not capturing() and folded.all_finite
                  and _surely_finite(x))
        base = _onednn_conv if onednn else _aten_conv
        wino = {}
        if onednn and _WINOGRAD:
            wino = model.fold_cache.derived(*(("winograd", _winograd_weights) if fp32 else
                                              ("winograd-bf16", _winograd_weights_bf16)))
        direct = model.fold_cache.derived("direct", _direct_weights) if onednn and _DIRECT_OP is not None else {}

        def conv(a, fc, mode=ShortcutMode.NONE, add=None, res_stride=1, pad_front=0):
            u = wino.get(id(fc))
            if u is not None:
                return _WINOGRAD_OP(a, u.pick(a), u.bias, add, int(add is not None and mode), res_stride, pad_front,
                                    True)
            d = direct.get(id(fc)) if mode in (ShortcutMode.NONE, ShortcutMode.IDENTITY) else None
            if d is not None and _direct_takes(fc.module, a.shape[0], add is not None):
                y = _DIRECT_OP(a.float(), d.weight, d.bias, fc.stride, fc.padding, True,
                               None if add is None else add.float())
                return y if fp32 else y.to(dtype)
            bias = fc.bias.to(dtype)
            if mode == ShortcutMode.PAD_A:  # subsample + zero channel padding by index math
                return torch.ops.resnet_fused.scale_shift_add_relu(
                    base(a, fc.weight, bias, fc.stride, fc.padding), None, None, add, None, None, mode=mode,
                    res_stride=res_stride, pad_front=pad_front, relu=True)
            return base(a, fc.weight, bias, fc.stride, fc.padding, relu=True, add=add)

        def project(a, weight, stride):
            d = direct.get(id(weight))
            if d is not None and _DIRECT_WIDE and a.shape[0] <= DIRECT_MAX_BATCH:
                y = _DIRECT_OP(a.float(), d.weight, None, stride, 0, False)
                return y if fp32 else y.to(dtype)
            return base(a, weight, None, stride, 0)

        return conv, project

    def eval_features(self, model, x):
        dtype = compute_dtype(x)
        folded = model.folded(dtype)
        conv, project = self._eval_conv(model, folded, x, dtype)
        a = conv(x.to(dtype), folded.stem)
        for b in folded.blocks:
            h = conv(a, b.conv1)
            if b.mode == ShortcutMode.PROJ_B:  # conv2's bias holds both folded shifts; the projection a 2nd conv
                a = conv(h, b.conv2, ShortcutMode.IDENTITY, add=project(a, b.proj_weight, b.stride))
            elif b.mode == ShortcutMode.NONE:
                a = conv(h, b.conv2)
            else:
                a = conv(h, b.conv2, b.mode, add=a, res_stride=b.stride, pad_front=b.pad_front)
        return a


    # ---- torchvision ResNets (torchvision_resnet.ChainPlan) --------------------------------------------------------

    def chain_train_features(self, model, x, sync=None):
        """Training: per convolution ATen's conv and the batch statistics; BN + ReLU (+ the shortcut after a
        block's last convolution) one C++ operator each."""
        plan = model.plan
        y, st = self._conv_stats(x, plan.stem, sync)
        a = self._bn_add_relu(y, st, sync=sync)
        if plan.maxpool is not None:
            a = plan.maxpool(a)
        for b in plan.blocks:
            h = a
            for cb in b.convs[:-1]:
                y, st = self._conv_stats(h, cb, sync)
                h = self._bn_add_relu(y, st, sync=sync)
            y, st = self._conv_stats(h, b.convs[-1], sync)
            if b.proj is not None:
                r, rst = self._conv_stats(a, b.proj, sync)
                a = self._bn_add_relu(y, st, ShortcutMode.PROJ_B, r, rst, res_stride=b.proj.stride, sync=sync)
            else:
                a = self._bn_add_relu(y, st, ShortcutMode.IDENTITY, a, sync=sync)
        return a

    def chain_eval_features(self, model, x):
        """Inference on the folded chain plan: every convolution with its bias, ReLU and (a block's last) the
        shortcut in one primitive; the projection a second convolution whose output is that shortcut."""
        dtype = compute_dtype(x)
        folded = model.folded(dtype)
        conv, project = self._eval_conv(model, folded, x, dtype)

        def finish(h, a, b):
            add = a if b.proj_weight is None else project(a, b.proj_weight, b.proj_stride)
            return conv(h, b.convs[-1], ShortcutMode.IDENTITY, add=add)

        return folded.walk(x.to(dtype), conv, finish)


EXTENSION = {"cpu": ExtensionBackend("cpu"), "cuda": ExtensionBackend("cuda")}
