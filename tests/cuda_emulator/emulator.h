// The CUDA built-ins that csrc/cuda/*.cuh use, for the host: a block's threads run as OS threads (so __syncthreads is
// a real barrier and __shared__ memory is really shared), blocks one after another in a shuffled order (a kernel
// whose result depends on the block order shows it). Enough to run the kernels' logic on a machine without a GPU;
// nothing here says anything about their speed, and warp-level primitives are not provided (the kernels do not use
// them). Include before the kernel headers.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time, so a function-local static is exactly one block's shared memory
#define __shared__ static

using std::max;
using std::min;
using std::sqrt;

namespace emu {

inline std::barrier<>*& block_barrier() {
  static std::barrier<>* b = nullptr;
  return b;
}

// kernel<<<grid, block>>>(args...): every block of the grid, each with block.x * block.y * block.z threads.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("emu::launch: 1 to 1024 threads per block");
  if (grid.y > 65535 || grid.z > 65535) throw std::invalid_argument("emu::launch: grid.y and grid.z must be <= 65535");
  blockDim = block;
  gridDim = grid;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::mt19937 rng(12345);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const dim3& b : blocks) {
    std::barrier<> bar(threads);
    block_barrier() = &bar;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        blockIdx = b;
        kernel(args...);
        bar.arrive_and_drop();  // a finished thread no longer holds the others at a barrier
      });
    }
    for (auto& th : pool) th.join();
    block_barrier() = nullptr;
  }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier()->arrive_and_wait(); }
