// The backward of batch_norm_add_relu, shared by its CPU and CUDA implementations: the argument checks, the
// per-channel coefficients of dy = s*g + a + b*y from the two channel sums, and the assembly of the six gradients.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"
#include "layout.h"

namespace resnet_fused {

using OptTensor = c10::optional<at::Tensor>;

inline void check_bn_add_relu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                              const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                              const OptTensor& res_mean, const OptTensor& res_invstd, const OptTensor& res_weight,
                              const OptTensor& res_bias, int64_t mode, int64_t res_stride, int64_t pad_front) {
  check_4d_float(y, "y");
  const int64_t c = y.size(1);
  check_channel_vector(mean, y, c, "mean");
  check_channel_vector(invstd, y, c, "invstd");
  check_channel_vector(weight, y, c, "weight");
  check_channel_vector(bias, y, c, "bias");
  TORCH_CHECK(mode != kProjB || (res_mean.has_value() && res_invstd.has_value()),
              "resnet_fused: option-B shortcut needs res_mean and res_invstd (the projection's batch statistics)");
  // the shortcut checks of scale_shift_add_relu (shape, dtype, device, geometry); option B's statistics below
  check_scale_shift_add_relu(y, c10::nullopt, c10::nullopt, residual, mode == kProjB ? res_invstd : c10::nullopt,
                             mode == kProjB ? res_invstd : c10::nullopt, mode, res_stride, pad_front);
  if (mode == kProjB) {
    check_channel_vector(res_mean, y, c, "res_mean");
    check_channel_vector(res_weight, y, c, "res_weight");
    check_channel_vector(res_bias, y, c, "res_bias");
  }
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Per-channel coefficients of dy = s*g + a + b*y from the sums (sum g, sum g*(y - mean)); also d weight.
struct Coeffs {
  at::Tensor s, a, b, dweight;
};
inline Coeffs coefficients(const at::Tensor& like, const at::Tensor& mean, const at::Tensor& invstd,
                           const OptTensor& weight, const at::Tensor& sum_g, const at::Tensor& sum_gxc, int64_t p) {
  const auto acc = acc_dtype(like);
  const at::Tensor m = mean.to(acc), is = invstd.to(acc);
  const at::Tensor s = is * channel_vec(weight, like, 1.0);
  const at::Tensor k = s * is * is * sum_gxc / static_cast<double>(p);
  return {s, k * m - s * sum_g / static_cast<double>(p), -k, is * sum_gxc};
}

inline Grads finish_grads(const at::Tensor& dy, const at::Tensor& dres, const at::Tensor& sums, const Coeffs& cy,
                          const Coeffs& cr, const OptTensor& weight, const OptTensor& res_weight, int64_t mode) {
  auto empty = [&] { return at::empty({0}, sums.options()); };
  at::Tensor dw = weight.has_value() ? cy.dweight.to(weight->scalar_type()) : empty();
  at::Tensor drw = mode == kProjB && res_weight.has_value() ? cr.dweight.to(res_weight->scalar_type()) : empty();
  at::Tensor drb = mode == kProjB ? sums[0].clone() : empty();
  return {dy, dw, sums[0].clone(), dres, drw, drb};
}

}  // namespace resnet_fused
