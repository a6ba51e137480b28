// CPU emulation of the CUDA execution model, for compiling the unchanged
// kernels of csrc/ops/cuda as C++20 with g++ (`g++ -include emu/emu.h -x c++`)
// and running them on CPU tensors.
//
// Model:
// - every CUDA thread of a block is a fiber (emu/emu.cpp: a small x86-64
//   context switch, ucontext elsewhere); the blocks of a grid run one after
//   another; fibers switch only at synchronisation points;
// - __syncthreads completes when every thread of the block has arrived at the
//   same barrier; a thread that exits while others wait, a barrier some
//   threads skip, or two different barrier statements reached at once raise;
// - warp intrinsics (*_sync, __syncwarp) are rendezvous points: they complete
//   once every lane named in `mask` has arrived with the same operation and
//   mask; a mask naming an exited lane, or lanes arriving with different
//   operations, raise; everything is checked, nothing hangs: a block where no
//   thread can go on raises a deadlock error naming where each thread waits;
// - with a schedule seed (EMU_SEED=n, or emu.set_schedule_seed(n)) the
//   runnable fibers are picked at random at every synchronisation point and
//   the blocks run in a random order; seed 0 is thread order;
// - __ldg checks the alignment of what it loads (a misaligned load raises);
// - __shared__ variables are per-block storage filled with 0xff bytes (NaN
//   floats, -1 integers) at the start of every block, as is the dynamic
//   shared buffer;
// - vector accesses declared with DUALENC_CHECK_ALIGNED must be aligned to
//   their size, as on the GPU;
// - errors are c10::Error (RuntimeError in Python) naming the kernel, the
//   block and the thread.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#define DUALENC_EMU 1

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__ static
#define __align__(n) alignas(n)
#if defined(EMU_ASAN)
// plain statics: AddressSanitizer puts red zones around each one
#define __shared__ static
#else
// one ELF section holding every __shared__ variable, refilled per block
#define __shared__ static __attribute__((section("emu_shared")))
#endif

// ---------------------------------------------------------------- geometry
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
// CUDA's vector type for 16-byte loads, with CUDA's alignment (a uint4 load
// is one 16-byte load and needs a 16-byte aligned address).
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
typedef struct CUstream_st* cudaStream_t;
constexpr int warpSize = 32;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

enum class WarpOp : int { Ballot, Any, All, Shfl, ShflUp, ShflDown, ShflXor, SyncWarp };

namespace detail {

struct ThreadView {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// the running fiber's coordinates (valid inside a kernel only)
extern thread_local ThreadView* t_view;

void syncthreads(const char* file, int line);
// A warp rendezvous: every lane of `mask` deposits `value` and `arg`; returns
// this lane's result (see emu.cpp).
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, unsigned value_size, int arg, int width,
                 const char* file, int line);
unsigned active_mask();
unsigned lane_id();
[[noreturn]] void trap(const char* file, int line);
[[noreturn]] void misaligned_load(const void* p, size_t size, size_t align, const char* file, int line);
[[noreturn]] void misaligned(const void* p, unsigned bytes, const char* file, int line);
void* dynamic_shared();

using Body = void (*)(void*);
// smem_limit: the most dynamic shared memory the kernel may launch with (48
// KiB, or what cudaFuncSetAttribute opted it into).
void run_launch(const char* kernel, dim3 grid, dim3 block, size_t smem, Body body, void* ctx,
                size_t smem_limit = 48 * 1024);
// cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, n)
void set_dynamic_shared_limit(const void* fn, int bytes);
size_t dynamic_shared_limit(const void* fn);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace detail

// The kernel-launch object: emu::launch(name, kernel, grid, block, smem, stream)(args...)
template <typename... P>
struct Launcher {
  const char* name;
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{fn, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(a))...)};
    detail::run_launch(name, grid, block, smem, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->fn, x->args);  // every thread gets its own copy of the arguments
    }, &ctx, detail::dynamic_shared_limit(reinterpret_cast<const void*>(fn)));
  }
};

template <typename... P, typename S>
Launcher<P...> launch(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem, const S&) {
  return Launcher<P...>{name, fn, grid, block, smem};
}

}  // namespace emu

// A kernel's opt-in to more than 48 KiB of dynamic shared memory (up to sm_90's
// 227 KiB); the emulated launch checks its size against it.
template <typename... P>
int cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    ::emu::detail::set_dynamic_shared_limit(reinterpret_cast<const void*>(fn), value);
  }
  return 0;
}

namespace emu {

// A vector access (8 or 16 bytes at once) must be aligned to its size: on the
// GPU a misaligned one stops the kernel (cudaErrorMisalignedAddress), which an
// x86 CPU would not notice. Kernels state each vector access with
// DUALENC_CHECK_ALIGNED (ops/cuda/launch.cuh); here it raises, naming the
// kernel, block, thread and the access's source line.
inline void check_aligned(const void* p, unsigned bytes,
                          std::source_location loc = std::source_location::current()) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    detail::misaligned(p, bytes, loc.file_name(), static_cast<int>(loc.line()));
  }
}

