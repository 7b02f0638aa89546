// CUDA implementations of the resnet_fused operators (schemas and the math: csrc/resnet_fused.cpp).
//
// Activations are NHWC rows [P, C] (channels_last used in place, other layouts converted once). Reductions are
// deterministic: fixed chunks of kRowsPerChunk rows produce per-chunk partials (one thread per channel walks its chunk, so
// a warp reads consecutive channels of a row: coalesced), then a second small kernel (or at::sum over the chunk
// axis) combines them in a fixed order. No float atomics. Everything launches on the current stream of the
// tensor's device, and nothing reads back to the host (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../layout.h"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;

// A per-channel vector in the accumulation dtype, or an empty tensor (nullptr in the kernel) when absent.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

dim3 chunk_grid(int64_t chunks, int64_t c) { return dim3(static_cast<unsigned>(chunks), (c + 31) / 32); }

// ---- bn_stats --------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_chunk_kernel(acc_t* __restrict__ cmean, acc_t* __restrict__ cm2,
                                      const scalar_t* __restrict__ x, int64_t p, int64_t c) {
  const int64_t j = blockIdx.y * 32 + threadIdx.x;
  const int64_t k = blockIdx.x;
  if (j >= c) return;
  const int64_t r0 = k * kRowsPerChunk, r1 = min(p, r0 + kRowsPerChunk);
  acc_t s = 0;
  for (int64_t r = r0; r < r1; ++r) s += static_cast<acc_t>(x[r * c + j]);
  const acc_t m = s / static_cast<acc_t>(r1 - r0);
  acc_t m2 = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t d = static_cast<acc_t>(x[r * c + j]) - m;
    m2 += d * d;
  }
  cmean[k * c + j] = m;
  cm2[k * c + j] = m2;
}

template <typename acc_t>
__global__ void bn_stats_merge_kernel(acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                      const acc_t* __restrict__ cmean, const acc_t* __restrict__ cm2, int64_t p,
                                      int64_t c, int64_t chunks) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= c) return;
  acc_t n_a = 0, mean_a = 0, m2_a = 0;
  for (int64_t k = 0; k < chunks; ++k) {  // Chan's parallel formula, in chunk order
    const acc_t n_b = static_cast<acc_t>(min(p, (k + 1) * kRowsPerChunk) - k * kRowsPerChunk);
    const acc_t n = n_a + n_b;
    const acc_t delta = cmean[k * c + j] - mean_a;
    mean_a += delta * n_b / n;
    m2_a += cm2[k * c + j] + delta * delta * n_a * n_b / n;
    n_a = n;
  }
  mean[j] = mean_a;
  var[j] = m2_a / static_cast<acc_t>(p);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in) {
  check_4d_float(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_nhwc(x_in);
  const int64_t c = x.size(1), p = c ? x.numel() / c : 0;
  TORCH_CHECK(p > 0, "resnet_fused: bn_stats needs at least one value per channel, got shape ", x.sizes());
  const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
  auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({c}, opts), var = at::empty({c}, opts);
  at::Tensor cmean = at::empty({chunks, c}, opts), cm2 = at::empty({chunks, c}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_stats_chunk_kernel<scalar_t, acc_t><<<chunk_grid(chunks, c), 32, 0, stream>>>(
        cmean.data_ptr<acc_t>(), cm2.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), p, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_stats_merge_kernel<acc_t><<<(c + 127) / 128, 128, 0, stream>>>(
        mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), cmean.data_ptr<acc_t>(), cm2.data_ptr<acc_t>(), p, c, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

template <typename scalar_t, typename acc_t>
__global__ void affine_per_channel_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n,
                                          int64_t c) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % c;
    out[i] = static_cast<scalar_t>(a[j] + b[j] * static_cast<acc_t>(x[i]));
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

at::Tensor bn_stats_backward_cuda(const c10::optional<at::Tensor>& grad_mean,
                                  const c10::optional<at::Tensor>& grad_var, const at::Tensor& x_in,
                                  const at::Tensor& mean) {
  check_4d_float(x_in, "x");
  const int64_t c = x_in.size(1);
  check_channel_vector(grad_mean, x_in, c, "grad_mean");
  check_channel_vector(grad_var, x_in, c, "grad_var");
  check_channel_vector(mean, x_in, c, "mean");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_nhwc(x_in);
  const double p = static_cast<double>(x.numel() / c);
  auto opts = x.options().dtype(acc_dtype(x));
  // dx = a + b * x with b = 2 gv / P, a = gm / P - b * mean (tiny per-channel vectors)
  at::Tensor b = grad_var.has_value() ? grad_var->to(acc_dtype(x)) * (2.0 / p) : at::zeros({c}, opts);
  at::Tensor a = (grad_mean.has_value() ? grad_mean->to(acc_dtype(x)) / p : at::zeros({c}, opts)) -
                 b * mean.to(acc_dtype(x));
  a = a.contiguous();
  b = b.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return in_layout_of(dx, x_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    affine_per_channel_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dx.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), n, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_layout_of(dx, x_in);
}

// ---- bn_finalize -----------------------------------------------------------------------------------------------

template <typename acc_t, typename run_t>
__global__ void bn_finalize_kernel(acc_t* __restrict__ invstd, run_t* __restrict__ rm, run_t* __restrict__ rv,
                                   int64_t* __restrict__ nbt, const acc_t* __restrict__ mean,
                                   const acc_t* __restrict__ var, int64_t c, int64_t count, double momentum,
                                   bool cumulative, double eps) {
  // launched as exactly ONE block (<<<1, ...>>> below): every thread reads num_batches_tracked before the
  // __syncthreads and thread 0 bumps it after; with several blocks a block could read the bumped count
  const int64_t next = *nbt + 1;
  __syncthreads();
  const double f = cumulative ? 1.0 / static_cast<double>(next) : momentum;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    rm[j] = static_cast<run_t>((1.0 - f) * static_cast<double>(rm[j]) + f * static_cast<double>(mean[j]));
    rv[j] = static_cast<run_t>((1.0 - f) * static_cast<double>(rv[j]) + f * unbias * static_cast<double>(var[j]));
    invstd[j] = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(var[j]) + eps));
  }
  if (threadIdx.x == 0) *nbt = next;
}

