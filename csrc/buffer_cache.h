// Large op outputs (weight gradients, dense codes) on CPU come from a small
// cache of memory blocks that earlier outputs of the same byte size gave back
// when their tensors died. A training step frees its weight gradients
// (zero_grad(set_to_none=True)) and asks for the same sizes again in the next
// backward: with the cache the pages fault in once per process instead of
// once per step, and freeing costs no unmap. Idle blocks are capped
// (buffer_cache_limit, default 1 GiB); blocks under 1 MiB, and every device
// other than the CPU, use the ordinary allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace dualenc_fast {

// An uninitialised tensor, as at::empty(sizes, options) (contiguous).
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

int64_t buffer_cache_limit();              // most bytes kept idle
void set_buffer_cache_limit(int64_t bytes);  // 0 turns the cache off (and empties it)
int64_t buffer_cache_bytes();              // bytes idle in the cache now
void clear_buffer_cache();                 // free every idle block

}  // namespace dualenc_fast
