// conv3x3_winograd: the 3x3 / stride 1 / padding 1 convolutions of FusedResNet's CPU inference path, by Winograd's
// minimal filtering F(m x m, 3x3), m = 2 or 4, with the folded BatchNorm's bias, the shortcut and the ReLU in the
// output transform.
//
// For each m x m output tile (input patch d: (m+2)^2 pixels from row m*th-1, zero outside the image) and each output
// channel k:
//     Y[k] = A^T [ sum_c U[k, c] (.) V[c] ] A,    V[c] = B^T d[c] B,    U[k, c] = G w[k, c] G^T  ((m+2)^2 each)
// F(2x2, 3x3), points 0, 1, -1, inf:
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1]
// F(4x4, 3x3), points 0, 1, -1, 2, -2, inf (Lavin & Gray 2016):
//     B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
//     G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1],
//     A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
// so each of the P = (m+2)^2 positions of the transformed tile is one GEMM over channels, M[p] = V[p] (tiles x C) @
// U[p] (C x K): P * C * K multiply-adds per m^2 outputs instead of the direct method's 9 * m^2 * C * K (2.25x fewer
// for m = 2, 4x for m = 4; m = 4's rounding errors are ~4x larger, still within the tests' fp32 tolerances).
// out = relu?(Y + bias + shortcut), shortcut = 0 | r (identity) | r[n, k - pad_front, h*s, w*s] (option A, the
// zero-padded subsample read by index math). U is made once per weight (resnet_fused.ext.winograd_weight, cached
// with the folded weights; its first dimension, 16 or 36, says m); all arithmetic is fp32 (U is computed in fp64
// then rounded).
//
// Layout: x, r and out are NHWC (channels_last), fp32 or bf16; C and K multiples of 8 (one AVX2 vector of channels).
// Work: blocks of T tiles (T sized so V and M of a block stay in L2) handed out to at::parallel_for's threads;
// per block: input transform -> V[P][T][C], P GEMMs -> M[P][T][K] (fp32), output transform + epilogue straight
// into out. The transforms (winograd_transforms.h) run 8 channels a step with AVX2 + FMA, or 16 with AVX-512
// where the AVX-512 GEMM runs (function target attributes; the operator refuses CPUs without AVX2 and FMA, and
// FusedResNet calls it only where conv3x3_winograd_supported() is true). The GEMMs are picked at run time
// (cpu_isa.h; RESNET_FUSED_CPU_ISA forces a lower one):
//   fp32, AVX2:    6 tiles x 16 channels of ymm accumulators, vfmadd231ps with a broadcast V value;
//   fp32, AVX-512: 12 tiles x 32 channels of zmm accumulators (2x the AVX2 peak where the CPU runs 512-bit FMAs
//                  at full width: measured 220 vs 111 GFLOP/s per core on the 2-core Zen 5 machine);
//   bf16 (x, r and out bf16, a bf16 U; AVX512_BF16 only): V and U in bf16, vdpbf16ps sums the products of a pair
//                  of input channels into fp32 accumulators (U packed as (P, C/2, K, 2): a column's pair side by
//                  side). bf16 x with an fp32 U runs the fp32 GEMM on fp32 V: F(4x4)'s transforms amplify
//                  rounding ~10x past a bf16 convolution's in bf16 (measured), not in fp32.
// bf16 rounding: the transforms and the epilogue compute in fp32; V, U and the output are rounded to bf16 (nearest
// even), as a bf16 direct convolution rounds its input, weight and output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "layout.h"
#include "output_cache.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RESNET_FUSED_WINOGRAD 1
#endif