at::Tensor bn_finalize_cuda(const at::Tensor& mean, const at::Tensor& var, at::Tensor& running_mean,
                            at::Tensor& running_var, at::Tensor& num_batches_tracked, int64_t count, double momentum,
                            bool cumulative, double eps) {
  check_bn_finalize(mean, var, running_mean, running_var, num_batches_tracked, count);
  const int64_t c = mean.numel();
  c10::cuda::CUDAGuard guard(mean.device());
  const auto acc = mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  at::Tensor invstd = at::empty({c}, m.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_finalize_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_finalize_run", [&] {
      bn_finalize_kernel<acc_t, scalar_t><<<1, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
          invstd.data_ptr<acc_t>(), running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
          num_batches_tracked.data_ptr<int64_t>(), m.data_ptr<acc_t>(), v.data_ptr<acc_t>(), c, count, momentum,
          cumulative, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return invstd;
}

// ---- scale_shift_add_relu --------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void scale_shift_add_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                            const acc_t* __restrict__ sc, const acc_t* __restrict__ sh,
                                            const scalar_t* __restrict__ r, const acc_t* __restrict__ rs,
                                            const acc_t* __restrict__ rt, int64_t n, int64_t c, int64_t h, int64_t w,
                                            int64_t rc, int64_t rh, int64_t rw, int64_t mode, int64_t stride,
                                            int64_t pad_front, bool relu) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % c;
    acc_t v = static_cast<acc_t>(y[i]);
    if (sc != nullptr) v = v * sc[j] + sh[j];
    if (mode == kIdentity) {
      v += static_cast<acc_t>(r[i]);
    } else if (mode == kProjB) {
      v += static_cast<acc_t>(r[i]) * rs[j] + rt[j];
    } else if (mode == kPadA) {
      const int64_t jr = j - pad_front;
      if (jr >= 0 && jr < rc) {
        const int64_t row = i / c;
        const int64_t b = row / (h * w), hh = (row / w) % h, ww = row % w;
        v += static_cast<acc_t>(r[((b * rh + hh * stride) * rw + ww * stride) * rc + jr]);
      }
    }
    out[i] = static_cast<scalar_t>(relu && v <= acc_t(0) ? acc_t(0) : v);  // NaN stays NaN (torch.relu)
  }
}

