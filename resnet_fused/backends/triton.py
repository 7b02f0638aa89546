"""The Triton backend: FusedResNet's network through the fused Triton kernels (resnet_fused/ops).

Training, per BasicBlock:
    y1, mean1, var1, scale1, shift1 = conv_bn_train(x, W1, bn1)            conv1, BN1 statistics in its epilogue
    y2, mean2, var2, scale2, shift2 = conv_bn_train(y1, W2, bn2, scale1, shift1)   BN1 + ReLU applied on load
    out = bn_add_relu(y2, scale2, shift2, shortcut)                        BN2 + shortcut (identity / A / B) + ReLU
(scale, shift) = (gamma / sqrt(var + eps), beta - mean * scale) come from the statistics' finalize launch, and
autograd carries gradients to gamma, beta and through the statistics; bn_running_update updates every running
buffer exactly as nn.BatchNorm2d, in one launch after the last layer. With sync_bn the statistics are merged over processes first: conv_bn_stats,
the collective, then bn_scale_shift. Option B: conv_bn_stats_proj computes y2 and the 1x1 projection of x (each
with its statistics) in one launch, then bn_scale_shift for each.
Inference: the folded plan, one conv_bn_act per conv with bias, shortcut (option B as a second GEMM in the same
tile) and ReLU in its epilogue; or, with ``model.whole_network_inference``, the whole network and its head in one
resnet_infer launch.

torchvision's ResNets (torchvision_resnet.ChainPlan) through the same operators: per block a chain of
conv_bn_train launches, each applying the previous BatchNorm + ReLU on load, then bn_add_relu with the identity or
the projection (its own conv_bn_train, normalised in bn_add_relu: mode 3); the stem's max-pool is PyTorch's. In
inference one conv_bn_act per folded convolution, the block's last with the shortcut (option B's second GEMM for
the projection) in its epilogue.
"""
from __future__ import annotations

import torch

from ..plan import ShortcutMode
from ..torchvision_resnet import ChainPlan
from .base import Backend, compute_dtype

try:  # importing the op modules registers the resnet_fused:: custom ops
    from ..ops import bn_add_relu as _bn_add_relu  # noqa: F401
    from ..ops import bn_running_update as _bn_running_update  # noqa: F401
    from ..ops import bn_scale_shift as _bn_scale_shift  # noqa: F401
    from ..ops import conv_bn_act as _conv_bn_act  # noqa: F401
    from ..ops import conv_bn_stats as _conv_bn_stats  # noqa: F401
    from ..ops import pool_linear as _pool_linear
    from ..ops import resnet_infer as _resnet_infer
    from ..ops.eager import ops  # the custom ops, called without the dispatcher in plain eager mode
    TRITON_IMPORT_ERROR = None
except ImportError as e:  # no Triton on this platform: the extension backends still work
    TRITON_IMPORT_ERROR = e

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _RunningUpdates:
    """The running-statistics updates of one forward, collected layer by layer and done in one launch after the
    last layer (bn_running_update): a forward that fails half way leaves every BatchNorm as it was."""

    def __init__(self):
        self.bns, self.means, self.vars, self.counts = [], [], [], []

    def add(self, bn, mean, var, count):
        if bn.track_running_stats and bn.running_mean is not None:
            self.bns.append(bn)
            self.means.append(mean.detach())
            self.vars.append(var.detach())
            self.counts.append(count)

    def apply(self):
        if self.bns:
            bns = self.bns
            ops.bn_running_update(
                [b.running_mean for b in bns], [b.running_var for b in bns], [b.num_batches_tracked for b in bns],
                self.means, self.vars, self.counts, [0.0 if b.momentum is None else float(b.momentum) for b in bns],
                [b.momentum is None for b in bns])


def _scale_shift(bn, mean, var):
    return ops.bn_scale_shift(mean, var, bn.weight, bn.bias, eps=bn.eps)


def _count(y):
    return y.shape[0] * y.shape[2] * y.shape[3]


