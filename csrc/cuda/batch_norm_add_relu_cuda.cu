// batch_norm_add_relu_backward on CUDA: two passes over the activation, as on the CPU (csrc/batch_norm_add_relu.cpp
// has the math; the kernels are in bnar_kernels.cuh). Pass 1: per chunk of kRowsPerChunk rows, sum g, sum g*(y - mean)
// and (option B) sum g*(r - mean_r), g = dout * [out > 0], in the centred form (no cancellation when |mean| >> std);
// the chunk partials are then summed in chunk order (deterministic). Pass 2: dy = s*g + a + b*y and the shortcut's
// gradient, 16 bytes per thread and step where the channels and pointers allow. This replaces the composite
// (scale_shift_add_relu_backward + 3-4 extra full-size passes of per-channel ATen arithmetic) on CUDA; the composite
// stays registered for other devices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../bn_add_relu_grads.h"
#include "../checks.h"
#include "../layout.h"
#include "bnar_kernels.cuh"

namespace resnet_fused {
namespace {

using kernels::kThreads;

template <typename scalar_t, typename acc_t>
void launch_write(at::Tensor& dy, at::Tensor& dr, const at::Tensor& go, const at::Tensor& out, const at::Tensor& y,
                  const at::Tensor& r, const at::Tensor& coef, int dr_mode, bool relu, cudaStream_t stream) {
  const int64_t n = y.numel(), c = y.size(1);
  scalar_t* pdr = dr_mode ? dr.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pr = dr_mode == 2 ? r.data_ptr<scalar_t>() : nullptr;
  const auto plan = kernels::plan_elementwise(n, c, n, sizeof(scalar_t),
                                              {dy.data_ptr(), pdr, go.data_ptr(), out.data_ptr(), y.data_ptr(), pr});
  kernels::dispatch_elementwise<scalar_t>(plan, [&](auto vec, auto index) {
    using index_t = decltype(index);
    kernels::bnar_bwd_write_kernel<decltype(vec)::value, index_t, scalar_t, acc_t><<<plan.blocks, kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), pdr, go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pr,
        coef.data_ptr<acc_t>(), static_cast<index_t>(n), static_cast<index_t>(c), dr_mode, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Grads batch_norm_add_relu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& out_in,
                                        const at::Tensor& y_in, const at::Tensor& mean, const at::Tensor& invstd,
                                        const OptTensor& weight, const OptTensor& residual, const OptTensor& res_mean,
                                        const OptTensor& res_invstd, const OptTensor& res_weight, int64_t mode,
                                        int64_t res_stride, int64_t pad_front, bool relu) {
  check_bn_add_relu(y_in, mean, invstd, weight, c10::nullopt, residual, res_mean, res_invstd, res_weight,
                    c10::nullopt, mode, res_stride, pad_front);
  check_grad_like(grad_out_in, out_in, y_in);
  c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor go = as_nhwc(grad_out_in), out = as_nhwc(out_in), y = as_nhwc(y_in);
  const bool proj = mode == kProjB;
  const at::Tensor r = proj ? as_nhwc(*residual) : y;
  const int64_t c = y.size(1), p = y.numel() / c;
  TORCH_CHECK(p > 0, "resnet_fused: batch_norm_add_relu_backward needs at least one value per channel");
  const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "resnet_fused: too many rows (", p, ")");
  const auto acc = acc_dtype(y);
  const at::Tensor m = mean.to(acc).contiguous();
  const at::Tensor rm = proj ? res_mean->to(acc).contiguous() : m;
  at::Tensor part = at::empty({chunks, 3, c}, y.options().dtype(acc));
  at::Tensor dy = at::empty_like(y);
  at::Tensor gr = mode != kNone ? at::empty_like(y) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sums;
  Coeffs cy, cr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "batch_norm_add_relu_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid = kernels::chunk_grid(chunks, c);  // chunks checked above
    auto reduce = proj ? kernels::bnar_bwd_reduce_kernel<true, scalar_t, acc_t>
                       : kernels::bnar_bwd_reduce_kernel<false, scalar_t, acc_t>;
    reduce<<<grid, kThreads, 0, stream>>>(part.data_ptr<acc_t>(), go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                          y.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), r.data_ptr<scalar_t>(),
                                          rm.data_ptr<acc_t>(), p, c, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums = part.sum(0);  // [sum g, sum g*(y - mean), sum g*(r - mean_r)]: ATen's sum is deterministic on CUDA
    cy = coefficients(y, mean, invstd, weight, sums[0], sums[1], p);
    if (proj) cr = coefficients(y, *res_mean, *res_invstd, res_weight, sums[0], sums[2], p);
    const at::Tensor coef = at::stack({cy.s, cy.a, cy.b, proj ? cr.s : cy.s, proj ? cr.a : cy.a,
                                       proj ? cr.b : cy.b}).contiguous();
    launch_write<scalar_t, acc_t>(dy, gr, go, out, y, r, coef, proj ? 2 : mode != kNone ? 1 : 0, relu, stream);
  });
  at::Tensor dres = at::empty({0}, y.options().dtype(acc));
  if (mode != kNone)  // option B's gr is already d residual; identity and option A go through shortcut_grads
    dres = std::get<0>(shortcut_grads(gr, sums, residual, proj ? int64_t(kIdentity) : mode, res_stride, pad_front));
  return finish_grads(in_layout_of(dy, y_in), dres, sums, cy, cr, weight, res_weight, mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_cuda);
}

}  // namespace resnet_fused
