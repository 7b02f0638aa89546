// resnet_fused C++ operators: schemas (TORCH_LIBRARY) and the CPU implementations.
//
// Every operator works on activations viewed as NHWC rows [P = N*H*W, C]: channels_last inputs are used in place,
// other layouts are converted once (and results returned in the input's own memory format).
//
//   bn_stats(x) -> (mean, var)            per-channel mean and biased variance. Fixed chunks of 256 rows give
//                                         chunk means and M2 (two passes over cache-resident rows), merged in chunk
//                                         order with Chan's formula: deterministic for any thread count.
//   bn_stats_backward(gm, gv, x, mean)    dx = gm/P + 2 gv (x - mean)/P   (the VJP of the two statistics)
//   bn_finalize(mean, var, rm!, rv!, nbt!, count, momentum, cumulative, eps) -> invstd
//                                         nn.BatchNorm2d's running update (unbiased variance, momentum=None as a
//                                         cumulative average) and 1/sqrt(var + eps)
//   scale_shift_add_relu(y, scale?, shift?, r?, rs?, rt?, mode, s, pad_front, relu)
//       out = relu(y*scale + shift + shortcut), shortcut = 0 | r | r[n, c - pad_front, h*s, w*s] | r*rs + rt
//   scale_shift_add_relu_backward(...) -> (dy, dscale, dshift, dr, drs, drt)
//       g = dout * [out > 0]; dy = g*scale; dscale = sum g*y; dshift = sum g; dr = g (identity), g scattered back
//       onto the strided positions (option A), g*rs (option B) with drs = sum g*r, drt = sum g. One pass writes the
//       elementwise gradients and per-chunk sums; the chunk sums are added in chunk order (deterministic).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "layout.h"

extern "C" {
// The module is only the shell that loads the library; operators are reached through torch.ops.resnet_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace resnet_fused {
namespace {

// channel_vec's values as a host vector for the CPU loops
template <typename acc_t>
std::vector<acc_t> channel_vector(const c10::optional<at::Tensor>& v, const at::Tensor& like, acc_t fill) {
  const at::Tensor t = channel_vec(v, like, static_cast<double>(fill));
  const acc_t* src = t.template data_ptr<acc_t>();
  return std::vector<acc_t>(src, src + t.numel());
}

// ---- bn_stats --------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  check_4d_float(x_in, "x");
  const at::Tensor x = as_nhwc(x_in);
  const int64_t c = x.size(1), p = c ? x.numel() / c : 0;
  TORCH_CHECK(p > 0, "resnet_fused: bn_stats needs at least one value per channel, got shape ", x.sizes());
  at::Tensor mean = at::empty({c}, x.options().dtype(acc_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<acc_t> cmean(chunks * c), cm2(chunks * c);
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(c);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r0 = k * kRowsPerChunk, r1 = std::min(p, r0 + kRowsPerChunk);
        std::fill(s.begin(), s.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = px + r * c;
          for (int64_t j = 0; j < c; ++j) s[j] += static_cast<acc_t>(row[j]);
        }
        acc_t* m = cmean.data() + k * c;
        for (int64_t j = 0; j < c; ++j) m[j] = s[j] / static_cast<acc_t>(r1 - r0);
        std::fill(s.begin(), s.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = px + r * c;
          for (int64_t j = 0; j < c; ++j) {
            const acc_t d = static_cast<acc_t>(row[j]) - m[j];
            s[j] += d * d;
          }
        }
        std::copy(s.begin(), s.end(), cm2.begin() + k * c);
      }
    });
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* pv = var.data_ptr<acc_t>();
    at::parallel_for(0, c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        acc_t n_a = 0, mean_a = 0, m2_a = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          const acc_t n_b = static_cast<acc_t>(std::min(p, (k + 1) * kRowsPerChunk) - k * kRowsPerChunk);
          const acc_t n = n_a + n_b;
          const acc_t delta = cmean[k * c + j] - mean_a;
          mean_a += delta * n_b / n;
          m2_a += cm2[k * c + j] + delta * delta * n_a * n_b / n;
          n_a = n;
        }
        pm[j] = mean_a;
        pv[j] = m2_a / static_cast<acc_t>(p);
      }
    });
  });
  return {mean, var};
}

