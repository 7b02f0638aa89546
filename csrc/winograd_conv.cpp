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
// Layout: x, r and out are NHWC (channels_last) fp32; C and K multiples of 8 (one AVX2 vector of channels).
// Work: blocks of T tiles (T sized so V and M of a block stay in L2) handed out to at::parallel_for's threads;
// per block: input transform -> V[P][T][C], P GEMMs with a 6-tile x 16-channel register tile -> M[P][T][K],
// output transform + epilogue straight into out. Kernels are compiled for AVX2 + FMA (function target attributes);
// the operator refuses CPUs without them, and FusedResNet calls it only where conv3x3_winograd_supported() is true.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "checks.h"
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
#define RF_UNROLL _Pragma("GCC unroll 8")

constexpr int64_t kTileRows = 6;  // tiles per register tile of the GEMM micro-kernel
// V and M of a block (tiles x positions x channels) sized to stay in L2 between the three steps: 192 KB measured
// best of 48/96/192/384 KB for both tile sizes on the 2-core Zen 4 machine (batch 32, 16-64 channels)
constexpr int64_t kBlockBytes = 192 * 1024;

struct Geometry {
  int64_t n, h, w, c, k;   // x: (n, h, w, c) NHWC; out: (n, h, w, k)
  int64_t th, tw, tiles;   // output tiles per column / row, and in all
  int64_t block;           // tiles per block (a multiple of kTileRows)
};

struct Shortcut {
  const float* r = nullptr;
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

// The 1-D transforms of F(m, 3) on 8 channels at a time: input r = B^T d (Alpha values), output o = A^T m (M values).
// Applied to columns then rows they give the 2-D transforms B^T d B and A^T m A.
template <int M>
struct Transform;

template <>
struct Transform<2> {  // F(2, 3): points 0, 1, -1, inf
  static constexpr int kAlpha = 4;
  RF_AVX2 static inline void input(const __m256* d, __m256* r) {
    r[0] = _mm256_sub_ps(d[0], d[2]);
    r[1] = _mm256_add_ps(d[1], d[2]);
    r[2] = _mm256_sub_ps(d[2], d[1]);
    r[3] = _mm256_sub_ps(d[1], d[3]);
  }
  RF_AVX2 static inline void output(const __m256* m, __m256* o) {
    o[0] = _mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]);
    o[1] = _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3]);
  }
};

template <>
struct Transform<4> {  // F(4, 3): points 0, 1, -1, 2, -2, inf
  static constexpr int kAlpha = 6;
  RF_AVX2 static inline void input(const __m256* d, __m256* r) {
    const __m256 four = _mm256_set1_ps(4.f), mfive = _mm256_set1_ps(-5.f), two = _mm256_set1_ps(2.f);
    const __m256 s12 = _mm256_add_ps(d[1], d[2]), s34 = _mm256_add_ps(d[3], d[4]);
    const __m256 d12 = _mm256_sub_ps(d[1], d[2]), d43 = _mm256_sub_ps(d[4], d[3]);
    const __m256 d42 = _mm256_sub_ps(d[4], d[2]), d31 = _mm256_sub_ps(d[3], d[1]);
    r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fmadd_ps(mfive, d[2], d[4]));  // 4 d0 - 5 d2 + d4
    r[1] = _mm256_fnmadd_ps(four, s12, s34);                                // (d3 + d4) - 4 (d1 + d2)
    r[2] = _mm256_fmadd_ps(four, d12, d43);                                 // (d4 - d3) + 4 (d1 - d2)
    r[3] = _mm256_fmadd_ps(two, d31, d42);                                  // (d4 - d2) + 2 (d3 - d1)
    r[4] = _mm256_fnmadd_ps(two, d31, d42);                                 // (d4 - d2) - 2 (d3 - d1)
    r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fmadd_ps(mfive, d[3], d[5])); // 4 d1 - 5 d3 + d5
  }
  RF_AVX2 static inline void output(const __m256* m, __m256* o) {
    const __m256 two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), eight = _mm256_set1_ps(8.f);
    const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
    const __m256 c = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
    o[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);                  // m0 + m1 + m2 + m3 + m4
    o[1] = _mm256_fmadd_ps(two, d, b);                                // (m1 - m2) + 2 (m3 - m4)
    o[2] = _mm256_fmadd_ps(four, c, a);                               // (m1 + m2) + 4 (m3 + m4)
    o[3] = _mm256_add_ps(_mm256_fmadd_ps(eight, d, b), m[5]);         // (m1 - m2) + 8 (m3 - m4) + m5
  }
};

