"""The strict CPU stand-in for a CUDA-graph capture (resnet_fused.graph_capture.EmulatedCapture): each rule a real
capture enforces, shown to bite on a planted fault; replays that run what was recorded (a stale graph shows in
the values); host choices compared between capture and replay; TF32 read through either PyTorch API."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from resnet_fused import capture_state
from resnet_fused.capture_state import CaptureError, conv_tf32, note_choice
from resnet_fused.graph_capture import EmulatedCapture, _Recorder
from resnet_fused.ops import semaphores as sem
from resnet_fused.ops.implicit_gemm import dot_precision


class Holder(torch.nn.Module):
    """A parameter and a buffer for the capture to read and write."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4.0))
        self.register_buffer("count", torch.zeros(4))


def capture(fn, module=None):
    return EmulatedCapture().capture(fn, module if module is not None else Holder())


@pytest.mark.parametrize("read", ["item", "bool", "tolist", "numpy", "print", "nonzero"])
def test_host_reads_inside_a_capture_are_refused(read):
    x = torch.randn(4)
    fns = dict(item=lambda: x.sum().item(), bool=lambda: bool(x.sum() > 0), tolist=lambda: x.tolist(),
               numpy=lambda: x.numpy(), print=lambda: str(x), nonzero=lambda: x.nonzero())
    with pytest.raises(CaptureError, match="host"):
        capture(lambda: (fns[read](), x * 2))


def test_a_tensor_made_from_host_data_inside_a_capture_is_refused():
    """The planted fault of the whole-network pack: torch.tensor(rows, device=...) inside the capture."""
    with pytest.raises(CaptureError, match="host data"):
        capture(lambda: (torch.tensor([1.0, 2.0]) * 2,))


def test_copies_between_the_host_and_a_cuda_capture_device_are_refused():
    aten = torch.ops.aten
    with FakeTensorMode(allow_non_fake_inputs=True):
        host, dev = torch.ones(3), torch.empty(3, device="cuda")
    rec = _Recorder("cuda")
    with pytest.raises(CaptureError, match="CPU tensor"):
        rec._refuse(aten.copy_.default, (dev, host), {})
    with pytest.raises(CaptureError, match="CPU tensor"):
        rec._refuse(aten._to_copy.default, (host,), dict(device=torch.device("cuda")))
    with pytest.raises(CaptureError, match="host"):  # .cpu() of a device tensor: a sync
        rec._refuse(aten._to_copy.default, (dev,), dict(device=torch.device("cpu")))
    with pytest.raises(CaptureError, match="host"):
        rec._refuse(aten.copy_.default, (host, dev), {})
    rec._refuse(aten.copy_.default, (dev, dev), {})  # device to device: fine
    _Recorder("cpu")._refuse(aten.copy_.default, (host, host), {})


def test_random_numbers_inside_a_capture_are_refused():
    with pytest.raises(CaptureError, match="random"):
        capture(lambda: (torch.randn(3),))


def test_persistent_state_made_inside_a_capture_is_refused(monkeypatch):
    """The planted fault of the semaphores: counters first allocated while capturing."""
    monkeypatch.setattr(sem, "_EAGER", {})
    with pytest.raises(CaptureError, match="semaphores"):
        capture(lambda: (sem.semaphores(torch.device("cpu"), 8) + 0,))
    pool = sem.SemaphorePool()
    with sem.use_pool(pool):
        sem.semaphores(torch.device("cpu"), 8)  # warm-up: allocated (and zeroed) eagerly
        cap = capture(lambda: (sem.semaphores(torch.device("cpu"), 8) + 0,))
        cap.replay()
    with pytest.raises(CaptureError, match="semaphores"):  # grown inside a capture: refused as well
        with sem.use_pool(pool):
            capture(lambda: (sem.semaphores(torch.device("cpu"), sem.POOL_COUNTERS + 1) + 0,))
    assert not capture_state.capturing()


def test_semaphore_pools_are_not_shared():
    a, b = sem.SemaphorePool(), sem.SemaphorePool()
    dev = torch.device("cpu")
    with sem.use_pool(a):
        ta = sem.semaphores(dev, 8)
        with sem.use_pool(b):
            tb = sem.semaphores(dev, 8)
        assert sem.semaphores(dev, 8) is ta
    assert ta.data_ptr() != tb.data_ptr() and not ta.any() and not tb.any()
    assert sem.semaphores(dev, 8).data_ptr() not in (ta.data_ptr(), tb.data_ptr())  # eager launches: their own
    assert ta.numel() == sem.POOL_COUNTERS  # room for the backward's launches, which the warm-up does not size
    with sem.use_pool(a):
        grown = sem.semaphores(dev, sem.POOL_COUNTERS + 1)
    assert grown.numel() > sem.POOL_COUNTERS and ta in a._kept  # a graph captured with the old buffer keeps it