// Python-settable schedule (emu/module.cpp): 0 = thread order.
void set_schedule_seed(uint64_t seed);
uint64_t schedule_seed();
// How many kernel launches ran since the seed was last set.
uint64_t launch_count();

}  // namespace emu

// ---------------------------------------------------------------- built-ins
#define threadIdx (::emu::detail::t_view->thread_idx)
#define blockIdx (::emu::detail::t_view->block_idx)
#define blockDim (::emu::detail::t_view->block_dim)
#define gridDim (::emu::detail::t_view->grid_dim)

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::emu::detail::syncthreads(loc.file_name(), static_cast<int>(loc.line()));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  ::emu::detail::warp_op(::emu::WarpOp::SyncWarp, mask, 0, 0, 0, 32, loc.file_name(), static_cast<int>(loc.line()));
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() { return ::emu::detail::active_mask(); }
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(::emu::detail::warp_op(::emu::WarpOp::Ballot, mask, pred != 0, 1, 0, 32,
                                                      loc.file_name(), static_cast<int>(loc.line())));
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::emu::detail::warp_op(::emu::WarpOp::Any, mask, pred != 0, 1, 0, 32, loc.file_name(),
                                                 static_cast<int>(loc.line())));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::emu::detail::warp_op(::emu::WarpOp::All, mask, pred != 0, 1, 0, 32, loc.file_name(),
                                                 static_cast<int>(loc.line())));
}

namespace emu::detail {
template <typename T>
T shfl(WarpOp op, unsigned mask, T v, int arg, int width, const std::source_location& loc) {
  return from_bits<T>(
      warp_op(op, mask, to_bits(v), sizeof(T), arg, width, loc.file_name(), static_cast<int>(loc.line())));
}
}  // namespace emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  return ::emu::detail::shfl(::emu::WarpOp::Shfl, mask, v, src, width, loc);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  return ::emu::detail::shfl(::emu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width, loc);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  return ::emu::detail::shfl(::emu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width, loc);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  return ::emu::detail::shfl(::emu::WarpOp::ShflXor, mask, v, lane_mask, width, loc);
}

inline void __trap(std::source_location loc = std::source_location::current()) {
  ::emu::detail::trap(loc.file_name(), static_cast<int>(loc.line()));
}

// Atomics: fibers never run at the same time, so a plain read-modify-write.
template <typename T, typename U>
T atomicAdd(T* p, U v) { T old = *p; *p = static_cast<T>(old + static_cast<T>(v)); return old; }
template <typename T, typename U>
T atomicSub(T* p, U v) { T old = *p; *p = static_cast<T>(old - static_cast<T>(v)); return old; }
template <typename T, typename U>
T atomicExch(T* p, U v) { T old = *p; *p = static_cast<T>(v); return old; }
template <typename T, typename U>
T atomicMax(T* p, U v) { T old = *p; if (static_cast<T>(v) > old) *p = static_cast<T>(v); return old; }
template <typename T, typename U>
T atomicMin(T* p, U v) { T old = *p; if (static_cast<T>(v) < old) *p = static_cast<T>(v); return old; }
template <typename T, typename U>
T atomicAnd(T* p, U v) { T old = *p; *p = old & static_cast<T>(v); return old; }
template <typename T, typename U>
T atomicOr(T* p, U v) { T old = *p; *p = old | static_cast<T>(v); return old; }
template <typename T, typename U>
T atomicXor(T* p, U v) { T old = *p; *p = old ^ static_cast<T>(v); return old; }
template <typename T, typename U, typename V>
T atomicCAS(T* p, U compare, V v) { T old = *p; if (old == static_cast<T>(compare)) *p = static_cast<T>(v); return old; }
inline unsigned atomicInc(unsigned* p, unsigned limit) { unsigned old = *p; *p = old >= limit ? 0u : old + 1u; return old; }
inline unsigned atomicDec(unsigned* p, unsigned limit) { unsigned old = *p; *p = (old == 0u || old > limit) ? limit : old - 1u; return old; }

// Integer and bit intrinsics.
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __lane_id_emu() { return ::emu::detail::lane_id(); }
// A load through the read-only cache; checked for T's alignment, as the GPU
// faults on a misaligned load (e.g. a uint4 from an address that is not a
// multiple of 16): here it raises, naming kernel, block and thread.
template <typename T>
T __ldg(const T* p, std::source_location loc = std::source_location::current()) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) {
    ::emu::detail::misaligned_load(p, sizeof(T), alignof(T), loc.file_name(), static_cast<int>(loc.line()));
  }
  return *p;
}

inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline double __longlong_as_double(long long u) { return std::bit_cast<double>(u); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// 16-bit float types are c10's.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float f) { return c10::Half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return c10::BFloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }


// Kernels register for the CUDA key; emulated, they serve CPU tensors.
#include <torch/library.h>
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
