// batch_norm_add_relu: training-mode BatchNorm (from precomputed batch statistics) + shortcut + ReLU, whose backward
// carries the gradient through the statistics itself, so a training block needs one backward operator per BN
// instead of scale_shift_add_relu_backward + bn_stats_backward + an add (two fewer full-size writes and allocations).
//
// Forward, per channel j (P = N*H*W values), with mean/invstd the batch statistics of y (from bn_stats):
//     s = weight * invstd,  t = bias - mean * s
//     out = relu(y*s + t + shortcut),   shortcut = 0 | r | r[n, j - pad_front, h*stride, w*stride] (option A)
//                                                  | r*s_r + t_r  (option B, r with its own statistics)
// Backward (g = dout * [out > 0]); because mean and invstd are functions of y, the full VJP is
//     dbias = sum g,   dweight = invstd * sum g*(y - mean)
//     dy = s*g - s/P * sum g - s*invstd^2/P * (y - mean) * sum g*(y - mean)   =  s*g + a + b*y
// and the same for the option-B branch with (r, its mean/invstd, weight_r); identity / option A pass g to r.
// mean and invstd therefore get no gradient of their own: they must be y's (and r's) batch statistics, computed
// without autograd (the Python autograd registration rejects statistics that require grad).
//
// CPU (here) and CUDA (cuda/batch_norm_add_relu_cuda.cu): pass 1 reduces sum g and sum g*(y - mean) (the centred
// form: no cancellation when |mean| >> std) over fixed chunks of rows, summed in chunk order (deterministic); pass 2
// writes dy (and dr). Other devices: a composite of scale_shift_add_relu_backward and per-channel ATen arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bn_add_relu_grads.h"
#include "checks.h"
#include "layout.h"

namespace resnet_fused {
namespace {

// (scale, shift) = (weight * invstd, bias - mean * scale) in the accumulation dtype
std::pair<at::Tensor, at::Tensor> affine(const at::Tensor& like, const at::Tensor& mean, const at::Tensor& invstd,
                                         const OptTensor& weight, const OptTensor& bias) {
  at::Tensor s = invstd.to(acc_dtype(like)) * channel_vec(weight, like, 1.0);
  at::Tensor t = channel_vec(bias, like, 0.0) - mean.to(acc_dtype(like)) * s;
  return {s, t};
}

// ---- forward: every device, through scale_shift_add_relu ------------------------------------------------------

at::Tensor batch_norm_add_relu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                               const OptTensor& res_mean, const OptTensor& res_invstd, const OptTensor& res_weight,
                               const OptTensor& res_bias, int64_t mode, int64_t res_stride, int64_t pad_front,
                               bool relu) {
  check_bn_add_relu(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, mode,
                    res_stride, pad_front);
  auto [s, t] = affine(y, mean, invstd, weight, bias);
  OptTensor rs, rt;
  if (mode == kProjB) std::tie(rs, rt) = affine(y, *res_mean, *res_invstd, res_weight, res_bias);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::scale_shift_add_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, bool)>();
  return op.call(y, s, t, residual, rs, rt, mode, res_stride, pad_front, relu);
}

// ---- backward, CPU: two passes over the rows --------------------------------------------------------------------

// sums[0..c) = sum g, sums[c..2c) = sum g*(y - mean), and with kProj sums[2c..3c) = sum g*(r - mean_r), over rows
// [r0, r1); g = dout*[out>0] (zeros in the third part otherwise).
// Rows are processed in blocks of channel-contiguous values with restrict pointers so the inner loops vectorise.
template <bool kProj, typename scalar_t, typename acc_t>
void reduce_chunk(acc_t* __restrict__ sums, const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                  const scalar_t* __restrict__ y, const acc_t* __restrict__ mean, const scalar_t* __restrict__ r,
                  const acc_t* __restrict__ rmean, int64_t c, int64_t r0, int64_t r1, bool relu) {
  std::vector<acc_t> buf(3 * c, acc_t(0));
  acc_t* __restrict__ s_g = buf.data();
  acc_t* __restrict__ s_gy = s_g + c;
  acc_t* __restrict__ s_gr = s_gy + c;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * c;
    for (int64_t j = 0; j < c; ++j) {
      const acc_t o_j = static_cast<acc_t>(out[o + j]), go_j = static_cast<acc_t>(go[o + j]);
      const acc_t g = (relu && o_j <= acc_t(0)) ? acc_t(0) : go_j;  // both loads unconditional: a vector select
      s_g[j] += g;
      s_gy[j] += g * (static_cast<acc_t>(y[o + j]) - mean[j]);
      if constexpr (kProj) s_gr[j] += g * (static_cast<acc_t>(r[o + j]) - rmean[j]);
    }
  }
  std::copy(buf.begin(), buf.end(), sums);
}