namespace resnet_fused {
namespace {

#ifdef RESNET_FUSED_WINOGRAD
#define RF_AVX2 __attribute__((target("avx2,fma")))
#define RF_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define RF_AVX512_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define RF_UNROLL _Pragma("GCC unroll 8")
#define RF_UNROLL_ALL _Pragma("GCC unroll 32")  // register tiles: every accumulator a named register

using bf16_t = uint16_t;  // a bf16 value's bits (c10::BFloat16's storage)

constexpr int64_t kTileRows = 6;  // blocks are a multiple of this (the AVX2 GEMM's tile; the AVX-512 one takes 12)
// V and M of a block (tiles x positions x channels) sized to stay in L2 between the three steps: 192 KB measured
// best of 48/96/192/384 KB for both tile sizes on the 2-core Zen 4 machine (batch 32, 16-64 channels)
constexpr int64_t kBlockBytes = 192 * 1024;

struct Geometry {
  int64_t n, h, w, c, k;   // x: (n, h, w, c) NHWC; out: (n, h, w, k)
  int64_t th, tw, tiles;   // output tiles per column / row, and in all
  int64_t block;           // tiles per block (a multiple of kTileRows)
  int64_t kparts = 1;      // > 1: each thread computes all tiles for one part of the output channels ...
  int64_t kchunk = 0;      // ... of this many channels (a multiple of 16; the last part may be shorter)
};

template <typename XT>
struct Shortcut {
  const XT* r = nullptr;
  int64_t mode = kNone, rc = 0, rh = 0, rw = 0, stride = 1, pad_front = 0;
};

// Walks the tiles t0, t0+1, ... of a block in order without a division per tile.
struct TileCursor {
  int64_t n, th, tw;
  TileCursor(const Geometry& g, int64_t t) : n(t / (g.th * g.tw)), th((t / g.tw) % g.th), tw(t % g.tw) {}
  void next(const Geometry& g) {
    if (++tw == g.tw) {
      tw = 0;
      if (++th == g.th) th = 0, ++n;
    }
  }
};

// M (T x N) = V (T x C) @ U (C x N) for one transform position; T a multiple of kTileRows, N of 8; U's rows ldu
// apart, M's ldm (N columns of wider matrices when the threads split the output channels).
RF_AVX2 void gemm_avx2(const void* Vp, const void* Up, float* M, int64_t T, int64_t C, int64_t K, int64_t ldu,
                       int64_t ldm) {
  const float *V = static_cast<const float*>(Vp), *U = static_cast<const float*>(Up);
  for (int64_t i = 0; i < T; i += kTileRows) {
    const float* a = V + i * C;
    int64_t k0 = 0;
    for (; k0 + 16 <= K; k0 += 16) {
      __m256 acc[kTileRows][2];
      for (int r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_loadu_ps(U + c * ldu + k0), b1 = _mm256_loadu_ps(U + c * ldu + k0 + 8);
        for (int r = 0; r < kTileRows; ++r) {
          const __m256 av = _mm256_broadcast_ss(a + r * C + c);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < kTileRows; ++r) {
        _mm256_storeu_ps(M + (i + r) * ldm + k0, acc[r][0]);
        _mm256_storeu_ps(M + (i + r) * ldm + k0 + 8, acc[r][1]);
      }
    }
    if (k0 < K) {  // the last 8 channels when K is not a multiple of 16
      __m256 acc[kTileRows];
      for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_loadu_ps(U + c * ldu + k0);
        for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r * C + c), b0, acc[r]);
      }
      for (int r = 0; r < kTileRows; ++r) _mm256_storeu_ps(M + (i + r) * ldm + k0, acc[r]);
    }
  }
}

// The AVX-512 GEMMs: R tiles x NV*16 channels of zmm accumulators per register tile; mask[v] selects the channels
// of vector v that exist (K is a multiple of 8, not of 16). fp32: one vfmadd231ps per (tile, vector, input channel).
template <int R, int NV>
RF_AVX512 inline void tile_f32(const float* a, const float* U, float* M, int64_t C, int64_t ldu, int64_t ldm,
                               int64_t k0, __mmask16 m0, __mmask16 m1) {
  const __mmask16 mask[2] = {m0, m1};
  __m512 acc[R][NV];
  RF_UNROLL_ALL for (int r = 0; r < R; ++r)
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    __m512 b[NV];
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(mask[v], U + c * ldu + k0 + 16 * v);
    RF_UNROLL_ALL for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * C + c]);
      RF_UNROLL_ALL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, b[v], acc[r][v]);
    }
  }
  RF_UNROLL_ALL for (int r = 0; r < R; ++r)
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(M + r * ldm + k0 + 16 * v, mask[v], acc[r][v]);
}

