// fma_peak: this CPU's multiply-add peak, measured, for the benchmarks' roofline (bench/throughput.py): each of
// `threads` OpenMP threads runs `iters` rounds of kChains independent multiply-add chains on vector registers (enough
// chains to cover the FMA latency on both FMA pipes), timed around the parallel region. fp32: vfmadd231ps on 16
// (AVX-512) or 8 (AVX2) lanes, 2 FLOP per lane; bf16: vdpbf16ps (AVX512_BF16), 32 bf16 products summed into 16 fp32
// lanes, 2 FLOP per product. Returns FLOP/s.
//
// The instruction set is picked at run time (cpu_isa: the best this CPU has); RESNET_FUSED_CPU_ISA=avx2 forces the
// AVX2 path (tests run every path), =avx512 refuses bf16 as a CPU without AVX512_BF16 would.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_isa.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RESNET_FUSED_FMA_PEAK 1
#endif

namespace resnet_fused {
namespace {

constexpr int kChains = 12;

#ifdef RESNET_FUSED_FMA_PEAK
// a <- a * b + c converges to c / (1 - b): finite for any number of rounds
__attribute__((target("avx2,fma"))) float chains_avx2(int64_t iters) {
  __m256 a[kChains];
  for (int j = 0; j < kChains; ++j) a[j] = _mm256_set1_ps(0.001f * static_cast<float>(j + 1));
  const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) a[j] = _mm256_fmadd_ps(a[j], b, c);
  __m256 s = a[0];
  for (int j = 1; j < kChains; ++j) s = _mm256_add_ps(s, a[j]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0];
}

__attribute__((target("avx512f"))) float chains_avx512(int64_t iters) {
  __m512 a[kChains];
  for (int j = 0; j < kChains; ++j) a[j] = _mm512_set1_ps(0.001f * static_cast<float>(j + 1));
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) a[j] = _mm512_fmadd_ps(a[j], b, c);
  __m512 s = a[0];
  for (int j = 1; j < kChains; ++j) s = _mm512_add_ps(s, a[j]);
  return _mm512_reduce_add_ps(s);
}

// acc += sum of pairwise products of 1e-3-sized bf16 values: grows by ~2e-6 per round, finite for 1e12 rounds
__attribute__((target("avx512f,avx512bf16"))) float chains_bf16(int64_t iters) {
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_setzero_ps();
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], x, x);
  __m512 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}
#endif

double fma_peak(int64_t iters, int64_t threads, bool bf16) {
  TORCH_CHECK(iters > 0 && threads > 0, "resnet_fused: fma_peak needs iters > 0 and threads > 0, got iters ", iters,
              ", threads ", threads);
  const std::string isa = cpu_isa();
  TORCH_CHECK(isa != "none", "resnet_fused: fma_peak needs an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(!bf16 || isa == "avx512_bf16", "resnet_fused: fma_peak(bf16) needs AVX512_BF16 (vdpbf16ps); this CPU "
              "(or RESNET_FUSED_CPU_ISA) gives ", isa);
#ifdef RESNET_FUSED_FMA_PEAK
  const bool wide = isa != "avx2";
  const double per_round = bf16 ? kChains * 32 * 2.0 : kChains * (wide ? 16 : 8) * 2.0;
  volatile float sink = 0.f;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const float v = bf16 ? chains_bf16(iters) : wide ? chains_avx512(iters) : chains_avx2(iters);
    if (v == 12345.f) sink = v;  // keeps the chains alive
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  (void)sink;
  return per_round * static_cast<double>(iters) * static_cast<double>(threads) / s;
#else
  return 0.0;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("cpu_isa() -> str", [] { return cpu_isa(); });
  m.def("fma_peak(int iters, int threads, bool bf16) -> float", &fma_peak);
}

}  // namespace resnet_fused
