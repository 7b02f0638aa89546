"""resnet_fused: fused GPU kernels for ResNets and a drop-in FusedResNet.

``ResNet`` is the plain-PyTorch reference (the test oracle); ``FusedResNet`` has the same constructor and the same
``state_dict`` keys and runs the fused Triton / C++ / CUDA operators.
"""
from .reference import ResNet
from .zoo import (MODEL_NAMES, build_model, load_weights, plain20, plain56, resnet8, resnet14, resnet18, resnet20,
                  resnet32, resnet34, resnet44, resnet56, resnet110)

__version__ = "0.1.0"


def __getattr__(name):
    # FusedResNet imports the op registry (and Triton when present) only when asked for.
    if name == "FusedResNet":
        from .model import FusedResNet
        return FusedResNet
    raise AttributeError(f"module 'resnet_fused' has no attribute {name!r}")


__all__ = ["ResNet", "FusedResNet", "MODEL_NAMES", "build_model", "load_weights", "resnet8", "resnet14", "resnet20",
           "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "plain20", "plain56"]