// bf16: V rows and U columns hold pairs of input channels side by side (32 bits); one vdpbf16ps per (tile, vector,
// pair) adds both products to the fp32 accumulator.
template <int R, int NV>
RF_AVX512_BF16 inline void tile_bf16(const bf16_t* a, const bf16_t* U, float* M, int64_t C, int64_t ldu, int64_t ldm,
                                     int64_t k0, __mmask16 m0, __mmask16 m1) {
  const __mmask16 mask[2] = {m0, m1};
  const int32_t* a2 = reinterpret_cast<const int32_t*>(a);
  const int32_t* u2 = reinterpret_cast<const int32_t*>(U);
  const int64_t pairs = C / 2;
  __m512 acc[R][NV];
  RF_UNROLL_ALL for (int r = 0; r < R; ++r)
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t cp = 0; cp < pairs; ++cp) {
    __m512bh b[NV];
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_maskz_loadu_epi32(mask[v], u2 + cp * ldu + k0 + 16 * v);
    RF_UNROLL_ALL for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a2[r * pairs + cp]);
      RF_UNROLL_ALL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, b[v]);
    }
  }
  RF_UNROLL_ALL for (int r = 0; r < R; ++r)
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(M + r * ldm + k0 + 16 * v, mask[v], acc[r][v]);
}

// Rows in register tiles of 12 (6 for the last when T is an odd multiple of 6); columns in 32s, the last 16 or
// fewer through one vector.
template <typename VT, typename Tile12x2, typename Tile12x1, typename Tile6x2, typename Tile6x1>
inline void gemm_avx512_rows(const VT* V, const VT* U, float* M, int64_t T, int64_t C, int64_t K, int64_t ldu,
                             int64_t ldm, Tile12x2 t12x2, Tile12x1 t12x1, Tile6x2 t6x2, Tile6x1 t6x1) {
  for (int64_t i = 0; i < T; i += 12) {
    const bool six = i + 12 > T;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const int64_t left = K - k0;
      const auto m0 = static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
      const auto m1 = static_cast<__mmask16>(left >= 32 ? 0xffff : left > 16 ? (1u << (left - 16)) - 1 : 0);
      const VT* a = V + i * C;
      float* m = M + i * ldm;
      if (left > 16)
        six ? t6x2(a, U, m, C, ldu, ldm, k0, m0, m1) : t12x2(a, U, m, C, ldu, ldm, k0, m0, m1);
      else
        six ? t6x1(a, U, m, C, ldu, ldm, k0, m0, m1) : t12x1(a, U, m, C, ldu, ldm, k0, m0, m1);
    }
  }
}

RF_AVX512 void gemm_avx512(const void* Vp, const void* Up, float* M, int64_t T, int64_t C, int64_t K, int64_t ldu,
                           int64_t ldm) {
  gemm_avx512_rows(static_cast<const float*>(Vp), static_cast<const float*>(Up), M, T, C, K, ldu, ldm,
                   tile_f32<12, 2>, tile_f32<12, 1>, tile_f32<6, 2>, tile_f32<6, 1>);
}

// ldu in pairs of input channels (U is (P, C/2, K, 2): a row of U holds K pairs)
RF_AVX512_BF16 void gemm_avx512_bf16(const void* Vp, const void* Up, float* M, int64_t T, int64_t C, int64_t K,
                                     int64_t ldu, int64_t ldm) {
  gemm_avx512_rows(static_cast<const bf16_t*>(Vp), static_cast<const bf16_t*>(Up), M, T, C, K, ldu, ldm,
                   tile_bf16<12, 2>, tile_bf16<12, 1>, tile_bf16<6, 2>, tile_bf16<6, 1>);
}

using GemmFn = void (*)(const void* V, const void* U, float* M, int64_t T, int64_t C, int64_t K, int64_t ldu,
                        int64_t ldm);

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The transforms, compiled once per vector width (winograd_transforms.h).
namespace avx2 {
#define RF_TARGET RF_AVX2
#define RF_LANES 8
#include "winograd_transforms.h"
#undef RF_TARGET
#undef RF_LANES
}  // namespace avx2

