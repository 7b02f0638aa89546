// The kernels of bn_stats, bn_stats_backward, bn_finalize and scale_shift_add_relu (+ backward); host code and the
// math's description: resnet_fused_cuda.cu and csrc/resnet_fused.cpp. Plain CUDA C++ (portable.cuh says why).
#pragma once
#include "portable.cuh"

namespace resnet_fused {
namespace kernels {

// ---- bn_stats --------------------------------------------------------------------------------------------------

// Pass 1: (mean, M2) of each chunk of kRowsPerChunk rows. Each thread takes two passes over its rows (mean, then
// squared deviations: no cancellation when |mean| >> std), then the 8 row groups merge with Chan's formula in
// group order. Grid: (chunks, channel blocks).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_stats_chunk_kernel(acc_t* __restrict__ cmean, acc_t* __restrict__ cm2, const scalar_t* __restrict__ x,
                          int64_t p, int64_t c) {
  __shared__ acc_t smem[2][kRowGroups][kChannelsPerBlock];
  const ChunkThread t = chunk_thread(p, c);
  const int tx = t.tx, ty = t.ty;
  const int64_t k = t.k, j = t.j, rows = t.rows, n_t = t.n, step = kRowGroups * c;
  acc_t m = 0, m2 = 0;
  if (j < c && n_t > 0) {
    const scalar_t* px = x + t.i0;
    acc_t s = 0;
    for (int64_t q = 0; q < n_t; ++q) s += static_cast<acc_t>(px[q * step]);
    m = s / static_cast<acc_t>(n_t);
    for (int64_t q = 0; q < n_t; ++q) {
      const acc_t d = static_cast<acc_t>(px[q * step]) - m;
      m2 += d * d;
    }
  }
  smem[0][ty][tx] = m;
  smem[1][ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && j < c) {
    acc_t n_a = static_cast<acc_t>(n_t), mean_a = m, m2_a = m2;
    for (int q = 1; q < kRowGroups; ++q)
      chan_merge(n_a, mean_a, m2_a, static_cast<acc_t>(group_rows(rows, q)), smem[0][q][tx], smem[1][q][tx]);
    cmean[k * c + j] = mean_a;
    cm2[k * c + j] = m2_a;
  }
}

// Pass 2: the chunks' (mean, M2) merged into the mean and the biased variance. Grid: channel blocks. Row group ty
// merges a contiguous run of chunks in order, then the 8 runs merge as a binary tree in shared memory (fixed shape:
// deterministic; a few hundred serial steps per thread instead of `chunks`, 1,568 at batch 512 x 28 x 28).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_stats_merge_kernel(acc_t* __restrict__ mean, acc_t* __restrict__ var, const acc_t* __restrict__ cmean,
                          const acc_t* __restrict__ cm2, int64_t p, int64_t c, int64_t chunks) {
  __shared__ acc_t smem[3][kRowGroups][kChannelsPerBlock];
  const int tx = threadIdx.x % kChannelsPerBlock, ty = threadIdx.x / kChannelsPerBlock;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + tx;
  const int64_t lo = chunks * ty / kRowGroups, hi = chunks * (ty + 1) / kRowGroups;
  acc_t n_a = 0, mean_a = 0, m2_a = 0;
  if (j < c) {
    for (int64_t k = lo; k < hi; ++k) {
      const acc_t n_b = static_cast<acc_t>(min(p - k * kRowsPerChunk, kRowsPerChunk));
      chan_merge(n_a, mean_a, m2_a, n_b, cmean[k * c + j], cm2[k * c + j]);
    }
  }
  for (int s = 1; s < kRowGroups; s *= 2) {
    if (ty % (2 * s) == s) {  // the right half of each pair hands its run over
      smem[0][ty][tx] = n_a;
      smem[1][ty][tx] = mean_a;
      smem[2][ty][tx] = m2_a;
    }
    __syncthreads();
    if (ty % (2 * s) == 0) chan_merge(n_a, mean_a, m2_a, smem[0][ty + s][tx], smem[1][ty + s][tx], smem[2][ty + s][tx]);
    __syncthreads();
  }
  if (ty == 0 && j < c) {
    mean[j] = mean_a;
    var[j] = m2_a / static_cast<acc_t>(p);
  }
}

// ---- scale_shift_add_relu (and bn_stats_backward: dx = shift + scale * x, no shortcut, no ReLU) -----------------

