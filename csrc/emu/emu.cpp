// The CUDA emulator's runtime (see emu.h): fibers, the block scheduler, the
// barrier and warp rendezvous, and the checks that turn misuse into errors.
#include "emu/emu.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Linker-made bounds of the section holding the __shared__ variables.
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

#if defined(EMU_ASM_SWITCH)
// emu_switch_context(save, load): saves the callee-saved registers, the SSE
// control word and the x87 control word on the current stack, stores the stack
// pointer in *save, loads `load` and restores the same from there.
// emu_fiber_start: first return target of a new fiber; calls r13(r12).
asm(R"(
  .text
  .globl emu_switch_context
  .hidden emu_switch_context
  .type emu_switch_context, @function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context, .-emu_switch_context

  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");
extern "C" void emu_switch_context(void** save, void* load);
extern "C" void emu_fiber_start();
#endif

namespace emu {
namespace detail {

thread_local ThreadView* t_view = nullptr;

namespace {

#if defined(EMU_ASAN)
constexpr size_t kStackBytes = size_t(512) << 10;
#else
constexpr size_t kStackBytes = size_t(64) << 10;
#endif
constexpr unsigned kFill = 0xff;  // fill byte of fresh shared memory

enum class State { Ready, Barrier, Warp, Done };

struct Stack {
  char* base = nullptr;  // lowest usable byte (a guard page lies below)
  size_t size = 0;
};

struct Fiber {
  ThreadView view;
  int id = 0;  // linear thread index within the block
  State state = State::Ready;
  const char* file = "";  // where it waits
  int line = 0;
#if defined(EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  Stack stack;
  uint64_t result = 0;  // of its last warp operation
  void* fake_stack = nullptr;
};

struct WarpSlot {
  bool pending = false;
  WarpOp op = WarpOp::SyncWarp;
  unsigned mask = 0, arrived = 0, size = 0;
  const char* file = "";
  int line = 0;
  uint64_t value[32];
  int arg[32];
  int width[32];
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string short_file(const char* f) {
  std::string s(f);
  const auto p = s.find("csrc/");
  return p == std::string::npos ? s : s.substr(p);
}

// One running launch: the state of its current block.
struct Run {
  const char* kernel = "";
  dim3 grid, block;
  size_t smem = 0;
  Body body = nullptr;
  void* ctx = nullptr;
  uint3 block_idx{0, 0, 0};
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<WarpSlot> warps;
  std::vector<unsigned> exited_lanes;  // per warp: lanes that exited or do not exist
  int at_barrier = 0, exited = 0;
  const char* bfile = "";
  int bline = 0;
  std::deque<int> fifo;      // thread order
  std::vector<int> pool;     // seeded order
  std::mt19937_64 rng;
  bool seeded = false;
  Fiber* cur = nullptr;
  std::string error;
  std::exception_ptr exc;
  std::vector<unsigned char> dyn;  // dynamic shared memory
#if defined(EMU_ASM_SWITCH)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
};

Run* g_run = nullptr;  // the launch in progress (launches are serialised)
std::mutex g_mutex;
uint64_t g_seed = 0;
uint64_t g_launches = 0;
bool g_seed_from_env = false;

uint64_t env_seed() {
  const char* s = std::getenv("EMU_SEED");
  if (!s || !*s) return 0;
  return std::strtoull(s, nullptr, 10);
}

std::string where(const Run& r, const Fiber& f) {
  std::ostringstream o;
  o << "kernel " << r.kernel << ", block (" << r.block_idx.x << "," << r.block_idx.y << "," << r.block_idx.z
    << "), thread (" << f.view.thread_idx.x << "," << f.view.thread_idx.y << "," << f.view.thread_idx.z << ")";
  return o.str();
}

std::vector<Stack>& stack_pool() {
  static thread_local std::vector<Stack> pool;
  return pool;
}

Stack get_stack(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "emu: could not allocate a fiber stack");
    mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    pool.push_back(Stack{static_cast<char*>(m) + page, kStackBytes});
  }
  return pool[i];
}

void switch_to_scheduler(Fiber& f, bool exiting);

void fiber_main(void*) {
  Run& r = *g_run;
  Fiber& f = *r.cur;
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  try {
    r.body(r.ctx);
  } catch (...) {
    if (!r.exc) r.exc = std::current_exception();
  }
  // exit checks
  f.state = State::Done;
  ++r.exited;
  const int warp = f.id / 32, lane = f.id % 32;
  r.exited_lanes[warp] |= 1u << lane;
  if (r.error.empty() && !r.exc) {
    if (r.at_barrier > 0) {
      r.error = "emu: " + where(r, f) + " exited while " + std::to_string(r.at_barrier) +
                " thread(s) wait at __syncthreads (" + short_file(r.bfile) + ":" + std::to_string(r.bline) +
                "): every thread of a block must reach every barrier";
    } else {
      const WarpSlot& w = r.warps[warp];
      if (w.pending && (w.mask >> lane & 1u)) {
        r.error = "emu: " + where(r, f) + " exited while lanes wait for it at " + op_name(w.op) + " (" +
                  short_file(w.file) + ":" + std::to_string(w.line) + ") with a mask naming it";
      }
    }
  }
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

#if !defined(EMU_ASM_SWITCH)
void fiber_entry_uc() { fiber_main(nullptr); }
#endif

void init_fiber(Run& r, Fiber& f) {
  f.stack = get_stack(static_cast<size_t>(f.id));
#if defined(EMU_ASAN)
  __asan_unpoison_memory_region(f.stack.base, f.stack.size);
#endif
#if defined(EMU_ASM_SWITCH)
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.base + f.stack.size) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = reinterpret_cast<uint64_t>(&emu_fiber_start);  // return address
  s[-2] = 0;                                              // rbp
  s[-3] = 0;                                              // rbx
  s[-4] = 0;                                              // r12: argument
  s[-5] = reinterpret_cast<uint64_t>(&fiber_main);        // r13: entry
  s[-6] = 0;                                              // r14
  s[-7] = 0;                                              // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  uint64_t ctl = mxcsr | (uint64_t(fpucw) << 32);
  s[-8] = ctl;
  f.sp = &s[-8];
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.base;
  f.ctx.uc_stack.ss_size = f.stack.size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_entry_uc, 0);
#endif
  (void)r;
}

void switch_to_fiber(Run& r, Fiber& f) {
  r.cur = &f;
  t_view = &f.view;
#if defined(EMU_ASAN)
  __sanitizer_start_switch_fiber(&r.sched_fake, f.stack.base, f.stack.size);
#endif
#if defined(EMU_ASM_SWITCH)
  emu_switch_context(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched_ctx, &f.ctx);
#endif
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
  t_view = nullptr;
}

void switch_to_scheduler(Fiber& f, bool exiting) {
  Run& r = *g_run;
#if defined(EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, r.sched_bottom, r.sched_size);
#else
  (void)exiting;
#endif
#if defined(EMU_ASM_SWITCH)
  emu_switch_context(&f.sp, r.sched_sp);
#else
  swapcontext(&f.ctx, &r.sched_ctx);
#endif
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_bottom, &r.sched_size);
#endif
}

void make_ready(Run& r, int id) {
  r.fibers[id].state = State::Ready;
  if (r.seeded) {
    r.pool.push_back(id);
  } else {
    r.fifo.push_back(id);
  }
}

// Leaves the fiber waiting (or fails the launch) and returns to the scheduler.
void wait_here(Run& r, Fiber& f) {
  switch_to_scheduler(f, false);
  if (!r.error.empty()) std::abort();  // an abandoned fiber is never resumed
}

[[noreturn]] void fail(Run& r, Fiber& f, std::string msg) {
  if (r.error.empty()) r.error = std::move(msg);
  switch_to_scheduler(f, true);
  std::abort();
}

Fiber& current(const char* what) {
  TORCH_CHECK(g_run && g_run->cur, "emu: ", what, " called outside a kernel");
  return *g_run->cur;
}

std::string deadlock_report(Run& r) {
  std::ostringstream o;
  o << "emu: deadlock in kernel " << r.kernel << ", block (" << r.block_idx.x << "," << r.block_idx.y << ","
    << r.block_idx.z << "): no thread can go on.";
  if (r.at_barrier > 0) {
    o << " " << r.at_barrier << " thread(s) wait at __syncthreads (" << short_file(r.bfile) << ":" << r.bline
      << ");";
  }
  for (size_t w = 0; w < r.warps.size(); ++w) {
    const WarpSlot& s = r.warps[w];
    if (!s.pending) continue;
    const unsigned missing = s.mask & ~s.arrived;
    o << " warp " << w << ": lanes 0x" << std::hex << s.arrived << " wait at " << op_name(s.op) << " ("
      << short_file(s.file) << ":" << std::dec << s.line << ") for lanes 0x" << std::hex << missing << std::dec
      << ";";
  }
  for (const Fiber& f : r.fibers) {
    if (f.state == State::Barrier || f.state == State::Warp) {
      o << " first waiting: thread (" << f.view.thread_idx.x << "," << f.view.thread_idx.y << ","
        << f.view.thread_idx.z << ") at " << short_file(f.file) << ":" << f.line << ".";
      break;
    }
  }
  return o.str();
}

void fill_shared(Run& r) {
#if !defined(EMU_ASAN)
  if (__start_emu_shared && __stop_emu_shared && __stop_emu_shared > __start_emu_shared) {
    std::memset(__start_emu_shared, kFill, static_cast<size_t>(__stop_emu_shared - __start_emu_shared));
  }
#endif
  if (!r.dyn.empty()) std::memset(r.dyn.data(), kFill, r.dyn.size());
}

void run_block(Run& r) {
  const int n = r.nthreads;
  r.fibers.assign(static_cast<size_t>(n), Fiber{});
  const int nwarps = (n + 31) / 32;
  r.warps.assign(static_cast<size_t>(nwarps), WarpSlot{});
  r.exited_lanes.assign(static_cast<size_t>(nwarps), 0u);
  if (n % 32) r.exited_lanes.back() = ~((1u << (n % 32)) - 1u);  // lanes that do not exist
  r.at_barrier = r.exited = 0;
  r.fifo.clear();
  r.pool.clear();
  fill_shared(r);
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[static_cast<size_t>(i)];
    f.id = i;
    const unsigned bx = r.block.x, by = r.block.y;
    f.view.thread_idx = uint3{static_cast<unsigned>(i) % bx, (static_cast<unsigned>(i) / bx) % by,
                              static_cast<unsigned>(i) / (bx * by)};
    f.view.block_idx = r.block_idx;
    f.view.block_dim = r.block;
    f.view.grid_dim = r.grid;
    init_fiber(r, f);
    make_ready(r, i);
  }
  while (true) {
    int id;
    if (r.seeded) {
      if (r.pool.empty()) break;
      const size_t j = static_cast<size_t>(r.rng() % r.pool.size());
      id = r.pool[j];
      r.pool[j] = r.pool.back();
      r.pool.pop_back();
    } else {
      if (r.fifo.empty()) break;
      id = r.fifo.front();
      r.fifo.pop_front();
    }
    switch_to_fiber(r, r.fibers[static_cast<size_t>(id)]);
    r.cur = nullptr;
    if (r.exc) std::rethrow_exception(r.exc);
    TORCH_CHECK(r.error.empty(), r.error);
  }
  if (r.exited != n) TORCH_CHECK(false, deadlock_report(r));
}

}  // namespace