namespace avx512 {
#define RF_TARGET RF_AVX512
#define RF_LANES 16
#include "winograd_transforms.h"
#undef RF_TARGET
#undef RF_LANES
}  // namespace avx512

// One thread's share: the tiles of the blocks it takes, output channels kb .. ke - 1 (V and M its own).
template <int M, int64_t Mode, bool Relu, bool Wide, typename XT, typename VT>
struct WinogradWorker {
  static constexpr int P = (M + 2) * (M + 2);
  const XT* x;
  const VT* U;
  GemmFn gemm;
  const float* bias;
  const Shortcut<XT>& s;
  const Geometry& g;
  XT* out;
  int64_t kb, ke;
  std::vector<VT> V = std::vector<VT>(P * g.block * g.c, VT(0));  // zeroed: rows past nt stay finite
  std::vector<float> Mt = std::vector<float>(P * g.block * (ke - kb));

  void block(int64_t t0, int64_t nt) {
    if constexpr (Wide)
      avx512::input_transform<M>(x, g, t0, nt, V.data());
    else
      avx2::input_transform<M>(x, g, t0, nt, V.data());
    // U's columns kb ..: an element offset of kb fp32 values, or kb pairs of bf16 values
    const VT* u = U + kb * static_cast<int64_t>(sizeof(float) / sizeof(VT));
    const int64_t ldu = g.k, kc = ke - kb;
    for (int p = 0; p < P; ++p)
      gemm(V.data() + p * g.block * g.c, u + p * g.c * g.k, Mt.data() + p * g.block * kc, g.block, g.c, kc, ldu, kc);
    if constexpr (Wide)
      avx512::output_transform<M, Mode, Relu>(Mt.data(), g, t0, nt, kb, ke, bias, s, out);
    else
      avx2::output_transform<M, Mode, Relu>(Mt.data(), g, t0, nt, kb, ke, bias, s, out);
  }
};

// XT: the activations' element type (float or bf16_t); VT: V's and U's (float, or bf16_t for the bf16 GEMM);
// Wide: the AVX-512 transforms (16 channels a step) instead of the AVX2 ones (8).
template <int M, int64_t Mode, bool Relu, bool Wide, typename XT, typename VT>
void winograd_forward(const XT* x, const VT* U, GemmFn gemm, const float* bias, const Shortcut<XT>& s,
                      const Geometry& g, XT* out) {
  using Worker = WinogradWorker<M, Mode, Relu, Wide, XT, VT>;
  const int64_t nblocks = (g.tiles + g.block - 1) / g.block;
  if (g.kparts > 1) {  // each part of the output channels reads its columns of U once, for every block
    at::parallel_for(0, g.kparts, 1, [&](int64_t b, int64_t e) {
      for (int64_t part = b; part < e; ++part) {
        const int64_t kb = part * g.kchunk;
        Worker w{x, U, gemm, bias, s, g, out, kb, std::min(g.k, kb + g.kchunk)};
        for (int64_t blk = 0; blk < nblocks; ++blk) w.block(blk * g.block, std::min(g.block, g.tiles - blk * g.block));
      }
    });
    return;
  }
  // blocks handed out one at a time (each writes its own tiles: the result does not depend on who computes what),
  // so a thread slowed by another process on its core does not leave the others waiting at the end
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Worker w{x, U, gemm, bias, s, g, out, 0, g.k};
    for (int64_t blk; (blk = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;)
      w.block(blk * g.block, std::min(g.block, g.tiles - blk * g.block));
  });
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_supported() { return false; }
#endif

