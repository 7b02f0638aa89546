"""FusedResNet's self-captured CUDA graphs (resnet_fused.graphs), on CPU with EmulatedCapture standing in for the
capture: keying, warm-up, one running-statistics update per call, outputs and gradients that later replays do not
overwrite, invalidation, bounds, fallbacks. Every check compares with the same model run without graphs. The real
capture is tested on a GPU in test_gpu.py."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import ext
from resnet_fused.graphs import ENV_VAR, EmulatedCapture, GraphRunner
from resnet_fused.model import FusedResNet
from resnet_fused.reference import ResNet

pytestmark = pytest.mark.skipif(not ext.available(), reason="needs the C++ extension (backend 'cpu')")


def pair(shortcut="A", backend="cpu", depth=8, max_graphs=4, cl=False, device="cpu"):
    """(model with emulated graphs, the same model without graphs), equal weights and buffers."""
    torch.manual_seed(0)
    ref = ResNet(depth=depth, shortcut=shortcut, widths=(4, 8, 12) if shortcut == "B" else None)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    g = FusedResNet.from_reference(ref, backend=backend).to(device)
    g.graphs = GraphRunner(True, max_graphs, EmulatedCapture())
    e = FusedResNet.from_reference(ref, backend=backend, cuda_graphs=False).to(device)
    if cl:
        g, e = g.to(memory_format=torch.channels_last), e.to(memory_format=torch.channels_last)
    return g, e


def batch(n, hw=10, seed=0, cl=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, hw, hw, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x.to(device), y.to(device)


def assert_same_state(g, e, grads=True, tol=dict(rtol=1e-5, atol=1e-6)):
    for (n, a), b in zip(g.named_parameters(), e.parameters()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"parameter {n}: {m}")
        if grads:
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"grad of {n}: {m}")
    for (n, a), b in zip(g.named_buffers(), e.buffers()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"buffer {n}: {m}")


def train_step(model, opt, x, y):
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return out.detach()


@pytest.mark.parametrize("shortcut,cl", [("A", False), ("B", False), ("A", True)])
def test_training_loop_matches_eager(shortcut, cl):
    g, e = pair(shortcut, cl=cl)
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in (g, e))
    sizes = [8, 8, 8, 8, 3, 3, 3, 8]  # an epoch's last smaller batch: warm-up, capture, replay; then back to 8
    for i, n in enumerate(sizes):
        x, y = batch(n, seed=i, cl=cl)
        torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y), rtol=1e-5, atol=1e-5)
        assert_same_state(g, e)
    assert g.graphs.stats["captures"] == 2 and g.graphs.stats["replays"] == 6, g.graphs.stats
    assert int(g.bn1.num_batches_tracked) == len(sizes)  # once per call: warm-up and capture included
    g.eval(), e.eval()  # inference after graph replays moved the running statistics: the fold must see them
    with torch.no_grad():
        for i in range(3):
            x, _ = batch(8, seed=100 + i, cl=cl)
            torch.testing.assert_close(g(x), e(x), rtol=1e-5, atol=1e-5)
    assert g.graphs.stats["captures"] == 3


def test_triton_backend_under_emulated_graphs(dev):
    """The Triton ops under the emulated capture: warm-up, capture (their effects undone) and replays of a training
    step give the numbers of the same model without graphs (small: every step is interpreted on CPU)."""
    g, e = pair("A", backend="triton", depth=8, device=dev)
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (g, e))
    for i in range(3):
        x, y = batch(2, hw=6, seed=i, device=dev)
        torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y), rtol=1e-4, atol=1e-5)
        assert_same_state(g, e, tol=dict(rtol=1e-4, atol=1e-5))
    assert g.graphs.stats["replays"] == 2


def test_outputs_are_not_overwritten_by_the_next_replay():
    g, e = pair()
    g.eval(), e.eval()
    xs = [batch(8, seed=i)[0] for i in range(4)]
    with torch.no_grad():
        outs = [g(x) for x in xs]  # eager, capture+replay, replay, replay
        for x, o in zip(xs, outs):
            torch.testing.assert_close(o, e(x))
    g.train(), e.train()
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (g, e))
    kept = []
    for i in range(4):
        x, y = batch(8, seed=10 + i)
        kept.append((train_step(g, og, x, y), train_step(e, oe, x, y)))
    for a, b in kept:
        torch.testing.assert_close(a, b)


def test_gradient_accumulation_across_replays():
    g, e = pair()
    for m in (g, e):  # warm-up and capture out of the way, without touching the gradients being compared
        with torch.no_grad():
            m.train()
        for i in range(2):
            x, y = batch(8, seed=i)
            F.cross_entropy(m(x), y).backward()
        m.zero_grad()
    for i in range(3):  # three micro-batches, one optimizer step's worth of gradients
        x, y = batch(8, seed=20 + i)
        for m in (g, e):
            F.cross_entropy(m(x), y).backward()
    assert g.graphs.stats["replays"] == 4
    assert_same_state(g, e)


def test_two_forwards_then_one_backward():
    g, e = pair()
    for m in (g, e):
        for i in range(2):
            x, y = batch(8, seed=i)
            F.cross_entropy(m(x), y).backward()
        m.zero_grad()
    (x1, y1), (x2, y2) = batch(8, seed=5), batch(8, seed=6)
    for m in (g, e):
        (F.cross_entropy(m(x1), y1) + F.cross_entropy(m(x2), y2)).backward()
    assert g.graphs.stats["replays"] == 2 and g.graphs.stats["eager"] == 2  # the second forward ran eagerly
    assert_same_state(g, e)


def test_a_discarded_forward_does_not_keep_graphs_off():
    g, _ = pair()
    for i in range(2):
        x, y = batch(8, seed=i)
        F.cross_entropy(g(x), y).backward()
    out = g(batch(8, seed=3)[0])  # forward with grad, never backward
    del out
    before = g.graphs.stats["replays"]
    F.cross_entropy(g(x), y).backward()
    assert g.graphs.stats["replays"] == before + 1


def test_second_backward_through_an_overwritten_replay_raises():
    g, _ = pair()
    for i in range(2):
        x, y = batch(8, seed=i)
        F.cross_entropy(g(x), y).backward()
    out = g(batch(8, seed=7)[0])
    out.sum().backward(retain_graph=True)
    g(batch(8, seed=8)[0]).sum().backward()  # another replay of the same graph
    with pytest.raises(RuntimeError, match="overwritten"):
        out.sum().backward()


def test_input_gradient_and_frozen_parameters():
    g, e = pair()
    for m in (g, e):
        m.conv1.weight.requires_grad_(False)
    for i in range(3):
        x, y = batch(8, seed=i)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        for m, xx in zip((g, e), xs):
            m.zero_grad()
            F.cross_entropy(m(xx), y).backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-7)
        assert_same_state(g, e)
        assert g.conv1.weight.grad is None
    assert g.graphs.stats["replays"] == 2


def _change(kind, m):
    if kind == "momentum":
        m.layer1[0].bn2.momentum = 0.5
    elif kind == "momentum_none":
        m.layer1[0].bn2.momentum = None
    elif kind == "eps":
        m.bn1.eps = 1e-2
    elif kind == "replace_parameter":
        m.fc.weight = torch.nn.Parameter(m.fc.weight.detach() * 0.5)
    elif kind == "replace_parameter_same_storage":  # a new Parameter object over the same memory: the graph's
        m.fc.weight = torch.nn.Parameter(m.fc.weight.detach())  # gradients must reach the new object
    elif kind == "replace_storage":  # the same Parameter object over new memory: the graph would read the old
        m.fc.weight.data = m.fc.weight.data * 0.5
    elif kind == "replace_buffer":
        m.bn1.running_var = m.bn1.running_var * 2
    elif kind == "load_state_dict":
        sd = {k: v * 0.9 if v.is_floating_point() else v for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
    elif kind == "to":
        m.float()
    elif kind == "requires_grad":
        m.fc.bias.requires_grad_(False)
    elif kind == "invalidate_caches":
        m.invalidate_caches()


@pytest.mark.parametrize("kind", ["momentum", "momentum_none", "eps", "replace_parameter",
                                  "replace_parameter_same_storage", "replace_storage", "replace_buffer",
                                  "load_state_dict", "to", "requires_grad", "invalidate_caches"])
def test_changes_drop_stale_graphs(kind):
    g, e = pair()
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (g, e))
    for i in range(3):
        x, y = batch(8, seed=i)
        train_step(g, og, x, y), train_step(e, oe, x, y)
    assert len(g.graphs) == 1
    for m in (g, e):
        _change(kind, m)
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (g, e))
    x, y = batch(8, seed=10)
    torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y))
    assert len(g.graphs) == 0, f"{kind}: stale graph kept"
    for i in range(3):  # recaptured with the new setting: still the numbers of the model without graphs
        x, y = batch(8, seed=11 + i)
        torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y), rtol=1e-5, atol=1e-5)
        assert_same_state(g, e)
    assert len(g.graphs) == 1


def test_number_of_graphs_is_bounded():
    g, e = pair(max_graphs=2)
    g.eval(), e.eval()
    with torch.no_grad():
        for n in (1, 2, 3, 4, 5, 2, 1):
            for _ in range(2):
                x, _ = batch(n, seed=n)
                torch.testing.assert_close(g(x), e(x))
            assert len(g.graphs) <= 2
    assert g.graphs.stats["captures"] == 7


def test_autocast_and_grad_mode_are_part_of_the_key():
    g, e = pair()
    g.eval(), e.eval()
    x, _ = batch(8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(g(x), e(x))
            full = e(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a, b = g(x), e(x)
            assert a.dtype == b.dtype == torch.bfloat16
            # the capture runs ATen's bf16 convolutions, eager (on AVX512_BF16 CPUs) the bf16 Winograd ones: the
            # same numbers up to bf16 rounding, a few of its 2^-8 steps after 8 layers
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=3e-2 * full.abs().max().item())
    assert g.graphs.stats["captures"] == 2 and g.graphs.stats["replays"] == 2
    g.train(), e.train()
    with torch.no_grad():  # training-mode forward without gradients (BatchNorm recalibration): its own graph
        for i in range(3):
            torch.testing.assert_close(g(batch(8, seed=i)[0]), e(batch(8, seed=i)[0]))
            assert_same_state(g, e, grads=False)
    assert g.graphs.stats["captures"] == 3


def test_off_switches(monkeypatch):
    assert not FusedResNet(depth=8, cuda_graphs=False).graphs.enabled
    monkeypatch.setenv(ENV_VAR, "0")
    assert not FusedResNet(depth=8).graphs.enabled
    assert FusedResNet(depth=8, cuda_graphs=True).graphs.enabled
    monkeypatch.delenv(ENV_VAR)
    assert FusedResNet(depth=8).graphs.enabled
    g, _ = pair()
    g.graphs.enabled = False
    for i in range(3):
        F.cross_entropy(g(batch(8, seed=i)[0]), batch(8, seed=i)[1]).backward()
    assert g.graphs.stats["captures"] == 0 and g.graphs.stats["eager"] == 0


def test_not_under_compile_tracing(monkeypatch):
    g, e = pair()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not g.graphs.applies(batch(8)[0])
    monkeypatch.undo()
    assert g.graphs.applies(batch(8)[0])
    assert not g.graphs.applies(batch(8)[0][:, :, ::2])  # a strided view: runs as without graphs


def test_a_failed_capture_falls_back_to_eager():
    g, e = pair()
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (g, e))
    g.graphs.capturer.fail = RuntimeError("operation not permitted when stream is capturing")
    for i in range(4):
        x, y = batch(8, seed=i)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y))
        if i == 1:
            assert any("capture failed" in str(m.message) for m in w)
        assert_same_state(g, e)
    assert g.graphs.stats["failures"] == 1 and g.graphs.stats["captures"] == 0 and len(g.graphs) == 0


def test_copy_pickle_and_repr():
    g, _ = pair()
    for i in range(2):
        F.cross_entropy(g(batch(8, seed=i)[0]), batch(8, seed=i)[1]).backward()
    assert len(g.graphs) == 1
    c = copy.deepcopy(g)
    assert len(c.graphs) == 0 and c.graphs.enabled
    buf = io.BytesIO()
    torch.save(g, buf)
    buf.seek(0)
    h = torch.load(buf, weights_only=False)
    assert len(h.graphs) == 0 and isinstance(pickle.loads(pickle.dumps(g.graphs)), GraphRunner)
    assert "cuda_graphs=True" in repr(g)


def test_eval_sees_running_statistics_moved_by_replays():
    """BatchNorm recalibration (train-mode forwards without gradients, no optimizer step): replays move the
    running statistics without moving their version counters, and the next eval must fold the new ones."""
    g, e = pair()
    x, _ = batch(8, seed=1)
    for phase in range(3):
        for m in (g, e):
            m.eval()
        with torch.no_grad():
            # the graphed eval runs ATen's convolutions (a capture cannot read the input's finiteness on the host),
            # the eager one Winograd F(4x4, 3x3): ~1e-5 apart; stale statistics would be ~1e-2 off
            torch.testing.assert_close(g(x), e(x), rtol=1e-4, atol=1e-5, msg=lambda m: f"phase {phase}: {m}")
            for m in (g, e):
                m.train()
            for i in range(2):
                xb = batch(8, seed=10 * phase + i)[0]
                g(xb), e(xb)
        assert_same_state(g, e, grads=False)
    assert g.graphs.stats["replays"] >= 4


def test_whole_network_inference_under_emulated_graphs(dev):
    """The one-launch inference (resnet_infer) captured and replayed: the logits of the model without graphs,
    each call's its own; switching the path drops the captured graphs."""
    g, e = pair("A", backend="triton", depth=8, device=dev)
    for m in (g, e):
        m.eval()
        m.whole_network_inference = True
    with torch.no_grad():
        outs = [(g(x), e(x)) for x in (batch(3, hw=6, seed=i, device=dev)[0] for i in range(3))]
        for og, oe in outs:
            torch.testing.assert_close(og, oe, rtol=1e-5, atol=1e-6)
        assert g.graphs.stats["replays"] == 2 and len(g.graphs) == 1  # call 1 eager, 2 captures + replays
        g.whole_network_inference = False
        assert len(g.graphs) == 0


