// One transpose of a sparse code per training step, shared by every product
// that walks it. In the backward of a joint step the decoder and the encoder
// walk the transpose (pairs grouped by feature, a FeatureCsr) of the same
// [B, k] code, and the NFM-linear layer and the FM pooling that of its first N
// columns: four builds, two distinct transposes. The indices this package's
// own selections return (topk_encode, topn_reselect; every device) are marked;
// a product asking for the transpose of a marked code, or of a view of one,
// gets the transpose built first.
//
// A transpose is found again only for the same storage (held weakly: neither
// the mark nor the entry keeps the code or its memory alive, and a storage
// that died can never be mistaken for a new one at the same address), the
// same view of it (offset, sizes, strides), the same version counter (an
// in-place write to the code gives a new version, so a new transpose), the
// same F and the same stream. Unmarked codes (anything a user passes) are
// transposed afresh on every call, as before, and so is every code while the
// stream is being captured into a CUDA graph (Csr::shareable_now). Writes that
// bypass the version counter (through `.data`, a NumPy or DLPack alias) are
// not seen: after such a write, clear_shared_csrs() or turn sharing off. At most kMaxEntries transposes
// are kept; entries whose code died are dropped at the next mark or lookup;
// clear_shared_csrs() (ops.clear_buffer_cache) drops them all.
//
// Header only: the CUDA module, the CPU module and the emulated module
// (compiled with `dualenc_fast` renamed) each get their own registry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <typeinfo>
#include <utility>
#include <vector>

namespace dualenc_fast {
namespace csr_share {

constexpr size_t kMaxMarks = 8;    // codes marked and alive at once (one per step in flight is usual)
constexpr size_t kMaxEntries = 4;  // transposes kept (a step needs two)

using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

struct Entry {
  explicit Entry(WeakStorage w) : storage(std::move(w)) {}
  WeakStorage storage;
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  int64_t version = 0, F = 0, stream = 0;
  const std::type_info* type = nullptr;  // the device's transpose type
  std::shared_ptr<const void> csr;
};

struct Registry {
  std::mutex mu;
  std::vector<WeakStorage> marks;
  std::vector<Entry> entries;  // oldest first
  std::atomic<bool> enabled{true};
  std::atomic<int64_t> built{0}, reused{0};

  void drop_dead_locked() {
    std::erase_if(marks, [](const WeakStorage& w) { return w.expired(); });
    std::erase_if(entries, [](const Entry& e) { return e.storage.expired(); });
  }
};

inline Registry& registry() {
  // never destroyed: a kept CUDA transpose must not be freed by a static
  // destructor after the allocator is gone at exit
  static Registry* r = new Registry;
  return *r;
}

inline bool same_storage(const WeakStorage& w, const c10::StorageImpl* impl) {
  // the weak reference keeps the StorageImpl object itself allocated, so while
  // it is not expired no other storage can live at this address
  return !w.expired() && w._unsafe_get_target() == impl;
}

inline bool shareable(const at::Tensor& t) {
  return t.defined() && t.has_storage() && !t.is_inference() && t.layout() == c10::kStrided;
}

// The current stream of the tensor's device (0 on the CPU).
inline int64_t stream_of(const at::Tensor& t) {
  const auto dev = t.device();
  if (dev.is_cpu()) return 0;
  return static_cast<int64_t>(c10::impl::getDeviceGuardImpl(dev.type())->getStream(dev).id());
}

}  // namespace csr_share

// Marks `indices` (a code topk_encode returns) so that the products of its
// backward share one transpose of it. Inference tensors are not marked.
inline void mark_shared_code(const at::Tensor& indices) {
  if (!csr_share::shareable(indices)) return;
  auto& r = csr_share::registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  r.drop_dead_locked();
  const auto* impl = indices.storage().unsafeGetStorageImpl();
  for (const auto& w : r.marks) {
    if (csr_share::same_storage(w, impl)) return;
  }
  if (r.marks.size() >= csr_share::kMaxMarks) r.marks.erase(r.marks.begin());
  r.marks.push_back(indices.storage().getWeakStorageImpl());
}

// Turns sharing on or off (off: every product builds its own transpose, as
// before; for measurements and tests). Turning it off drops the entries.
inline void set_share_csrs(bool on) {
  auto& r = csr_share::registry();
  r.enabled = on;
  if (!on) {
    const std::lock_guard<std::mutex> lock(r.mu);
    r.entries.clear();
  }
}
inline bool share_csrs() { return csr_share::registry().enabled; }

// Drops every kept transpose and mark.
inline void clear_shared_csrs() {
  auto& r = csr_share::registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  r.entries.clear();
  r.marks.clear();
}

// (transposes built, transposes reused) since the last reset: the tests count
// builds per step with it.
inline std::pair<int64_t, int64_t> shared_csr_stats(bool reset) {
  auto& r = csr_share::registry();
  std::pair<int64_t, int64_t> out{r.built.load(), r.reused.load()};
  if (reset) {
    r.built = 0;
    r.reused = 0;
  }
  return out;
}

// The transpose of the code `indices` ([B, k] int64, exactly as the op
// received it: the view, before any .contiguous()) over F features: the one
// kept for a marked code, else build() (which returns a Csr).
template <typename Csr, typename Build>
std::shared_ptr<const Csr> shared_csr(const at::Tensor& indices, int64_t F, Build&& build) {
  auto& r = csr_share::registry();
  const bool can_share = r.enabled && csr_share::shareable(indices) && Csr::shareable_now();
  std::optional<csr_share::Entry> key;
  if (can_share) {
    const auto* impl = indices.storage().unsafeGetStorageImpl();
    const std::lock_guard<std::mutex> lock(r.mu);
    r.drop_dead_locked();
    bool marked = false;
    for (const auto& w : r.marks) marked = marked || csr_share::same_storage(w, impl);
    if (marked) {
      key.emplace(indices.storage().getWeakStorageImpl());
      key->offset = indices.storage_offset();
      key->sizes = indices.sizes().vec();
      key->strides = indices.strides().vec();
      key->version = indices._version();
      key->F = F;
      key->stream = csr_share::stream_of(indices);
      key->type = &typeid(Csr);
      for (const auto& e : r.entries) {
        if (csr_share::same_storage(e.storage, impl) && e.offset == key->offset && e.sizes == key->sizes &&
            e.strides == key->strides && e.version == key->version && e.F == F && e.stream == key->stream &&
            *e.type == typeid(Csr)) {
          ++r.reused;
          return std::static_pointer_cast<const Csr>(e.csr);
        }
      }
    }
  }
  auto csr = std::make_shared<const Csr>(build());
  ++r.built;
  if (key) {
    key->csr = csr;
    const std::lock_guard<std::mutex> lock(r.mu);
    if (r.entries.size() >= csr_share::kMaxEntries) r.entries.erase(r.entries.begin());
    r.entries.push_back(std::move(*key));
  }
  return csr;
}

}  // namespace dualenc_fast
