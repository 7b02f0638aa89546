"""torchvision ResNets for the tests: BatchNorm statistics away from their init, and narrow variants (torchvision's
own BasicBlock / Bottleneck classes and forward, stages of a few channels) for the Triton interpreter and the CUDA
kernel emulator, where torchvision's 64-512 channels would take hours."""
import torch


def last_bns(model):
    """The BatchNorm ending each block's residual branch (bn2 of a BasicBlock, bn3 of a Bottleneck)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {id(getattr(m, "bn3" if isinstance(m, Bottleneck) else "bn2")) for m in model.modules()
            if isinstance(m, (BasicBlock, Bottleneck))}


def randomize_bn(model, seed=0):
    """BatchNorm weights, biases and running statistics away from their init (folding must matter). The
    residual branches' last BatchNorm weights are small (0.1-0.3), as in a trained network: at 1 they double the
    activations' scale at every block, and after 50 layers one rounding decides the logits' softmax (PyTorch's
    own NCHW and channels_last steps then differ by 1e3x in some gradients)."""
    g = torch.Generator().manual_seed(seed)
    last = last_bns(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                lo, span = (0.1, 0.2) if id(m) in last else (0.5, 1.0)
                m.weight.copy_(lo + span * torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
                m.running_mean.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
    return model


def narrow_tv(block, widths=(8, 12, 20, 24), layers=(1, 2, 1, 1), in_channels=3, stem=(7, 2, 3), maxpool=True,
              seed=0):
    from torchvision.models.resnet import ResNet, conv1x1
    torch.manual_seed(seed)
    m = ResNet(block, [1, 1, 1, 1], num_classes=10)
    m.conv1 = torch.nn.Conv2d(in_channels, widths[0], stem[0], stem[1], stem[2], bias=False)
    m.bn1 = torch.nn.BatchNorm2d(widths[0])
    if not maxpool:
        m.maxpool = torch.nn.Identity()
    inplanes = widths[0]
    for i, (width, n) in enumerate(zip(widths, layers)):
        blocks = []
        for j in range(n):
            stride = 2 if i and not j else 1
            ds = None
            if stride != 1 or inplanes != width * block.expansion:
                ds = torch.nn.Sequential(conv1x1(inplanes, width * block.expansion, stride),
                                         torch.nn.BatchNorm2d(width * block.expansion))
            blocks.append(block(inplanes, width, stride, ds))
            inplanes = width * block.expansion
        setattr(m, f"layer{i + 1}", torch.nn.Sequential(*blocks))
    m.fc = torch.nn.Linear(inplanes, 10)
    return randomize_bn(m, seed)
