"""resnet_fused.ops.eager: the custom ops called without the dispatcher in plain eager mode, through it whenever
anything may trace or intercept; both ways give bitwise the same training step."""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fused.backends.triton  # noqa: F401  (registers the ops)
from resnet_fused import FusedResNet
from resnet_fused.ops import eager

from test_fused_model import perturbed_reference


def test_direct_only_in_plain_eager(monkeypatch):
    assert eager.direct_ok()
    with FakeTensorMode():
        assert not eager.direct_ok()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not eager.direct_ok()
    monkeypatch.undo()
    monkeypatch.setenv("RESNET_FUSED_EAGER_OPS", "0")
    assert not eager.direct_ok()


def _step(fused, x, g):
    out = fused(x)
    out.backward(g)
    return out.detach(), [p.grad.clone() for p in fused.parameters()], [b.clone() for b in fused.buffers()]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_direct_path_equals_the_dispatcher_path(dev, shortcut, monkeypatch):
    """A training step (and an eval forward) with the direct calls and with RESNET_FUSED_EAGER_OPS=0: the same
    outputs, gradients and running statistics, bit for bit; and the direct path really skips the dispatcher."""
    ref = perturbed_reference(8, shortcut, False, dev)
    fused = FusedResNet.from_reference(ref, backend="triton", cuda_graphs=False)
    twin = copy.deepcopy(fused)
    torch.manual_seed(1)
    x = torch.randn(3, 1, 11, 11, device=dev)
    g = torch.randn(3, 10, device=dev)
    calls = []
    real = eager.EagerOp.__call__

    def spy(self, *args, **kwargs):
        calls.append(eager.direct_ok())
        return real(self, *args, **kwargs)
    monkeypatch.setattr(eager.EagerOp, "__call__", spy)
    direct = _step(fused, x, g)
    assert calls and all(calls)
    monkeypatch.setenv("RESNET_FUSED_EAGER_OPS", "0")
    calls.clear()
    dispatched = _step(twin, x, g)
    assert calls and not any(calls)
    for a, b in zip(direct, dispatched):
        for u, v in zip(*(a, b) if isinstance(a, list) else ([a], [b])):
            assert torch.equal(u, v)
    monkeypatch.delenv("RESNET_FUSED_EAGER_OPS")
    fused.eval(), twin.eval()
    with torch.no_grad():
        out = fused(x)
        monkeypatch.setenv("RESNET_FUSED_EAGER_OPS", "0")
        assert torch.equal(out, twin(x))


def test_gradient_of_an_op_without_a_formula_goes_to_the_dispatcher(dev):
    """A backward op called with inputs that need a gradient (double backward) is the custom op's business: it
    raises there instead of silently returning a result without a graph."""
    from resnet_fused.ops.eager import ops
    y = torch.randn(2, 8, 4, 4, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
    s = torch.rand(8, device=dev) + 0.5
    gy, *_ = ops.bn_add_relu_backward(torch.ones_like(y), y.detach(), y, s, None, None, mode=0, res_stride=1,
                                      pad_front=0, relu=False)
    with pytest.raises(RuntimeError):
        gy.sum().backward()


def test_profiler_traces_name_the_ops(dev):
    """Under the profiler the direct calls still show as resnet_fused::NAME (what host_profile.py reads)."""
    ref = perturbed_reference(8, "A", False, dev)
    fused = FusedResNet.from_reference(ref, backend="triton", cuda_graphs=False)
    x = torch.randn(2, 1, 8, 8, device=dev)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"resnet_fused::conv_bn_train", "resnet_fused::bn_add_relu", "resnet_fused::pool_linear"} <= names


def test_direct_mutation_bumps_versions(dev):
    """A mutating op called directly bumps its tensors' version counters as the dispatcher would (the inference
    cache is keyed on them)."""
    from resnet_fused.ops.eager import ops
    bn = torch.nn.BatchNorm2d(4).to(dev)
    before = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    ops.bn_running_update([bn.running_mean], [bn.running_var], [bn.num_batches_tracked],
                          [torch.zeros(4, device=dev)], [torch.ones(4, device=dev)], [8], [0.1], [False])
    after = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    assert all(a > b for a, b in zip(after, before))
