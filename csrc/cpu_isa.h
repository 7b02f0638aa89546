// The CPU's vector instruction set, picked at run time, for the CPU operators that have a path per instruction set
// (fma_peak, conv3x3_winograd's GEMMs). RESNET_FUSED_CPU_ISA lowers it (never raises it past what the CPU has), so
// the tests can run every path on one machine.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace resnet_fused {

// "avx512_bf16", "avx512", "avx2" or "none": the best this CPU runs, lowered by RESNET_FUSED_CPU_ISA
inline std::string cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  std::string best = "none";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = "avx2";
  if (best == "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = "avx512";
  if (best == "avx512" && __builtin_cpu_supports("avx512bf16")) best = "avx512_bf16";
  const char* force = std::getenv("RESNET_FUSED_CPU_ISA");
  if (force == nullptr || *force == '\0') return best;
  const std::string f(force);
  const char* order[] = {"none", "avx2", "avx512", "avx512_bf16"};
  int fi = -1, bi = 0;
  for (int i = 0; i < 4; ++i) {
    if (f == order[i]) fi = i;
    if (best == order[i]) bi = i;
  }
  TORCH_CHECK(fi >= 0, "resnet_fused: RESNET_FUSED_CPU_ISA must be one of none, avx2, avx512, avx512_bf16, got '",
              f, "'");
  return order[std::min(fi, bi)];  // never more than the CPU has
#else
  return "none";
#endif
}

}  // namespace resnet_fused