// V[p][i][:] = (B^T d B)[p] for 8 channels of one tile, d[a][b] the patch's pixels (zero outside the image).
template <int M>
RF_AVX2 inline void transform_patch(const __m256 (&d)[Transform<M>::kAlpha][Transform<M>::kAlpha], float* v,
                                    int64_t pos_stride) {
  constexpr int A = Transform<M>::kAlpha;
  __m256 u[A][A], col[A], r[A];
  RF_UNROLL for (int b = 0; b < A; ++b) {  // B^T d, column by column
    RF_UNROLL for (int a = 0; a < A; ++a) col[a] = d[a][b];
    Transform<M>::input(col, r);
    RF_UNROLL for (int a = 0; a < A; ++a) u[a][b] = r[a];
  }
  RF_UNROLL for (int a = 0; a < A; ++a) {  // (B^T d) B, row by row
    Transform<M>::input(u[a], r);
    RF_UNROLL for (int b = 0; b < A; ++b) _mm256_storeu_ps(v + (a * A + b) * pos_stride, r[b]);
  }
}

// V[p][i][:] = (B^T d B)[p] for the tiles t0 .. t0+nt-1 of a block (i = t - t0).
template <int M>
RF_AVX2 void input_transform(const float* x, const Geometry& g, int64_t t0, int64_t nt, float* V) {
  constexpr int A = Transform<M>::kAlpha;
  const int64_t C = g.c, T = g.block, row = g.w * C;
  const __m256 zero = _mm256_setzero_ps();
  TileCursor cur(g, t0);
  for (int64_t i = 0; i < nt; ++i, cur.next(g)) {
    const int64_t ih0 = cur.th * M - 1, iw0 = cur.tw * M - 1;
    float* v = V + i * C;
    __m256 d[A][A];
    if (ih0 >= 0 && ih0 + A <= g.h && iw0 >= 0 && iw0 + A <= g.w) {  // interior: no bounds checks
      const float* p = x + ((cur.n * g.h + ih0) * g.w + iw0) * C;
      for (int64_t c0 = 0; c0 < C; c0 += 8) {
        RF_UNROLL for (int a = 0; a < A; ++a)
          RF_UNROLL for (int b = 0; b < A; ++b) d[a][b] = _mm256_loadu_ps(p + a * row + b * C + c0);
        transform_patch<M>(d, v + c0, T * C);
      }
      continue;
    }
    const float* px[A][A];
    for (int a = 0; a < A; ++a) {
      for (int b = 0; b < A; ++b) {
        const int64_t ih = ih0 + a, iw = iw0 + b;
        px[a][b] = (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x + ((cur.n * g.h + ih) * g.w + iw) * C : nullptr;
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      RF_UNROLL for (int a = 0; a < A; ++a)
        RF_UNROLL for (int b = 0; b < A; ++b) d[a][b] = px[a][b] ? _mm256_loadu_ps(px[a][b] + c0) : zero;
      transform_patch<M>(d, v + c0, T * C);
    }
  }
}

// M (T x K) = V (T x C) @ U (C x K) for one transform position; T a multiple of kTileRows, K of 8.
RF_AVX2 void gemm_position(const float* V, const float* U, float* M, int64_t T, int64_t C, int64_t K) {
  for (int64_t i = 0; i < T; i += kTileRows) {
    const float* a = V + i * C;
    int64_t k0 = 0;
    for (; k0 + 16 <= K; k0 += 16) {
      __m256 acc[kTileRows][2];
      for (int r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_loadu_ps(U + c * K + k0), b1 = _mm256_loadu_ps(U + c * K + k0 + 8);
        for (int r = 0; r < kTileRows; ++r) {
          const __m256 av = _mm256_broadcast_ss(a + r * C + c);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < kTileRows; ++r) {
        _mm256_storeu_ps(M + (i + r) * K + k0, acc[r][0]);
        _mm256_storeu_ps(M + (i + r) * K + k0 + 8, acc[r][1]);
      }
    }
    if (k0 < K) {  // the last 8 channels when K is not a multiple of 16
      __m256 acc[kTileRows];
      for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m256 b0 = _mm256_loadu_ps(U + c * K + k0);
        for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r * C + c), b0, acc[r]);
      }
      for (int r = 0; r < kTileRows; ++r) _mm256_storeu_ps(M + (i + r) * K + k0, acc[r]);
    }
  }
}

