// conv2d_direct: the CPU inference convolutions that Winograd does not take and oneDNN runs badly: the stem of a
// ResNet (1 or 3 input channels; oneDNN 3.x through PyTorch 2.14 ran a 1-channel 3x3 conv at batch 32 ~8x slower
// than at batch 16 in one of two measurements, 1.3x slower than this kernel in the
// other) and the small strided convolutions (oneDNN's per-call setup, ~60-80 us, dominates at small batches).
//
//     out[n, oh, ow, k] = relu?(bias[k] + sum_{r, q, c} xp[n, oh*s + r, ow*s + q, c] * w[r, q, c, k]
//                               + res?[n, oh, ow, k])
//
// (res: an optional shortcut shaped like the output, added before the ReLU as a block's last convolution needs it),
// with xp the input zero-padded by `padding` on each side (a copy made per call: the padded row lets the inner loop
// run without bounds checks). The weight comes pre-packed as (K/8, KH, KW, C, 8) fp32 (resnet_fused.ext.direct_weight,
// cached with the folded weights): per block of 8 output channels, for one output row the taps (q, c) of a kernel
// row are contiguous in both the padded input row and the weight, and a chunk of output channels reads its weights
// as a few sequential streams (with (KH, KW, C, K) a 32-channel chunk of a 512-channel layer read 128 bytes of every
// 2 KB: 2.3 ms per 512x512 3x3 layer at batch 1, 7x7, against 0.95 ms with its weights cached). fp32 arithmetic in
// the order of the taps; inference only (no autograd).
// Two paths, picked at run time (cpu_isa.h; RESNET_FUSED_CPU_ISA forces the lower one), both with the input value
// broadcast and the weights loaded, threads over (output row, channel chunk):
//   AVX2 + FMA: 6 output pixels x 16 output channels (12 ymm accumulators); K a multiple of 8 (the last 8 channels
//               with a 6 x 8 tile);
//   AVX-512:    up to 28 zmm accumulators: 28 pixels x 16 channels or 14 pixels x 32 channels (a vector's two
//               8-channel blocks loaded apart and joined; the second masked off past K), a row's pixels split into equal tiles (a
//               7-pixel row is one 7-pixel tile, not 6 + 1): every pixel count its own instantiation, so the
//               accumulators stay in registers. 2.4-4x fewer instructions per multiply-add than the AVX2 tile.
// Both store maxps(0, acc) for the ReLU: maxps(0, NaN) is NaN, NaN stays NaN. The operator refuses CPUs without AVX2
// and FMA (conv3x3_winograd_supported() says whether both CPU operators run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "cpu_isa.h"
#include "layout.h"
#include "output_cache.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RESNET_FUSED_DIRECT 1
#endif

namespace resnet_fused {
namespace {

#ifdef RESNET_FUSED_DIRECT
#define RF_AVX2 __attribute__((target("avx2,fma")))
#define RF_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define RF_UNROLL_ALL _Pragma("GCC unroll 32")

constexpr int kPixels = 6;  // output pixels per register tile

struct ConvShape {
  int64_t n, c, hp, wp;  // padded input (n, hp, wp, c)
  int64_t k, kh, kw, stride;
  int64_t oh, ow;
  // the weight of output channels 8b .. 8b + 7 starts at w + b * block: (KH, KW, C, 8) each, contiguous
  int64_t block() const { return kh * kw * c * 8; }
};

// Output pixels ow0 .. ow0+NP-1 of row (n, oh), channels k0 .. k0 + 8V - 1: the accumulators are locals of one
// function with compile-time trip counts, so they stay in registers (12 of AVX2's 16).
template <int V, int NP, bool Relu>
RF_AVX2 void conv_tile(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh,
                       int64_t ow0, int64_t k0, const float* res, float* out) {
  const int64_t taps = g.kw * g.c, K = g.k, xs = g.stride * g.c;
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[NP][V];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) {
    const __m256 b = bias ? _mm256_loadu_ps(bias + k0 + v * 8) : zero;
#pragma GCC unroll 6
    for (int p = 0; p < NP; ++p) acc[p][v] = b;
  }
  for (int64_t r = 0; r < g.kh; ++r) {
    const float* x = xp + ((n * g.hp + oh * g.stride + r) * g.wp + ow0 * g.stride) * g.c;
    const float* wr = w + (k0 / 8) * g.block() + r * taps * 8;
    for (int64_t j = 0; j < taps; ++j) {  // the kernel row's taps (q, c), contiguous in x and w
      __m256 wv[V];
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wr + v * g.block() + j * 8);
#pragma GCC unroll 6
      for (int p = 0; p < NP; ++p) {
        const __m256 a = _mm256_broadcast_ss(x + p * xs + j);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) acc[p][v] = _mm256_fmadd_ps(a, wv[v], acc[p][v]);
      }
    }
  }
  const int64_t at = ((n * g.oh + oh) * g.ow + ow0) * K + k0;
  if (res) {
#pragma GCC unroll 6
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[p][v] = _mm256_add_ps(acc[p][v], _mm256_loadu_ps(res + at + p * K + v * 8));
  }
  float* o = out + at;
