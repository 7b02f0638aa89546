"""fma_peak / cpu_isa (csrc/fma_peak.cpp): the CPU's measured multiply-add peak behind the benchmarks' FMA% column,
on every instruction-set path this CPU has (RESNET_FUSED_CPU_ISA forces the lower ones)."""
import time

import pytest
import torch

from resnet_fused import ext

if not ext.available() or not hasattr(torch.ops.resnet_fused, "fma_peak"):
    pytest.skip("resnet_fused._C is not built (or predates fma_peak)", allow_module_level=True)

ops = torch.ops.resnet_fused
ORDER = ["none", "avx2", "avx512", "avx512_bf16"]
BEST = ops.cpu_isa()
if BEST == "none":
    pytest.skip("fma_peak needs an x86-64 CPU with AVX2 and FMA", allow_module_level=True)


def matmul_rate(threads):
    """FLOP/s of a 1024^3 fp32 matmul on ``threads`` threads, the best of 3: no code can beat the FMA peak."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * 1024 ** 3 / best
    finally:
        torch.set_num_threads(old)


def peak(threads=1, bf16=False):
    return max(ops.fma_peak(5_000_000, threads, bf16) for _ in range(3))


def test_cpu_isa_is_lowered_by_the_env_var_never_raised(monkeypatch):
    assert BEST in ORDER
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "avx2")
    assert ops.cpu_isa() == "avx2"
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "avx512_bf16")
    assert ops.cpu_isa() == BEST  # never more than the CPU has
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "sse")
    with pytest.raises(RuntimeError, match="RESNET_FUSED_CPU_ISA must be one of"):
        ops.cpu_isa()


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_fp32_peak_bounds_a_matmul(monkeypatch, isa):
    """The measured peak is at least what a large matmul reaches on one thread (or half of it on a forced narrower
    path), and not absurdly above it: a FLOP count off by a factor (lanes, the 2 of a multiply-add) fails. The
    AVX-512 peak's ceiling is twice the AVX2 path's (twice the lanes), not the matmul's: PyTorch's BLAS need not
    run AVX-512 code (on the Zen 5 machine a 1-thread matmul reached 97 GFLOP/s, AVX2 111, AVX-512 238)."""
    if ORDER.index(BEST) < ORDER.index(isa):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "avx2")
    p_avx2 = peak()
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", isa)
    p, mm = peak(), matmul_rate(1)
    floor = 0.9 if isa == BEST or (isa == "avx512" and BEST == "avx512_bf16") else 0.4
    ceiling = 2.2 * mm if isa == "avx2" else 2.2 * p_avx2
    assert floor * mm <= p <= ceiling, (p, mm, p_avx2)


def test_bf16_peak_needs_avx512_bf16(monkeypatch):
    if BEST != "avx512_bf16":
        with pytest.raises(RuntimeError, match="needs AVX512_BF16"):
            ops.fma_peak(1000, 1, True)
        pytest.skip("this CPU has no AVX512_BF16: only the refusal is tested")
    assert peak(bf16=True) >= 0.9 * peak()  # two products per fp32 lane per instruction
    monkeypatch.setenv("RESNET_FUSED_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="needs AVX512_BF16"):
        ops.fma_peak(1000, 1, True)


def test_fma_peak_bad_arguments_are_clear_errors():
    with pytest.raises(RuntimeError, match="iters > 0 and threads > 0"):
        ops.fma_peak(0, 1, False)
    with pytest.raises(RuntimeError, match="iters > 0 and threads > 0"):
        ops.fma_peak(10, 0, False)