def test_a_replay_under_another_semaphore_buffer_raises():
    pool = sem.SemaphorePool()

    @torch.library.custom_op("rf_capture_test::counted", mutates_args=())
    def counted(x: torch.Tensor) -> torch.Tensor:
        return x + sem.semaphores(x.device, 4)[:1].to(x.dtype)

    x = torch.ones(2)
    with sem.use_pool(pool):
        counted(x)
        cap = capture(lambda: (counted(x),))
        cap.replay()
    with pytest.raises(CaptureError, match="semaphores"):
        cap.replay()  # outside the pool: the launch would take the eager buffer, the graph has the pool's


def test_tf32_flipped_after_capture_is_caught():
    """The planted fault of the TF32 choice: read at every launch, baked into the graph, not in its key."""
    @torch.library.custom_op("rf_capture_test::tf32_scale", mutates_args=())
    def tf32_scale(x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if dot_precision(x.dtype, x.device) == "ieee" else 3.0)

    x = torch.ones(2)
    old = torch.backends.cudnn.allow_tf32
    try:
        cap = capture(lambda: (tf32_scale(x),))
        cap.replay()
        torch.backends.cudnn.allow_tf32 = not old
        with pytest.raises(CaptureError, match="tf32"):
            cap.replay()
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_host_choices_recorded_at_capture_must_match_at_replay():
    @torch.library.custom_op("rf_capture_test::choosy", mutates_args=())
    def choosy(x: torch.Tensor) -> torch.Tensor:
        note_choice("config", int(choosy.setting))
        return x * choosy.setting
    choosy.setting = 2

    x = torch.ones(2)
    cap = capture(lambda: (choosy(x),))
    cap.replay()
    torch.testing.assert_close(cap.outputs[0], x * 2)
    choosy.setting = 3
    with pytest.raises(CaptureError, match="config"):
        cap.replay()


def test_a_capture_runs_no_kernels_and_a_replay_runs_the_recorded_ones():
    m = Holder()
    x = torch.ones(4)

    def fn():
        m.count.add_(1)  # a buffer written in place (a running statistic)
        return (m.w * x + m.count,)
    cap = capture(fn, m)
    assert torch.equal(m.count, torch.zeros(4)) and torch.isnan(cap.outputs[0]).all()  # undone; undefined
    version = m.count._version
    cap.replay()
    torch.testing.assert_close(cap.outputs[0], torch.arange(4.0) + 1)
    assert torch.equal(m.count, torch.ones(4)) and m.count._version == version  # no version counter moves
    x.fill_(2)  # the recorded input's memory: read again
    cap.replay()
    torch.testing.assert_close(cap.outputs[0], 2 * torch.arange(4.0) + 2)


def test_a_replay_reads_the_tensors_it_recorded_not_the_modules_new_ones():
    """What makes a stale graph visible: after a parameter is replaced, the replay still reads the old one."""
    m = Holder()
    cap = capture(lambda: (m.w * 2,), m)
    cap.replay()
    torch.testing.assert_close(cap.outputs[0], torch.arange(4.0) * 2)
    m.w = torch.nn.Parameter(torch.full((4,), 10.0))
    cap.replay()
    torch.testing.assert_close(cap.outputs[0], torch.arange(4.0) * 2)


def test_an_inference_tensor_written_outside_inference_mode_fails_as_in_pytorch():
    m = Holder()
    with torch.inference_mode():
        static = torch.ones(4)
        cap = capture(lambda: (static * m.w,), m)
        cap.replay()
    with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference"):
        static.copy_(torch.zeros(4))


def test_capturing_is_reported_only_inside_a_capture():
    seen = []
    capture(lambda: (seen.append(capture_state.capturing()), torch.ones(1) * 2)[1:])
    assert seen == [True] and not capture_state.capturing()


@pytest.fixture
def restore_precision():
    getter, setter = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    pairs = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn")]
    old = [getter(*p) for p in pairs]
    yield
    for p, v in zip(pairs, old):
        setter(*p, v)


def test_conv_tf32_follows_the_legacy_flag_and_the_fp32_precision_api(restore_precision):
    torch.backends.cudnn.allow_tf32 = True
    assert conv_tf32()
    torch.backends.cudnn.allow_tf32 = False
    assert not conv_tf32()
    torch.backends.fp32_precision = "tf32"  # the new API on top of the legacy one: allow_tf32 now raises
    with pytest.raises(RuntimeError):
        torch.backends.cudnn.allow_tf32
    assert conv_tf32()  # conv "none" inherits the generic setting
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert not conv_tf32()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert conv_tf32()


def test_folding_or_deriving_weights_inside_a_capture_is_refused():
    """The model's caches are filled before a capture (GraphRunner refreshes the fold and calls Backend.prepare);
    the refusal is what catches a path that would fill one inside."""
    from resnet_fused import FusedResNet
    m = FusedResNet(depth=8, backend="cpu").eval()
    with pytest.raises(CaptureError, match="folding"):
        capture(lambda: (m.folded(torch.float32).stem.bias * 1,), m)
    m.folded(torch.float32)  # filled outside: a cache hit inside is fine
    capture(lambda: (m.folded(torch.float32).stem.bias * 1,), m).replay()
    with pytest.raises(CaptureError, match="'packed' weights"):
        capture(lambda: (m.fold_cache.derived("packed", lambda f: f.stem.bias * 2) * 1,), m)
