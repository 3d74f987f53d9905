// The CPU block cache (block_cache.h): a c10::Allocator whose freed blocks wait in a list for the next request of
// about their size.

#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

namespace msa {
namespace {

// Below this, malloc's own heap already reuses memory without faults.
constexpr size_t kMinCachedBytes = size_t{1} << 20;

struct Block {
  void* data;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  // Never destroyed: tensors of the cache may be freed during interpreter shutdown, after static destructors ran.
  static BlockCache& instance() {
    static auto* cache = new BlockCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) {  // a storage resized to nothing: no block to hold
      return {nullptr, nullptr, nullptr, c10::Device(c10::DeviceType::CPU)};
    }
    Block block = take(bytes);
    if (block.data == nullptr) {
      block = {c10::alloc_cpu(bytes), bytes};
    }
    // The context remembers the block's size for give_back; it is freed there.
    auto* context = new Block(block);
    return {block.data, context, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t set_limit(int64_t max_bytes) {
    std::vector<Block> evicted;
    int64_t held;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = static_cast<size_t>(std::max<int64_t>(max_bytes, 0));
      evict_until_fits(0, evicted);
      held = static_cast<int64_t>(held_);
    }
    free_all(evicted);
    return held;
  }

  int64_t held_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

 private:
  // The smallest held block of at least `bytes` (and at most twice that, so a small request does not pin a large
  // block), or a null block.
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes / 2 <= bytes && (best == free_.end() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best == free_.end()) {
      return {nullptr, 0};
    }
    const Block block = *best;
    free_.erase(best);
    held_ -= block.bytes;
    return block;
  }

  static void give_back(void* context) {
    const Block block = *static_cast<Block*>(context);
    delete static_cast<Block*>(context);
    instance().hold(block);
  }

  void hold(const Block& block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block.bytes <= limit_) {
        evict_until_fits(block.bytes, evicted);
        free_.push_back(block);  // the list runs from the oldest freed block to the newest
        held_ += block.bytes;
      } else {
        evicted.push_back(block);
      }
    }
    free_all(evicted);
  }

  // Moves the oldest blocks to `evicted` until `incoming` more bytes fit under the limit. Caller holds the lock.
  void evict_until_fits(size_t incoming, std::vector<Block>& evicted) {
    while (!free_.empty() && held_ + incoming > limit_) {
      evicted.push_back(free_.front());
      held_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  static void free_all(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) {
      c10::free_cpu(block.data);
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  size_t held_ = 0;
  size_t limit_ = 0;
};

}  // namespace

at::Tensor empty_from_block_cache(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (bytes < kMinCachedBytes) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  }
  return at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

int64_t set_block_cache_limit(int64_t max_bytes) {
  return BlockCache::instance().set_limit(max_bytes);
}

int64_t block_cache_bytes() {
  return BlockCache::instance().held_bytes();
}

}  // namespace msa
