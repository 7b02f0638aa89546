// Host-side helpers shared by the CPU and CUDA operators: the NHWC row view and the shortcut gradients.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

namespace resnet_fused {

inline at::Tensor as_nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// Results are returned in the memory format ATen suggests for the corresponding input.
inline at::Tensor in_layout_of(const at::Tensor& nhwc, const at::Tensor& ref) {
  auto fmt = ref.suggest_memory_format();
  return fmt == at::MemoryFormat::ChannelsLast ? nhwc : nhwc.contiguous(fmt);
}

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel operand in the accumulation dtype, contiguous, on like's device: v itself; or, when v is absent,
// [C] values of `fill`, or an undefined tensor without a fill (a nullptr for the kernels).
inline at::Tensor channel_vec(const c10::optional<at::Tensor>& v, const at::Tensor& like,
                              c10::optional<double> fill = c10::nullopt) {
  const auto acc = acc_dtype(like);
  if (v.has_value()) return v->to(acc).contiguous();
  if (fill.has_value()) return at::full({like.size(1)}, *fill, like.options().dtype(acc));
  return at::Tensor();
}

// (d residual, d res_scale, d res_shift) of scale_shift_add_relu from the kernel's shortcut gradient gr (NHWC,
// y-shaped: g for identity / option A, g*res_scale for option B) and the channel sums [sum g*y, sum g, sum g*r].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shortcut_grads(const at::Tensor& gr, const at::Tensor& sums,
                                                                     const c10::optional<at::Tensor>& residual,
                                                                     int64_t mode, int64_t res_stride,
                                                                     int64_t pad_front) {
  auto empty = [&] { return at::empty({0}, sums.options()); };
  if (mode == kIdentity) return {in_layout_of(gr, *residual), empty(), empty()};
  if (mode == kPadA) {  // scatter back onto the strided positions of the block input; padded channels drop out
    const at::Tensor& res = *residual;
    at::Tensor g = at::empty(res.sizes(), res.options(), res.suggest_memory_format()).zero_();  // in res's layout
    g.slice(2, 0, c10::nullopt, res_stride).slice(3, 0, c10::nullopt, res_stride)
        .copy_(gr.slice(1, pad_front, pad_front + res.size(1)));
    return {g, empty(), empty()};
  }
  if (mode == kProjB) return {in_layout_of(gr, *residual), sums[2].clone(), sums[1].clone()};
  return {empty(), empty(), empty()};
}

}  // namespace resnet_fused
