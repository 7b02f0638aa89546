// Argument checks shared by the CPU and CUDA operators: every user error is a TORCH_CHECK that says what was wrong.
#pragma once
#include <ATen/ATen.h>

namespace resnet_fused {

// Shortcut modes of scale_shift_add_relu (the same numbering as the Triton op bn_add_relu).
enum ShortcutMode : int64_t { kNone = 0, kIdentity = 1, kPadA = 2, kProjB = 3 };

inline void check_4d_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "resnet_fused: ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
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

}  // namespace resnet_fused