#pragma GCC unroll 6
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(o + p * K + v * 8, Relu ? _mm256_max_ps(zero, acc[p][v]) : acc[p][v]);
}

// Channels k0 .. k0 + 8V - 1 of np <= kPixels pixels from ow0 (the pixel count as a template argument).
template <int V, bool Relu>
RF_AVX2 void conv_pixels(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n,
                         int64_t oh, int64_t ow0, int np, int64_t k0, const float* res, float* out) {
  switch (np) {
    case 6: return conv_tile<V, 6, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
    case 5: return conv_tile<V, 5, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
    case 4: return conv_tile<V, 4, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
    case 3: return conv_tile<V, 3, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
    case 2: return conv_tile<V, 2, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
    default: return conv_tile<V, 1, Relu>(xp, w, bias, g, n, oh, ow0, k0, res, out);
  }
}

// One output row (n, oh): every pixel, every output channel (maxps(0, NaN) is NaN: NaN stays NaN).
template <bool Relu>
RF_AVX2 void conv_row(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh,
                      const float* res, float* out) {
  for (int64_t ow0 = 0; ow0 < g.ow; ow0 += kPixels) {
    const int np = static_cast<int>(std::min<int64_t>(kPixels, g.ow - ow0));
    int64_t k0 = 0;
    for (; k0 + 16 <= g.k; k0 += 16) conv_pixels<2, Relu>(xp, w, bias, g, n, oh, ow0, np, k0, res, out);
    if (k0 < g.k) conv_pixels<1, Relu>(xp, w, bias, g, n, oh, ow0, np, k0, res, out);
  }
}

// ---- AVX-512 --------------------------------------------------------------------------------------------------

constexpr int kAcc512 = 28;  // zmm accumulators per tile (+ NV weight vectors + 1 broadcast: at most 31 of 32)

// NP pixels from ow0 of row (n, oh), channels k0 .. k0 + 16 NV - 1 (mask[v]: the channels of vector v that exist).
template <int NV, int NP>
RF_AVX512 void tile512(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh,
                       int64_t ow0, int64_t k0, const __mmask16* mask, bool relu, const float* res, float* out) {
  const int64_t taps = g.kw * g.c, K = g.k, xs = g.stride * g.c;
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc[NP][NV];
  RF_UNROLL_ALL for (int v = 0; v < NV; ++v) {
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask[v], bias + k0 + 16 * v) : zero;
    RF_UNROLL_ALL for (int p = 0; p < NP; ++p) acc[p][v] = b;
  }
  for (int64_t r = 0; r < g.kh; ++r) {
    const float* x = xp + ((n * g.hp + oh * g.stride + r) * g.wp + ow0 * g.stride) * g.c;
    const float* wr = w + (k0 / 8) * g.block() + r * taps * 8;
    for (int64_t j = 0; j < taps; ++j) {
      __m512 wv[NV];  // 16 channels from two 8-channel blocks (the second absent past K: masked)
      RF_UNROLL_ALL for (int v = 0; v < NV; ++v) {
        const float* wj = wr + 2 * v * g.block() + j * 8;
        const __m256 lo = _mm256_loadu_ps(wj), hi = _mm256_maskz_loadu_ps(mask[v] >> 8, wj + g.block());
        wv[v] = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      }
      RF_UNROLL_ALL for (int p = 0; p < NP; ++p) {
        const __m512 a = _mm512_set1_ps(x[p * xs + j]);
        RF_UNROLL_ALL for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_fmadd_ps(a, wv[v], acc[p][v]);
      }
    }
  }
  const int64_t at = ((n * g.oh + oh) * g.ow + ow0) * K + k0;
  if (res) {
    RF_UNROLL_ALL for (int p = 0; p < NP; ++p)
      RF_UNROLL_ALL for (int v = 0; v < NV; ++v)
        acc[p][v] = _mm512_add_ps(acc[p][v], _mm512_maskz_loadu_ps(mask[v], res + at + p * K + 16 * v));
  }
  float* o = out + at;
  RF_UNROLL_ALL for (int p = 0; p < NP; ++p)
    RF_UNROLL_ALL for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(o + p * K + 16 * v, mask[v],
                            relu ? _mm512_maskz_max_ps(mask[v], zero, acc[p][v]) : acc[p][v]);
}

