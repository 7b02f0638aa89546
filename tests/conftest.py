"""Test set-up: the Triton interpreter on CPU-only machines (set before anything imports triton)."""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    # On a machine without CUDA the Triton kernels run on CPU tensors through the interpreter.
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


def fast_interpreter():
    """The Triton interpreter without its int32 overflow sanitizer: it checks every 32-bit add/mul of the kernels'
    index math in int64 (about twice the interpreted work, e.g. a ResNet-8 step 23 s -> 13 s), and at the tests'
    small shapes no 32-bit index can overflow (index64() sends bigger tensors to the 64-bit path)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import dataclasses

    import triton.runtime.interpreter as interp
    builder = getattr(interp, "interpreter_builder", None)
    if builder is not None and hasattr(builder.options, "sanitize_overflow"):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


fast_interpreter()


def compile_only():
    """RESNET_FUSED_COMPILE_ONLY=1 (scripts/precompile.py --tests): every Triton launch compiles its kernel into the
    cache for this GPU and runs nothing, so that a device check's test stages find their kernels compiled. The
    tests' values are then meaningless and their results are ignored. Under the interpreter (dry runs) a launch
    does nothing at all."""
    if os.environ.get("RESNET_FUSED_COMPILE_ONLY") != "1":
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    run = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)
    JITFunction.run = compile_without_launch
    InterpretedFunction.run = lambda self, *args, **kwargs: None


compile_only()


def pytest_configure(config):
    if interpreting():
        from resnet_fused.backends import interpreter_problem
        problem = interpreter_problem()
        if problem is not None:  # otherwise every kernel test fails with an opaque InterpreterError
            raise pytest.UsageError(f"the tests run the Triton kernels through the interpreter, but {problem}")

DATA_ROOT = os.environ.get("RESNET_FUSED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                  "data")


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def dev():
    """Where the Triton kernels run in this session: cuda, or cpu under the interpreter."""
    if interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpreting():
        pytest.skip("GPU test: run with TRITON_INTERPRET=0")
    return torch.device("cuda")


@pytest.fixture
def mnist_root():
    root = os.path.abspath(DATA_ROOT)
    if not os.path.exists(os.path.join(root, "MNIST", "raw")):
        pytest.skip(f"MNIST not found under {root}: set RESNET_FUSED_DATA")
    return root


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons against PyTorch use IEEE fp32 products on both sides (no TF32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