void syncthreads(const char* file, int line) {
  Fiber& f = current("__syncthreads");
  Run& r = *g_run;
  if (r.exited > 0) {
    fail(r, f, "emu: " + where(r, f) + " reached __syncthreads (" + short_file(file) + ":" + std::to_string(line) +
                   ") after " + std::to_string(r.exited) +
                   " thread(s) of its block exited: every thread of a block must reach every barrier");
  }
  if (r.at_barrier == 0) {
    r.bfile = file;
    r.bline = line;
  } else if (r.bline != line || std::strcmp(r.bfile, file) != 0) {
    fail(r, f, "emu: divergent barrier: " + where(r, f) + " reached __syncthreads at " + short_file(file) + ":" +
                   std::to_string(line) + " while " + std::to_string(r.at_barrier) + " thread(s) wait at " +
                   short_file(r.bfile) + ":" + std::to_string(r.bline));
  }
  f.state = State::Barrier;
  f.file = file;
  f.line = line;
  if (++r.at_barrier == r.nthreads) {
    r.at_barrier = 0;
    for (int i = 0; i < r.nthreads; ++i) make_ready(r, i);
  }
  wait_here(r, f);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, unsigned value_size, int arg, int width,
                 const char* file, int line) {
  Fiber& f = current(op_name(op));
  Run& r = *g_run;
  const int warp = f.id / 32, lane = f.id % 32;
  const std::string at = std::string(op_name(op)) + " (" + short_file(file) + ":" + std::to_string(line) + ")";
  if (!(mask >> lane & 1u)) {
    fail(r, f, "emu: " + where(r, f) + " called " + at + " with a mask 0x" + ([&] {
                 std::ostringstream o;
                 o << std::hex << mask;
                 return o.str();
               })() + " that does not name its own lane " + std::to_string(lane));
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(r, f, "emu: " + where(r, f) + " called " + at + " with width " + std::to_string(width) +
                   ", not a power of 2 up to 32");
  }
  const unsigned gone = mask & r.exited_lanes[static_cast<size_t>(warp)];
  if (gone) {
    fail(r, f, "emu: " + where(r, f) + " called " + at + " with a mask naming lane " +
                   std::to_string(std::countr_zero(gone)) + ", which has exited or does not exist");
  }
  WarpSlot& w = r.warps[static_cast<size_t>(warp)];
  if (!w.pending) {
    w.pending = true;
    w.op = op;
    w.mask = mask;
    w.arrived = 0;
    w.size = value_size;
    w.file = file;
    w.line = line;
  } else if (w.op != op || w.mask != mask || w.size != value_size) {
    std::ostringstream o;
    o << "emu: mismatched warp operations: " << where(r, f) << " called " << at << " with mask 0x" << std::hex
      << mask << " while lanes 0x" << w.arrived << " of its warp wait at " << op_name(w.op) << " ("
      << short_file(w.file) << ":" << std::dec << w.line << ") with mask 0x" << std::hex << w.mask;
    fail(r, f, o.str());
  }
  w.arrived |= 1u << lane;
  w.value[lane] = value;
  w.arg[lane] = arg;
  w.width[lane] = width;
  f.state = State::Warp;
  f.file = file;
  f.line = line;
  if (w.arrived == w.mask) {
    // complete: every lane's result, then all of them go on
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if ((w.mask >> l & 1u) && w.value[l]) ballot |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(w.mask >> l & 1u)) continue;
      Fiber& g = r.fibers[static_cast<size_t>(warp * 32 + l)];
      uint64_t res = 0;
      const int wd = w.width[l], start = (l / wd) * wd;
      int src = l;
      switch (w.op) {
        case WarpOp::Ballot: res = ballot; break;
        case WarpOp::Any: res = ballot != 0; break;
        case WarpOp::All: res = ballot == w.mask; break;
        case WarpOp::SyncWarp: break;
        case WarpOp::Shfl: src = start + (((w.arg[l] % wd) + wd) % wd); break;
        case WarpOp::ShflUp: src = l - w.arg[l] >= start ? l - w.arg[l] : l; break;
        case WarpOp::ShflDown: src = l + w.arg[l] < start + wd ? l + w.arg[l] : l; break;
        case WarpOp::ShflXor: src = (l ^ w.arg[l]) < start + wd ? (l ^ w.arg[l]) : l; break;
      }
      if (w.op == WarpOp::Shfl || w.op == WarpOp::ShflUp || w.op == WarpOp::ShflDown || w.op == WarpOp::ShflXor) {
        if (src < 0 || src > 31 || !(w.mask >> src & 1u)) {
          w.pending = false;
          fail(r, f, "emu: kernel " + std::string(r.kernel) + ": lane " + std::to_string(l) + " of warp " +
                         std::to_string(warp) + " reads lane " + std::to_string(src) + " in " + at +
                         ", a lane not named in the mask");
        }
        res = w.value[src];
      }
      g.result = res;
    }
    w.pending = false;
    for (int l = 0; l < 32; ++l) {
      if (w.mask >> l & 1u) make_ready(r, warp * 32 + l);
    }
  }
  wait_here(r, f);
  return f.result;
}