using Tile512 = void (*)(const float*, const float*, const float*, const ConvShape&, int64_t, int64_t, int64_t,
                         int64_t, const __mmask16*, bool, const float*, float*);

// tile512<NV, 1 .. kAcc512 / NV>, indexed by the pixel count - 1
template <int NV, int... P>
constexpr std::array<Tile512, sizeof...(P)> tiles512(std::integer_sequence<int, P...>) {
  return {&tile512<NV, P + 1>...};
}
constexpr auto kTiles512x1 = tiles512<1>(std::make_integer_sequence<int, kAcc512>{});
constexpr auto kTiles512x2 = tiles512<2>(std::make_integer_sequence<int, kAcc512 / 2>{});

// Row (n, oh), channels k0 .. k0 + kc - 1 (kc <= 32): the row's pixels in tiles of equal size (the largest that
// keeps the accumulators in registers, then evened out), the last one shorter where they do not divide.
void row512(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh, int64_t k0,
            int64_t kc, bool relu, const float* res, float* out) {
  const int nv = kc > 16 ? 2 : 1;
  const __mmask16 mask[2] = {static_cast<__mmask16>(kc >= 16 ? 0xffff : (1u << kc) - 1),
                             static_cast<__mmask16>(kc >= 32 ? 0xffff : kc > 16 ? (1u << (kc - 16)) - 1 : 0)};
  const int64_t most = kAcc512 / nv, count = (g.ow + most - 1) / most, np = (g.ow + count - 1) / count;
  for (int64_t ow0 = 0; ow0 < g.ow; ow0 += np) {
    const int64_t p = std::min(np, g.ow - ow0);
    const Tile512 tile = nv == 2 ? kTiles512x2[p - 1] : kTiles512x1[p - 1];
    tile(xp, w, bias, g, n, oh, ow0, k0, mask, relu, res, out);
  }
}

// ---- threads ---------------------------------------------------------------------------------------------------

// Work items: (output row, chunk of 32 channels) for AVX-512, output rows for AVX2 (its tiles walk all K). Where
// the weights outweigh the input (the last stages of a torchvision ResNet at small batches: 9.4 MB of weights for a
// 100 KB input at 512 channels, 7x7, batch 1) the items run chunk by chunk, so that a chunk's weights are read from
// memory once and from the cache for every row; elsewhere row by row (a row's input stays cached for every chunk).
void direct_forward(const float* xp, const float* w, const float* bias, const float* res, const ConvShape& g,
                    bool wide, bool relu, float* out) {
  const int64_t rows = g.n * g.oh, chunks = wide ? (g.k + 31) / 32 : 1;
  const bool chunk_major = g.kh * g.kw * g.k > g.n * g.hp * g.wp;  // weight bytes > input bytes (both x C)
  const int64_t work = g.ow * std::min<int64_t>(g.k, wide ? 32 : g.k) * g.kh * g.kw * g.c;  // multiply-adds per item
  at::parallel_for(0, rows * chunks, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work)),
                   [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t row = chunk_major ? i % rows : i / chunks, chunk = chunk_major ? i / rows : i % chunks;
      const int64_t n = row / g.oh, oh = row % g.oh;
      if (wide) {
        const int64_t k0 = chunk * 32;
        row512(xp, w, bias, g, n, oh, k0, std::min<int64_t>(32, g.k - k0), relu, res, out);
      } else {
        (relu ? conv_row<true> : conv_row<false>)(xp, w, bias, g, n, oh, res, out);
      }
    }
  });
}