at::Tensor bn_stats_backward_cpu(const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_var,
                                 const at::Tensor& x_in, const at::Tensor& mean) {
  check_4d_float(x_in, "x");
  const int64_t c = x_in.size(1);
  check_channel_vector(grad_mean, x_in, c, "grad_mean");
  check_channel_vector(grad_var, x_in, c, "grad_var");
  check_channel_vector(mean, x_in, c, "mean");
  const at::Tensor x = as_nhwc(x_in);
  const int64_t p = x.numel() / c;
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto gm = channel_vector<acc_t>(grad_mean, x, 0), gv = channel_vector<acc_t>(grad_var, x, 0);
    auto mu = channel_vector<acc_t>(mean, x, 0);
    std::vector<acc_t> a(c), b(c);  // dx = a + b * x
    for (int64_t j = 0; j < c; ++j) {
      b[j] = 2 * gv[j] / static_cast<acc_t>(p);
      a[j] = gm[j] / static_cast<acc_t>(p) - b[j] * mu[j];
    }
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pd = dx.data_ptr<scalar_t>();
    at::parallel_for(0, p, kRowsPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < c; ++j)
          pd[r * c + j] = static_cast<scalar_t>(a[j] + b[j] * static_cast<acc_t>(px[r * c + j]));
    });
  });
  return in_layout_of(dx, x_in);
}

// ---- bn_finalize -----------------------------------------------------------------------------------------------

at::Tensor bn_finalize_cpu(const at::Tensor& mean, const at::Tensor& var, at::Tensor& running_mean,
                           at::Tensor& running_var, at::Tensor& num_batches_tracked, int64_t count, double momentum,
                           bool cumulative, double eps) {
  check_bn_finalize(mean, var, running_mean, running_var, num_batches_tracked, count);
  num_batches_tracked.add_(1);
  const double f = cumulative ? 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>()) : momentum;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  at::NoGradGuard no_grad;
  running_mean.mul_(1.0 - f).add_(mean.to(running_mean.scalar_type()), f);
  running_var.mul_(1.0 - f).add_(var.to(running_var.scalar_type()), f * unbias);
  return (var + eps).rsqrt();
}

// ---- scale_shift_add_relu --------------------------------------------------------------------------------------

struct ShortcutGeometry {
  int64_t h, w, rc, rh, rw;
};

// Rows [r0, r1) of out = relu(y*sc + sh + shortcut), with the shortcut mode a compile-time constant and restrict
// pointers so the channel loops vectorise (option A reads the subsampled row of r and adds it to channels
// [pad_front, pad_front + rc)).
template <int64_t kMode, typename scalar_t, typename acc_t>
void ssar_rows(scalar_t* __restrict__ out, const scalar_t* __restrict__ y, const scalar_t* __restrict__ r,
               const acc_t* __restrict__ sc, const acc_t* __restrict__ sh, const acc_t* __restrict__ rs,
               const acc_t* __restrict__ rt, int64_t c, int64_t r0, int64_t r1, const ShortcutGeometry& g,
               int64_t stride, int64_t pad_front, bool relu) {
  const acc_t lo = relu ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * c;
    if constexpr (kMode == kPadA) {
      const int64_t n = row / (g.h * g.w), hh = (row / g.w) % g.h, ww = row % g.w;
      const scalar_t* __restrict__ rr = r + ((n * g.rh + hh * stride) * g.rw + ww * stride) * g.rc;
      for (int64_t j = 0; j < c; ++j) {
        const int64_t jr = j - pad_front;
        const bool in = jr >= 0 && jr < g.rc;                          // a channel of r, or zero padding
        const acc_t add = in ? static_cast<acc_t>(rr[in ? jr : 0]) : 0;  // in-bounds index: no branch needed
        out[o + j] = static_cast<scalar_t>(std::max(static_cast<acc_t>(y[o + j]) * sc[j] + sh[j] + add, lo));
      }
    } else {
      for (int64_t j = 0; j < c; ++j) {
        acc_t v = static_cast<acc_t>(y[o + j]) * sc[j] + sh[j];
        if constexpr (kMode == kIdentity) v += static_cast<acc_t>(r[o + j]);
        if constexpr (kMode == kProjB) v += static_cast<acc_t>(r[o + j]) * rs[j] + rt[j];
        out[o + j] = static_cast<scalar_t>(std::max(v, lo));
      }
    }
  }
}

