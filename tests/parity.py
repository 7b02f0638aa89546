"""Parity checks that fail only when the kernels are wrong, not when fp32 rounding takes its usual course.

* ``one_step_errors``: one training step of FusedResNet and of the fp32 reference, each against the same step in
  float64; FusedResNet's error (logits, every gradient, running statistics) may be at most twice PyTorch fp32's.
* ``loss_band``: a training run is chaotic: the reference itself, started from weights perturbed by 1e-6, leaves a
  1e-3 band around its own loss within a few steps. The band of such perturbed reference runs, per step, is the
  yardstick: FusedResNet's losses must lie inside it (widened by the band's own width and a small floor).

Used by tests/test_fused_model.py on CPU (small) and tests/test_gpu.py on a GPU (ResNet-20 on MNIST).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from resnet_fused import FusedResNet


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x.to(next(model.parameters()).dtype))
    F.cross_entropy(out.double(), y).backward()
    return out.detach()


def one_step_errors(ref, x, y, backend, convert=None, both_layouts=False, conditioning=0, **fused_kwargs):
    """{name: (FusedResNet's error, PyTorch fp32's error, the float64 value's largest magnitude)} against float64
    after one training step from the fp32 reference ``ref``'s state: the logits, every parameter's gradient, every
    floating-point buffer. ``convert(ref, backend)``: how the fused model is made (default
    FusedResNet.from_reference; FusedResNet.from_torchvision for a torchvision ResNet).

    ``both_layouts``: PyTorch's fp32 error is the larger of its NCHW and its channels_last run's. A max-pool window
    whose two largest values are within rounding of each other (or a ReLU input within rounding of 0) routes the
    gradient by the rounding: for torchvision's ResNet-18 at 224x224, batch 2, PyTorch's channels_last step is 2e4x
    further from float64 than its NCHW step in one gradient (measured): PyTorch's own two layouts bracket what
    fp32 can promise there.

    ``conditioning``: that many float64 steps from weights perturbed by 1e-6 (about 8 fp32 roundings) count as
    PyTorch runs too: where one ReLU input is within rounding of 0, fp32 decides its sign by luck and PyTorch's
    own run may happen to be lucky (ResNet-50 at 96x96, batch 1: a pre-ReLU value 3e-7 of its tensor's scale from
    0; FusedResNet's fp32 step put it on the other side on the Zen 5 machine, moving one BatchNorm's bias gradient
    by 17% of its largest value while both PyTorch layouts stayed within 1e-5). The perturbed float64 steps show how far
    such a quantity moves under rounding-sized changes."""
    ref64 = copy.deepcopy(ref).double()
    fused = (convert or (lambda r, b: FusedResNet.from_reference(r, backend=b, **fused_kwargs)))(ref, backend)
    refs32 = [copy.deepcopy(ref)] + ([copy.deepcopy(ref).to(memory_format=torch.channels_last)] if both_layouts
                                     else [])
    refs32 += [perturbed(ref64, 1e-6, seed) for seed in range(conditioning)]
    want, got = _step(ref64, x, y), _step(fused, x, y)
    outs32 = [_step(m, x.contiguous(memory_format=torch.channels_last) if i == 1 else x, y)
              for i, m in enumerate(refs32)]

    def errors(f, ps, w):
        return _max_err(f, w), max(_max_err(p, w) for p in ps), w.abs().max().item()
    errs = {"logits": errors(got, outs32, want)}
    for (name, p64), pf, *p32 in zip(ref64.named_parameters(), fused.parameters(), *(m.parameters() for m in refs32)):
        errs[f"grad {name}"] = errors(pf.grad, [p.grad for p in p32], p64.grad)
    for (name, b64), bf, *b32 in zip(ref64.named_buffers(), fused.buffers(), *(m.buffers() for m in refs32)):
        if b64.is_floating_point():
            errs[name] = errors(bf, b32, b64)
    return errs


def assert_within_twice_pytorch(errs, ulps=4, eps=torch.finfo(torch.float32).eps, flipped=None):
    """Each of FusedResNet's errors <= 2x PyTorch fp32's + ``ulps`` fp32 roundings of the quantity's magnitude
    (PyTorch may get a value to within one rounding by luck).

    ``flipped``: a relative error of PyTorch's own above which a quantity counts as decided by a rounding (a ReLU
    input or a max-pool tie within rounding of its threshold: with ~1e6 such decisions per step in a deep network,
    some flip); those quantities need only stay within 10% of float64 (a wrong kernel is off by O(1)), or within
    twice PyTorch's error where even that is larger."""
    def ok(v):
        within = v[0] <= 2 * v[1] + ulps * eps * v[2]
        return within or (flipped is not None and v[1] > flipped * v[2] and v[0] <= 0.1 * v[2])
    bad = {k: v for k, v in errs.items() if not ok(v)}
    assert not bad, "FusedResNet's error above twice PyTorch fp32's (fused, pytorch): " + \
        ", ".join(f"{k}: {v[0]:.3g} vs {v[1]:.3g}" for k, v in bad.items())


def perturbed(ref, eps, seed):
    """A copy of ``ref`` with every parameter multiplied by (1 + eps * N(0, 1))."""
    m = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    return m


def losses(model, batches, lr=0.1):
    """The per-step training losses of ``model`` over ``batches`` (SGD, momentum 0.9, weight decay 5e-4)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    out = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def loss_band(ref, batches, runs=3, eps=1e-6):
    """Per step (lo, hi) of the reference's loss over ``runs`` runs from 1e-6-perturbed copies and itself."""
    curves = [losses(copy.deepcopy(ref), batches)]
    curves += [losses(perturbed(ref, eps, seed), batches) for seed in range(runs)]
    return [(min(c), max(c)) for c in zip(*curves)]


def assert_inside_band(curve, band, floor=1e-4):
    """Each loss inside its step's band widened by the band's width and ``floor`` relative."""
    for step, (loss, (lo, hi)) in enumerate(zip(curve, band)):
        margin = (hi - lo) + floor * abs(hi)
        assert lo - margin <= loss <= hi + margin, \
            f"step {step}: FusedResNet's loss {loss:.6f} outside the reference band [{lo:.6f}, {hi:.6f}]"
