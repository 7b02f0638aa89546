// conv2d_direct: the CPU inference convolutions that Winograd does not take and oneDNN runs badly: the stem of a
// ResNet (1 or 3 input channels; oneDNN 3.x through PyTorch 2.14 ran a 1-channel 3x3 conv at batch 32 ~8x slower
// than at batch 16 in one of two measurements, 1.3x slower than this kernel in the
// other) and, at small batches, the small convolutions (oneDNN's per-call setup, ~60-80 us, dominates there).
//
//     out[n, oh, ow, k] = relu?(bias[k] + sum_{r, q, c} xp[n, oh*s + r, ow*s + q, c] * w[r, q, c, k])
//
// with xp the input zero-padded by `padding` on each side (a copy made per call: the padded row lets the inner loop
// run without bounds checks). The weight comes pre-packed as (KH, KW, C, K) fp32 (resnet_fused.ext.direct_weight,
// cached with the folded weights), so that for one output row the taps (q, c) of a kernel row are contiguous in
// both the padded input row and the weight.
// Register tile: 6 output pixels x 16 output channels (12 AVX2 accumulators), the input broadcast, the weights
// loaded; K a multiple of 8 (the last 8 channels with a 6 x 8 tile). Threads over output rows (n, oh). Inference
// only (no autograd); fp32 arithmetic in the order of the taps. Kernels compiled for AVX2 + FMA (function target
// attributes); the operator refuses CPUs without them (conv3x3_winograd_supported() says whether both run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

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

constexpr int kPixels = 6;  // output pixels per register tile

struct ConvShape {
  int64_t n, c, hp, wp;  // padded input (n, hp, wp, c)
  int64_t k, kh, kw, stride;
  int64_t oh, ow;
};

// Output pixels ow0 .. ow0+NP-1 of row (n, oh), channels k0 .. k0 + 8V - 1: the accumulators are locals of one
// function with compile-time trip counts, so they stay in registers (12 of AVX2's 16).
template <int V, int NP, bool Relu>
RF_AVX2 void conv_tile(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh,
                       int64_t ow0, int64_t k0, float* out) {
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
    const float* wr = w + r * taps * K + k0;
    for (int64_t j = 0; j < taps; ++j) {  // the kernel row's taps (q, c), contiguous in x and w
      __m256 wv[V];
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wr + j * K + v * 8);
#pragma GCC unroll 6
      for (int p = 0; p < NP; ++p) {
        const __m256 a = _mm256_broadcast_ss(x + p * xs + j);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) acc[p][v] = _mm256_fmadd_ps(a, wv[v], acc[p][v]);
      }
    }
  }
  float* o = out + ((n * g.oh + oh) * g.ow + ow0) * K + k0;
#pragma GCC unroll 6
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(o + p * K + v * 8, Relu ? _mm256_max_ps(zero, acc[p][v]) : acc[p][v]);
}

// Channels k0 .. k0 + 8V - 1 of np <= kPixels pixels from ow0 (the pixel count as a template argument).
template <int V, bool Relu>
RF_AVX2 void conv_pixels(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n,
                         int64_t oh, int64_t ow0, int np, int64_t k0, float* out) {
  switch (np) {
    case 6: return conv_tile<V, 6, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
    case 5: return conv_tile<V, 5, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
    case 4: return conv_tile<V, 4, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
    case 3: return conv_tile<V, 3, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
    case 2: return conv_tile<V, 2, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
    default: return conv_tile<V, 1, Relu>(xp, w, bias, g, n, oh, ow0, k0, out);
  }
}

// One output row (n, oh): every pixel, every output channel (maxps(0, NaN) is NaN: NaN stays NaN).
template <bool Relu>
RF_AVX2 void conv_row(const float* xp, const float* w, const float* bias, const ConvShape& g, int64_t n, int64_t oh,
                      float* out) {
  for (int64_t ow0 = 0; ow0 < g.ow; ow0 += kPixels) {
    const int np = static_cast<int>(std::min<int64_t>(kPixels, g.ow - ow0));
    int64_t k0 = 0;
    for (; k0 + 16 <= g.k; k0 += 16) conv_pixels<2, Relu>(xp, w, bias, g, n, oh, ow0, np, k0, out);
    if (k0 < g.k) conv_pixels<1, Relu>(xp, w, bias, g, n, oh, ow0, np, k0, out);
  }
}

template <bool Relu>
void direct_forward(const float* xp, const float* w, const float* bias, const ConvShape& g, float* out) {
  const int64_t rows = g.n * g.oh;
  const int64_t work = g.ow * g.k * g.kh * g.kw * g.c;  // multiply-adds per row
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) conv_row<Relu>(xp, w, bias, g, i / g.oh, i % g.oh, out);
  });
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_supported() { return false; }
#endif

at::Tensor conv2d_direct_cpu(const at::Tensor& x_in, const at::Tensor& weight_p, const c10::optional<at::Tensor>& bias,
                             int64_t stride, int64_t padding, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "resnet_fused: conv2d_direct: x must be 4-D (N, C, H, W), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_p.scalar_type() == at::kFloat,
              "resnet_fused: conv2d_direct computes in float32, got x ", x_in.scalar_type(), " and weight_p ",
              weight_p.scalar_type());
  TORCH_CHECK(weight_p.device() == x_in.device(), "resnet_fused: conv2d_direct: weight_p is on ", weight_p.device(),
              " but x is on ", x_in.device());
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(weight_p.dim() == 4 && weight_p.size(2) == c, "resnet_fused: conv2d_direct: weight_p must be the "
              "(KH, KW, C_in=", c, ", C_out) packing from resnet_fused.ext.direct_weight, got shape ",
              weight_p.sizes());
  const int64_t kh = weight_p.size(0), kw = weight_p.size(1), k = weight_p.size(3);
  TORCH_CHECK(k > 0 && k % 8 == 0, "resnet_fused: conv2d_direct needs output channels that are a multiple of 8, got ",
              k);
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
  TORCH_CHECK(cpu_supported(), "resnet_fused: conv2d_direct needs an x86-64 CPU with AVX2 and FMA");
  at::Tensor out = new_output(x_in.options(), {n, k, oh, ow});
  if (out.numel() == 0) return out;
#ifdef RESNET_FUSED_DIRECT
  // (n, hp, wp, c) zero-padded copy of x, so that every tap reads inside it
  at::Tensor xp = at::empty({n, hp, wp, c}, x_in.options());
  xp.narrow(1, padding, h).narrow(2, padding, w).copy_(x_in.permute({0, 2, 3, 1}));
  if (padding > 0) {  // only the border is zeroed (the 224x224 stem's input is 20 MB at batch 32)
    xp.narrow(1, 0, padding).zero_();
    xp.narrow(1, padding + h, padding).zero_();
    xp.narrow(2, 0, padding).zero_();
    xp.narrow(2, padding + w, padding).zero_();
  }
  const at::Tensor wt = weight_p.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const ConvShape g{n, c, hp, wp, k, kh, kw, stride, oh, ow};
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  (relu ? direct_forward<true> : direct_forward<false>)(xp.data_ptr<float>(), wt.data_ptr<float>(), pb, g,
                                                        out.data_ptr<float>());
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("conv2d_direct(Tensor x, Tensor weight_p, Tensor? bias, int stride, int padding, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv2d_direct", &conv2d_direct_cpu); }

}  // namespace resnet_fused