at::Tensor scale_shift_add_relu_cpu(const at::Tensor& y_in, const c10::optional<at::Tensor>& scale,
                                    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
                                    const c10::optional<at::Tensor>& res_scale,
                                    const c10::optional<at::Tensor>& res_shift, int64_t mode, int64_t res_stride,
                                    int64_t pad_front, bool relu) {
  check_scale_shift_add_relu(y_in, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front);
  const at::Tensor y = as_nhwc(y_in);
  const at::Tensor r = mode != kNone ? as_nhwc(*residual) : y;
  const int64_t c = y.size(1), p = y.numel() / c;
  const ShortcutGeometry g{y.size(2), y.size(3), r.size(1), r.size(2), r.size(3)};
  at::Tensor out = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "scale_shift_add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto sc = channel_vector<acc_t>(scale, y, 1), sh = channel_vector<acc_t>(shift, y, 0);
    auto rs = channel_vector<acc_t>(res_scale, y, 1), rt = channel_vector<acc_t>(res_shift, y, 0);
    const scalar_t* py = y.data_ptr<scalar_t>();
    const scalar_t* pr = r.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const acc_t *psc = sc.data(), *psh = sh.data(), *prs = rs.data(), *prt = rt.data();
    at::parallel_for(0, p, 64, [&](int64_t begin, int64_t end) {
      switch (mode) {
        case kIdentity:
          ssar_rows<kIdentity>(po, py, pr, psc, psh, prs, prt, c, begin, end, g, 1, 0, relu);
          break;
        case kPadA:
          ssar_rows<kPadA>(po, py, pr, psc, psh, prs, prt, c, begin, end, g, res_stride, pad_front, relu);
          break;
        case kProjB:
          ssar_rows<kProjB>(po, py, pr, psc, psh, prs, prt, c, begin, end, g, 1, 0, relu);
          break;
        default:
          ssar_rows<kNone>(po, py, pr, psc, psh, prs, prt, c, begin, end, g, 1, 0, relu);
      }
    });
  });
  return in_layout_of(out, y_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_shift_add_relu_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& y_in,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& res_scale, int64_t mode, int64_t res_stride, int64_t pad_front, bool relu) {
  check_scale_shift_add_relu(y_in, scale, scale, residual, res_scale, res_scale, mode, res_stride, pad_front);
  check_grad_like(grad_out_in, out_in, y_in);
  const at::Tensor go = as_nhwc(grad_out_in), out = as_nhwc(out_in), y = as_nhwc(y_in);
  const at::Tensor r = mode == kProjB ? as_nhwc(*residual) : y;
  const int64_t c = y.size(1), p = y.numel() / c;
  const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor gy = at::empty_like(y);
  at::Tensor gr = mode != kNone ? at::empty_like(y) : at::empty({0}, y.options());
  const auto acc = acc_dtype(y);
  at::Tensor part = at::zeros({chunks, 3, c}, y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "scale_shift_add_relu_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto sc = channel_vector<acc_t>(scale, y, 1), rs = channel_vector<acc_t>(res_scale, y, 1);
    const scalar_t *pgo = go.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    const scalar_t* pr = r.data_ptr<scalar_t>();
    scalar_t* pgy = gy.data_ptr<scalar_t>();
    scalar_t* pgr = mode != kNone ? gr.data_ptr<scalar_t>() : nullptr;
    acc_t* pp = part.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t* s_gy = pp + k * 3 * c;
        acc_t* s_g = s_gy + c;
        acc_t* s_gr = s_g + c;
        for (int64_t row = k * kRowsPerChunk; row < std::min(p, (k + 1) * kRowsPerChunk); ++row) {
          const int64_t o = row * c;
          for (int64_t j = 0; j < c; ++j) {
            const acc_t go_j = static_cast<acc_t>(pgo[o + j]);  // loaded unconditionally: a select, no branch
            const acc_t g = (relu && static_cast<acc_t>(po[o + j]) <= 0) ? acc_t(0) : go_j;
            pgy[o + j] = static_cast<scalar_t>(g * sc[j]);
            s_gy[j] += g * static_cast<acc_t>(py[o + j]);
            s_g[j] += g;
            if (mode == kProjB) {
              s_gr[j] += g * static_cast<acc_t>(pr[o + j]);
              pgr[o + j] = static_cast<scalar_t>(g * rs[j]);
            } else if (mode != kNone) {
              pgr[o + j] = static_cast<scalar_t>(g);
            }
          }
        }
      }
    });
  });
  at::Tensor sums = part.sum(0);  // fixed-order reduction over chunks
  auto [g_res, g_rs, g_rt] = shortcut_grads(gr, sums, residual, mode, res_stride, pad_front);
  return {in_layout_of(gy, y_in), sums[0].clone(), sums[1].clone(), g_res, g_rs, g_rt};
}

}  // namespace

TORCH_LIBRARY(resnet_fused, m) {
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_stats_backward(Tensor? grad_mean, Tensor? grad_var, Tensor x, Tensor mean) -> Tensor");
  m.def("bn_finalize(Tensor mean, Tensor var, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!) num_batches_tracked, int count, float momentum, bool cumulative, float eps) -> Tensor");
  m.def("scale_shift_add_relu(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
        "Tensor? res_shift, int mode, int res_stride, int pad_front, bool relu) -> Tensor");
  m.def("scale_shift_add_relu_backward(Tensor grad_out, Tensor out, Tensor y, Tensor? scale, Tensor? residual, "
        "Tensor? res_scale, int mode, int res_stride, int pad_front, bool relu) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_stats_backward", &bn_stats_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("scale_shift_add_relu", &scale_shift_add_relu_cpu);
  m.impl("scale_shift_add_relu_backward", &scale_shift_add_relu_backward_cpu);
}

}  // namespace resnet_fused
