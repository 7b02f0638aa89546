"""resnet_infer (the whole network's inference in one launch) against the reference ResNet and the per-layer path."""
from unittest import mock

import pytest
import torch

from resnet_fused import FusedResNet, ResNet

from test_fused_model import perturbed_reference

# (depth, shortcut, plain, widths, batch, (H, W)): option A / B / plain, widths not a multiple of 8 or 16 (padded
# tiles, the flat-K path for odd input channels), batch 1, 7x7 and odd sizes (stride 2 rounds up), and batches
# larger than the interpreter's 2 programs (the persistent loop over images).
CASES = [
    (8, "A", False, [16, 32, 64], 3, (9, 11)),
    (8, "B", False, [16, 32, 64], 1, (7, 7)),
    (14, "A", False, [12, 24, 40], 3, (7, 8)),
    (14, "B", False, [6, 20, 24], 2, (5, 5)),
    (14, "A", True, [16, 16, 32], 3, (7, 7)),
]


def _pair(depth, shortcut, plain, widths, dev, classes=10):
    ref = perturbed_reference(depth, shortcut, plain, dev, widths=widths)
    if classes != 10:
        ref.fc = torch.nn.Linear(ref.fc.in_features, classes).to(dev)
        ref.num_classes = classes
    ref.eval()
    fused = FusedResNet.from_reference(ref, backend="triton", cuda_graphs=False).eval()
    fused.whole_network_inference = True
    return ref, fused