// The weight operand's checks: fp32 (P, C, K) for fp32 or bf16 x, bf16 (P, C/2, K, 2) for bf16 x; P = 16 or 36.
void check_winograd_weight(const at::Tensor& x, const at::Tensor& weight_t) {
  const int64_t c = x.size(1);
  TORCH_CHECK(weight_t.device() == x.device(), "resnet_fused: conv3x3_winograd: weight_t is on ", weight_t.device(),
              " but x is on ", x.device());
  const bool p_ok = weight_t.dim() >= 1 && (weight_t.size(0) == 16 || weight_t.size(0) == 36);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "resnet_fused: conv3x3_winograd "
              "computes float32 or bfloat16 activations, got ", x.scalar_type());
  if (weight_t.scalar_type() == at::kFloat) {
    TORCH_CHECK(p_ok && weight_t.dim() == 3 && weight_t.size(1) == c, "resnet_fused: conv3x3_winograd: weight_t "
                "must be the (16 or 36, C_in=", c, ", C_out) transform from resnet_fused.ext.winograd_weight, got "
                "shape ", weight_t.sizes());
  } else {
    TORCH_CHECK(weight_t.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16, "resnet_fused: "
                "conv3x3_winograd: weight_t must be float32 (any x) or bfloat16 (bfloat16 x), got ",
                weight_t.scalar_type(), " for ", x.scalar_type(), " x");
    TORCH_CHECK(p_ok && weight_t.dim() == 4 && weight_t.size(1) * 2 == c && weight_t.size(3) == 2,
                "resnet_fused: conv3x3_winograd: a bfloat16 weight_t must be the (16 or 36, C_in/2=", c / 2,
                ", C_out, 2) transform from resnet_fused.ext.winograd_weight(w, tile, torch.bfloat16), got shape ",
                weight_t.sizes());
  }
}

#ifdef RESNET_FUSED_WINOGRAD
// Blocks of tiles sized so that V and M stay in L2. Where U outweighs the input's transforms (more output channels
// than tiles: batch 1 past the first stage, e.g. 256x256 channels on 14x14: U 4 MB, V 0.8 MB) the threads split
// the output channels, each reading its columns of U once (split by tiles, every block read all of U: 1.3 ms per
// such layer against 0.7 ms with U cached); elsewhere they split the tiles, at least two blocks per thread where the
// image is small, so that every thread has work.
Geometry make_geometry(const at::Tensor& x, int64_t k, int m, int64_t v_bytes) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), positions = (m + 2) * (m + 2);
  Geometry g{n, h, w, c, k, (h + m - 1) / m, (w + m - 1) / m, 0, 0};
  g.tiles = n * g.th * g.tw;
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && k >= 32 && k > g.tiles) {
    g.kchunk = ((k + threads - 1) / threads + 15) / 16 * 16;
    g.kparts = (k + g.kchunk - 1) / g.kchunk;
  }
  const int64_t kc = g.kparts > 1 ? g.kchunk : k;
  const int64_t per_tile = positions * (v_bytes * c + 4 * kc);  // V and M bytes per tile
  const int64_t per_thread = g.kparts > 1 ? g.tiles : (g.tiles + 2 * threads - 1) / (2 * threads);
  g.block = std::min(kBlockBytes / per_tile, (per_thread + kTileRows - 1) / kTileRows * kTileRows);
  g.block = std::max<int64_t>(kTileRows, g.block / kTileRows * kTileRows);
  return g;
}