// dy = s*g + a + b*y and the shortcut gradient over rows [r0, r1): none (kDr = 0), g (kDr = 1: identity, option A
// before its scatter) or s_r*g + a_r + b_r*r (kDr = 2: option B). coef holds [s, a, b, s_r, a_r, b_r], c each.
template <int kDr, typename scalar_t, typename acc_t>
void write_grads(scalar_t* __restrict__ dy, scalar_t* __restrict__ dr, const scalar_t* __restrict__ go,
                 const scalar_t* __restrict__ out, const scalar_t* __restrict__ y, const scalar_t* __restrict__ r,
                 const acc_t* __restrict__ coef, int64_t c, int64_t r0, int64_t r1, bool relu) {
  const acc_t *__restrict__ s = coef, *__restrict__ a = coef + c, *__restrict__ b = coef + 2 * c;
  const acc_t *__restrict__ sr = coef + 3 * c, *__restrict__ ar = coef + 4 * c, *__restrict__ br = coef + 5 * c;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * c;
    for (int64_t j = 0; j < c; ++j) {
      const acc_t o_j = static_cast<acc_t>(out[o + j]), go_j = static_cast<acc_t>(go[o + j]);
      const acc_t g = (relu && o_j <= acc_t(0)) ? acc_t(0) : go_j;  // both loads unconditional: a vector select
      dy[o + j] = static_cast<scalar_t>(s[j] * g + a[j] + b[j] * static_cast<acc_t>(y[o + j]));
      if constexpr (kDr == 1) dr[o + j] = static_cast<scalar_t>(g);
      if constexpr (kDr == 2)
        dr[o + j] = static_cast<scalar_t>(sr[j] * g + ar[j] + br[j] * static_cast<acc_t>(r[o + j]));
    }
  }
}

Grads batch_norm_add_relu_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& y_in,
                                       const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& weight,
                                       const OptTensor& residual, const OptTensor& res_mean,
                                       const OptTensor& res_invstd, const OptTensor& res_weight, int64_t mode,
                                       int64_t res_stride, int64_t pad_front, bool relu) {
  check_bn_add_relu(y_in, mean, invstd, weight, c10::nullopt, residual, res_mean, res_invstd, res_weight,
                    c10::nullopt, mode, res_stride, pad_front);
  check_grad_like(grad_out_in, out_in, y_in);
  const at::Tensor go = as_nhwc(grad_out_in), out = as_nhwc(out_in), y = as_nhwc(y_in);
  const bool proj = mode == kProjB;
  const at::Tensor r = proj ? as_nhwc(*residual) : y;
  const int64_t c = y.size(1), p = c ? y.numel() / c : 0;
  TORCH_CHECK(p > 0, "resnet_fused: batch_norm_add_relu_backward needs at least one value per channel");
  const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
  const auto acc = acc_dtype(y);
  at::Tensor part = at::empty({chunks, 3, c}, y.options().dtype(acc));
  at::Tensor dy = at::empty_like(y);
  at::Tensor gr = mode != kNone ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor sums;
  Coeffs cy, cr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "batch_norm_add_relu_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor m = mean.to(acc).contiguous();
    const at::Tensor rm = proj ? res_mean->to(acc).contiguous() : m;
    const acc_t *pm = m.data_ptr<acc_t>(), *prm = rm.data_ptr<acc_t>();
    const scalar_t *pgo = go.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    const scalar_t* pr = r.data_ptr<scalar_t>();
    acc_t* pp = part.data_ptr<acc_t>();
    // pass 1: per chunk, sum g, sum g*(y - mean) and (option B) sum g*(r - mean_r)
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r0 = k * kRowsPerChunk, r1 = std::min(p, (k + 1) * kRowsPerChunk);
        if (proj)
          reduce_chunk<true, scalar_t, acc_t>(pp + k * 3 * c, pgo, po, py, pm, pr, prm, c, r0, r1, relu);
        else
          reduce_chunk<false, scalar_t, acc_t>(pp + k * 3 * c, pgo, po, py, pm, pr, prm, c, r0, r1, relu);
      }
    });
    sums = part.sum(0);  // [sum g, sum g*(y - mean), sum g*(r - mean_r)], fixed chunk order
    cy = coefficients(y, mean, invstd, weight, sums[0], sums[1], p);
    if (proj) cr = coefficients(y, *res_mean, *res_invstd, res_weight, sums[0], sums[2], p);
    // [s, a, b] for y, then for r (option B): dy = s*g + a + b*y
    const at::Tensor coef = at::stack({cy.s, cy.a, cy.b, proj ? cr.s : cy.s, proj ? cr.a : cy.a,
                                       proj ? cr.b : cy.b}).contiguous();
    const acc_t* pc = coef.data_ptr<acc_t>();
    scalar_t* pdy = dy.data_ptr<scalar_t>();
    scalar_t* pgr = mode != kNone ? gr.data_ptr<scalar_t>() : nullptr;
    // pass 2: dy = s*g + a + b*y; dr = g (identity, option A before the scatter) or s_r*g + a_r + b_r*r (option B)
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const int64_t r0 = begin * kRowsPerChunk, r1 = std::min(p, end * kRowsPerChunk);
      if (proj)
        write_grads<2, scalar_t, acc_t>(pdy, pgr, pgo, po, py, pr, pc, c, r0, r1, relu);
      else if (mode != kNone)
        write_grads<1, scalar_t, acc_t>(pdy, pgr, pgo, po, py, nullptr, pc, c, r0, r1, relu);
      else
        write_grads<0, scalar_t, acc_t>(pdy, nullptr, pgo, po, py, nullptr, pc, c, r0, r1, relu);
    });
  });
  at::Tensor dres = at::empty({0}, y.options().dtype(acc));  // no shortcut: an empty accumulation-dtype tensor
  if (mode != kNone)  // option B's gr is already d residual; identity and option A go through shortcut_grads
    dres = std::get<0>(shortcut_grads(gr, sums, residual, proj ? int64_t(kIdentity) : mode, res_stride, pad_front));
  return finish_grads(in_layout_of(dy, y_in), dres, sums, cy, cr, weight, res_weight, mode);
}