// The shortcut's 8 channels k0 .. k0+7 at output pixel (n, oh, ow).
template <int64_t Mode>
RF_AVX2 inline __m256 load_shortcut(const Shortcut& s, int64_t n, int64_t oh, int64_t ow, int64_t h, int64_t w,
                                    int64_t k, int64_t k0) {
  if constexpr (Mode == kIdentity) {
    return _mm256_loadu_ps(s.r + ((n * h + oh) * w + ow) * k + k0);
  } else {  // option A: channel j of y reads channel j - pad_front of r (zero outside [0, rc))
    const float* p = s.r + ((n * s.rh + oh * s.stride) * s.rw + ow * s.stride) * s.rc;
    const int64_t j0 = k0 - s.pad_front;
    if (j0 >= 0 && j0 + 8 <= s.rc) return _mm256_loadu_ps(p + j0);
    if (j0 + 8 <= 0 || j0 >= s.rc) return _mm256_setzero_ps();
    alignas(32) float tmp[8];
    for (int q = 0; q < 8; ++q) tmp[q] = (j0 + q >= 0 && j0 + q < s.rc) ? p[j0 + q] : 0.f;
    return _mm256_load_ps(tmp);
  }
}

// out[tile] = relu?(A^T M A + bias + shortcut) for the tiles t0 .. t0+nt-1 of a block.
template <int M, int64_t Mode, bool Relu>
RF_AVX2 void output_transform(const float* Mt, const Geometry& g, int64_t t0, int64_t nt, const float* bias,
                              const Shortcut& s, float* out) {
  constexpr int A = Transform<M>::kAlpha;
  const int64_t K = g.k, T = g.block;
  const __m256 zero = _mm256_setzero_ps();
  TileCursor cur(g, t0);
  for (int64_t i = 0; i < nt; ++i, cur.next(g)) {
    const int64_t oh0 = cur.th * M, ow0 = cur.tw * M, n = cur.n;
    const int rows = static_cast<int>(std::min<int64_t>(M, g.h - oh0));
    const int cols = static_cast<int>(std::min<int64_t>(M, g.w - ow0));
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      __m256 sa[M][A], col[A], o[M];
      RF_UNROLL for (int b = 0; b < A; ++b) {  // A^T m, column by column
        RF_UNROLL for (int a = 0; a < A; ++a) col[a] = _mm256_loadu_ps(Mt + ((a * A + b) * T + i) * K + k0);
        Transform<M>::output(col, o);
        RF_UNROLL for (int a = 0; a < M; ++a) sa[a][b] = o[a];
      }
      const __m256 bv = bias ? _mm256_loadu_ps(bias + k0) : zero;
      for (int a = 0; a < rows; ++a) {
        const int64_t oh = oh0 + a;
        __m256 y[M];  // (A^T m) A, row a
        Transform<M>::output(sa[a], y);
        for (int b = 0; b < cols; ++b) {
          const int64_t ow = ow0 + b;
          __m256 v = _mm256_add_ps(y[b], bv);
          if constexpr (Mode != kNone) v = _mm256_add_ps(v, load_shortcut<Mode>(s, n, oh, ow, g.h, g.w, K, k0));
          if constexpr (Relu) v = _mm256_max_ps(zero, v);  // maxps returns its 2nd operand for NaN: NaN stays
          _mm256_storeu_ps(out + ((n * g.h + oh) * g.w + ow) * K + k0, v);
        }
      }
    }
  }
}

