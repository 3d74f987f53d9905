// Reused CPU memory for the large tensors the CPU kernels allocate on every training step: the softmax the
// forward keeps for the backward and the word gradients (tens of MB each at B = 128).
//
// Memory fresh from the system costs a page fault on first touch of each 4 KiB page (zeroed by the kernel), which
// at these sizes takes as long as a sixth of the forward itself; and whether glibc hands back such a block from
// its heap or maps fresh pages depends on the history of the process. A training loop asks for the same sizes
// every step, so blocks freed by one step serve the next. Free blocks are held up to a byte limit
// (set_block_cache_limit; the Python side sets it to the saved-softmax budget).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace msa {

// An uninitialised contiguous CPU tensor; large ones take their memory from the cache and give it back to it when
// freed (smaller ones come from torch's allocator: malloc reuses those well).
at::Tensor empty_from_block_cache(at::IntArrayRef sizes, at::ScalarType dtype);

// Sets the most bytes of free blocks the cache holds, frees the oldest blocks above it, and returns the bytes it
// still holds. A limit of 0 frees every block and caches nothing from then on.
int64_t set_block_cache_limit(int64_t max_bytes);

// The bytes of free blocks held now.
int64_t block_cache_bytes();

}  // namespace msa