// The zero-padded NHWC copy of x (only the border zeroed: the 224x224 stem's input is 20 MB at batch 32), rows
// copied in parallel; x itself (NHWC) without padding.
at::Tensor padded_nhwc(const at::Tensor& x_in, int64_t padding) {
  const at::Tensor x = as_nhwc(x_in);
  if (padding == 0) return x;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hp = h + 2 * padding,
                wp = w + 2 * padding;
  at::Tensor xp = at::empty({n, hp, wp, c}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  const int64_t row_bytes = w * c * static_cast<int64_t>(sizeof(float)), pad_bytes = padding * c * sizeof(float);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, wp * c));
  at::parallel_for(0, n * hp, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t img = i / hp, y = i % hp - padding;
      float* d = dst + i * wp * c;
      if (y < 0 || y >= h) {
        std::memset(d, 0, wp * c * sizeof(float));
        continue;
      }
      std::memset(d, 0, pad_bytes);
      std::memcpy(d + padding * c, src + (img * h + y) * w * c, row_bytes);
      std::memset(d + (padding + w) * c, 0, pad_bytes);
    }
  });
  return xp;
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_supported() { return false; }
#endif

at::Tensor conv2d_direct_cpu(const at::Tensor& x_in, const at::Tensor& weight_p, const c10::optional<at::Tensor>& bias,
                             int64_t stride, int64_t padding, bool relu, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4, "resnet_fused: conv2d_direct: x must be 4-D (N, C, H, W), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_p.scalar_type() == at::kFloat,
              "resnet_fused: conv2d_direct computes in float32, got x ", x_in.scalar_type(), " and weight_p ",
              weight_p.scalar_type());
  TORCH_CHECK(weight_p.device() == x_in.device(), "resnet_fused: conv2d_direct: weight_p is on ", weight_p.device(),
              " but x is on ", x_in.device());
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(weight_p.dim() == 5 && weight_p.size(3) == c && weight_p.size(4) == 8 && weight_p.size(0) > 0,
              "resnet_fused: conv2d_direct: weight_p must be the (C_out/8, KH, KW, C_in=", c, ", 8) packing from "
              "resnet_fused.ext.direct_weight, got shape ", weight_p.sizes());
  const int64_t kh = weight_p.size(1), kw = weight_p.size(2), k = weight_p.size(0) * 8;
  TORCH_CHECK(stride >= 1 && padding >= 0, "resnet_fused: conv2d_direct: stride must be >= 1 and padding >= 0, got "
              "stride ", stride, ", padding ", padding);
  const int64_t hp = h + 2 * padding, wp = w + 2 * padding;
  TORCH_CHECK(hp >= kh && wp >= kw, "resnet_fused: conv2d_direct: the padded input (", hp, "x", wp,
              ") is smaller than the kernel (", kh, "x", kw, ")");
  const int64_t oh = (hp - kh) / stride + 1, ow = (wp - kw) / stride + 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == k && bias->scalar_type() == at::kFloat &&
                bias->device() == x_in.device(), "resnet_fused: conv2d_direct: bias must be a float32 vector of ",
                "one value per output channel (", k, ") on ", x_in.device(), ", got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device() == x_in.device() &&
                residual->sizes() == at::IntArrayRef({n, k, oh, ow}), "resnet_fused: conv2d_direct: residual must be "
                "a float32 tensor shaped like the output (", n, ", ", k, ", ", oh, ", ", ow, ") on ", x_in.device(),
                ", got ", residual->scalar_type(), " ", residual->sizes(), " on ", residual->device());
  }
  TORCH_CHECK(cpu_supported(), "resnet_fused: conv2d_direct needs an x86-64 CPU with AVX2 and FMA");
  at::Tensor out = new_output(x_in.options(), {n, k, oh, ow});
  if (out.numel() == 0) return out;
#ifdef RESNET_FUSED_DIRECT
  const at::Tensor xp = padded_nhwc(x_in, padding);
  const at::Tensor wt = weight_p.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const ConvShape g{n, c, hp, wp, k, kh, kw, stride, oh, ow};
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const at::Tensor r = residual.has_value() ? as_nhwc(*residual) : at::Tensor();
  const bool wide = cpu_isa().rfind("avx512", 0) == 0;  // the AVX-512 tiles
  direct_forward(xp.data_ptr<float>(), wt.data_ptr<float>(), pb, r.defined() ? r.data_ptr<float>() : nullptr, g, wide,
                 relu, out.data_ptr<float>());
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("conv2d_direct(Tensor x, Tensor weight_p, Tensor? bias, int stride, int padding, bool relu, "
        "Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv2d_direct", &conv2d_direct_cpu); }

}  // namespace resnet_fused
