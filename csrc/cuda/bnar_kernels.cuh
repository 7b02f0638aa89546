// The kernels of batch_norm_add_relu_backward on CUDA (host code: batch_norm_add_relu_cuda.cu; the math:
// csrc/batch_norm_add_relu.cpp). Plain CUDA C++ (portable.cuh says why).
#pragma once
#include "portable.cuh"

namespace resnet_fused {
namespace kernels {

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t relu_grad(acc_t go, acc_t out, bool relu) {
  return (relu && out <= acc_t(0)) ? acc_t(0) : go;  // threshold_backward's mask: a NaN output passes its gradient
}

// Pass 1: per chunk, the channel sums [sum g, sum g*(y - mean), sum g*(r - mean_r)] (the last for option B only,
// kProj) into part[chunk][3][c], g = grad_out masked by the ReLU. Centred: no cancellation when |mean| >> std.
// Grid: (chunks, channel blocks); the 8 row groups merge in a fixed order.
template <bool kProj, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bnar_bwd_reduce_kernel(acc_t* __restrict__ part, const scalar_t* __restrict__ go,
                           const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                           const acc_t* __restrict__ mean, const scalar_t* __restrict__ r,
                           const acc_t* __restrict__ rmean, int64_t p, int64_t c, bool relu) {
  __shared__ acc_t smem[3][kRowGroups][kChannelsPerBlock];
  const ChunkThread t = chunk_thread(p, c);
  acc_t s_g = 0, s_gy = 0, s_gr = 0;
  if (t.j < c) {
    const acc_t m = mean[t.j], rm = kProj ? rmean[t.j] : acc_t(0);
    int64_t i = t.i0;
    for (int64_t q = 0; q < t.n; ++q, i += kRowGroups * c) {
      const acc_t g = relu_grad(static_cast<acc_t>(go[i]), static_cast<acc_t>(out[i]), relu);
      s_g += g;
      s_gy += g * (static_cast<acc_t>(y[i]) - m);
      if (kProj) s_gr += g * (static_cast<acc_t>(r[i]) - rm);
    }
  }
  finish_chunk_sums(smem, part, t, c, s_g, s_gy, s_gr);
}

// Pass 2: dy = s*g + a + b*y and the shortcut's gradient: dr_mode 0 none, 1 dr = g (identity; option A before its
// scatter), 2 dr = s_r*g + a_r + b_r*r (option B). coef holds [s, a, b, s_r, a_r, b_r], c each. V channels of one
// row per thread and step (see plan_elementwise).
template <int V, typename index_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bnar_bwd_write_kernel(scalar_t* __restrict__ dy, scalar_t* __restrict__ dr, const scalar_t* __restrict__ go,
                          const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                          const scalar_t* __restrict__ r, const acc_t* __restrict__ coef, index_t n, index_t c,
                          int dr_mode, bool relu) {
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x) * V;
  for (index_t i = (static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                    static_cast<index_t>(threadIdx.x)) * V;
       i < n; i += step) {
    const index_t j0 = i % c;
    const Vec<scalar_t, V> gv = load_vec<V>(go + i), ov = load_vec<V>(out + i), yv = load_vec<V>(y + i);
    const Vec<scalar_t, V> rv = dr_mode == 2 ? load_vec<V>(r + i) : yv;
    Vec<scalar_t, V> dyv, drv;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t j = j0 + e;
      const acc_t g = relu_grad(static_cast<acc_t>(gv.v[e]), static_cast<acc_t>(ov.v[e]), relu);
      dyv.v[e] = static_cast<scalar_t>(coef[j] * g + coef[c + j] + coef[2 * c + j] * static_cast<acc_t>(yv.v[e]));
      drv.v[e] = dr_mode == 2 ? static_cast<scalar_t>(coef[3 * c + j] * g + coef[4 * c + j] +
                                                      coef[5 * c + j] * static_cast<acc_t>(rv.v[e]))
                              : static_cast<scalar_t>(g);
    }
    store_vec<V>(dy + i, dyv);
    if (dr_mode != 0) store_vec<V>(dr + i, drv);
  }
}

}  // namespace kernels
}  // namespace resnet_fused
