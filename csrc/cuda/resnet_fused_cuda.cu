// CUDA operators of resnet_fused: the host side (checks, layouts, launches on the current stream of the tensor's
// device; the schemas and the math: csrc/resnet_fused.cpp). The kernels are in bn_kernels.cuh.
//
// Activations are NHWC rows [P, C] (channels_last used in place, other layouts converted once). Reductions are
// deterministic: fixed chunks of kRowsPerChunk rows give per-chunk partials (a block of 32 channels x 8 row groups per
// chunk, merged in a fixed order), then a tree merge kernel (bn_stats) or at::sum over the chunk axis combines them.
// No float atomics, and nothing reads back to the host (CUDA-graph capturable). Elementwise kernels move 16 bytes per
// thread and step where the channels and pointers allow, with 32-bit indices where the sizes allow (checked).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../layout.h"
#include "bn_kernels.cuh"

namespace resnet_fused {
namespace {

using kernels::kThreads;

// A per-channel vector in the accumulation dtype, or an empty tensor (nullptr in the kernel) when absent.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The chunked reductions' grid (kernels::chunk_grid), with its x dimension checked.
dim3 checked_chunk_grid(int64_t chunks, int64_t c) {
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "resnet_fused: too many rows for one launch (",
              chunks * kRowsPerChunk, ")");
  return kernels::chunk_grid(chunks, c);
}

// ---- bn_stats --------------------------------------------------------------------------------------------------

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
    kernels::bn_stats_chunk_kernel<scalar_t, acc_t><<<checked_chunk_grid(chunks, c), kThreads, 0, stream>>>(
        cmean.data_ptr<acc_t>(), cm2.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), p, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kernels::bn_stats_merge_kernel<acc_t><<<kernels::channel_blocks(c), kThreads, 0, stream>>>(
        mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), cmean.data_ptr<acc_t>(), cm2.data_ptr<acc_t>(), p, c, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// out = relu?(y * sc + sh + shortcut) with the launch plan of plan_elementwise (r: the residual, or y when absent).
template <typename scalar_t, typename acc_t>
void launch_scale_shift_add_relu(at::Tensor& out, const at::Tensor& y, const at::Tensor& sc, const at::Tensor& sh,
                                 const at::Tensor& r, const at::Tensor& rs, const at::Tensor& rt, int64_t mode,
                                 int64_t stride, int64_t pad_front, bool relu) {
  const int64_t n = y.numel();
  if (n == 0) return;
  const bool same_shape_r = mode == kIdentity || mode == kProjB;
  const auto plan = kernels::plan_elementwise(n, y.size(1), r.numel(), sizeof(scalar_t),
                                              {out.data_ptr(), y.data_ptr(), same_shape_r ? r.data_ptr() : nullptr});
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernels::dispatch_elementwise<scalar_t>(plan, [&](auto vec, auto index) {
    using index_t = decltype(index);
    kernels::scale_shift_add_relu_kernel<decltype(vec)::value, index_t, scalar_t, acc_t>
        <<<plan.blocks, kThreads, 0, stream>>>(
            out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null<acc_t>(sc), ptr_or_null<acc_t>(sh),
            r.data_ptr<scalar_t>(), ptr_or_null<acc_t>(rs), ptr_or_null<acc_t>(rt), static_cast<index_t>(n),
            static_cast<index_t>(y.size(1)), static_cast<index_t>(y.size(2)), static_cast<index_t>(y.size(3)),
            static_cast<index_t>(r.size(1)), static_cast<index_t>(r.size(2)), static_cast<index_t>(r.size(3)),
            static_cast<int>(mode), static_cast<index_t>(stride), static_cast<index_t>(pad_front), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_scale_shift_add_relu<scalar_t, acc_t>(dx, x, b, a, x, at::Tensor(), at::Tensor(), kNone, 1, 0, false);
  });
  return in_layout_of(dx, x_in);
}

// ---- bn_finalize -----------------------------------------------------------------------------------------------

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
      // exactly one block: the kernel's num_batches_tracked update relies on it
      kernels::bn_finalize_kernel<acc_t, scalar_t><<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          invstd.data_ptr<acc_t>(), running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
          num_batches_tracked.data_ptr<int64_t>(), m.data_ptr<acc_t>(), v.data_ptr<acc_t>(), c, count, momentum,
          cumulative, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return invstd;
}

// ---- scale_shift_add_relu --------------------------------------------------------------------------------------

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "scale_shift_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_scale_shift_add_relu<scalar_t, acc_t>(out, y, sc, sh, r, rs, rt, mode, res_stride, pad_front, relu);
  });
  return in_layout_of(out, y_in);
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
      kernels::scale_shift_add_relu_backward_kernel<scalar_t, acc_t>
          <<<checked_chunk_grid(chunks, c), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              gy.data_ptr<scalar_t>(), mode != kNone ? gr.data_ptr<scalar_t>() : nullptr, part.data_ptr<acc_t>(),
              go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null<acc_t>(sc),
              r.data_ptr<scalar_t>(), ptr_or_null<acc_t>(rs), p, c, static_cast<int>(mode), relu);
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