def test_inference_mode_and_no_grad_graphs_do_not_mix():
    """A graph captured under torch.inference_mode holds inference tensors: a no_grad call must not replay it
    (its static input copy would be an in-place update of an inference tensor outside inference mode)."""
    g, e = pair()
    g.eval(), e.eval()
    x, _ = batch(8, seed=3)
    for _ in range(3):
        with torch.inference_mode():
            torch.testing.assert_close(g(x), e(x))
        with torch.no_grad():
            torch.testing.assert_close(g(x), e(x))
    assert g.graphs.stats["captures"] == 2 and g.graphs.stats["failures"] == 0, g.graphs.stats


def test_tf32_is_part_of_the_key():
    """fp32 kernels read TF32 at launch and a graph bakes the choice in: flipping it recaptures."""
    g, e = pair()
    g.eval(), e.eval()
    x, _ = batch(8, seed=4)
    old = torch.backends.cudnn.allow_tf32
    try:
        with torch.no_grad():
            for flag in (False, False, True, True, True, False):
                torch.backends.cudnn.allow_tf32 = flag
                torch.testing.assert_close(g(x), e(x))
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert g.graphs.stats["captures"] == 2 and g.graphs.stats["replays"] == 4, g.graphs.stats


def test_a_host_read_inside_the_forward_is_caught_by_the_capture():
    """A planted fault (an .item() in a forward hook): the strict stand-in refuses it as a real capture would,
    and the model falls back to running without graphs, with the same numbers."""
    g, e = pair()

    def hook(mod, inp, out):
        out.abs().max().item()  # e.g. logging the largest logit
    g.fc.register_forward_hook(hook)
    og, oe = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (g, e))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(3):
            x, y = batch(8, seed=i)
            torch.testing.assert_close(train_step(g, og, x, y), train_step(e, oe, x, y))
    assert g.graphs.stats["failures"] == 1 and g.graphs.stats["captures"] == 0
    assert any("on the host" in str(m.message) for m in w)
    assert_same_state(g, e)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_whole_network_weights_are_packed_before_the_capture(dev, amp):
    """After the weights change, the eval key is already warm: the next call captures at once, and the packed
    weights of the new fold (in autocast's dtype) must be made before the capture, not inside it (torch.tensor
    there is a pageable host-to-device copy a real capture refuses)."""
    g, e = pair("A", backend="triton", depth=8, device=dev)
    for m in (g, e):
        m.eval()
        m.whole_network_inference = True
    x = batch(2, hw=6, seed=1, device=dev)[0]
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        torch.testing.assert_close(g(x), e(x), rtol=1e-5, atol=1e-6)  # warm-up
        for m in (g, e):
            m.fc.weight.mul_(0.5)  # a new fold
        for _ in range(2):
            torch.testing.assert_close(g(x), e(x), rtol=1e-5, atol=1e-6)
    assert g.graphs.stats["failures"] == 0 and g.graphs.stats["captures"] == 1, g.graphs.stats


def test_memory_format_is_part_of_the_key():
    """NCHW and channels_last inputs of 3 channels have different strides (with 1 channel they coincide): each
    gets its own graph, and the input gradient comes back in the input's own layout, as without graphs."""
    torch.manual_seed(0)
    ref = ResNet(depth=8, in_channels=3)
    g = FusedResNet.from_reference(ref, backend="cpu")
    g.graphs = GraphRunner(True, 4, EmulatedCapture())
    e = FusedResNet.from_reference(ref, backend="cpu", cuda_graphs=False)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        if i % 2:
            x = x.to(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        for m, xx in zip((g, e), xs):
            m.zero_grad()
            m(xx).square().sum().backward()
        assert xs[0].grad.stride() == xs[1].grad.stride() == x.stride(), i
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
        assert_same_state(g, e)
    assert g.graphs.stats["captures"] == 2 and g.graphs.stats["replays"] == 4, g.graphs.stats
