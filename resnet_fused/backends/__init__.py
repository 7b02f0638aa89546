"""FusedResNet's backends: one object per backend behind one small interface, and the one rule for "auto".

A backend turns an input into the last stage's feature map (FusedResNet pools and applies the head):
``check(x)`` raises if it cannot run on this input, ``features(model, x)`` walks ``model.plan`` once, in training
or inference form. ``resolve(name, x)`` picks the backend object for a name ("auto", "triton", "cuda", "cpu").
"""
from __future__ import annotations

import os

import torch

from .. import ext
from .base import REFERENCE, Backend

__all__ = ["BACKENDS", "Backend", "REFERENCE", "resolve", "validate_name", "triton_interpreting",
           "interpreter_problem"]

BACKENDS = ("auto", "triton", "cuda", "cpu")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(text: str) -> tuple:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run the kernels in this environment, or None. Triton < 3.7's interpreter
    turns a runtime scalar into a loop bound with ``int()`` of a 1-element array, which NumPy >= 2.4 refuses
    (every kernel with a runtime-length loop then fails with an opaque InterpreterError)."""
    import numpy
    try:
        import triton
    except ImportError:  # no Triton: nothing to interpret (backend 'triton' says so itself)
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton interpreter of Triton {triton.__version__} does not work with NumPy {numpy.__version__} "
                f"(it converts 1-element arrays with int(), an error since NumPy 2.4): pip install 'numpy<2.4', or "
                f"Triton >= 3.7")
    return None


def validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def _triton():
    from .triton import TRITON
    return TRITON


def _extension(device_type: str):
    from .extension import EXTENSION
    return EXTENSION[device_type]


def resolve(name: str, x: torch.Tensor, chain: bool = False) -> Backend:
    """The backend object that runs ``x`` for the backend name; "auto": Triton on CUDA tensors (the CUDA extension
    if Triton is missing, plain PyTorch if both are), the C++ CPU operators on CPU tensors (plain PyTorch without
    the extension). Raises, naming what is missing, when a named backend cannot run this input. ``chain``: the
    model is a torchvision ResNet (torchvision_resnet.ChainPlan): "auto" takes the CUDA extension (cuDNN) for it on
    CUDA tensors until a GPU has measured the Triton kernels on these networks."""
    if name == "auto":
        if x.device.type == "cuda":
            from .triton import TRITON_IMPORT_ERROR
            name = ("triton" if TRITON_IMPORT_ERROR is None and not chain else "cuda" if ext.has_cuda()
                    else None)
        else:
            name = "cpu" if ext.available() else None
        if name is None:
            return REFERENCE
    backend = _triton() if name == "triton" else _extension(name)
    backend.check(x)
    return backend
