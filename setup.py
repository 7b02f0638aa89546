"""Build script for resnet_fused.

The Python package (Triton kernels, models, tools) needs no compiler. The C++/CUDA operators in ``csrc/`` are built
as ``resnet_fused._C`` when their sources are present:

* ``RESNET_FUSED_BUILD_CUDA=auto`` (default): build the CUDA sources when a CUDA toolkit with nvcc is found
  (``CUDA_HOME``, else the ``nvcc`` on PATH). Never judged by ``torch.cuda.is_available()``: GPU-less build hosts
  must still produce CUDA builds.
* ``RESNET_FUSED_BUILD_CUDA=1``: build them or fail loudly. ``0``: CPU operators only.
* ``RESNET_FUSED_BUILD_EXT=0``: no extension at all (pure Python install).
* ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0"; ``MAX_JOBS`` defaults to the core count, at most 4.

Install with ``pip install --no-build-isolation -e .`` (this file imports torch).
"""
import glob
import os
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit folder that holds bin/nvcc, following wrapper scripts on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    # A wrapper script (exec /usr/local/cuda-X/bin/nvcc "$@") sits outside the toolkit: read where it points.
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for tok in head.decode(errors="ignore").split():
                if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                    return os.path.dirname(os.path.dirname(os.path.realpath(tok)))
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


def _extensions():
    if os.environ.get("RESNET_FUSED_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp:
        return [], {}
    mode = os.environ.get("RESNET_FUSED_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RESNET_FUSED_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _find_cuda_home() if mode != "0" else None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    build_cuda = mode == "1" or (mode == "auto" and cuda_home is not None and bool(cu))
    if mode == "1" and cuda_home is None:
        raise SystemExit("RESNET_FUSED_BUILD_CUDA=1 but no CUDA toolkit with nvcc was found (set CUDA_HOME)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch 2.14)
    if build_cuda:
        ext = CUDAExtension(
            "resnet_fused._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DRESNET_FUSED_WITH_CUDA"],
                                "nvcc": ["-O3", "-DRESNET_FUSED_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("resnet_fused._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"resnet_fused: building extension with CUDA={'on' if build_cuda else 'off'} (CUDA_HOME={cuda_home})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
