// The CUDA kernels of csrc/cuda/*.cuh compiled for the host (emulator.h) with C entry points for
// tests/test_cuda_kernels_emulated.py (ctypes). Each entry point launches what the matching host function in
// csrc/cuda/*.cu launches, with the same grids, block size and elementwise plan.
//
// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16; the accumulation type is float64 for float64 and
// float32 otherwise (at::opmath_type). Every entry point returns 0, or -1 for an unknown dtype code.
#include "emulator.h"

#include <cstring>

#include "../../csrc/cuda/bn_kernels.cuh"
#include "../../csrc/cuda/bnar_kernels.cuh"

namespace {

using namespace resnet_fused;
using namespace resnet_fused::kernels;

// bfloat16 with round-to-nearest-even, NaN kept NaN (as c10::BFloat16)
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = 0x7fc0;
    } else {
      u += 0x7fff + ((u >> 16) & 1);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct f16 {
  _Float16 h;
  f16() = default;
  f16(float f) : h(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(h); }
};
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2);

template <typename F>
int with_dtype(int dt, F&& f) {
  switch (dt) {
    case 0: f(float{}, float{}); return 0;
    case 1: f(double{}, double{}); return 0;
    case 2: f(bf16{}, float{}); return 0;
    case 3: f(f16{}, float{}); return 0;
    default: return -1;
  }
}

// The plan the .cu launcher makes, or (force_index64) the 64-bit path the launcher takes for huge tensors; max_blocks
// small makes the grid-stride loops take several steps.
template <typename scalar_t>
ElementwisePlan plan(int64_t n, int64_t c, int64_t other, std::initializer_list<const void*> ptrs, int64_t max_blocks,
                     int force_index64) {
  ElementwisePlan pl = plan_elementwise(n, c, other, sizeof(scalar_t), ptrs, max_blocks);
  if (force_index64) pl = {1, false, plan_elementwise(n, 1, other, 16, {}, max_blocks).blocks};
  return pl;
}

}  // namespace

extern "C" {

int emu_bn_stats(int dt, const void* x, int64_t p, int64_t c, void* mean, void* var) {
  return with_dtype(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<acc_t> cmean(chunks * c), cm2(chunks * c);
    emu::launch(chunk_grid(chunks, c), dim3(kThreads), bn_stats_chunk_kernel<scalar_t, acc_t>, cmean.data(),
                cm2.data(), static_cast<const scalar_t*>(x), p, c);
    emu::launch(dim3(channel_blocks(c)), dim3(kThreads),
                bn_stats_merge_kernel<acc_t>, static_cast<acc_t*>(mean), static_cast<acc_t*>(var),
                static_cast<const acc_t*>(cmean.data()), static_cast<const acc_t*>(cm2.data()), p, c, chunks);
  });
}

// Returns the path taken as vec * 10 + index32 (e.g. 41: four channels per step, 32-bit indices), or -1.
int emu_scale_shift_add_relu(int dt, void* out, const void* y, const void* sc, const void* sh, const void* r,
                             const void* rs, const void* rt, int64_t n, int64_t c, int64_t h, int64_t w, int64_t rc,
                             int64_t rh, int64_t rw, int64_t r_numel, int mode, int64_t stride, int64_t pad_front,
                             int relu, int64_t max_blocks, int force_index64) {
  int taken = -1;
  const int rc_ = with_dtype(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const bool same_shape_r = mode == kIdentity || mode == kProjB;
    const auto pl = plan<scalar_t>(n, c, r_numel, {out, y, same_shape_r ? r : nullptr}, max_blocks, force_index64);
    dispatch_elementwise<scalar_t>(pl, [&](auto vec, auto index) {
      using index_t = decltype(index);
      taken = decltype(vec)::value * 10 + (sizeof(index_t) == 4 ? 1 : 0);
      emu::launch(dim3(pl.blocks), dim3(kThreads), scale_shift_add_relu_kernel<decltype(vec)::value, index_t, scalar_t, acc_t>,
                  static_cast<scalar_t*>(out), static_cast<const scalar_t*>(y), static_cast<const acc_t*>(sc),
                  static_cast<const acc_t*>(sh), static_cast<const scalar_t*>(r), static_cast<const acc_t*>(rs),
                  static_cast<const acc_t*>(rt), static_cast<index_t>(n), static_cast<index_t>(c),
                  static_cast<index_t>(h), static_cast<index_t>(w), static_cast<index_t>(rc), static_cast<index_t>(rh),
                  static_cast<index_t>(rw), mode, static_cast<index_t>(stride), static_cast<index_t>(pad_front),
                  relu != 0);
    });
  });
  return rc_ == 0 ? taken : -1;
}

