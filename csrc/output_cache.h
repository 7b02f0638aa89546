// The output buffers of the CPU inference operators (conv3x3_winograd, conv2d_direct), recycled per thread.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace resnet_fused {

// Output buffers of this thread's recent calls, reused once nobody else holds them (the storage referenced only
// from here). Batch-sliced inference allocates one ~1.6 MB activation per layer and slice; fresh allocations of
// that size come from mmap or a just-trimmed heap, and touching them page-faults the whole buffer every time
// (the figures: bench/results/README.md, CPU notes). Per
// thread, so concurrent callers never share a buffer; at most kCachedOutputs buffers of at most kCachedBytes each.
inline constexpr size_t kCachedOutputs = 8;
inline constexpr int64_t kCachedBytes = 4 << 20;

inline at::Tensor new_output(const at::TensorOptions& options, at::IntArrayRef sizes) {
  thread_local std::vector<at::Tensor> cache;
  const std::vector<int64_t> strides = c10::get_channels_last_strides_2d(sizes);
  const auto fresh = [&](const c10::Storage& storage) {
    return at::empty({0}, options).set_(storage, 0, sizes, strides);
  };
  for (size_t i = 0; i < cache.size(); ++i) {
    if (cache[i].storage().use_count() == 1 && cache[i].sizes() == sizes && cache[i].dtype() == options.dtype()) {
      at::Tensor keep = cache[i];  // most recently used last
      cache.erase(cache.begin() + static_cast<int64_t>(i));
      cache.push_back(keep);
      return fresh(keep.storage());
    }
  }
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::ChannelsLast));
  if (static_cast<int64_t>(out.nbytes()) > kCachedBytes) return out;
  if (cache.size() == kCachedOutputs) cache.erase(cache.begin());
  cache.push_back(out);
  return fresh(out.storage());
}

}  // namespace resnet_fused
