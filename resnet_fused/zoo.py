"""The model zoo: ResNets by name (reference or fused), and one loader for the checkpoints people already have.

``build_model("resnet20", impl="fused")``; ``resnet20()``, ``resnet56(impl="fused")``, ...; ``load_weights(model,
source)`` fills a ResNet or FusedResNet from
  * a run checkpoint of ``python -m resnet_fused.train`` (``{"model": ..., "config": ..., "checksum": ...}``, the
    checksum verified),
  * the most used CIFAR ResNets' checkpoints (akamaster/pytorch_resnet_cifar10 layout: ``{"state_dict": ...}``,
    a ``module.`` prefix from DataParallel, the head called ``linear``, no ``num_batches_tracked``),
  * or a plain state_dict (``module.`` / ``_orig_mod.`` prefixes stripped),
and says clearly which keys it does not know. Option A pads the new channels as that repository does (planes//4
on each side when the width doubles), so its weights give its outputs.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .reference import ResNet, resnet_layout

__all__ = ["MODEL_NAMES", "build_model", "parse_model_name", "load_weights", "resnet8", "resnet14", "resnet20",
           "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "plain20", "plain56"]

_NAMED = {
    "resnet8": dict(depth=8), "resnet14": dict(depth=14), "resnet20": dict(depth=20), "resnet32": dict(depth=32),
    "resnet44": dict(depth=44), "resnet56": dict(depth=56), "resnet110": dict(depth=110),
    "resnet18": dict(depth=18, shortcut="B"), "resnet34": dict(depth=34, shortcut="B"),
    "plain20": dict(depth=20, plain=True), "plain56": dict(depth=56, plain=True),
}
MODEL_NAMES = tuple(_NAMED)


def parse_model_name(name: str) -> dict:
    """Constructor arguments for a model name: the named ones, plus resnetN / plainN for any valid depth."""
    key = str(name).lower()
    if key in _NAMED:
        return dict(_NAMED[key])
    for prefix, plain in (("resnet", False), ("plain", True)):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            depth = int(key[len(prefix):])
            resnet_layout(depth)  # raises a clear ValueError on a bad depth
            return dict(depth=depth, plain=plain, shortcut="B" if depth in (18, 34) else "A")
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)} (or resnetN / plainN, N=6n+2)")


def build_model(name: str, impl: str = "reference", **kwargs) -> nn.Module:
    """A model by name; ``impl="fused"`` gives the FusedResNet with the same state_dict keys. ``tv-NAME``: the
    torchvision ResNet NAME (resnet18 ... wide_resnet101_2; torchvision's module with impl="reference", a
    FusedTorchvisionResNet with impl="fused"; ``cuda_graphs`` does not apply to them)."""
    if str(name).startswith("tv-"):
        from .torchvision_resnet import torchvision_model
        if impl not in ("reference", "fused"):
            raise ValueError(f"unknown impl {impl!r}; choose 'reference' or 'fused'")
        kwargs.pop("cuda_graphs", None)
        if impl == "reference":
            kwargs.pop("backend", None)
        return torchvision_model(name[3:], fused=impl == "fused", **kwargs)
    args = parse_model_name(name)
    args.update(kwargs)
    if impl == "reference":
        return ResNet(**args)
    if impl == "fused":
        from .model import FusedResNet  # imported when asked for: it loads the op registry (and Triton)
        return FusedResNet(**args)
    raise ValueError(f"unknown impl {impl!r}; choose 'reference' or 'fused'")


def _named(name):
    def ctor(impl: str = "reference", **kwargs):
        return build_model(name, impl=impl, **kwargs)
    ctor.__name__ = name
    ctor.__doc__ = f"{name}: ResNet({', '.join(f'{k}={v!r}' for k, v in _NAMED[name].items())}); impl='fused' too."
    return ctor


resnet8, resnet14, resnet20, resnet32 = (_named(n) for n in ("resnet8", "resnet14", "resnet20", "resnet32"))
resnet44, resnet56, resnet110 = (_named(n) for n in ("resnet44", "resnet56", "resnet110"))
resnet18, resnet34, plain20, plain56 = (_named(n) for n in ("resnet18", "resnet34", "plain20", "plain56"))


# ---- loading weights ---------------------------------------------------------------------------------------------

def _read(source):
    """(state_dict, where it came from) from a path or a dict in any of the layouts above."""
    from .checkpoint import UserError, clean_state_dict, load_checkpoint
    what = "state_dict"
    if isinstance(source, (str, os.PathLike)):
        what = f"checkpoint {os.fspath(source)!r}"
        if not os.path.isfile(source):
            raise UserError(f"{what} does not exist")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{what} cannot be read as a weights-only checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(obj, dict) and "model" in obj and "config" in obj:  # ours: verify its checksum
            obj = load_checkpoint(os.fspath(source))
    else:
        obj = source
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} is not a state_dict, a {{'state_dict': ...}} checkpoint or a resnet_fused run "
                        f"checkpoint")
    return clean_state_dict(obj), what


def load_weights(model: ResNet, source) -> ResNet:
    """Fill ``model`` (ResNet or FusedResNet) from ``source`` (a path or a dict; layouts in the module docstring):
    strict on every weight and statistic, UserError naming the first keys it cannot place."""
    from .checkpoint import UserError, load_model_state
    sd, what = _read(source)
    sd = {("fc." + k[len("linear."):] if k.startswith("linear.") else k): v for k, v in sd.items()}
    own = model.state_dict()
    if not any(k in own for k in sd):
        raise UserError(f"{what}: none of its {len(sd)} keys (e.g. {next(iter(sd), None)!r}) is one this "
                        f"{type(model).__name__} knows: not a layout load_weights reads (resnet_fused run "
                        f"checkpoints, akamaster CIFAR ResNets, plain state_dicts)")
    for k, v in own.items():  # checkpoints from before BatchNorm counted its batches
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    load_model_state(model, sd, what)  # strict: missing, unexpected and mis-shaped keys are named
    return model