class _Counted:
    """Stands in for the @triton.jit kernel: counts ``kernel[grid]`` launches and runs them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _calls(fn):
    """(result, how many resnet_infer launches fn made)."""
    from resnet_fused.ops import resnet_infer as ri
    counted = _Counted(ri.resnet_infer_kernel)
    with mock.patch.object(ri, "resnet_infer_kernel", counted):
        out = fn()
    return out, counted.launches


@pytest.mark.parametrize("depth,shortcut,plain,widths,batch,hw", CASES, ids=str)
def test_matches_reference_and_per_layer_path(dev, depth, shortcut, plain, widths, batch, hw):
    ref, fused = _pair(depth, shortcut, plain, widths, dev)
    x = torch.randn(batch, 1, *hw, device=dev)
    with torch.no_grad():
        out, launches = _calls(lambda: fused(x))
        want = ref(x)
        fused.whole_network_inference = False
        layers = fused(x)
    assert launches == 1
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, layers, rtol=1e-4, atol=1e-5)


def test_input_layouts_and_three_channels(dev):
    """NCHW, channels_last and a strided view give the same logits (the stem gathers through x's strides)."""
    torch.manual_seed(1)
    ref = ResNet(8, widths=[16, 16, 32], in_channels=3).to(dev).eval()
    fused = FusedResNet.from_reference(ref, backend="triton", cuda_graphs=False).eval()
    fused.whole_network_inference = True
    x = torch.randn(3, 3, 8, 16, device=dev)
    with torch.no_grad():
        want = ref(x[..., ::2])
        for v in (x[..., ::2].contiguous(), x[..., ::2].contiguous(memory_format=torch.channels_last), x[..., ::2]):
            torch.testing.assert_close(fused(v), want, rtol=1e-4, atol=1e-5)


def test_low_precision_within_twice_pytorch_error(dev):
    """Under autocast: error against the fp32 reference <= 2x PyTorch's own autocast error + atol (bf16 on a GPU;
    fp16 under the interpreter, which has no bf16 arithmetic)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    ref, fused = _pair(8, "A", False, [16, 32, 64], dev)
    x = torch.randn(4, 1, 9, 9, device=dev)
    with torch.no_grad():
        want = ref(x)
        with torch.autocast(dev.type, dtype=dtype):
            pt = ref(x)
            out = fused(x)
    assert out.dtype == dtype
    err, pt_err = (out.float() - want).abs().max().item(), (pt.float() - want).abs().max().item()
    assert err <= 2 * pt_err + 1e-2, (err, pt_err)


def test_nan_in_one_image_stays_in_that_image(dev):
    ref, fused = _pair(8, "B", False, [16, 32, 64], dev)
    x = torch.randn(3, 1, 7, 7, device=dev)
    x[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        out = fused(x)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], ref(x[[0, 2]]), rtol=1e-4, atol=1e-5)


def test_follows_weight_and_statistics_changes(dev):
    """The packed weights hang off the folded plan: an optimizer step or a running-statistics change refolds."""
    ref, fused = _pair(8, "A", False, [16, 32, 64], dev)
    x = torch.randn(2, 1, 7, 7, device=dev)
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):
            m.layer3[0].bn1.running_var.mul_(3)
            m.layer1[0].conv2.weight.add_(0.1)
            m.fc.bias.add_(1.0)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_networks_it_does_not_take_run_per_layer(dev):
    """More classes than the kernel's head takes: the per-layer path, no resnet_infer launch, same logits."""
    ref, fused = _pair(8, "A", False, [16, 32, 64], dev, classes=300)
    x = torch.randn(2, 1, 7, 7, device=dev)
    with torch.no_grad():
        out, launches = _calls(lambda: fused(x))
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    assert launches == 0


def test_off_by_default_training_untouched_and_switch_drops_graphs(dev, monkeypatch):
    monkeypatch.delenv("RESNET_FUSED_WHOLE_NETWORK", raising=False)
    fused = FusedResNet(8, widths=[16, 32, 64], backend="triton", cuda_graphs=False)
    assert not fused.whole_network_inference
    monkeypatch.setenv("RESNET_FUSED_WHOLE_NETWORK", "1")
    fused = FusedResNet(8, widths=[16, 32, 64], backend="triton", cuda_graphs=False)
    assert fused.whole_network_inference
    x = torch.randn(2, 1, 7, 7, device=dev)
    _, launches = _calls(lambda: fused(x))  # training mode: the training kernels
    assert launches == 0
    with mock.patch.object(fused.graphs, "clear") as clear:
        fused.whole_network_inference = False
    clear.assert_called_once()


def test_empty_batch_and_bad_operands(dev):
    from resnet_fused.ops import resnet_infer as ri
    ref, fused = _pair(8, "A", False, [16, 32, 64], dev)
    with torch.no_grad():
        assert fused(torch.randn(0, 1, 7, 7, device=dev)).shape == (0, 10)
    spec, (w, b, t) = ri.prepare(fused.folded(torch.float32), 1, torch.float32)
    x = torch.randn(2, 1, 7, 7, device=dev)
    with pytest.raises(ValueError, match="classifier weight must be"):
        ri.resnet_infer(x, w, b, t, torch.randn(10, 32, device=dev), None, spec, torch.float32)
    with pytest.raises(ValueError, match="spec must be"):
        ri.resnet_infer(x, w, b, t, fused.fc.weight, None, spec[:-1], torch.float32)
    with pytest.raises(ValueError, match="do not chain"):
        bad = list(spec)
        bad[3 + 6] = 24  # stage 2's input width
        ri.resnet_infer(x, w, b, t, fused.fc.weight, None, bad, torch.float32)


def test_opcheck_and_compile(dev):
    from resnet_fused.ops import resnet_infer as ri
    ref, fused = _pair(8, "B", False, [16, 32, 64], dev)
    spec, (w, b, t) = ri.prepare(fused.folded(torch.float32), 1, torch.float32)
    x = torch.randn(2, 1, 7, 7, device=dev)
    torch.library.opcheck(torch.ops.resnet_fused.resnet_infer.default,
                          (x, w, b, t, fused.fc.weight, fused.fc.bias, spec, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager" if dev.type == "cpu" else "inductor")
    with torch.no_grad():
        out, launches = _calls(lambda: compiled(x))
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    assert launches == 1


def test_blocks_per_sm_follow_registers_shared_memory_and_threads():
    """The CUDA occupancy rules on sm_90 (65,536 registers, 228 KB of shared memory, 2,048 threads per SM): 154
    registers x 128 threads leave room for 3 blocks, not the 4 a fixed grid assumed."""
    from resnet_fused.ops.resnet_infer import ctas_per_sm
    assert ctas_per_sm(154, 0, 4) == 3   # 20 x 256 registers per warp: 20,480 per block
    assert ctas_per_sm(97, 0, 4) == 4    # 97 x 32 rounds up to 13 x 256 per warp (not 5 blocks of 12,416)
    assert ctas_per_sm(32, 77_000, 4) == 2  # 1 KB reserved per block: 3 x 78,024 bytes do not fit
    assert ctas_per_sm(128, 0, 4) == 4
    assert ctas_per_sm(32, 0, 4) == 16   # the threads' limit: 2,048 / 128
    assert ctas_per_sm(32, 100_000, 4) == 2  # shared memory's
    assert ctas_per_sm(255, 0, 8) == 1
    assert ctas_per_sm(16, 0, 1) == 32   # the blocks' limit


def test_the_persistent_grid_is_the_blocks_the_gpu_holds_at_once(monkeypatch):
    from types import SimpleNamespace

    from resnet_fused.ops import launch
    from resnet_fused.ops.resnet_infer import programs
    monkeypatch.setattr(launch, "COMPILE_FOR_GPU_SMS", 132)
    cpu = torch.device("cpu")
    kernel = SimpleNamespace(n_regs=154, metadata=SimpleNamespace(shared=0, num_warps=4))
    assert programs(10_000, cpu, kernel) == 3 * 132
    assert programs(100, cpu, kernel) == 100
    assert programs(10_000, cpu) == 4 * 132  # no register count (a compile-only run): the old default
    monkeypatch.setattr(launch, "COMPILE_FOR_GPU_SMS", None)
    assert programs(10_000, cpu, kernel) == 2  # the interpreter