at::Tensor scale_shift_add_relu_cuda(const at::Tensor& y_in, const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                                     const c10::optional<at::Tensor>& res_scale,
                                     const c10::optional<at::Tensor>& res_shift, int64_t mode, int64_t res_stride,
                                     int64_t pad_front, bool relu) {
  check_scale_shift_add_relu(y_in, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front);
  c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = as_nhwc(y_in);
  const at::Tensor r = mode != kNone ? as_nhwc(*residual) : y;
  at::Tensor sc = channel_vec(scale, y), sh = channel_vec(shift, y);
  at::Tensor rs = channel_vec(res_scale, y), rt = channel_vec(res_shift, y);
  at::Tensor out = at::empty_like(y);
  const int64_t n = y.numel();
  if (n == 0) return in_layout_of(out, y_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "scale_shift_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_shift_add_relu_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null<acc_t>(sc), ptr_or_null<acc_t>(sh),
        r.data_ptr<scalar_t>(), ptr_or_null<acc_t>(rs), ptr_or_null<acc_t>(rt), n, y.size(1), y.size(2), y.size(3),
        r.size(1), r.size(2), r.size(3), mode, res_stride, pad_front, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_layout_of(out, y_in);
}

template <typename scalar_t, typename acc_t>
__global__ void scale_shift_add_relu_backward_kernel(
    scalar_t* __restrict__ gy, scalar_t* __restrict__ gr, acc_t* __restrict__ part, const scalar_t* __restrict__ go,
    const scalar_t* __restrict__ out, const scalar_t* __restrict__ y, const acc_t* __restrict__ sc,
    const scalar_t* __restrict__ r, const acc_t* __restrict__ rs, int64_t p, int64_t c, int64_t mode, bool relu) {
  const int64_t j = blockIdx.y * 32 + threadIdx.x;
  const int64_t k = blockIdx.x;
  if (j >= c) return;
  acc_t s_gy = 0, s_g = 0, s_gr = 0;
  const acc_t scale = sc != nullptr ? sc[j] : acc_t(1);
  const acc_t rscale = rs != nullptr ? rs[j] : acc_t(1);
  for (int64_t row = k * kRowsPerChunk; row < min(p, (k + 1) * kRowsPerChunk); ++row) {
    const int64_t i = row * c + j;
    acc_t g = static_cast<acc_t>(go[i]);
    if (relu && static_cast<acc_t>(out[i]) <= acc_t(0)) g = 0;  // threshold_backward's mask
    gy[i] = static_cast<scalar_t>(g * scale);
    s_gy += g * static_cast<acc_t>(y[i]);
    s_g += g;
    if (mode == kProjB) {
      s_gr += g * static_cast<acc_t>(r[i]);
      gr[i] = static_cast<scalar_t>(g * rscale);
    } else if (mode != kNone) {
      gr[i] = static_cast<scalar_t>(g);
    }
  }
  part[(k * 3 + 0) * c + j] = s_gy;
  part[(k * 3 + 1) * c + j] = s_g;
  part[(k * 3 + 2) * c + j] = s_gr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scale_shift_add_relu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& y_in,
                                   const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& residual,
                                   const c10::optional<at::Tensor>& res_scale, int64_t mode, int64_t res_stride,
                                   int64_t pad_front, bool relu) {
  check_scale_shift_add_relu(y_in, scale, scale, residual, res_scale, res_scale, mode, res_stride, pad_front);
  check_grad_like(grad_out_in, out_in, y_in);
  c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor go = as_nhwc(grad_out_in), out = as_nhwc(out_in), y = as_nhwc(y_in);
  const at::Tensor r = mode == kProjB ? as_nhwc(*residual) : y;
  at::Tensor sc = channel_vec(scale, y), rs = channel_vec(res_scale, y);
  const int64_t c = y.size(1), p = c ? y.numel() / c : 0;
  const int64_t chunks = std::max<int64_t>(1, (p + kRowsPerChunk - 1) / kRowsPerChunk);
  const auto acc = acc_dtype(y);
  at::Tensor gy = at::empty_like(y);
  at::Tensor gr = mode != kNone ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor part = at::zeros({chunks, 3, c}, y.options().dtype(acc));
  if (p > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "scale_shift_add_relu_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scale_shift_add_relu_backward_kernel<scalar_t, acc_t>
          <<<chunk_grid(chunks, c), 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
              gy.data_ptr<scalar_t>(), mode != kNone ? gr.data_ptr<scalar_t>() : nullptr, part.data_ptr<acc_t>(),
              go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null<acc_t>(sc),
              r.data_ptr<scalar_t>(), ptr_or_null<acc_t>(rs), p, c, mode, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor sums = part.sum(0);
  auto [g_res, g_rs, g_rt] = shortcut_grads(gr, sums, residual, mode, res_stride, pad_front);
  return {in_layout_of(gy, y_in), sums[0].clone(), sums[1].clone(), g_res, g_rs, g_rt};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_stats_backward", &bn_stats_backward_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("scale_shift_add_relu", &scale_shift_add_relu_cuda);
  m.impl("scale_shift_add_relu_backward", &scale_shift_add_relu_backward_cuda);
}

}  // namespace resnet_fused
