"""The model zoo and load_weights: the checkpoints people already have load into ResNet and FusedResNet."""
import pytest
import torch

from resnet_fused import FusedResNet, ResNet, ext, load_weights
from resnet_fused.checkpoint import UserError, seal


def _akamaster_layout(sd):
    """A state_dict as akamaster/pytorch_resnet_cifar10 saves it: DataParallel's module. prefix, the head called
    linear, no num_batches_tracked (written before BatchNorm counted batches), wrapped in {'state_dict': ...}."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        out["module." + ("linear." + k[3:] if k.startswith("fc.") else k)] = v.clone()
    return {"state_dict": out, "best_prec1": 91.78}


@pytest.mark.parametrize("depth", [20, 8])
def test_akamaster_cifar_checkpoint_loads_into_fused_and_matches(tmp_path, depth):
    torch.manual_seed(0)
    ref = ResNet(depth, in_channels=3)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save(_akamaster_layout(ref.state_dict()), path)
    fused = load_weights(FusedResNet(depth, in_channels=3, backend="cpu" if ext.available() else "auto"), str(path))
    ref.eval(), fused.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    assert int(fused.bn1.num_batches_tracked) == 0
    plain = load_weights(ResNet(depth, in_channels=3), _akamaster_layout(ref.state_dict()))  # a dict works too
    for k, v in ref.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(plain.state_dict()[k], v), k


def test_run_checkpoints_and_plain_state_dicts_load(tmp_path):
    ref = ResNet(8)
    ckpt = seal(dict(model=ref.state_dict(), config=dict(model="resnet8"), epoch=1))
    torch.save(ckpt, tmp_path / "last.pt")
    m = load_weights(FusedResNet(8), str(tmp_path / "last.pt"))
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    compiled_prefix = {"_orig_mod." + k: v for k, v in ref.state_dict().items()}
    load_weights(ResNet(8), compiled_prefix)
    ckpt["epoch"] = 2  # altered after sealing: the run checkpoint's checksum is verified
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="checksum"):
        load_weights(ResNet(8), str(tmp_path / "bad.pt"))


def test_unknown_layouts_and_architectures_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not a layout load_weights reads"):
        load_weights(ResNet(8), {"features.0.weight": torch.zeros(3), "classifier.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="does not match the model architecture"):
        load_weights(ResNet(8), ResNet(14).state_dict())
    with pytest.raises(UserError, match="not a state_dict"):
        load_weights(ResNet(8), {"state_dict": 3})
    with pytest.raises(UserError, match="does not exist"):
        load_weights(ResNet(8), str(tmp_path / "missing.th"))


def test_reference_module_imports_nothing_of_ours():
    import ast
    import pathlib
    src = pathlib.Path(__file__).parent.parent / "resnet_fused" / "reference.py"
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("resnet_fused"), ast.dump(node)
