// Argument checks shared by the CPU and CUDA operators: every user error is a TORCH_CHECK that says what was wrong.
#pragma once
#include <ATen/ATen.h>

#include "constants.h"

namespace resnet_fused {

inline void check_4d_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "resnet_fused: ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) > 0, "resnet_fused: ", name, " must have at least one channel, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resnet_fused: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_channel_vector(const c10::optional<at::Tensor>& v, const at::Tensor& like, int64_t c,
                                 const char* name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->numel() == c, "resnet_fused: ", name, " must have one value per channel (", c,
              "), got shape ", v->sizes());
  TORCH_CHECK(v->device() == like.device(), "resnet_fused: ", name, " is on ", v->device(),
              " but the activation is on ", like.device());
  TORCH_CHECK(at::isFloatingType(v->scalar_type()), "resnet_fused: ", name, " must be floating point, got ",
              v->scalar_type());
}

// Checks for scale_shift_add_relu(y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front).
inline void check_scale_shift_add_relu(const at::Tensor& y, const c10::optional<at::Tensor>& scale,
                                       const c10::optional<at::Tensor>& shift,
                                       const c10::optional<at::Tensor>& residual,
                                       const c10::optional<at::Tensor>& res_scale,
                                       const c10::optional<at::Tensor>& res_shift, int64_t mode, int64_t res_stride,
                                       int64_t pad_front) {
  check_4d_float(y, "y");
  const int64_t c = y.size(1);
  check_channel_vector(scale, y, c, "scale");
  check_channel_vector(shift, y, c, "shift");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "resnet_fused: scale and shift must be given together");
  TORCH_CHECK(mode >= kNone && mode <= kProjB, "resnet_fused: shortcut mode must be 0 (none), 1 (identity), ",
              "2 (option A) or 3 (option B), got ", mode);
  if (mode == kNone) return;
  TORCH_CHECK(residual.has_value(), "resnet_fused: shortcut mode ", mode, " needs a residual tensor");
  const at::Tensor& r = *residual;
  check_4d_float(r, "residual");
  TORCH_CHECK(r.device() == y.device(), "resnet_fused: residual is on ", r.device(), " but y is on ", y.device());
  TORCH_CHECK(r.scalar_type() == y.scalar_type(), "resnet_fused: residual dtype ", r.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(r.size(0) == y.size(0), "resnet_fused: residual batch ", r.size(0), " does not match y batch ",
              y.size(0));
  if (mode == kIdentity || mode == kProjB) {
    TORCH_CHECK(r.sizes() == y.sizes(), "resnet_fused: the ", mode == kIdentity ? "identity" : "projection",
                " shortcut must have the shape of y ", y.sizes(), ", got ", r.sizes());
  }
  if (mode == kPadA) {
    TORCH_CHECK(res_stride >= 1, "resnet_fused: res_stride must be >= 1, got ", res_stride);
    TORCH_CHECK((r.size(2) + res_stride - 1) / res_stride == y.size(2) &&
                    (r.size(3) + res_stride - 1) / res_stride == y.size(3),
                "resnet_fused: option-A shortcut of spatial size ", r.size(2), "x", r.size(3), " subsampled by ",
                res_stride, " does not give y's ", y.size(2), "x", y.size(3));
    TORCH_CHECK(pad_front >= 0 && pad_front + r.size(1) <= c, "resnet_fused: option-A shortcut with ", r.size(1),
                " channels padded by ", pad_front, " in front does not fit y's ", c, " channels");
  }
  if (mode == kProjB) {
    TORCH_CHECK(res_scale.has_value() && res_shift.has_value(),
                "resnet_fused: option-B shortcut needs res_scale and res_shift");
    check_channel_vector(res_scale, y, c, "res_scale");
    check_channel_vector(res_shift, y, c, "res_shift");
  }
}

// The backward operators' (grad_out, out) pair: y's shape, dtype and device.
inline void check_grad_like(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y) {
  TORCH_CHECK(grad_out.sizes() == y.sizes() && out.sizes() == y.sizes(), "resnet_fused: grad_out and out must have ",
              "y's shape ", y.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == y.scalar_type() && out.scalar_type() == y.scalar_type(),
              "resnet_fused: grad_out, out and y must share a dtype, got ", grad_out.scalar_type(), ", ",
              out.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(grad_out.device() == y.device() && out.device() == y.device(), "resnet_fused: grad_out, out and y ",
              "must be on one device, got ", grad_out.device(), ", ", out.device(), " and ", y.device());
}

// bn_finalize's operands, the same on every device: checked before anything is written, so a bad call leaves the
// running statistics untouched (and a device mismatch never reaches a kernel).
inline void check_bn_finalize(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& running_mean,
                              const at::Tensor& running_var, const at::Tensor& num_batches_tracked, int64_t count) {
  const int64_t c = mean.numel();
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(), "resnet_fused: bn_finalize needs mean and var of ",
              "shape [C], got ", mean.sizes(), " and ", var.sizes());
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && at::isFloatingType(var.scalar_type()),
              "resnet_fused: bn_finalize needs floating-point mean and var");
  TORCH_CHECK(running_mean.numel() == c && running_var.numel() == c, "resnet_fused: running statistics have ",
              running_mean.numel(), " and ", running_var.numel(), " channels, the batch statistics ", c);
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_var.scalar_type() == running_mean.scalar_type() &&
                  at::isFloatingType(running_mean.scalar_type()),
              "resnet_fused: running statistics must be contiguous floating-point tensors of one dtype");
  TORCH_CHECK(count > 1, "resnet_fused: expected more than 1 value per channel when training, got ", count);
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong,
              "resnet_fused: num_batches_tracked must be one int64 value");
  for (const at::Tensor* t : {&var, &running_mean, &running_var, &num_batches_tracked})
    TORCH_CHECK(t->device() == mean.device(), "resnet_fused: bn_finalize operands must be on one device: mean is on ",
                mean.device(), ", another operand on ", t->device());
}

}  // namespace resnet_fused
