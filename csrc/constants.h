// Constants shared by the CPU operators, the CUDA kernels and the host-compiled kernel tests (no ATen here, so that
// csrc/cuda/*.cuh also compile without torch: tests/cuda_emulator).
#pragma once
#include <cstdint>

namespace resnet_fused {

// Shortcut modes of scale_shift_add_relu (the same numbering as the Triton op bn_add_relu).
enum ShortcutMode : int64_t { kNone = 0, kIdentity = 1, kPadA = 2, kProjB = 3 };

// Deterministic reductions walk the rows (N*H*W positions, channels contiguous) in fixed chunks of this many rows,
// one partial per chunk, merged in chunk order: the result does not depend on the thread or block count.
constexpr int64_t kRowsPerChunk = 256;

}  // namespace resnet_fused
