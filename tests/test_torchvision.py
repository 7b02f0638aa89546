"""torchvision's ResNets as a drop-in (resnet_fused.torchvision_resnet): against torchvision's own modules with
random weights and statistics (no download), one training step (logits, every gradient, the running statistics:
FusedResNet's error against float64 at most twice PyTorch fp32's) and inference; the state_dict both ways; the
refusals."""
import copy

import pytest
import torch

from resnet_fused import FusedResNet, ext, load_weights
from resnet_fused.checkpoint import UserError

from parity import assert_within_twice_pytorch, one_step_errors
from tv_models import randomize_bn, narrow_tv

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(not ext.available(), reason="the C++ extension is not built")


def tv(name, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(getattr(torchvision.models, name)(weights=None, **kw), seed)


def cifar_variant(name, in_channels=1, num_classes=10):
    """What CIFAR/MNIST users do with a torchvision ResNet: a 3x3 stride-1 stem, no max-pool."""
    m = tv(name, num_classes=num_classes)
    m.conv1 = torch.nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    return m


# PyTorch's own relative error above which a gradient counts as decided by a rounding (see
# parity.assert_within_twice_pytorch): 1e-4 is ~1,000 fp32 roundings. Where it applies, measured: ResNet-152 at
# 64x64, layer3.12-13's bn3 (PyTorch 1.2e-3-2.5e-3, FusedResNet 3e-2-6e-2); the 1-channel ResNet-50 variant's
# layer2.1.bn3.bias (PyTorch 6.7e-3, FusedResNet 2.2e-2).
FLIPPED = 1e-4


def _step_errors(ref, x, classes=10, conditioning=0):
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    return one_step_errors(ref.train(), x, y, "cpu", convert=FusedResNet.from_torchvision, both_layouts=True,
                           conditioning=conditioning)


@pytest.mark.parametrize("name,size,batch", [("resnet18", 224, 2), ("resnet18", 96, 1), ("resnet50", 64, 2),
                                             ("resnet50", 96, 1), ("resnet34", 64, 2), ("wide_resnet50_2", 64, 2),
                                             ("resnet101", 64, 2), ("resnet152", 64, 2)])
def test_one_training_step_matches_torchvision(name, size, batch):
    """Logits, every parameter's gradient and every running statistic after one step: FusedResNet's error
    against float64 at most twice torchvision's fp32 (plus 4 roundings). The last stage's BatchNorm sees at least
    8 values per channel (batch 2 at 64x64, batch 1 at 96x96): with 1 or 2 (32x32 inputs) a rounding decides its
    normalised outputs' signs and fp32 promises nothing (PyTorch's own layouts then differ by 1e4x); with 4 a
    gradient can still move by more than 10% (ResNet-152, batch 1 at 64x64: measured). With 36 (ResNet-50's
    layer4.0.bn1 at 96x96, batch 1) one pre-ReLU value sits 3e-7 of its scale from 0: 6 float64 steps from
    1e-6-perturbed weights say how far rounding moves what depends on it (parity.one_step_errors; one of the 6
    puts that value where FusedResNet's fp32 step did on the Zen 5 machine and moves layer4.0.conv1's weight
    gradient by the same 1.34e-3, to three digits)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    cond = 6 if batch == 1 else 0
    assert_within_twice_pytorch(flipped=FLIPPED, errs=_step_errors(tv(name, num_classes=10), x, conditioning=cond))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_and_a_cifar_stem_train_like_torchvision(name):
    ref = tv(name, num_classes=10, zero_init_residual=True)
    with torch.no_grad():  # zero_init_residual's zeros, then the statistics randomised: the last BN weights stay 0
        for m in ref.modules():
            last = getattr(m, "bn3", None) if hasattr(m, "bn3") else getattr(m, "bn2", None)
            if last is not None and isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                   torchvision.models.resnet.Bottleneck)):
                assert torch.count_nonzero(last.weight) > 0  # randomised by tv(): zero it again
                last.weight.zero_()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert_within_twice_pytorch(flipped=FLIPPED, errs=_step_errors(ref, x))
    x1 = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    assert_within_twice_pytorch(flipped=FLIPPED, errs=_step_errors(cifar_variant(name), x1))


@pytest.mark.parametrize("name,size,batch", [("resnet18", 224, 1), ("resnet18", 64, 3), ("resnet50", 64, 1),
                                             ("resnet50", 32, 5), ("wide_resnet50_2", 32, 1), ("resnet34", 33, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_matches_torchvision(name, size, batch, channels_last):
    """Eval mode: BatchNorm folded, Winograd / oneDNN with post-ops; the logits within fp32 rounding of
    torchvision's (relative 1e-4 of the logits' scale), in either memory format of the input."""
    ref = tv(name, num_classes=10).eval()
    fused = FusedResNet.from_torchvision(ref).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert fused.resolve_backend(x) == "cpu"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_inference_propagates_nan_and_matches_after_an_optimizer_step():
    ref = tv("resnet18", num_classes=10).eval()
    fused = FusedResNet.from_torchvision(ref).eval()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        out = fused(x)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    with torch.no_grad():  # a changed weight is seen (the folded cache follows the parameters' versions)
        for m in (ref, fused):
            m.layer2[0].conv1.weight.mul_(1.5)
        torch.testing.assert_close(fused(x[:1]), ref(x[:1]), rtol=0, atol=1e-4 * ref(x[:1]).abs().max().item())


def test_state_dict_is_torchvisions_both_ways_and_load_weights_reads_it():
    ref = tv("resnet50", num_classes=7)
    fused = FusedResNet.from_torchvision(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    other = tv("resnet50", seed=1, num_classes=7)
    fused.load_state_dict(other.state_dict(), strict=True)
    back = torchvision.models.resnet50(weights=None, num_classes=7)
    back.load_state_dict(fused.state_dict(), strict=True)
    for (k, a), b in zip(other.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    from resnet_fused.torchvision_resnet import torchvision_model
    built = load_weights(torchvision_model("resnet50", num_classes=7), other.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built.eval()(x), other.eval()(x), rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="layer"):
        load_weights(torchvision_model("resnet18", num_classes=7), other.state_dict())
    assert ref.training and fused.training and next(ref.parameters()) is not next(fused.parameters())


def test_eval_mode_gradients_and_backend_choice():
    ref = tv("resnet18", num_classes=10).eval()
    fused = FusedResNet.from_torchvision(ref).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x).sum().backward()
    fused(x2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    assert FusedResNet.from_torchvision(ref).resolve_backend(torch.randn(1, 3, 8, 8)) == "cpu"
    with pytest.raises(ValueError, match="expects an \\(N, 3, H, W\\)"):
        fused(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("build,match", [
    (lambda: torchvision.models.resnext50_32x4d(weights=None), "groups=32: ResNeXt"),
    (lambda: torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]), "dilat"),
])
def test_what_the_fused_backends_do_not_take_is_refused_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        FusedResNet.from_torchvision(build())


def test_the_conversion_copies_and_keeps_mode_device_dtype():
    ref = tv("resnet18", num_classes=10).eval().double()
    fused = FusedResNet.from_torchvision(ref)
    assert not fused.training and next(fused.parameters()).dtype == torch.float64
    with torch.no_grad():
        fused.fc.weight.zero_()
    assert torch.count_nonzero(ref.fc.weight) > 0
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        copy.deepcopy(fused)(x)


def test_torch_compile_fullgraph_matches_torchvision_in_eval_and_training():
    """torch.compile(fullgraph=True) of the converted model: no graph break (the fused operators are custom ops
    with fakes), the logits and (training) every gradient as torchvision's."""
    ref = tv("resnet18", num_classes=10)
    fused = FusedResNet.from_torchvision(ref)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    ref.eval(), fused.eval()
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=1e-4 * want.abs().max().item())
    ref.train(), fused.train()
    want, got = ref(x), compiled(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3 * p.grad.abs().max().item(), msg=name)