unsigned active_mask() {
  Fiber& f = current("__activemask");
  return ~g_run->exited_lanes[static_cast<size_t>(f.id / 32)];
}

unsigned lane_id() { return static_cast<unsigned>(current("lane id").id % 32); }

void trap(const char* file, int line) {
  Fiber& f = current("__trap");
  fail(*g_run, f, "emu: " + where(*g_run, f) + " called __trap at " + short_file(file) + ":" + std::to_string(line));
}

void misaligned_load(const void* p, size_t size, size_t align, const char* file, int line) {
  Fiber& f = current("__ldg");
  std::ostringstream o;
  o << "emu: " << where(*g_run, f) << ": misaligned load: __ldg of a " << size << "-byte value from address " << p
    << " (" << short_file(file) << ":" << line << "), not a multiple of " << align
    << ": a misaligned load faults on the GPU";
  fail(*g_run, f, o.str());
}

void misaligned(const void* p, unsigned bytes, const char* file, int line) {
  Fiber& f = current("a vector access");
  std::ostringstream o;
  o << "emu: " << where(*g_run, f) << " made a misaligned " << bytes << "-byte access to " << p << " at "
    << short_file(file) << ":" << line << " (the GPU stops with 'misaligned address')";
  fail(*g_run, f, o.str());
}

