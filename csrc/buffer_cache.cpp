// See buffer_cache.h.
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace dualenc_fast {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* p = take(bytes);
    if (!p) p = c10::alloc_cpu(bytes);
    auto* blk = new Block{p, bytes};
    return {p, blk, &CachingCpuAllocator::give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t limit() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(limit_);
  }
  void set_limit(int64_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = static_cast<size_t>(bytes);
      evict_locked(limit_, drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }
  int64_t idle_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(idle_);
  }

  static CachingCpuAllocator& get() {
    static auto* a = new CachingCpuAllocator();  // never destroyed: tensors may outlive static teardown
    return *a;
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    idle_ -= bytes;
    return p;
  }
  static void give_back(void* ctx) {
    auto* blk = static_cast<Block*>(ctx);
    get().put(blk->ptr, blk->bytes);
    delete blk;
  }
  void put(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (bytes > limit_) {
        drop.push_back(p);
      } else {
        evict_locked(limit_ - bytes, drop);
        free_[bytes].push_back(p);
        idle_ += bytes;
      }
    }
    for (void* q : drop) c10::free_cpu(q);
  }
  // Free idle blocks (largest sizes first) until at most `keep` bytes stay idle.
  void evict_locked(size_t keep, std::vector<void*>& drop) {
    while (idle_ > keep) {
      auto big = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (!it->second.empty() && (big == free_.end() || it->first > big->first)) big = it;
      }
      if (big == free_.end()) break;
      drop.push_back(big->second.back());
      big->second.pop_back();
      idle_ -= big->first;
    }
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t idle_ = 0;
  size_t limit_ = size_t(1) << 30;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() && !options.pinned_memory()) {
    int64_t n = 1;
    for (auto s : sizes) n *= s;
    const size_t bytes = static_cast<size_t>(n) * options.dtype().itemsize();
    auto& alloc = CachingCpuAllocator::get();
    if (bytes >= kMinBytes && alloc.limit() > 0) {
      return at::Tensor(at::detail::empty_generic(sizes, &alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  options.dtype().toScalarType(), std::nullopt));
    }
  }
  return at::empty(sizes, options);
}

int64_t buffer_cache_limit() { return CachingCpuAllocator::get().limit(); }
void set_buffer_cache_limit(int64_t bytes) { CachingCpuAllocator::get().set_limit(bytes); }
int64_t buffer_cache_bytes() { return CachingCpuAllocator::get().idle_bytes(); }
void clear_buffer_cache() {
  auto& a = CachingCpuAllocator::get();
  const int64_t lim = a.limit();
  a.set_limit(0);
  a.set_limit(lim);
}

}  // namespace dualenc_fast
