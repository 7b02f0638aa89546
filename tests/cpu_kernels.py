"""Helpers of the CPU inference kernels' tests (test_winograd.py, test_direct_conv.py)."""
import pytest
import torch

from resnet_fused import ResNet, ext


def require_cpu_kernels():
    """Skip the calling test module unless this build and CPU run the AVX2 inference kernels."""
    if not ext.available():
        pytest.skip(f"resnet_fused._C is not built: {ext.EXT_IMPORT_ERROR}", allow_module_level=True)
    if not ext.winograd_supported():
        pytest.skip("the CPU inference kernels need an x86-64 CPU with AVX2 and FMA", allow_module_level=True)


ISA_ORDER = ["none", "avx2", "avx512", "avx512_bf16"]  # cpu_isa()'s answers, each path a superset of the last


def force_isa(monkeypatch, isa):
    """Run the CPU operators' ``isa`` path (RESNET_FUSED_CPU_ISA); skip where this CPU lacks it."""
    native = torch.ops.resnet_fused.cpu_isa()
    if ISA_ORDER.index(native) < ISA_ORDER.index(isa):
        pytest.skip(f"this CPU has no {isa} (it has {native}); the other paths run")
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", isa)
    assert torch.ops.resnet_fused.cpu_isa() == isa


def make(shape, layout="cl", seed=0, scale=1.0):
    """A seeded fp32 tensor (drawn in fp64), channels_last ("cl") or as drawn ("nchw")."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return t.float().contiguous(memory_format=torch.channels_last) if layout == "cl" else t.float()


def reference_net(widths=(16, 32, 64), shortcut="A", plain=False, depth=14, in_channels=1):
    """An eval-mode reference ResNet with non-trivial BatchNorm parameters and running statistics."""
    torch.manual_seed(0)
    ref = ResNet(depth, shortcut=shortcut, widths=list(widths), plain=plain, in_channels=in_channels)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return ref.eval()