void* dynamic_shared() {
  current("extern __shared__");
  return g_run->dyn.empty() ? nullptr : g_run->dyn.data();
}

std::mutex g_limit_mutex;
std::map<const void*, size_t> g_smem_limits;  // kernels opted into more dynamic shared memory

void set_dynamic_shared_limit(const void* fn, int bytes) {
  // sm_90's opt-in maximum per block
  TORCH_CHECK(bytes >= 0 && bytes <= 227 * 1024, "emu: cudaFuncSetAttribute: ", bytes,
              " bytes of dynamic shared memory exceed the 227 KiB a block can opt into");
  std::lock_guard<std::mutex> lock(g_limit_mutex);
  g_smem_limits[fn] = static_cast<size_t>(bytes);
}

size_t dynamic_shared_limit(const void* fn) {
  std::lock_guard<std::mutex> lock(g_limit_mutex);
  const auto it = g_smem_limits.find(fn);
  return it == g_smem_limits.end() ? size_t{48 * 1024} : std::max(size_t{48 * 1024}, it->second);
}

void run_launch(const char* kernel, dim3 grid, dim3 block, size_t smem, Body body, void* ctx, size_t smem_limit) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(g_run == nullptr, "emu: kernel ", kernel, " launched from inside a kernel");
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "emu: kernel ", kernel, ": invalid configuration argument: grid (", grid.x, ",", grid.y, ",",
              grid.z, ")");
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && block.z <= 64, "emu: kernel ", kernel,
              ": invalid configuration argument: block (", block.x, ",", block.y, ",", block.z, ")");
  TORCH_CHECK(smem <= smem_limit, "emu: kernel ", kernel, ": ", smem, " bytes of dynamic shared memory exceed the ",
              smem_limit, " bytes it may launch with (48 KiB without opting in by cudaFuncSetAttribute)");
  if (!g_seed_from_env) {
    g_seed_from_env = true;
    if (g_seed == 0) g_seed = env_seed();
  }
  Run r;
  r.kernel = kernel;
  r.grid = grid;
  r.block = block;
  r.smem = smem;
  r.body = body;
  r.ctx = ctx;
  r.nthreads = static_cast<int>(nthreads);
  r.dyn.assign(smem, static_cast<unsigned char>(kFill));
  r.seeded = g_seed != 0;
  if (r.seeded) r.rng.seed(g_seed * 0x9e3779b97f4a7c15ull + g_launches);
  ++g_launches;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (r.seeded) {
    order.resize(nblocks);
    std::iota(order.begin(), order.end(), uint64_t(0));
    std::shuffle(order.begin(), order.end(), r.rng);
  }
  g_run = &r;
  try {
    for (uint64_t i = 0; i < nblocks; ++i) {
      const uint64_t b = r.seeded ? order[i] : i;
      r.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
      run_block(r);
    }
  } catch (...) {
    g_run = nullptr;
    t_view = nullptr;
    throw;
  }
  g_run = nullptr;
}

}  // namespace detail

void set_schedule_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  detail::g_seed = seed;
  detail::g_seed_from_env = true;
  detail::g_launches = 0;
}

uint64_t schedule_seed() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  if (!detail::g_seed_from_env) {
    detail::g_seed_from_env = true;
    if (detail::g_seed == 0) detail::g_seed = detail::env_seed();
  }
  return detail::g_seed;
}

uint64_t launch_count() { return detail::g_launches; }

}  // namespace emu