class TritonBackend(Backend):
    name = "triton"

    def check(self, x):
        from . import interpreter_problem, triton_interpreting
        if TRITON_IMPORT_ERROR is not None:
            raise RuntimeError(f"backend 'triton' needs Triton, which failed to import: {TRITON_IMPORT_ERROR}")
        if x.device.type != "cuda":
            if not triton_interpreting():
                raise RuntimeError(f"backend 'triton' runs on CUDA tensors (got {x.device}); on CPU use "
                                   f"backend='cpu', or set TRITON_INTERPRET=1 before importing triton")
            problem = interpreter_problem()
            if problem is not None:
                raise RuntimeError(f"backend 'triton' on CPU tensors: {problem}")

    @staticmethod
    def _dtype(x):
        dtype = compute_dtype(x)
        if dtype not in _DTYPES:
            raise TypeError(f"backend 'triton' computes in float32, bfloat16 or float16, not {dtype}; use "
                            f"backend='cpu' for {dtype}")
        return dtype

    def features(self, model, x, sync=None):
        x = x.to(self._dtype(x))
        if isinstance(model.plan, ChainPlan):
            return self.chain_train_features(model, x, sync) if model.training else self.chain_eval_features(model, x)
        return self.train_features(model, x, sync) if model.training else self.eval_features(model, x)

    @staticmethod
    def _whole_network_on(model):
        """Inference as one resnet_infer launch: asked for, and FusedResNet's own plan (not a torchvision one)."""
        return (not model.training and getattr(model, "whole_network_inference", False)
                and not isinstance(model.plan, ChainPlan))

    def forward(self, model, x, sync=None):
        if self._whole_network_on(model):
            logits = self.whole_network(model, x)
            if logits is not None:
                return logits
        return super().forward(model, x, sync)

    def prepare(self, model, x):
        if self._whole_network_on(model):
            self._packed_network(model, self._dtype(x))

    def _packed_network(self, model, dtype):
        """resnet_infer's (spec, packed weights) of the folded network, kept with the folded plan; None when its
        kernel does not take this network."""
        folded = model.folded(dtype)
        if torch.compiler.is_compiling():
            return _resnet_infer.prepare(folded, model.in_channels, dtype)
        return model.fold_cache.derived("resnet_infer", lambda f: _resnet_infer.prepare(f, model.in_channels, dtype))

    def whole_network(self, model, x):
        """The logits from one resnet_infer launch, or None when its kernel does not take this network."""
        dtype = self._dtype(x)
        net = self._packed_network(model, dtype)
        fc = model.fc
        if net is None or fc.out_features > _resnet_infer.MAX_CLASSES:
            return None
        spec, (weights, biases, table) = net
        return ops.resnet_infer(x.to(dtype), weights, biases, table, fc.weight, fc.bias, spec=spec,
                                out_dtype=dtype)

    @staticmethod
    def _train_convs(running, sync):
        """(stats, conv_stats): a BatchNorm's statistics (this rank's, or with sync_bn the global batch's: one
        collective per BatchNorm), and conv_stats(a, cb, scale, shift) -> (y, (scale', shift')): cb's convolution
        of relu(a * scale + shift) (or of a) with its BatchNorm's statistics, running update queued."""
        def stats(y, mean, var):
            return (mean, var, _count(y)) if sync is None else sync(mean, var, y)

        def conv_stats(a, cb, scale=None, shift=None):
            if sync is None:  # the statistics' finalize launch also gives BatchNorm's (scale, shift)
                y, mean, var, s, t = ops.conv_bn_train(a, cb.conv.weight, scale, shift, cb.bn.weight, cb.bn.bias,
                                                       eps=cb.bn.eps, stride=cb.stride, padding=cb.padding)
                running.add(cb.bn, mean, var, _count(y))
                return y, (s, t)
            y, mean, var = ops.conv_bn_stats(a, cb.conv.weight, in_scale=scale, in_shift=shift,
                                             stride=cb.stride, padding=cb.padding)
            mean, var, count = stats(y, mean, var)
            running.add(cb.bn, mean, var, count)
            return y, _scale_shift(cb.bn, mean, var)
        return stats, conv_stats

    def train_features(self, model, x, sync=None):
        running = _RunningUpdates()
        stats, conv_stats = self._train_convs(running, sync)
        y, (s, t) = conv_stats(x, model.plan.stem)
        a = ops.bn_add_relu(y, s, t, residual=None, res_scale=None, res_shift=None, mode=ShortcutMode.NONE,
                            res_stride=1, pad_front=0, relu=True)
        for b in model.plan.blocks:
            y1, (s1, t1) = conv_stats(a, b.conv1)
            if b.mode == ShortcutMode.PROJ_B:  # conv2 and the projection in one launch, both with statistics
                y2, m2, v2, ys, ms, vs = ops.conv_bn_stats_proj(y1, b.conv2.conv.weight, s1, t1, a,
                                                                b.proj.conv.weight, proj_stride=b.stride)
                m2, v2, count = stats(y2, m2, v2)
                ms, vs, _ = stats(ys, ms, vs)
                for cb, m, v in ((b.conv2, m2, v2), (b.proj, ms, vs)):
                    running.add(cb.bn, m, v, count)
                (s2, t2), (rs, rt) = _scale_shift(b.conv2.bn, m2, v2), _scale_shift(b.proj.bn, ms, vs)
                a = ops.bn_add_relu(y2, s2, t2, residual=ys, res_scale=rs, res_shift=rt, mode=b.mode,
                                    res_stride=b.stride, pad_front=0, relu=True)
                continue
            y2, (s2, t2) = conv_stats(y1, b.conv2, s1, t1)
            a = ops.bn_add_relu(y2, s2, t2, residual=None if b.mode == ShortcutMode.NONE else a, res_scale=None,
                                res_shift=None, mode=b.mode, res_stride=b.stride, pad_front=b.pad_front, relu=True)
        running.apply()
        return a

    def chain_train_features(self, model, x, sync=None):
        """A torchvision ResNet's training forward: the stem's BN + ReLU written once (the max-pool reads it),
        inside a block every BN + ReLU but the last applied on load by the next convolution."""
        running = _RunningUpdates()
        _, conv_stats = self._train_convs(running, sync)
        plan = model.plan
        y, (s, t) = conv_stats(x, plan.stem)
        a = ops.bn_add_relu(y, s, t, residual=None, res_scale=None, res_shift=None, mode=ShortcutMode.NONE,
                            res_stride=1, pad_front=0, relu=True)
        if plan.maxpool is not None:
            a = plan.maxpool(a)
        for b in plan.blocks:
            y, (s, t) = conv_stats(a, b.convs[0])
            for cb in b.convs[1:]:
                y, (s, t) = conv_stats(y, cb, s, t)
            if b.proj is not None:
                r, (rs, rt) = conv_stats(a, b.proj)
                a = ops.bn_add_relu(y, s, t, residual=r, res_scale=rs, res_shift=rt, mode=ShortcutMode.PROJ_B,
                                    res_stride=1, pad_front=0, relu=True)
            else:
                a = ops.bn_add_relu(y, s, t, residual=a, res_scale=None, res_shift=None, mode=ShortcutMode.IDENTITY,
                                    res_stride=1, pad_front=0, relu=True)
        running.apply()
        return a

    def chain_eval_features(self, model, x):
        """A torchvision ResNet's inference: one conv_bn_act per folded convolution; the block's last adds the
        identity, or the projection as a second GEMM into the same tile (its shift folded into the bias)."""
        op = ops.conv_bn_act
        folded = model.folded(x.dtype)

        def conv(a, fc, **shortcut):
            kw = dict(residual=None, x2=None, weight2=None, res_mode=ShortcutMode.NONE, res_stride=1) | shortcut
            return op(a, fc.weight, fc.bias, stride=fc.stride, padding=fc.padding, pad_front=0, relu=True, **kw)

        def finish(h, a, b):
            if b.proj_weight is not None:
                return conv(h, b.convs[-1], x2=a, weight2=b.proj_weight, res_mode=ShortcutMode.PROJ_B,
                            res_stride=b.proj_stride)
            return conv(h, b.convs[-1], residual=a, res_mode=ShortcutMode.IDENTITY)

        return folded.walk(x, conv, finish)

    def head(self, model, feats):
        """pool_linear: pool + classifier in one launch each way, the weights read in their dtype (no autocast
        casts); the logits in autocast's dtype (as nn.Linear's under autocast), else the features'."""
        fc = model.fc
        if not _pool_linear.fits(feats.shape[1], fc.out_features):
            return super().head(model, feats)
        logits, _ = ops.pool_linear(feats, fc.weight, fc.bias, out_dtype=compute_dtype(feats))
        return logits

    def eval_features(self, model, x):
        op = ops.conv_bn_act
        folded = model.folded(x.dtype)

        def conv(a, fc, mode=ShortcutMode.NONE, residual=None, x2=None, weight2=None, res_stride=1, pad_front=0):
            return op(a, fc.weight, fc.bias, residual=residual, x2=x2, weight2=weight2, stride=fc.stride,
                      padding=fc.padding, res_mode=mode, res_stride=res_stride, pad_front=pad_front, relu=True)

        a = conv(x, folded.stem)
        for b in folded.blocks:
            h = conv(a, b.conv1)
            if b.mode == ShortcutMode.PROJ_B:
                a = conv(h, b.conv2, b.mode, x2=a, weight2=b.proj_weight, res_stride=b.stride)
            else:
                a = conv(h, b.conv2, b.mode, residual=None if b.mode == ShortcutMode.NONE else a,
                         res_stride=b.stride, pad_front=b.pad_front)
        return a


TRITON = TritonBackend()
