// What the CUDA kernels of csrc/cuda share: the block shape of the chunked reductions, the aligned vector type, Chan's
// merge of (count, mean, M2) and the launch plan of the elementwise kernels.
//
// The kernel headers (*.cuh) use no ATen and no CUDA runtime API, only the CUDA C++ language, so that the same
// source also compiles as plain C++ on a machine without a GPU: tests/cuda_emulator defines the CUDA built-ins
// (threadIdx, __syncthreads, __shared__, ...) for the host, runs each block's threads as OS threads, and the tests
// compare every kernel with PyTorch. The .cu files hold the host code (ATen, streams, launches).
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../constants.h"

namespace resnet_fused {
namespace kernels {

// The chunked reductions: a block is 32 channels x 8 row groups of one chunk of kRowsPerChunk rows (256 threads).
// Thread (tx, ty) walks rows r0 + ty, r0 + ty + 8, ... with its channel fixed, so a warp reads 32 consecutive
// channels of one row (coalesced); the 8 row groups merge in shared memory in a fixed order (deterministic).
constexpr int kChannelsPerBlock = 32;
constexpr int kRowGroups = 8;
constexpr int kThreads = kChannelsPerBlock * kRowGroups;

// The grids of the chunked reductions: (chunks, channel blocks), and channel blocks alone for bn_stats' merge.
inline unsigned channel_blocks(int64_t c) {
  return static_cast<unsigned>((c + kChannelsPerBlock - 1) / kChannelsPerBlock);
}
inline dim3 chunk_grid(int64_t chunks, int64_t c) { return dim3(static_cast<unsigned>(chunks), channel_blocks(c)); }

// How many of a chunk's `rows` rows row group q walks.
__host__ __device__ inline int64_t group_rows(int64_t rows, int q) {
  return rows > q ? (rows - q + kRowGroups - 1) / kRowGroups : 0;
}

// Where thread (tx, ty) of a chunked-reduction block (grid: chunks x channel blocks) works: chunk k, channel j, the
// chunk's `rows`, and its own n rows, the first at element index i0 = (r0 + ty) * c + j, then kRowGroups * c apart.
struct ChunkThread {
  int tx, ty;
  int64_t k, j, rows, n, i0;
};

__device__ __forceinline__ ChunkThread chunk_thread(int64_t p, int64_t c) {
  ChunkThread t;
  t.tx = threadIdx.x % kChannelsPerBlock;
  t.ty = threadIdx.x / kChannelsPerBlock;
  t.k = blockIdx.x;
  t.j = static_cast<int64_t>(blockIdx.y) * kChannelsPerBlock + t.tx;
  const int64_t r0 = t.k * kRowsPerChunk;
  t.rows = min(p - r0, kRowsPerChunk);
  t.n = group_rows(t.rows, t.ty);
  t.i0 = (r0 + t.ty) * c + t.j;
  return t;
}

// The end of a chunked reduction with three per-channel sums: the block's 8 row groups merge in group order
// (deterministic) and row group 0 writes part[chunk][0..2][j]. Every thread of the block calls it (__syncthreads).
template <typename acc_t>
__device__ __forceinline__ void finish_chunk_sums(acc_t (&smem)[3][kRowGroups][kChannelsPerBlock],
                                                  acc_t* __restrict__ part, const ChunkThread& t, int64_t c,
                                                  acc_t s0, acc_t s1, acc_t s2) {
  const int tx = t.tx, ty = t.ty;
  const int64_t j = t.j;
  smem[0][ty][tx] = s0;
  smem[1][ty][tx] = s1;
  smem[2][ty][tx] = s2;
  __syncthreads();
  if (ty != 0 || j >= c) return;
  for (int q = 1; q < kRowGroups; ++q) {
    s0 += smem[0][q][tx];
    s1 += smem[1][q][tx];
    s2 += smem[2][q][tx];
  }
  acc_t* dst = part + t.k * 3 * c;
  dst[j] = s0;
  dst[c + j] = s1;
  dst[2 * c + j] = s2;
}

// V consecutive elements as one aligned value: a 16-byte vector load/store (ld.global.v4) when V * sizeof(T) == 16.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Chan et al.'s parallel update: (n_a, mean_a, m2_a) absorbs (n_b, mean_b, m2_b); an empty side changes nothing.
template <typename acc_t>
__host__ __device__ inline void chan_merge(acc_t& n_a, acc_t& mean_a, acc_t& m2_a, acc_t n_b, acc_t mean_b,
                                           acc_t m2_b) {
  if (n_b == acc_t(0)) return;
  const acc_t n = n_a + n_b, delta = mean_b - mean_a;
  mean_a += delta * (n_b / n);
  m2_a += m2_b + delta * delta * (n_a * (n_b / n));
  n_a = n;
}

// The elementwise kernels (grid-stride loops over n elements, V per thread and step): V = 16 bytes' worth where the
// channel count is a multiple of it and every pointer is 16-byte aligned, else 1; 32-bit indices where every index
// the loop can form (n, the largest other operand, plus one grid step) fits, else 64-bit (and V = 1).
struct ElementwisePlan {
  int vec;
  bool index32;
  unsigned blocks;
};

inline ElementwisePlan plan_elementwise(int64_t n, int64_t c, int64_t other_numel, int elem_bytes,
                                        std::initializer_list<const void*> ptrs, int64_t max_blocks = 65535) {
  int vec = 16 / elem_bytes;
  if (vec < 1 || c % vec != 0) vec = 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) vec = 1;
  auto blocks_for = [&](int v) {
    const int64_t per_block = static_cast<int64_t>(kThreads) * v;
    return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, max_blocks));
  };
  const int64_t step = blocks_for(vec) * kThreads * vec;
  const bool index32 = std::max(n, other_numel) + step <= std::numeric_limits<int32_t>::max();
  if (!index32) vec = 1;
  return {vec, index32, static_cast<unsigned>(blocks_for(vec))};
}

// Calls f(std::integral_constant<int, V>, index_t{}) for the plan's (V, index type): the instantiations that exist.
template <typename scalar_t, typename F>
void dispatch_elementwise(const ElementwisePlan& plan, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t) >= 1 ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
  if (!plan.index32)
    f(std::integral_constant<int, 1>{}, int64_t{});
  else if (plan.vec == kVec)
    f(std::integral_constant<int, kVec>{}, int32_t{});
  else
    f(std::integral_constant<int, 1>{}, int32_t{});
}

}  // namespace kernels
}  // namespace resnet_fused