// ---- backward, other devices: scale_shift_add_relu_backward + per-channel arithmetic --------------------------

Grads batch_norm_add_relu_backward_composite(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                                             const at::Tensor& mean, const at::Tensor& invstd,
                                             const OptTensor& weight, const OptTensor& residual,
                                             const OptTensor& res_mean, const OptTensor& res_invstd,
                                             const OptTensor& res_weight, int64_t mode, int64_t res_stride,
                                             int64_t pad_front, bool relu) {
  check_bn_add_relu(y, mean, invstd, weight, c10::nullopt, residual, res_mean, res_invstd, res_weight, c10::nullopt,
                    mode, res_stride, pad_front);
  const bool proj = mode == kProjB;
  const int64_t c = y.size(1), p = c ? y.numel() / c : 0;
  const auto acc = acc_dtype(y);
  at::Tensor s = invstd.to(acc) * channel_vec(weight, y, 1.0);
  OptTensor sr;
  if (proj) sr = res_invstd->to(acc) * channel_vec(res_weight, y, 1.0);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnet_fused::scale_shift_add_relu_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, bool)>();
  // gy = s*g, sums: sum g*y, sum g; dr = g (identity / A, scattered) or s_r*g with sum g*r (B)
  auto [gy, sum_gy, sum_g, dres, sum_gr, sum_g_again] = op.call(grad_out, out, y, s, residual, sr, mode, res_stride,
                                                           pad_front, relu);
  (void)sum_g_again;
  const at::Tensor m = mean.to(acc);
  const at::Tensor sum_gxc = sum_gy - m * sum_g;
  Coeffs cy = coefficients(y, mean, invstd, weight, sum_g, sum_gxc, p), cr;
  auto per_channel = [&](const at::Tensor& v) { return v.view({1, c, 1, 1}); };
  at::Tensor dy = (gy + per_channel(cy.a) + per_channel(cy.b) * y).to(y.scalar_type());
  at::Tensor z = at::zeros_like(sum_g);
  at::Tensor sums = at::stack({sum_g, sum_gxc, z});
  if (proj) {
    const at::Tensor sum_grc = sum_gr - res_mean->to(acc) * sum_g;
    cr = coefficients(y, *res_mean, *res_invstd, res_weight, sum_g, sum_grc, p);
    dres = (dres + per_channel(cr.a) + per_channel(cr.b) * *residual).to(residual->scalar_type());
  }
  return finish_grads(dy, dres, sums, cy, cr, weight, res_weight, mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("batch_norm_add_relu(Tensor y, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor? res_mean, Tensor? res_invstd, Tensor? res_weight, Tensor? res_bias, int mode, int res_stride, "
        "int pad_front, bool relu) -> Tensor");
  m.def("batch_norm_add_relu_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor invstd, "
        "Tensor? weight, Tensor? residual, Tensor? res_mean, Tensor? res_invstd, Tensor? res_weight, int mode, "
        "int res_stride, int pad_front, bool relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_add_relu", &batch_norm_add_relu);
  m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_composite);
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_cpu); }

}  // namespace resnet_fused