# ---- the Triton backend (under the interpreter on a CPU; on CUDA tensors where there is a GPU) ---------------------
# torchvision's own BasicBlock / Bottleneck classes and forward, with narrow stages (torchvision fixes them at
# 64-512 channels, hours under the interpreter): channel counts that are not multiples of 8, every shortcut kind.

def _blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {"basic": BasicBlock, "bottleneck": Bottleneck}


def _triton_step_errors(ref, x, dev):
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1)).to(dev)
    return one_step_errors(ref.to(dev).train(), x.to(dev), y, "triton", both_layouts=True,
                           convert=lambda r, b: FusedResNet.from_torchvision(r, backend=b))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_triton_training_step_matches_torchvision(block, dev):
    """conv_bn_train chains (the previous BN + ReLU applied on load), the projection normalised in bn_add_relu,
    the stem's max-pool: logits, every gradient, every running statistic within twice torchvision's fp32 error
    against float64. 64x64 batch 2: the last stage's BatchNorm sees 8 values per channel."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_within_twice_pytorch(flipped=FLIPPED, errs=_triton_step_errors(narrow_tv(_blocks()[block]), x, dev))


def test_triton_training_step_of_a_cifar_variant(dev):
    """A 3x3 stride-1 stem, no max-pool, one input channel, batch 3 of 13x13 (odd sizes)."""
    ref = narrow_tv(_blocks()["basic"], widths=(8, 16, 12, 24), layers=(2, 1, 1, 1), in_channels=1, stem=(3, 1, 1),
                    maxpool=False)
    x = torch.randn(3, 1, 13, 13, generator=torch.Generator().manual_seed(3))
    assert_within_twice_pytorch(flipped=FLIPPED, errs=_triton_step_errors(ref, x, dev))


@pytest.mark.parametrize("block,size,batch", [("basic", 32, 1), ("bottleneck", 33, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_inference_matches_torchvision(block, size, batch, channels_last, dev):
    """Eval mode: conv_bn_act per folded convolution, the block's last with the identity or the projection's
    second GEMM in its epilogue: the logits within 1e-4 of their scale of torchvision's."""
    ref = narrow_tv(_blocks()[block]).to(dev).eval()
    fused = FusedResNet.from_torchvision(ref, backend="triton").eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5)).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert fused.resolve_backend(x) == "triton"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    x[0, 1, 2, 2] = float("nan")
    with torch.no_grad():
        out = fused(x)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()
