import pytest
import torch

from resnet_fused import MODEL_NAMES, ResNet, build_model
from resnet_fused.reference import BasicBlock, PadShortcut, ProjectionShortcut


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# parameter counts of the paper's nets with 1 input channel and 10 classes (3 channels: resnet20 has 269,722)
EXPECTED = {"resnet8": 75002, "resnet14": 172218, "resnet20": 269434, "resnet32": 463866, "resnet44": 658298,
            "resnet56": 852730, "resnet110": 1727674, "resnet18": 11172810, "resnet34": 21280970,
            "plain20": 269434, "plain56": 852730}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_constructors_shapes_and_counts(name):
    m = build_model(name)
    assert n_params(m) == EXPECTED[name]
    x = torch.randn(2, 1, 28, 28)
    assert m(x).shape == (2, 10)


def test_resnet20_rgb_is_the_papers_027M():
    assert n_params(ResNet(20, in_channels=3)) == 269722


def test_option_a_has_no_shortcut_parameters_and_b_has():
    a = ResNet(20, shortcut="A")
    b = ResNet(20, shortcut="B")
    assert not any("shortcut" in k for k, _ in a.named_parameters())
    assert sum(isinstance(m, PadShortcut) for m in a.modules()) == 2
    proj = [m for m in b.modules() if isinstance(m, ProjectionShortcut)]
    assert len(proj) == 2 and all(m.conv.weight.shape[2:] == (1, 1) for m in proj)
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_pads_zero_channels_and_subsamples():
    s = PadShortcut(4, 8, 2)
    x = torch.randn(2, 4, 6, 6)
    y = s(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


def test_plain_has_no_skip_path():
    torch.manual_seed(0)
    blk = BasicBlock(8, 8, 1, plain=True).eval()
    assert blk.shortcut is None and blk.shortcut_kind == "none"
    x = torch.randn(2, 8, 5, 5)
    pre = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x)))))
    torch.testing.assert_close(blk(x), torch.relu(pre))
    res = BasicBlock(8, 8, 1).eval()
    res.load_state_dict(blk.state_dict())
    torch.testing.assert_close(res(x), torch.relu(pre + x))


@pytest.mark.parametrize("depth", [0, 2, 7, 9, 19, 21, 51, -4])
def test_bad_depth_is_a_clear_error(depth):
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth)


def test_bad_model_name_and_shortcut():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet-twenty")
    with pytest.raises(ValueError, match="shortcut"):
        ResNet(20, shortcut="C")
    with pytest.raises(ValueError, match="widths"):
        ResNet(20, widths=[4, 8])


def test_state_dict_keys_are_stable():
    keys = list(ResNet(8, shortcut="B").state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer2.0.shortcut.conv.weight" in keys and "layer2.0.shortcut.bn.running_var" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


def test_he_initialisation():
    torch.manual_seed(0)
    m = ResNet(56)
    w = m.layer2[3].conv1.weight
    std = (2.0 / (w.shape[1] * 9)) ** 0.5
    assert abs(w.std().item() / std - 1) < 0.05
    assert all(bn.weight.eq(1).all() and bn.bias.eq(0).all() for bn in m.modules()
               if isinstance(bn, torch.nn.BatchNorm2d))
