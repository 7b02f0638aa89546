// batch_norm_add_relu_backward on CUDA: two passes over the activation, as on the CPU (csrc/batch_norm_add_relu.cpp
// has the math). Pass 1: per chunk of kRowsPerChunk rows, sum g, sum g*(y - mean) and (option B) sum g*(r - mean_r),
// g = dout * [out > 0] (threshold_backward's mask: a NaN output passes its gradient), in the centred form (no
// cancellation when |mean| >> std); the chunk partials are then summed in chunk order (deterministic). Pass 2: dy =
// s*g + a + b*y and the shortcut's gradient. This replaces the composite (scale_shift_add_relu_backward + 3-4 extra
// full-size passes of per-channel ATen arithmetic) on CUDA; the composite stays registered for other devices.
//
// Pass 1: a block is 32 channels x 8 row groups of one chunk (256 threads); each thread walks its rows with the
// channel index fixed (coalesced across the warp), the 8 row groups are merged in shared memory in a fixed order.
// Pass 2: one thread per element, 32-bit indices where the tensor is small enough (checked), 64-bit otherwise.
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

namespace resnet_fused {
namespace {

constexpr int kChannelsPerBlock = 32;
constexpr int kRowGroups = 8;
constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t relu_grad(acc_t go, acc_t out, bool relu) {
  return (relu && out <= acc_t(0)) ? acc_t(0) : go;
}

template <bool kProj, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bnar_bwd_reduce_kernel(acc_t* __restrict__ part, const scalar_t* __restrict__ go,
                           const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                           const acc_t* __restrict__ mean, const scalar_t* __restrict__ r,
                           const acc_t* __restrict__ rmean, int64_t p, int64_t c, bool relu) {
  __shared__ acc_t smem[3][kRowGroups][kChannelsPerBlock];
  const int tx = threadIdx.x % kChannelsPerBlock, ty = threadIdx.x / kChannelsPerBlock;
  const int64_t k = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kChannelsPerBlock + tx;
  const int64_t r0 = k * kRowsPerChunk, r1 = min(p, r0 + kRowsPerChunk);
  acc_t s_g = 0, s_gy = 0, s_gr = 0;
  if (j < c) {
    const acc_t m = mean[j], rm = kProj ? rmean[j] : acc_t(0);
    for (int64_t row = r0 + ty; row < r1; row += kRowGroups) {
      const int64_t i = row * c + j;
      const acc_t g = relu_grad(static_cast<acc_t>(go[i]), static_cast<acc_t>(out[i]), relu);
      s_g += g;
      s_gy += g * (static_cast<acc_t>(y[i]) - m);
      if (kProj) s_gr += g * (static_cast<acc_t>(r[i]) - rm);
    }
  }
  smem[0][ty][tx] = s_g;
  smem[1][ty][tx] = s_gy;
  smem[2][ty][tx] = s_gr;
  __syncthreads();
  if (ty == 0 && j < c) {  // the row groups in a fixed order: deterministic
    for (int q = 1; q < kRowGroups; ++q) {
      s_g += smem[0][q][tx];
      s_gy += smem[1][q][tx];
      s_gr += smem[2][q][tx];
    }
    acc_t* dst = part + k * 3 * c;
    dst[j] = s_g;
    dst[c + j] = s_gy;
    dst[2 * c + j] = s_gr;
  }
}

// dy = s*g + a + b*y; kDr: 0 no shortcut, 1 dr = g (identity, option A before its scatter), 2 dr = s_r*g + a_r +
// b_r*r (option B). coef holds [s, a, b, s_r, a_r, b_r], c each.
template <int kDr, typename index_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bnar_bwd_write_kernel(scalar_t* __restrict__ dy, scalar_t* __restrict__ dr, const scalar_t* __restrict__ go,
                          const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                          const scalar_t* __restrict__ r, const acc_t* __restrict__ coef, index_t n, index_t c,
                          bool relu) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t j = i % c;
    const acc_t g = relu_grad(static_cast<acc_t>(go[i]), static_cast<acc_t>(out[i]), relu);
    dy[i] = static_cast<scalar_t>(coef[j] * g + coef[c + j] + coef[2 * c + j] * static_cast<acc_t>(y[i]));
    if (kDr == 1) dr[i] = static_cast<scalar_t>(g);
    if (kDr == 2)
      dr[i] = static_cast<scalar_t>(coef[3 * c + j] * g + coef[4 * c + j] + coef[5 * c + j] * static_cast<acc_t>(r[i]));
  }
}

unsigned write_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <int kDr, typename scalar_t, typename acc_t>
void launch_write(at::Tensor& dy, at::Tensor& dr, const at::Tensor& go, const at::Tensor& out, const at::Tensor& y,
                  const at::Tensor& r, const at::Tensor& coef, int64_t n, int64_t c, bool relu,
                  cudaStream_t stream) {
  scalar_t* pdr = kDr ? dr.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pr = kDr == 2 ? r.data_ptr<scalar_t>() : nullptr;
  if (n <= std::numeric_limits<int32_t>::max() - static_cast<int64_t>(kThreads) * 65535) {  // 32-bit indices fit
    bnar_bwd_write_kernel<kDr, int32_t, scalar_t, acc_t><<<write_blocks(n), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), pdr, go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pr,
        coef.data_ptr<acc_t>(), static_cast<int32_t>(n), static_cast<int32_t>(c), relu);
  } else {
    bnar_bwd_write_kernel<kDr, int64_t, scalar_t, acc_t><<<write_blocks(n), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), pdr, go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pr,
        coef.data_ptr<acc_t>(), n, c, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((c + kChannelsPerBlock - 1) /
                                                                         kChannelsPerBlock));
    auto reduce = proj ? bnar_bwd_reduce_kernel<true, scalar_t, acc_t> : bnar_bwd_reduce_kernel<false, scalar_t, acc_t>;
    reduce<<<grid, kThreads, 0, stream>>>(part.data_ptr<acc_t>(), go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                          y.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), r.data_ptr<scalar_t>(),
                                          rm.data_ptr<acc_t>(), p, c, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums = part.sum(0);  // [sum g, sum g*(y - mean), sum g*(r - mean_r)]: ATen's sum is deterministic on CUDA
    cy = coefficients(y, mean, invstd, weight, sums[0], sums[1], p);
    if (proj) cr = coefficients(y, *res_mean, *res_invstd, res_weight, sums[0], sums[2], p);
    const at::Tensor coef = at::stack({cy.s, cy.a, cy.b, proj ? cr.s : cy.s, proj ? cr.a : cy.a,
                                       proj ? cr.b : cy.b}).contiguous();
    const int64_t n = y.numel();
    if (proj)
      launch_write<2, scalar_t, acc_t>(dy, gr, go, out, y, r, coef, n, c, relu, stream);
    else if (mode != kNone)
      launch_write<1, scalar_t, acc_t>(dy, gr, go, out, y, r, coef, n, c, relu, stream);
    else
      launch_write<0, scalar_t, acc_t>(dy, gr, go, out, y, r, coef, n, c, relu, stream);
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
