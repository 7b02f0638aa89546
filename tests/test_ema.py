"""The weight EMA of --ema: the average, its warm-up, BatchNorm statistics, and a FusedResNet evaluated with it."""
import pytest
import torch
import torch.nn.functional as F

from resnet_fused import FusedResNet
from resnet_fused.ema import WeightEMA
from resnet_fused import ResNet

WIDTHS = (4, 8, 12)


def _steps(model, n, seed=0):
    """n SGD steps on random batches; the model's state_dict after each (what the EMA must average)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    states = []
    for _ in range(n):
        x = torch.randn(6, 1, 9, 9, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        yield states[-1]


@pytest.mark.parametrize("decay", [0.5, 0.99])
def test_ema_is_the_warmed_up_average_of_weights_and_bn_statistics(decay):
    torch.manual_seed(0)
    model = ResNet(8, widths=WIDTHS)
    ema = WeightEMA(model, decay)
    expect = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n, state in enumerate(_steps(model, 4)):
        ema.update(model)
        d = min(decay, (1 + n) / (10 + n))
        for k, v in state.items():
            expect[k] = d * expect[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.model.state_dict()
    assert ema.updates == 4
    for k, v in expect.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert any(k.endswith("running_var") for k in expect)  # BatchNorm statistics are averaged too
    assert int(got[next(k for k in got if k.endswith("num_batches_tracked"))]) == 4
    # the copy is frozen and separate: the model's parameters are not the EMA's
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.model.parameters(), model.parameters()))


def test_ema_of_a_fused_model_evaluates_its_averaged_weights():
    """The EMA copy of a FusedResNet moves in place (no autograd): its eval forward (folded BN, cached per
    parameter version) must follow every update."""
    torch.manual_seed(1)
    model = FusedResNet(8, widths=WIDTHS, backend="cpu")
    ema = WeightEMA(model, 0.9)
    x = torch.randn(5, 1, 9, 9)
    for _ in _steps(model, 3):
        with torch.no_grad():
            before = ema.model(x)  # the fold is built from the current weights ...
        ema.update(model)
        check = ResNet(8, widths=WIDTHS).eval()
        check.load_state_dict(ema.model.state_dict())
        with torch.no_grad():
            after, want = ema.model(x), check(x)
        torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)  # ... and rebuilt after the update
        assert not torch.allclose(before, after)


def test_ema_state_round_trip_and_bad_decay():
    model = ResNet(8, widths=WIDTHS)
    ema = WeightEMA(model, 0.9)
    for _ in _steps(model, 2):
        ema.update(model)
    other = WeightEMA(ResNet(8, widths=WIDTHS), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2
    for k, v in ema.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[k], v), k
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            WeightEMA(model, bad)