// out = relu?(y * scale + shift + shortcut), V channels of one row per thread and step (see plan_elementwise).
// Shortcut: identity r; option B r * rs + rt; option A r at the strided position, its channels placed at
// pad_front.. (zeros elsewhere). scale/shift absent (nullptr): y as is. NaN stays NaN (torch.relu).
template <int V, typename index_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_shift_add_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                const acc_t* __restrict__ sc, const acc_t* __restrict__ sh,
                                const scalar_t* __restrict__ r, const acc_t* __restrict__ rs,
                                const acc_t* __restrict__ rt, index_t n, index_t c, index_t h, index_t w, index_t rc,
                                index_t rh, index_t rw, int mode, index_t stride, index_t pad_front, bool relu) {
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x) * V;
  for (index_t i = (static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                    static_cast<index_t>(threadIdx.x)) * V;
       i < n; i += step) {
    const index_t j0 = i % c;
    const Vec<scalar_t, V> yv = load_vec<V>(y + i);
    Vec<scalar_t, V> rv = yv, ov;
    if (mode == kIdentity || mode == kProjB) rv = load_vec<V>(r + i);
    index_t base = 0;  // option A: the residual row at the strided position
    if (mode == kPadA) {
      const index_t row = i / c, hw = h * w;
      const index_t b = row / hw, hh = (row / w) % h, ww = row % w;
      base = ((b * rh + hh * stride) * rw + ww * stride) * rc;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t j = j0 + e;
      acc_t v = static_cast<acc_t>(yv.v[e]);
      if (sc != nullptr) v = v * sc[j] + sh[j];
      if (mode == kIdentity) {
        v += static_cast<acc_t>(rv.v[e]);
      } else if (mode == kProjB) {
        v += static_cast<acc_t>(rv.v[e]) * rs[j] + rt[j];
      } else if (mode == kPadA) {
        const index_t jr = j - pad_front;
        if (jr >= 0 && jr < rc) v += static_cast<acc_t>(r[base + jr]);
      }
      ov.v[e] = static_cast<scalar_t>(relu && v <= acc_t(0) ? acc_t(0) : v);
    }
    store_vec<V>(out + i, ov);
  }
}

// Backward of scale_shift_add_relu, one pass: g = grad_out masked where out <= 0 (threshold_backward: a NaN output
// passes its gradient), gy = g * scale, the shortcut's gr (g; g * rs for option B), and per chunk the channel sums
// [sum g*y, sum g, sum g*r] into part[chunk][3][c] (the host sums the chunks in order). Grid: (chunks, channel blocks).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_shift_add_relu_backward_kernel(scalar_t* __restrict__ gy, scalar_t* __restrict__ gr,
                                         acc_t* __restrict__ part, const scalar_t* __restrict__ go,
                                         const scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                         const acc_t* __restrict__ sc, const scalar_t* __restrict__ r,
                                         const acc_t* __restrict__ rs, int64_t p, int64_t c, int mode, bool relu) {
  __shared__ acc_t smem[3][kRowGroups][kChannelsPerBlock];
  const ChunkThread t = chunk_thread(p, c);
  acc_t s_gy = 0, s_g = 0, s_gr = 0;
  if (t.j < c) {
    const acc_t scale = sc != nullptr ? sc[t.j] : acc_t(1);
    const acc_t rscale = rs != nullptr ? rs[t.j] : acc_t(1);
    int64_t i = t.i0;
    for (int64_t q = 0; q < t.n; ++q, i += kRowGroups * c) {
      acc_t g = static_cast<acc_t>(go[i]);
      if (relu && static_cast<acc_t>(out[i]) <= acc_t(0)) g = 0;
      gy[i] = static_cast<scalar_t>(g * scale);
      s_gy += g * static_cast<acc_t>(y[i]);
      s_g += g;
      if (mode == kProjB) {
        s_gr += g * static_cast<acc_t>(r[i]);
        gr[i] = static_cast<scalar_t>(g * rscale);
      } else if (mode != kNone) {
        gr[i] = static_cast<scalar_t>(g);
      }
    }
  }
  finish_chunk_sums(smem, part, t, c, s_gy, s_g, s_gr);
}

// ---- bn_finalize -----------------------------------------------------------------------------------------------

// Running statistics, num_batches_tracked and invstd from the batch's mean and biased variance (count values per
// channel). Launched as exactly ONE block: every thread reads num_batches_tracked before the __syncthreads and
// thread 0 bumps it after; with several blocks a block could read the bumped count. C is at most a few hundred
// here, so one block looping over the channels costs nothing.
template <typename acc_t, typename run_t>
__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(acc_t* __restrict__ invstd, run_t* __restrict__ rm, run_t* __restrict__ rv,
                       int64_t* __restrict__ nbt, const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                       int64_t c, int64_t count, double momentum, bool cumulative, double eps) {
  const int64_t next = *nbt + 1;
  __syncthreads();
  const double f = cumulative ? 1.0 / static_cast<double>(next) : momentum;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    rm[j] = static_cast<run_t>((1.0 - f) * static_cast<double>(rm[j]) + f * static_cast<double>(mean[j]));
    rv[j] = static_cast<run_t>((1.0 - f) * static_cast<double>(rv[j]) + f * unbias * static_cast<double>(var[j]));
    invstd[j] = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(var[j]) + eps));
  }
  if (threadIdx.x == 0) *nbt = next;
}

}  // namespace kernels
}  // namespace resnet_fused