template <int M, int64_t Mode, bool Relu>
void winograd_forward(const float* x, const float* U, const float* bias, const Shortcut& s, const Geometry& g,
                      float* out) {
  constexpr int P = Transform<M>::kAlpha * Transform<M>::kAlpha;
  const int64_t nblocks = (g.tiles + g.block - 1) / g.block;
  // blocks handed out one at a time (each writes its own tiles: the result does not depend on who computes what),
  // so a thread slowed by another process on its core does not leave the others waiting at the end
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> V(P * g.block * g.c, 0.f), Mt(P * g.block * g.k);  // zeroed: rows past nt stay finite
    for (int64_t blk; (blk = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
      const int64_t t0 = blk * g.block, nt = std::min(g.block, g.tiles - t0);
      input_transform<M>(x, g, t0, nt, V.data());
      for (int p = 0; p < P; ++p)
        gemm_position(V.data() + p * g.block * g.c, U + p * g.c * g.k, Mt.data() + p * g.block * g.k, g.block,
                      g.c, g.k);
      output_transform<M, Mode, Relu>(Mt.data(), g, t0, nt, bias, s, out);
    }
  });
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_supported() { return false; }
#endif

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight_t,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                int64_t mode, int64_t res_stride, int64_t pad_front, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "resnet_fused: conv3x3_winograd: x must be 4-D (N, C, H, W), got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_t.scalar_type() == at::kFloat,
              "resnet_fused: conv3x3_winograd computes in float32, got x ", x_in.scalar_type(), " and weight_t ",
              weight_t.scalar_type());
  TORCH_CHECK(weight_t.device() == x_in.device(), "resnet_fused: conv3x3_winograd: weight_t is on ",
              weight_t.device(), " but x is on ", x_in.device());
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(weight_t.dim() == 3 && (weight_t.size(0) == 16 || weight_t.size(0) == 36) && weight_t.size(1) == c,
              "resnet_fused: conv3x3_winograd: weight_t must be the (16 or 36, C_in=", c, ", C_out) transform from "
              "resnet_fused.ext.winograd_weight, got shape ", weight_t.sizes());
  const int64_t k = weight_t.size(2);
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
  if (out.numel() == 0) return out;
#ifdef RESNET_FUSED_WINOGRAD
  const at::Tensor x = as_nhwc(x_in), U = weight_t.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor(), r;
  Shortcut s;
  s.mode = mode;
  if (mode != kNone) {
    r = as_nhwc(*residual);
    s.r = r.data_ptr<float>();
    s.rc = r.size(1), s.rh = r.size(2), s.rw = r.size(3), s.stride = res_stride, s.pad_front = pad_front;
  }
  const int m = weight_t.size(0) == 36 ? 4 : 2;  // F(4x4, 3x3) or F(2x2, 3x3)
  Geometry g{n, h, w, c, k, (h + m - 1) / m, (w + m - 1) / m, 0, 0};
  g.tiles = n * g.th * g.tw;
  // V (P*T*C) and M (P*T*K) floats of a block in ~kBlockBytes
  const int64_t per_tile = weight_t.size(0) * 4 * (c + k);
  // at least two blocks per thread where the image is small (batch 1), so that every thread has work
  const int64_t per_thread = (g.tiles + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  g.block = std::min(kBlockBytes / per_tile, (per_thread + kTileRows - 1) / kTileRows * kTileRows);
  g.block = std::max<int64_t>(kTileRows, g.block / kTileRows * kTileRows);
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* pu = U.data_ptr<float>();
  const auto run = [&](auto m_c, auto mode_c) {  // tile, shortcut mode and ReLU as template arguments
    constexpr int kM = decltype(m_c)::value;
    constexpr int64_t kMode = decltype(mode_c)::value;
    relu ? winograd_forward<kM, kMode, true>(px, pu, pb, s, g, po)
         : winograd_forward<kM, kMode, false>(px, pu, pb, s, g, po);
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
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("conv3x3_winograd(Tensor x, Tensor weight_t, Tensor? bias, Tensor? residual, int mode, int res_stride, "
        "int pad_front, bool relu) -> Tensor");
  m.def("conv3x3_winograd_supported() -> bool", &cpu_supported);
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv3x3_winograd", &conv3x3_winograd_cpu); }

}  // namespace resnet_fused