// The tile size, shortcut mode and ReLU as template arguments.
template <typename XT, typename VT>
void run_winograd(const at::Tensor& x, const at::Tensor& U, GemmFn gemm, bool wide, const at::Tensor& b,
                  const at::Tensor& r, int64_t mode, int64_t res_stride, int64_t pad_front, bool relu,
                  at::Tensor& out) {
  const int m = U.size(0) == 36 ? 4 : 2;  // F(4x4, 3x3) or F(2x2, 3x3)
  const Geometry g = make_geometry(x, out.size(1), m, sizeof(VT));
  Shortcut<XT> s;
  s.mode = mode;
  if (mode != kNone) {
    s.r = static_cast<const XT*>(r.data_ptr());
    s.rc = r.size(1), s.rh = r.size(2), s.rw = r.size(3), s.stride = res_stride, s.pad_front = pad_front;
  }
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  XT* po = static_cast<XT*>(out.data_ptr());
  const XT* px = static_cast<const XT*>(x.data_ptr());
  const VT* pu = static_cast<const VT*>(U.data_ptr());
  const auto run = [&](auto m_c, auto mode_c) {
    constexpr int kM = decltype(m_c)::value;
    constexpr int64_t kMode = decltype(mode_c)::value;
    if (wide)
      relu ? winograd_forward<kM, kMode, true, true>(px, pu, gemm, pb, s, g, po)
           : winograd_forward<kM, kMode, false, true>(px, pu, gemm, pb, s, g, po);
    else
      relu ? winograd_forward<kM, kMode, true, false>(px, pu, gemm, pb, s, g, po)
           : winograd_forward<kM, kMode, false, false>(px, pu, gemm, pb, s, g, po);
  };
  const auto run_mode = [&](auto m_c) {
    if (mode == kIdentity)
      run(m_c, std::integral_constant<int64_t, kIdentity>{});
    else if (mode == kPadA)
      run(m_c, std::integral_constant<int64_t, kPadA>{});
    else
      run(m_c, std::integral_constant<int64_t, kNone>{});
  };
  m == 4 ? run_mode(std::integral_constant<int, 4>{}) : run_mode(std::integral_constant<int, 2>{});
}
#endif

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight_t,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                int64_t mode, int64_t res_stride, int64_t pad_front, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "resnet_fused: conv3x3_winograd: x must be 4-D (N, C, H, W), got shape ",
              x_in.sizes());
  check_winograd_weight(x_in, weight_t);
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3), k = weight_t.size(2);
  TORCH_CHECK(c % 8 == 0 && k % 8 == 0 && c > 0 && k > 0, "resnet_fused: conv3x3_winograd needs input and output "
              "channels that are multiples of 8, got ", c, " -> ", k, " (use a direct convolution for these)");
  TORCH_CHECK(mode == kNone || mode == kIdentity || mode == kPadA, "resnet_fused: conv3x3_winograd: shortcut mode "
              "must be 0 (none), 1 (identity) or 2 (option A), got ", mode);
  at::Tensor out = new_output(x_in.options(), {n, k, h, w});
  // the shortcut and bias checks of scale_shift_add_relu, against the output's shape
  check_scale_shift_add_relu(out, bias, bias, residual, c10::nullopt, c10::nullopt, mode, res_stride, pad_front);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "resnet_fused: conv3x3_winograd: bias must be float32, got ",
                bias->scalar_type());
  TORCH_CHECK(cpu_supported(), "resnet_fused: conv3x3_winograd needs an x86-64 CPU with AVX2 and FMA");
  const std::string isa = cpu_isa();
  const bool bf16 = weight_t.scalar_type() == at::kBFloat16;  // the bf16 GEMM
  TORCH_CHECK(!bf16 || isa == "avx512_bf16", "resnet_fused: conv3x3_winograd on bfloat16 needs a CPU with "
              "AVX512_BF16 (vdpbf16ps); this CPU (or RESNET_FUSED_CPU_ISA) gives ", isa,
              " (check resnet_fused.ext.winograd_bf16_supported() first)");
  if (out.numel() == 0) return out;
#ifdef RESNET_FUSED_WINOGRAD
  const at::Tensor x = as_nhwc(x_in), U = weight_t.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = mode != kNone ? as_nhwc(*residual) : at::Tensor();
  const bool wide = isa != "avx2";  // the AVX-512 GEMM and transforms
  const GemmFn f32 = wide ? gemm_avx512 : gemm_avx2;
  if (bf16)
    run_winograd<bf16_t, bf16_t>(x, U, gemm_avx512_bf16, wide, b, r, mode, res_stride, pad_front, relu, out);
  else if (x.scalar_type() == at::kBFloat16)  // bf16 activations, fp32 GEMM (F(4x4)'s rounding needs it)
    run_winograd<bf16_t, float>(x, U, f32, wide, b, r, mode, res_stride, pad_front, relu, out);
  else
    run_winograd<float, float>(x, U, f32, wide, b, r, mode, res_stride, pad_front, relu, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("conv3x3_winograd(Tensor x, Tensor weight_t, Tensor? bias, Tensor? residual, int mode, int res_stride, "
        "int pad_front, bool relu) -> Tensor");
  m.def("conv3x3_winograd_supported() -> bool", &cpu_supported);
  m.def("conv3x3_winograd_bf16_supported() -> bool", [] { return cpu_supported() && cpu_isa() == "avx512_bf16"; });
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv3x3_winograd", &conv3x3_winograd_cpu); }

}  // namespace resnet_fused