int emu_scale_shift_add_relu_backward(int dt, void* gy, void* gr, void* part, const void* go, const void* out,
                                      const void* y, const void* sc, const void* r, const void* rs, int64_t p,
                                      int64_t c, int mode, int relu) {
  return with_dtype(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const int64_t chunks = std::max<int64_t>(1, (p + kRowsPerChunk - 1) / kRowsPerChunk);
    emu::launch(chunk_grid(chunks, c), dim3(kThreads), scale_shift_add_relu_backward_kernel<scalar_t, acc_t>,
                static_cast<scalar_t*>(gy), static_cast<scalar_t*>(gr), static_cast<acc_t*>(part),
                static_cast<const scalar_t*>(go), static_cast<const scalar_t*>(out), static_cast<const scalar_t*>(y),
                static_cast<const acc_t*>(sc), static_cast<const scalar_t*>(r), static_cast<const acc_t*>(rs), p, c,
                mode, relu != 0);
  });
}

// acc_dt: 0 float32, 1 float64; run_dt: any dtype code (the running statistics' dtype).
int emu_bn_finalize(int acc_dt, int run_dt, void* invstd, void* rm, void* rv, int64_t* nbt, const void* mean,
                    const void* var, int64_t c, int64_t count, double momentum, int cumulative, double eps) {
  if (acc_dt != 0 && acc_dt != 1) return -1;
  return with_dtype(run_dt, [&](auto s, auto) {
    using run_t = decltype(s);
    auto go = [&](auto acc) {
      using acc_t = decltype(acc);
      emu::launch(dim3(1), dim3(kThreads), bn_finalize_kernel<acc_t, run_t>, static_cast<acc_t*>(invstd),
                  static_cast<run_t*>(rm), static_cast<run_t*>(rv), nbt, static_cast<const acc_t*>(mean),
                  static_cast<const acc_t*>(var), c, count, momentum, cumulative != 0, eps);
    };
    if (acc_dt == 0)
      go(float{});
    else
      go(double{});
  });
}

int emu_bnar_backward_reduce(int dt, int proj, void* part, const void* go, const void* out, const void* y,
                             const void* mean, const void* r, const void* rmean, int64_t p, int64_t c, int relu) {
  return with_dtype(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const int64_t chunks = (p + kRowsPerChunk - 1) / kRowsPerChunk;
    auto kernel = proj ? bnar_bwd_reduce_kernel<true, scalar_t, acc_t> : bnar_bwd_reduce_kernel<false, scalar_t, acc_t>;
    emu::launch(chunk_grid(chunks, c), dim3(kThreads), kernel, static_cast<acc_t*>(part),
                static_cast<const scalar_t*>(go), static_cast<const scalar_t*>(out), static_cast<const scalar_t*>(y),
                static_cast<const acc_t*>(mean), static_cast<const scalar_t*>(r), static_cast<const acc_t*>(rmean), p,
                c, relu != 0);
  });
}

// Returns the path taken as in emu_scale_shift_add_relu.
int emu_bnar_backward_write(int dt, void* dy, void* dr, const void* go, const void* out, const void* y, const void* r,
                            const void* coef, int64_t n, int64_t c, int dr_mode, int relu, int64_t max_blocks,
                            int force_index64) {
  int taken = -1;
  const int rc_ = with_dtype(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    void* pdr = dr_mode ? dr : nullptr;
    const void* pr = dr_mode == 2 ? r : nullptr;
    const auto pl = plan<scalar_t>(n, c, n, {dy, pdr, go, out, y, pr}, max_blocks, force_index64);
    dispatch_elementwise<scalar_t>(pl, [&](auto vec, auto index) {
      using index_t = decltype(index);
      taken = decltype(vec)::value * 10 + (sizeof(index_t) == 4 ? 1 : 0);
      emu::launch(dim3(pl.blocks), dim3(kThreads), bnar_bwd_write_kernel<decltype(vec)::value, index_t, scalar_t, acc_t>,
                  static_cast<scalar_t*>(dy), static_cast<scalar_t*>(pdr), static_cast<const scalar_t*>(go),
                  static_cast<const scalar_t*>(out), static_cast<const scalar_t*>(y),
                  static_cast<const scalar_t*>(pr), static_cast<const acc_t*>(coef), static_cast<index_t>(n),
                  static_cast<index_t>(c), dr_mode, relu != 0);
    });
  });
  return rc_ == 0 ? taken : -1;
}

}  // extern "C"
