"""FusedResNet: the reference ResNet's modules and state_dict, run through fused operators.

Training mode (backend "triton"), per BasicBlock:
    y1, mean1, var1 = conv_bn_stats(x, W1)                          conv1, BN1 statistics in its epilogue
    y2, mean2, var2 = conv_bn_stats(y1, W2, scale1, shift1)         BN1 + ReLU applied on load, BN2 statistics
    out = bn_add_relu(y2, scale2, shift2, shortcut)                 BN2 + shortcut (identity / A / B) + ReLU
For option B, conv_bn_stats_proj computes y2 and the 1x1 projection of x (each with its statistics) in one launch.
with scale = gamma * rsqrt(var + eps), shift = beta - mean * scale from bn_scale_shift (one launch each way), so
autograd carries gradients to gamma, beta and through the statistics; bn_running_update updates the running buffers
exactly as nn.BatchNorm2d. The stem is conv_bn_stats + bn_add_relu (mode 0); pooling and the head are PyTorch.

Inference mode: BN folded into the conv weights (cached while parameters and buffers are unchanged), one
conv_bn_act kernel per conv with bias, shortcut (identity, option A by index math, option B as a second GEMM into
the same tile) and ReLU in its epilogue.

Backends: "triton" (the kernels above; on CPU tensors only under TRITON_INTERPRET=1), "cuda" / "cpu" (ATen
convolutions + the C++/CUDA operators of resnet_fused._C: bn_stats and bn_finalize outside autograd, then
batch_norm_add_relu, whose backward includes the statistics' gradient; in eval BN folded into the weights, with
oneDNN's conv + bias + add + ReLU primitives on fp32 CPU tensors and scale_shift_add_relu otherwise; channels_last
throughout), "auto" (triton on CUDA tensors; cpu on CPU tensors, or the plain PyTorch composition when the
extension is not built). ``RESNET_FUSED_BACKEND`` sets the default.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import ext
from .reference import ResNet

try:  # importing the op modules registers the resnet_fused:: custom ops
    from .ops import bn_add_relu as _bn_add_relu_mod  # noqa: F401
    from .ops import bn_running_update as _bn_running_update_mod  # noqa: F401
    from .ops import bn_scale_shift as _bn_scale_shift_mod  # noqa: F401
    from .ops import conv_bn_act as _conv_bn_act_mod  # noqa: F401
    from .ops import conv_bn_stats as _conv_bn_stats_mod  # noqa: F401
    TRITON_IMPORT_ERROR = None
except ImportError as e:  # no Triton on this platform: the cpu backend still works
    TRITON_IMPORT_ERROR = e

BACKENDS = ("auto", "triton", "cuda", "cpu")
_SHORTCUT_MODE = {"none": 0, "identity": 1, "A": 2, "B": 3}


def _acc(t):
    """Per-channel math in fp32 at least (fp64 models stay fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _shortcut_args(blk, x):
    """(residual, res_scale, res_shift, mode, res_stride, pad_front) of a training block's final fused op for the
    parameter-free shortcuts (none, identity, option A); option B has its own path."""
    kind = blk.shortcut_kind
    if kind == "none":
        return None, None, None, 0, blk.stride, 0
    return x, None, None, _SHORTCUT_MODE[kind], blk.stride, blk.shortcut.pad_front if kind == "A" else 0


def _channels_last(x):
    """x in channels_last, with strides that say so even for one channel: ATen reads an (N, 1, H, W) tensor's
    strides as NCHW, and its convolution would then return NCHW activations for the rest of the network."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:
        n, c, h, w = x.shape
        x = x.as_strided(x.shape, (h * w * c, 1, w * c, c))
    return x


# oneDNN convolutions with bias, residual add and ReLU fused as post-ops: the primitives torch.compile's CPU backend
# uses (checked once here: the check itself must not be traced)
_HAS_ONEDNN_POST_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _use_onednn_post_ops(x, dtype):
    """fp32 CPU tensors in eager mode, when this torch has the fused oneDNN primitives (they have no fake
    implementation for torch.compile, whose CPU backend makes the same fusions itself)."""
    return (_HAS_ONEDNN_POST_OPS and x.device.type == "cpu" and dtype == torch.float32
            and not torch.compiler.is_compiling())


def _onednn_conv(x, w, b, stride, pad, relu=False, add=None):
    """relu?(conv2d(x, w, b) + add?) as one oneDNN primitive (no separate pass over the output for add/ReLU)."""
    s, p, d = [stride, stride], [pad, pad], [1, 1]
    if add is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, w, b, p, s, d, 1, "add", None,
                                                              "relu" if relu else None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, p, s, d, 1, "relu" if relu else "none", [], "")


# conv3x3_winograd: this extension build and this CPU run it (x86-64 with AVX2 + FMA)
_WINOGRAD = ext.winograd_supported()


# the activation size CPU inference keeps per batch slice (FusedResNet._eval_chunks)
_CPU_EVAL_SLICE_BYTES = int(1.6 * 2**20)


def _winograd_fits(conv):
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0)


def _aten_conv(x, w, b, stride, pad, relu=False, add=None):
    """The same with ATen's convolution and the C++ fused add + ReLU (CUDA, fp64, low precision)."""
    y = F.conv2d(x, w, b, stride, pad)
    if add is not None:
        return torch.ops.resnet_fused.scale_shift_add_relu(y, None, None, add, None, None, 1, 1, 0, relu)
    return torch.relu_(y) if relu else y


def _copy_bn_settings(src, dst):
    """eps and momentum are BatchNorm attributes, not state_dict entries: carried over by the conversions."""
    for a, b in zip(src.modules(), dst.modules()):
        if isinstance(a, torch.nn.modules.batchnorm._BatchNorm):
            b.eps, b.momentum = a.eps, a.momentum


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class FusedResNet(ResNet):
    """Drop-in ResNet with fused kernels: same constructor (plus ``backend``) and the same state_dict keys."""

    def __init__(self, depth: int = 20, shortcut: str | None = "A", in_channels: int = 1, num_classes: int = 10,
                 widths=None, plain: bool = False, backend: str | None = None):
        super().__init__(depth, shortcut, in_channels, num_classes, widths, plain)
        backend = backend or os.environ.get("RESNET_FUSED_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self._folded = None  # (key, folded weights, all finite) cache for inference
        self._wino = None  # (folded weights, their Winograd transforms) cache for CPU inference

    # ---- conversions -----------------------------------------------------------------------------------------

    @classmethod
    def from_reference(cls, model: ResNet, backend: str | None = None) -> "FusedResNet":
        fused = cls(**model.config(), backend=backend)
        p = next(model.parameters())
        fused.to(device=p.device, dtype=p.dtype)
        fused.load_state_dict(model.state_dict(), strict=True)
        _copy_bn_settings(model, fused)
        fused.train(model.training)
        return fused

    def to_reference(self) -> ResNet:
        ref = ResNet(**self.config())
        p = next(self.parameters())
        ref.to(device=p.device, dtype=p.dtype)
        ref.load_state_dict(self.state_dict(), strict=True)
        _copy_bn_settings(self, ref)
        ref.train(self.training)
        return ref

    def extra_repr(self):
        return f"backend={self.backend!r}"

    # ---- dispatch --------------------------------------------------------------------------------------------

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend this input runs on: "triton", "cuda", "cpu", or "reference" (plain PyTorch math)."""
        b = self.backend
        if b == "auto":
            if x.device.type == "cuda":
                b = "triton" if TRITON_IMPORT_ERROR is None else "cuda" if ext.has_cuda() else "reference"
            else:
                b = "cpu" if ext.available() else "reference"
        if b == "triton":
            if TRITON_IMPORT_ERROR is not None:
                raise RuntimeError(f"backend 'triton' needs Triton, which failed to import: {TRITON_IMPORT_ERROR}")
            if x.device.type != "cuda" and not triton_interpreting():
                raise RuntimeError(f"backend 'triton' runs on CUDA tensors (got {x.device}); on CPU use "
                                   f"backend='cpu', or set TRITON_INTERPRET=1 before importing triton")
        elif b in ("cuda", "cpu"):
            ext.require(b)
            if x.device.type != b:
                raise RuntimeError(f"backend {b!r} runs on {b.upper() if b == 'cpu' else 'CUDA'} tensors, got an "
                                   f"input on {x.device}; move the model or pick backend='auto'")
        return b

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedResNet expects a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"FusedResNet expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FusedResNet was built for {self.in_channels} input channels, got input of shape "
                             f"{tuple(x.shape)} ({x.shape[1]} channels)")
        if not x.is_floating_point():
            raise TypeError(f"FusedResNet expects a floating-point input, got {x.dtype}; convert images with "
                            f".float() (and normalise) first")
        w = self.conv1.weight
        if x.device != w.device:
            raise RuntimeError(f"input is on {x.device} but the model's weights are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"input dtype {x.dtype} does not match the weight dtype {w.dtype}; convert one of "
                               f"them (or run under torch.autocast)")
        if self.training and x.shape[0] == 0:
            raise ValueError(f"FusedResNet got an empty batch (input shape {tuple(x.shape)}); training needs at "
                             f"least one image (BatchNorm statistics of no values are undefined)")
        if self.training and x.shape[0] * self._min_spatial(x) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)} (spatial size 1x1 after the last stage with batch "
                             f"{x.shape[0]})")

    def _min_spatial(self, x):
        h, w = x.shape[2], x.shape[3]
        for _ in range(len(self.widths) - 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return h * w

    def forward(self, x):
        self._check_input(x)
        backend = self.resolve_backend(x)
        if backend == "reference":
            return super().forward(x)
        if backend in ("cpu", "cuda"):
            if not self.training and torch.is_grad_enabled() and self._needs_grad(x):
                return super().forward(x)
            # channels_last throughout: oneDNN's convolutions are up to 4x faster in it on CPU, and the C++
            # operators work on NHWC rows in place (an NCHW operand costs them a layout copy each way)
            x = _channels_last(x)
            if self.training:
                return self.fc(torch.flatten(F.adaptive_avg_pool2d(self._features_ext_train(x), 1), 1))
            return self.fc(torch.cat([torch.flatten(F.adaptive_avg_pool2d(self._features_ext_eval(c), 1), 1)
                                      for c in self._eval_chunks(x)]))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"backend 'triton' computes in float32, bfloat16 or float16, not {dtype}; use "
                            f"backend='cpu' for {dtype}")
        x = x.to(dtype)
        if self.training:
            feats = self._features_train(x, dtype)
        elif torch.is_grad_enabled() and self._needs_grad(x):
            return super().forward(x)  # eval-mode gradients (saliency, adversarial): the reference composition
        else:
            feats = self._features_eval(x, dtype)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1))

    def _needs_grad(self, x):
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    # ---- the C++/CUDA backends: ATen convolutions + resnet_fused._C operators ------------------------------

    def _ext_conv_bn(self, x, conv, bn):
        """conv (ATen), then y's batch statistics (bn_stats) and the running update (bn_finalize) outside autograd:
        batch_norm_add_relu's backward carries the gradient through the statistics itself."""
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
        with torch.no_grad():
            mean, var = torch.ops.resnet_fused.bn_stats(y)
            if bn.track_running_stats and bn.running_mean is not None:
                invstd = torch.ops.resnet_fused.bn_finalize(
                    mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                    y.shape[0] * y.shape[2] * y.shape[3], 0.0 if bn.momentum is None else float(bn.momentum),
                    bn.momentum is None, bn.eps)
            else:
                invstd = torch.rsqrt(var + bn.eps)
        return y, (mean, invstd, bn.weight, bn.bias)

    def _features_ext_train(self, x):
        bnar = torch.ops.resnet_fused.batch_norm_add_relu
        none = (None, None, None, None, None)
        y, st = self._ext_conv_bn(x, self.conv1, self.bn1)
        a = bnar(y, *st, *none, 0, 1, 0, True)
        for blk in self.blocks():
            y1, st1 = self._ext_conv_bn(a, blk.conv1, blk.bn1)
            h = bnar(y1, *st1, *none, 0, 1, 0, True)
            y2, st2 = self._ext_conv_bn(h, blk.conv2, blk.bn2)
            kind = blk.shortcut_kind
            if kind == "B":
                r, rst = self._ext_conv_bn(a, blk.shortcut.conv, blk.shortcut.bn)
                a = bnar(y2, *st2, r, *rst, 3, blk.stride, 0, True)
            elif kind == "none":
                a = bnar(y2, *st2, *none, 0, 1, 0, True)
            else:
                pad_front = blk.shortcut.pad_front if kind == "A" else 0
                a = bnar(y2, *st2, a, None, None, None, None, _SHORTCUT_MODE[kind], blk.stride, pad_front, True)
        return a

    def _features_ext_eval(self, x):
        """BN folded into the conv weights (cached): conv + bias + ReLU, and conv + bias + shortcut + ReLU. On fp32
        CPU tensors the 3x3 stride-1 convolutions (channels multiples of 8) are conv3x3_winograd with bias, shortcut
        (option A by index math) and ReLU in its output transform; the others are oneDNN primitives with post-ops."""
        ssar = torch.ops.resnet_fused.scale_shift_add_relu
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        folded = self._folded_weights(dtype)
        # oneDNN's ReLU post-op turns NaN into 0, and Winograd's transforms turn an Inf into NaN where a direct
        # convolution keeps it: with a non-finite input or weight the ATen convolutions run instead, so NaN and
        # Inf come out exactly as in PyTorch (one cheap pass over the input; the weights' flag is cached)
        onednn = _use_onednn_post_ops(x, dtype) and self._folded[2] and bool(torch.isfinite(x).all())
        base = _onednn_conv if onednn else _aten_conv
        wino = self._winograd_weights(folded) if onednn and _WINOGRAD else [None] * len(folded)
        wg = torch.ops.resnet_fused.conv3x3_winograd

        def conv(x, i, stride, pad, relu=False, add=None, mode=1, res_stride=1, pad_front=0):
            w, b = folded[i][0], folded[i][1]
            if wino[i] is not None:
                return wg(x, wino[i], b, add, 0 if add is None else mode, res_stride, pad_front, relu)
            if mode == 2:  # option A: subsample + zero channel padding by index math in scale_shift_add_relu
                return ssar(base(x, w, b.to(dtype), stride, pad), None, None, add, None, None, 2, res_stride,
                            pad_front, relu)
            return base(x, w, b.to(dtype), stride, pad, relu=relu, add=add)

        a = conv(x.to(dtype), 0, 1, 1, relu=True)
        i = 1
        for blk in self.blocks():
            h = conv(a, i, blk.stride, 1, relu=True)
            kind = blk.shortcut_kind
            if kind == "B":  # the bias holds both folded shifts; the projection is a second conv
                ysc = base(a, folded[i + 1][2], None, blk.stride, 0)
                a = conv(h, i + 1, 1, 1, relu=True, add=ysc)
            elif kind == "none":
                a = conv(h, i + 1, 1, 1, relu=True)
            elif kind == "identity":
                a = conv(h, i + 1, 1, 1, relu=True, add=a)
            else:
                a = conv(h, i + 1, 1, 1, relu=True, add=a, mode=2, res_stride=blk.stride,
                         pad_front=blk.shortcut.pad_front)
            i += 2
        return a

    def _eval_chunks(self, x):
        """CPU inference runs the network on slices of the batch whose largest activation (~1.6 MB) stays in the
        caches from one layer to the next instead of streaming through memory at every layer (samples are
        independent in eval mode: the same numbers; about 1.2-1.3x faster at batch 256 on the 2-core development
        machine). One slice elsewhere (CUDA, torch.compile)."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return (x,)
        per_image = x.shape[2] * x.shape[3] * max(self.conv1.out_channels, x.shape[1]) * x.element_size()
        rows = max(1, _CPU_EVAL_SLICE_BYTES // per_image)
        if x.shape[0] <= rows:
            return (x,)
        slices = -(-x.shape[0] // rows)
        return x.split(-(-x.shape[0] // slices))  # equal slices (256 images: 8 x 32, not 8 x 31 + 8)

    def _winograd_weights(self, folded):
        """conv3x3_winograd's transformed weights for the folded convs it can run (3x3, stride 1, padding 1,
        channels multiples of 8; None for the others), cached with the folded weights they come from."""
        cached = getattr(self, "_wino", None)  # (absent on modules pickled by older versions)
        if cached is not None and cached[0] is folded:
            return cached[1]
        convs = [self.conv1] + [c for blk in self.blocks() for c in (blk.conv1, blk.conv2)]
        wino = [ext.winograd_weight(f[0]) if _winograd_fits(c) else None for c, f in zip(convs, folded)]
        self._wino = (folded, wino)
        return wino

    # ---- training --------------------------------------------------------------------------------------------

    @staticmethod
    def _scale_shift(bn, mean, var):
        """(gamma * rsqrt(var + eps), beta - mean * scale): one launch, one for its VJP (bn_scale_shift)."""
        return torch.ops.resnet_fused.bn_scale_shift(mean, var, bn.weight, bn.bias, bn.eps)

    @staticmethod
    def _update_running(bn, mean, var, count):
        if bn.track_running_stats and bn.running_mean is not None:
            torch.ops.resnet_fused.bn_running_update(
                bn.running_mean, bn.running_var, bn.num_batches_tracked, mean.detach(), var.detach(), count,
                0.0 if bn.momentum is None else float(bn.momentum), bn.momentum is None)

    def _conv_stats(self, x, conv, bn, dtype, scale=None, shift=None):
        y, mean, var = torch.ops.resnet_fused.conv_bn_stats(x, conv.weight.to(dtype), scale, shift,
                                                            conv.stride[0], conv.padding[0])
        self._update_running(bn, mean, var, y.shape[0] * y.shape[2] * y.shape[3])
        return y, self._scale_shift(bn, mean, var)

    def _features_train(self, x, dtype):
        ops = torch.ops.resnet_fused
        y, (s, t) = self._conv_stats(x, self.conv1, self.bn1, dtype)
        a = ops.bn_add_relu(y, s, t, None, None, None, 0, 1, 0, True)
        for blk in self.blocks():
            y1, (s1, t1) = self._conv_stats(a, blk.conv1, blk.bn1, dtype)
            if blk.shortcut_kind == "B":  # conv2 and the projection shortcut in one launch, both with statistics
                y2, m2, v2, ys, ms, vs = ops.conv_bn_stats_proj(y1, blk.conv2.weight.to(dtype), s1, t1, a,
                                                                blk.shortcut.conv.weight.to(dtype), blk.stride)
                count = y2.shape[0] * y2.shape[2] * y2.shape[3]
                self._update_running(blk.bn2, m2, v2, count)
                self._update_running(blk.shortcut.bn, ms, vs, count)
                (s2, t2), (rs, rt) = self._scale_shift(blk.bn2, m2, v2), self._scale_shift(blk.shortcut.bn, ms, vs)
                a = ops.bn_add_relu(y2, s2, t2, ys, rs, rt, 3, blk.stride, 0, True)
                continue
            y2, (s2, t2) = self._conv_stats(y1, blk.conv2, blk.bn2, dtype, s1, t1)
            a = ops.bn_add_relu(y2, s2, t2, *_shortcut_args(blk, a), True)
        return a

    # ---- inference -------------------------------------------------------------------------------------------

    @staticmethod
    def _fold(conv, bn, dtype):
        s = _acc(bn.weight) * torch.rsqrt(_acc(bn.running_var) + bn.eps)
        w = _channels_last((_acc(conv.weight) * s[:, None, None, None]).to(dtype))  # oneDNN's layout: no reorder
        return w, _acc(bn.bias) - _acc(bn.running_mean) * s

    def _cache_key(self, dtype):
        """What the folded weights depend on: every parameter and buffer (storage and version: optimizer steps,
        in-place edits, load_state_dict and replaced tensors change it), each BatchNorm's eps, and the dtype.
        Edits through ``.data`` bypass the version counter: call invalidate_caches() after them."""
        tensors = list(self.parameters()) + list(self.buffers())
        eps = tuple(m.eps for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        return dtype, eps, tuple((t.data_ptr(), t._version) for t in tensors)

    def invalidate_caches(self):
        """Drop the inference caches (BatchNorm folded into the conv weights, their Winograd transforms). Needed
        only after changing a weight or buffer in a way PyTorch does not record (``p.data[...] = ...``,
        ``p.data.copy_(...)``); optimizer steps, in-place ops on the parameters, load_state_dict, ``.to()`` and
        changes of eps are seen by themselves."""
        self._folded = self._wino = None

    def _folded_weights(self, dtype):
        """Per conv: (folded weight, bias); cached until a parameter, buffer or eps changes (or the dtype)."""
        compiling = torch.compiler.is_compiling()
        key = None if compiling else self._cache_key(dtype)
        if key is not None and self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        folded = [self._fold(self.conv1, self.bn1, dtype)]
        for blk in self.blocks():
            folded.append(self._fold(blk.conv1, blk.bn1, dtype))
            w2, b2 = self._fold(blk.conv2, blk.bn2, dtype)
            if blk.shortcut_kind == "B":
                wsc, bsc = self._fold(blk.shortcut.conv, blk.shortcut.bn, dtype)
                folded.append((w2, b2 + bsc, wsc))
            else:
                folded.append((w2, b2))
        if key is not None:  # with whether every folded tensor is finite (see _features_ext_eval)
            self._folded = (key, folded, all(bool(torch.isfinite(t).all()) for f in folded for t in f))
        return folded

    def _features_eval(self, x, dtype):
        op = torch.ops.resnet_fused.conv_bn_act
        folded = iter(self._folded_weights(dtype))
        w, b = next(folded)
        a = op(x, w, b, None, None, None, 1, 1, 0, 1, 0, True)
        for blk in self.blocks():
            w1, b1 = next(folded)
            h = op(a, w1, b1, None, None, None, blk.stride, 1, 0, 1, 0, True)
            f2 = next(folded)
            kind = blk.shortcut_kind
            if kind == "B":
                a = op(h, f2[0], f2[1], None, a, f2[2], 1, 1, 0, blk.stride, 0, True)
            else:
                res = a if kind in ("identity", "A") else None
                pad_front = blk.shortcut.pad_front if kind == "A" else 0
                a = op(h, f2[0], f2[1], res, None, None, 1, 1, min(_SHORTCUT_MODE[kind], 2), blk.stride,
                       pad_front, True)
        return a

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_caches()  # .to() / .cuda() / .half() replace tensors
        return super()._apply(fn, *args, **kwargs)
