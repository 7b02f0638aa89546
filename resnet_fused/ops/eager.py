"""resnet_fused's custom ops, called the cheap way in eager mode.

Every fused op is a ``torch.library.custom_op`` (so that torch.compile, export and opcheck see one opaque op with a
fake and an autograd formula). Going through the dispatcher costs host time, though: on the development CPU a
custom op with autograd took ~210 us per call against ~30 us for its launcher alone, and a ResNet-20 training step
makes ~60 such calls. In plain eager mode nothing needs that machinery, so ``ops.NAME(...)`` here runs the op's own
Python function directly, under a ``torch.autograd.Function`` built from the op's registered ``setup_context`` and
``backward`` (the very functions the custom op uses) when a gradient is needed; the backward's own ops go the same
way. Whenever anything may be tracing or intercepting — torch.compile / export (``torch.compiler.is_compiling()``),
an active ``TorchDispatchMode`` or ``TorchFunctionMode`` (FakeTensor, functionalisation, make_fx, counting tools),
a gradient asked of an op without a formula — the call goes to ``torch.ops.resnet_fused.NAME`` as before. Under the
autograd profiler the direct call runs inside a ``record_function`` of the op's name, so traces still name it. ``RESNET_FUSED_EAGER_OPS=0`` turns the
direct path off.

Op modules register with ``custom_op`` / ``register_autograd`` below instead of torch.library's (same arguments).
"""
from __future__ import annotations

import inspect
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_IMPLS: dict = {}       # "resnet_fused::name" -> (the op's Python function, the names of the args it mutates)
_AUTOGRAD: dict = {}    # "resnet_fused::name" -> (setup_context, backward)


def custom_op(name, *, mutates_args):
    """torch.library.custom_op(name, mutates_args=...), remembering the Python function for the direct path."""
    def wrap(fn):
        _IMPLS[name] = (fn, tuple(mutates_args))
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
    return wrap


def register_autograd(op, backward, *, setup_context):
    """op.register_autograd(backward, setup_context=...), remembering both for the direct path."""
    op.register_autograd(backward, setup_context=setup_context)
    _AUTOGRAD[op._qualname] = (setup_context, backward)


def direct_ok() -> bool:
    """Whether a call may skip the dispatcher: nothing is tracing, faking or intercepting operators."""
    return (os.environ.get("RESNET_FUSED_EAGER_OPS", "1") != "0" and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled())


class EagerOp:
    """ops.NAME: the custom op, or its Python function (in an autograd.Function when a gradient is needed)."""

    def __init__(self, qualname):
        self.qualname = qualname
        self.op = getattr(torch.ops.resnet_fused, qualname.split("::")[1])
        self.impl, mutated = _IMPLS[qualname]
        sig = inspect.signature(self.impl)
        self.params = list(sig.parameters.values())
        self.mutated = [i for i, p in enumerate(self.params) if p.name in mutated]
        self.fn = None
        if qualname in _AUTOGRAD:
            setup_context, backward = _AUTOGRAD[qualname]
            impl = self.impl

            def forward(ctx, *args):  # ctx-style forward: apply() then binds no signature per call
                out = impl(*args)
                setup_context(ctx, args, out)
                return out
            self.fn = type(qualname.split("::")[1], (torch.autograd.Function,),
                           dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def positional(self, args, kwargs):
        if not kwargs:
            return args
        rest = self.params[len(args):]
        return args + tuple(kwargs[p.name] if p.name in kwargs else p.default for p in rest)

    def __call__(self, *args, **kwargs):
        if not direct_ok():
            return self.op(*args, **kwargs)
        if torch.autograd._profiler_enabled():  # traces name the op, as they would the custom op
            with torch.autograd.profiler.record_function(self.qualname):
                return self.direct(self.positional(args, kwargs))
        return self.direct(self.positional(args, kwargs))

    def direct(self, args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self.fn is None:  # no formula (a backward op under create_graph): the custom op says so
                return self.op(*args)
            return self.fn.apply(*args)
        out = self.impl(*args)
        for i in self.mutated:  # as the dispatcher does for a mutating custom op: caches keyed on versions see it
            for t in (args[i] if isinstance(args[i], (list, tuple)) else (args[i],)):
                if isinstance(t, torch.Tensor):
                    torch.autograd.graph.increment_version(t)
        return out


class _Ops:
    """``ops.conv_bn_train(...)`` etc.: the EagerOp of each registered op, made on first use."""

    def __getattr__(self, name):
        op = EagerOp(f"resnet_fused::{name}")
        setattr(self, name, op)
        return op


ops = _Ops()
