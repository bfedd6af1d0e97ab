// The SIMT emulator: runs a CUDA launch of this project's kernels (compiled as host C++ against
// simt.h / ptx_emu.h) on CPU memory, and checks it as a GPU would not.
//
// Execution model
//   * CTAs of the grid run in parallel on OpenMP threads, one CTA per OS thread at a time, so
//     `__shared__` = thread_local is that CTA's shared memory.
//   * The CUDA threads of a CTA are fibers on that OS thread (a few instructions of assembly
//     swap the callee-saved registers and the stack pointer). A fiber runs until it reaches a
//     barrier or a warp-wide instruction, then the scheduler resumes the next runnable fiber in
//     an order drawn from PHI_SIMT_SEED (0: thread order; others: warps and lanes shuffled).
//   * __syncthreads releases when every live thread of the CTA has arrived; a warp-wide
//     instruction (shfl, ldmatrix, mma) executes when all 32 lanes have arrived at the same one,
//     with the operand ownership of the PTX ISA; anything else is a deadlock or a divergence
//     and an error.
//   * cp.async reads the source when issued, fills the destination with a NaN pattern (0xff
//     bytes) at once and writes the data only when the issuing thread waits for its group.
//
// Checks (the first failure ends the launch with an error naming kernel, block and thread)
//   * launch configuration as the driver checks it: block <= 1024 threads, grid.y/z <= 65535,
//     dynamic shared memory <= 48 KiB unless raised by cudaFuncSetAttribute, which may not
//     exceed the emulated arch's opt-in limit (PHI_SIMT_ARCH, default sm_80);
//   * every global access lies inside a tensor the host glue registered for the launch;
//   * every shared access lies inside the dynamic shared memory the launch requested and is
//     aligned as the instruction requires;
//   * shared-memory races: between two barriers, a 4-byte word written by one thread and read
//     or written by another (every shared access of these kernels is a whole number of aligned
//     words), and any access to the destination of a cp.async its thread has not waited for.
//
// Counters (per kernel name, summed over launches; emu_stats()): barriers, mma, ldmatrix and
// shuffles, shared-memory wavefronts against the conflict-free ideal (ldmatrix, st.shared,
// cp.async writes), and global requests with the 32-byte sectors they touch against the
// fewest possible. A warp's plain accesses are grouped by their order in each lane (the k-th
// global load of every lane is one request), which is exact for convergent code.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt/simt.h"
#include "simt/stats.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace phi::simt {
constexpr size_t kSmemCapacity = 232448;  // sm_90's opt-in maximum (227 KiB)
}

// The dynamic shared memory of the CTA running on this OS thread. The flash kernels declare it
// as `extern __shared__ unsigned char smem[]` inside namespace phi::flash, which names this.
namespace phi::flash {
alignas(128) thread_local unsigned char smem[phi::simt::kSmemCapacity];
}
// GCC calls the TLS init function of an `extern thread_local` array of unknown bound without
// first testing whether it exists (it does test for threadIdx & co); this array needs no
// initialisation, so its init function is empty.
extern "C" __attribute__((visibility("hidden"))) void _ZTHN3phi5flash4smemE() {}

// ---------------------------------------------------------------------------------- fibers
// phi_simt_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save and resumes the fiber whose saved
// stack pointer is `to`. A new fiber's stack is laid out so that the first switch into it
// "returns" into phi_simt_trampoline with r12 = its argument and r13 = its entry function.
#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.globl phi_simt_switch
.hidden phi_simt_switch
.type phi_simt_switch,@function
phi_simt_switch:
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
.size phi_simt_switch,.-phi_simt_switch

.p2align 4
.globl phi_simt_trampoline
.hidden phi_simt_trampoline
.type phi_simt_trampoline,@function
phi_simt_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
.size phi_simt_trampoline,.-phi_simt_trampoline
)");
extern "C" void phi_simt_switch(void** save_sp, void* to_sp);
extern "C" void phi_simt_trampoline();
#else
#error "the SIMT emulator's fiber switch is written for x86-64"
#endif

namespace phi::simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr uint16_t kNoThread = 0xffff, kManyThreads = 0xfffe;

enum class State : uint8_t { kRunnable, kAtBarrier, kAtWarpOp, kExited };
enum Log_kind { kGlobalLoad, kGlobalStore, kSharedStore, kCpAsyncShared, kLogKinds };
enum Warp_op { kShfl, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBf16 };
const char* const kWarpOpNames[] = {"shfl.sync", "ldmatrix.x4", "ldmatrix.x4.trans", "mma.m16n8k16.f16",
                                    "mma.m16n8k16.bf16"};

struct Access {
  uint64_t addr;
  uint32_t size;
};

struct Copy {  // an issued cp.async of 16 bytes
  uint32_t dst;
  int group;
  unsigned char data[16];
};

struct Thread {
  void* sp = nullptr;
  State state = State::kExited;
  int tid = 0;
  uint3 idx{};
  int groups_committed = 0;
  std::vector<Copy> copies;
  std::vector<Access> log[kLogKinds];
};

struct Warp {
  int lanes = 0, live = 0, arrived = 0, op = 0;
  void* args[32];
};

// Per 4-byte word of shared memory: the last writer and reader(s) in the current barrier
// interval ("epoch"), and the thread whose cp.async to it is in flight.
struct Shadow {
  uint32_t w_epoch = 0, r_epoch = 0;
  uint16_t writer = kNoThread, reader = kNoThread, pending = kNoThread;
};

struct Region {
  uintptr_t begin, end;
  std::string name;
};

struct Launch {
  std::string name;
  dim3 grid, block;
  size_t smem;
  void (*thunk)(void*);
  void* ctx;
  uint64_t seed;
  std::vector<Region> regions;  // sorted by begin
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  Counters counters;
};

struct Stack {
  char* base = nullptr;  // lowest address (a guard page), kStackBytes + page mapped
  Stack() = default;
  Stack(const Stack&) = delete;
  Stack(Stack&& o) noexcept : base(o.base) { o.base = nullptr; }
  ~Stack() {
    if (base) munmap(base, kStackBytes + 4096);
  }
};

// Everything about the CTA that runs on this OS thread.
struct Worker {
  Launch* launch = nullptr;
  std::vector<Thread> threads;
  std::vector<Stack> stacks;
  std::vector<Warp> warps;
  std::vector<int> order;
  std::vector<Shadow> shadow;
  void* sched_sp = nullptr;
  Thread* current = nullptr;
  int live = 0, bar_arrived = 0;
  uint32_t epoch = 1;
  bool aborted = false;
  size_t smem_bytes = 0;
  uint3 block{};
  Counters counters;
};

thread_local Worker tls_worker;
Worker& worker() { return tls_worker; }

std::mutex g_mu;
std::map<const void*, int> g_max_smem;          // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
std::map<std::string, Counters> g_stats;        // per kernel name
thread_local std::vector<Region>* t_scope = nullptr;  // the open Memory_scope of a host thread

// ------------------------------------------------------------------------------ failures

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string where(const Worker& w, int tid) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u), thread %d (warp %d, lane %d)", w.block.x, w.block.y, w.block.z,
                tid, tid / 32, tid % 32);
  return buf;
}

void record_error(Worker& w, const std::string& what) {
  Launch& l = *w.launch;
  {
    std::lock_guard<std::mutex> lock(l.mu);
    if (!l.failed.load()) l.error = "simt: " + l.name + ": " + what;
    l.failed.store(true);
  }
  w.aborted = true;
}

void yield_to_scheduler() {
  Worker& w = worker();
  Thread* me = w.current;
  phi_simt_switch(&me->sp, w.sched_sp);
}

// Records the launch's error and, on a fiber, leaves it for good: the CTA is abandoned (fibers
// hold no resources beyond their stacks, which the next CTA re-initialises).
[[noreturn]] void fail_in_fiber(const std::string& what) {
  Worker& w = worker();
  record_error(w, what);
  for (;;) yield_to_scheduler();
}

// Call sites build the message in a helper so no std::string lives on the abandoned frame.
#define SIMT_FAIL(...)                        \
  do {                                        \
    fail_in_fiber(::phi::simt::format(__VA_ARGS__)); \
  } while (0)

}  // namespace

template <typename... A>
std::string format(const A&... parts) {
  std::string s;
  ((s += parts), ...);
  return s;
}

namespace {

// ------------------------------------------------------------------------- counters

// Shared-memory wavefronts of one phase of a request: the most distinct 4-byte words that
// fall into one of the 32 banks (a broadcast of one word costs nothing extra).
int wavefronts(const Access* acc, int n) {
  uint32_t words[256];
  int count = 0;
  for (int i = 0; i < n; ++i) {
    for (uint64_t wd = acc[i].addr / 4; wd <= (acc[i].addr + acc[i].size - 1) / 4 && count < 256; ++wd) {
      words[count++] = uint32_t(wd);
    }
  }
  std::sort(words, words + count);
  count = int(std::unique(words, words + count) - words);
  int per_bank[32] = {};
  int worst = 0;
  for (int i = 0; i < count; ++i) worst = std::max(worst, ++per_bank[words[i] % 32]);
  return worst;
}

// One shared-memory request of a warp (lane accesses in lane order): wavefronts and the
// conflict-free ideal. The hardware serves 128 bytes per phase: 32 lanes of 4-byte accesses,
// 16 lanes of 8 bytes or 8 lanes of 16 bytes.
void count_shared_request(const Access* acc, int n, uint64_t& wf, uint64_t& ideal) {
  const uint32_t size = n ? acc[0].size : 4;
  const int per_phase = size >= 16 ? 8 : size >= 8 ? 16 : 32;
  for (int i = 0; i < n; i += per_phase) {
    wf += wavefronts(acc + i, std::min(per_phase, n - i));
    ideal += 1;
  }
}

// One global request: distinct 32-byte sectors, and the fewest that could hold its bytes.
void count_global_request(Access* acc, int n, uint64_t& sectors, uint64_t& ideal) {
  uint64_t secs[64];
  int count = 0;
  for (int i = 0; i < n; ++i) {
    for (uint64_t s = acc[i].addr / 32; s <= (acc[i].addr + acc[i].size - 1) / 32 && count < 64; ++s) {
      secs[count++] = s;
    }
  }
  std::sort(secs, secs + count);
  sectors += uint64_t(std::unique(secs, secs + count) - secs);
  std::sort(acc, acc + n, [](const Access& a, const Access& b) { return a.addr < b.addr; });
  uint64_t bytes = 0, covered_to = 0;
  for (int i = 0; i < n; ++i) {
    const uint64_t b = std::max<uint64_t>(acc[i].addr, covered_to), e = acc[i].addr + acc[i].size;
    if (e > b) bytes += e - b;
    covered_to = std::max(covered_to, e);
  }
  ideal += (bytes + 31) / 32;
}

// At a point where the warp's lanes have converged: the k-th access of each kind of every
// lane forms the warp's k-th request of that kind.
void flush_warp_logs(Worker& w, int warp) {
  const int t0 = warp * 32, t1 = std::min<int>(t0 + 32, int(w.threads.size()));
  for (int kind = 0; kind < kLogKinds; ++kind) {
    size_t longest = 0;
    for (int t = t0; t < t1; ++t) longest = std::max(longest, w.threads[t].log[kind].size());
    for (size_t k = 0; k < longest; ++k) {
      Access acc[32];
      int n = 0;
      for (int t = t0; t < t1; ++t) {
        if (k < w.threads[t].log[kind].size()) acc[n++] = w.threads[t].log[kind][k];
      }
      Counters& c = w.counters;
      switch (kind) {
        case kGlobalLoad: c.gld_requests++; count_global_request(acc, n, c.gld_sectors, c.gld_ideal_sectors); break;
        case kGlobalStore: c.gst_requests++; count_global_request(acc, n, c.gst_sectors, c.gst_ideal_sectors); break;
        case kSharedStore: c.sts_requests++; count_shared_request(acc, n, c.sts_wavefronts, c.sts_ideal); break;
        case kCpAsyncShared: c.cp_async_requests++; count_shared_request(acc, n, c.cp_async_wavefronts, c.cp_async_ideal); break;
      }
    }
    for (int t = t0; t < t1; ++t) w.threads[t].log[kind].clear();
  }
}

// ------------------------------------------------------------------------ shared memory

void smem_offset_checked(Worker& w, int tid, uint32_t addr, uint32_t bytes, uint32_t align, const char* what) {
  if (addr % align != 0) {
    SIMT_FAIL(where(w, tid), ": ", what, " at shared offset ", std::to_string(addr), " is not ",
              std::to_string(align), "-byte aligned");
  }
  if (uint64_t(addr) + bytes > w.smem_bytes) {
    SIMT_FAIL(where(w, tid), ": ", what, " of ", std::to_string(bytes), " bytes at shared offset ",
              std::to_string(addr), " is past the ", std::to_string(w.smem_bytes),
              " bytes of dynamic shared memory the launch requested");
  }
}

std::string thread_name(uint16_t t) { return t == kManyThreads ? "several threads" : "thread " + std::to_string(t); }

void shadow_read(Worker& w, uint32_t addr, uint32_t bytes, int tid) {
  for (uint32_t wd = addr / 4; wd < (addr + bytes + 3) / 4; ++wd) {
    Shadow& s = w.shadow[wd];
    if (s.pending != kNoThread) {
      SIMT_FAIL(where(w, tid), ": reads shared bytes [", std::to_string(wd * 4), ", ", std::to_string(wd * 4 + 4),
                ") that the cp.async of ", thread_name(s.pending),
                " is still writing (no cp.async.wait_group of that thread covers it yet)");
    }
    if (s.w_epoch == w.epoch && s.writer != tid) {
      SIMT_FAIL("shared-memory race: ", where(w, tid), " reads bytes [", std::to_string(wd * 4), ", ",
                std::to_string(wd * 4 + 4), ") written by ", thread_name(s.writer),
                " with no __syncthreads in between");
    }
    if (s.r_epoch == w.epoch) {
      if (s.reader != tid) s.reader = kManyThreads;
    } else {
      s.r_epoch = w.epoch;
      s.reader = uint16_t(tid);
    }
  }
}

void shadow_write(Worker& w, uint32_t addr, uint32_t bytes, int tid, bool landing) {
  for (uint32_t wd = addr / 4; wd < (addr + bytes + 3) / 4; ++wd) {
    Shadow& s = w.shadow[wd];
    if (s.pending != kNoThread && !(landing && s.pending == tid)) {
      SIMT_FAIL(where(w, tid), ": writes shared bytes [", std::to_string(wd * 4), ", ", std::to_string(wd * 4 + 4),
                ") that the cp.async of ", thread_name(s.pending), " is still writing");
    }
    if (s.w_epoch == w.epoch && s.writer != tid) {
      SIMT_FAIL("shared-memory race: ", where(w, tid), " writes bytes [", std::to_string(wd * 4), ", ",
                std::to_string(wd * 4 + 4), ") also written by ", thread_name(s.writer),
                " with no __syncthreads in between");
    }
    if (s.r_epoch == w.epoch && s.reader != tid) {
      SIMT_FAIL("shared-memory race: ", where(w, tid), " writes bytes [", std::to_string(wd * 4), ", ",
                std::to_string(wd * 4 + 4), ") read by ", thread_name(s.reader), " with no __syncthreads in between");
    }
    s.w_epoch = w.epoch;
    s.writer = uint16_t(tid);
  }
}

unsigned char* smem_base() { return phi::flash::smem; }

// ------------------------------------------------------------------------ scheduling

void release_barrier(Worker& w) {
  for (Thread& t : w.threads) {
    if (t.state == State::kAtBarrier) t.state = State::kRunnable;
  }
  w.bar_arrived = 0;
  ++w.epoch;
  ++w.counters.barriers;
  for (size_t i = 0; i < w.warps.size(); ++i) flush_warp_logs(w, int(i));
}

extern "C" void phi_simt_fiber_main(Thread* t) {
  Worker& w = worker();
  std::string thrown;
  try {
    w.launch->thunk(w.launch->ctx);
  } catch (const std::exception& e) {  // e.g. out of memory in the emulator's bookkeeping
    thrown = e.what();
  }
  // Leave the handler before leaving the fiber: the C++ runtime's caught-exception stack
  // belongs to the OS thread, which the other fibers share.
  if (!thrown.empty()) fail_in_fiber(format(where(w, t->tid), ": exception in the emulator: ", thrown));
  // The thread returned from the kernel.
  for (Copy& c : t->copies) {  // in-flight copies die with the CTA's shared memory
    for (uint32_t wd = c.dst / 4; wd < c.dst / 4 + 4; ++wd) w.shadow[wd].pending = kNoThread;
  }
  t->copies.clear();
  t->state = State::kExited;
  --w.live;
  Warp& warp = w.warps[t->tid / 32];
  --warp.live;
  if (warp.arrived > 0) {
    fail_in_fiber(format(where(w, t->tid), ": exits while lanes of its warp wait at ", kWarpOpNames[warp.op],
                         " (a .sync instruction with a full mask needs all 32 lanes)"));
  }
  if (warp.live == 0) flush_warp_logs(w, t->tid / 32);
  if (w.bar_arrived > 0 && w.bar_arrived == w.live) release_barrier(w);
  for (;;) yield_to_scheduler();
}

void* init_stack(Stack& s, Thread* t) {
  if (s.base == nullptr) {
    void* m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(m, 4096, PROT_NONE);  // overflow faults instead of corrupting the next stack
    s.base = static_cast<char*>(m);
  }
  uintptr_t top = (reinterpret_cast<uintptr_t>(s.base) + 4096 + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  sp[1] = 0;                                                   // r15
  sp[2] = 0;                                                   // r14
  sp[3] = reinterpret_cast<uint64_t>(&phi_simt_fiber_main);    // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(t);                       // r12: argument
  sp[5] = 0;                                                   // rbx
  sp[6] = 0;                                                   // rbp
  sp[7] = reinterpret_cast<uint64_t>(&phi_simt_trampoline);    // return address
  return sp;
}

void make_order(Worker& w, uint64_t seed, uint64_t cta) {
  const int n = int(w.threads.size());
  w.order.resize(n);
  for (int i = 0; i < n; ++i) w.order[i] = i;
  if (seed == 0) return;
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + cta);
  std::vector<int> warp_order(w.warps.size());
  for (size_t i = 0; i < warp_order.size(); ++i) warp_order[i] = int(i);
  std::shuffle(warp_order.begin(), warp_order.end(), rng);
  int k = 0;
  for (int wi : warp_order) {
    const int t0 = wi * 32, t1 = std::min(n, t0 + 32);
    std::vector<int> lanes;
    for (int t = t0; t < t1; ++t) lanes.push_back(t);
    std::shuffle(lanes.begin(), lanes.end(), rng);
    for (int t : lanes) w.order[k++] = t;
  }
}

void run_cta(Launch& l, uint64_t linear) {
  Worker& w = worker();
  w.launch = &l;
  const dim3 g = l.grid, b = l.block;
  w.block = {unsigned(linear % g.x), unsigned(linear / g.x % g.y), unsigned(linear / (uint64_t(g.x) * g.y))};
  blockIdx = w.block;
  gridDim = g;
  blockDim = b;
  const int n = int(b.x * b.y * b.z);
  if (int(w.threads.size()) != n) w.threads.resize(n);
  while (w.stacks.size() < size_t(n)) w.stacks.emplace_back();
  w.warps.assign((n + 31) / 32, Warp{});
  for (size_t i = 0; i < w.warps.size(); ++i) {
    w.warps[i].lanes = w.warps[i].live = std::min(32, n - int(i) * 32);
  }
  for (int t = 0; t < n; ++t) {
    Thread& th = w.threads[t];
    th.tid = t;
    th.idx = {unsigned(t % b.x), unsigned(t / b.x % b.y), unsigned(t / (b.x * b.y))};
    th.state = State::kRunnable;
    th.groups_committed = 0;
    th.copies.clear();
    for (auto& lg : th.log) lg.clear();
    th.sp = init_stack(w.stacks[t], &th);
  }
  w.live = n;
  w.bar_arrived = 0;
  w.epoch += 2;  // nothing recorded by an earlier CTA matches
  w.aborted = false;
  w.smem_bytes = l.smem;
  if (w.shadow.size() < kSmemCapacity / 4) w.shadow.resize(kSmemCapacity / 4);
  std::memset(smem_base(), 0xff, l.smem);  // uninitialised shared memory reads as NaN
  make_order(w, l.seed, linear);
  ++w.counters.ctas;
  w.counters.threads += uint64_t(n);

  while (w.live > 0 && !w.aborted) {
    bool ran = false;
    for (int t : w.order) {
      Thread& th = w.threads[t];
      if (th.state != State::kRunnable) continue;
      w.current = &th;
      threadIdx = th.idx;
      phi_simt_switch(&w.sched_sp, th.sp);
      w.current = nullptr;
      ran = true;
      if (w.aborted) break;
    }
    if (!ran && !w.aborted) {
      int at_bar = 0, at_warp = 0;
      for (const Thread& t : w.threads) {
        at_bar += t.state == State::kAtBarrier;
        at_warp += t.state == State::kAtWarpOp;
      }
      record_error(w, format("deadlock in block (", std::to_string(w.block.x), ",", std::to_string(w.block.y), ",",
                             std::to_string(w.block.z), "): ", std::to_string(at_bar), " threads wait at __syncthreads, ",
                             std::to_string(at_warp), " at a warp-wide instruction whose other lanes never arrive, ",
                             std::to_string(w.live - at_bar - at_warp), " others"));
    }
  }
  if (w.aborted) {  // clear the in-flight marks of the abandoned CTA
    for (Thread& t : w.threads) {
      for (Copy& c : t.copies) {
        for (uint32_t wd = c.dst / 4; wd < c.dst / 4 + 4; ++wd) w.shadow[wd].pending = kNoThread;
      }
      t.copies.clear();
    }
  }
  w.launch = nullptr;
}

// --------------------------------------------------------------------- warp-wide ops

struct Shfl_args {
  uint32_t value;
  int arg, width;
  bool xor_mode;
  unsigned mask;
  uint32_t result;
};
struct Ldmatrix_args {
  uint32_t* r;
  uint32_t addr;
};
struct Mma_args {
  float* c;
  const uint32_t* a;
  uint32_t b0, b1;
};

// Arrives at warp-wide instruction `op` with this lane's operands; returns once the
// instruction has executed for the whole warp (by the last lane to arrive).
void warp_rendezvous(int op, void* args, void (*exec)(Worker&, int warp, void* const* lane_args, int op)) {
  Worker& w = worker();
  Thread* me = w.current;
  const int wi = me->tid / 32;
  Warp& warp = w.warps[wi];
  if (warp.live != 32) {
    SIMT_FAIL(where(w, me->tid), ": ", kWarpOpNames[op], " with ", std::to_string(warp.live),
              " live lanes (the kernels' .sync instructions use full-warp masks)");
  }
  if (warp.arrived == 0) {
    warp.op = op;
  } else if (warp.op != op) {
    SIMT_FAIL(where(w, me->tid), ": warp divergence: this lane is at ", kWarpOpNames[op], " while ",
              std::to_string(warp.arrived), " lanes wait at ", kWarpOpNames[warp.op]);
  }
  warp.args[me->tid % 32] = args;
  if (++warp.arrived < warp.live) {
    me->state = State::kAtWarpOp;
    yield_to_scheduler();
    return;
  }
  exec(w, wi, warp.args, op);
  warp.arrived = 0;
  for (int t = wi * 32; t < wi * 32 + 32; ++t) {
    if (w.threads[t].state == State::kAtWarpOp) w.threads[t].state = State::kRunnable;
  }
  flush_warp_logs(w, wi);
}

void exec_shfl(Worker& w, int wi, void* const* lane_args, int) {
  Shfl_args* a[32];
  for (int l = 0; l < 32; ++l) a[l] = static_cast<Shfl_args*>(lane_args[l]);
  for (int l = 0; l < 32; ++l) {
    if (a[l]->mask != 0xffffffffu) {
      fail_in_fiber(format(where(w, wi * 32 + l), ": shfl.sync with mask ", hex(a[l]->mask),
                           " (the emulator runs full-warp shuffles only)"));
    }
    const int width = a[l]->width;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      fail_in_fiber(format(where(w, wi * 32 + l), ": shfl.sync width ", std::to_string(width), " is not a power of 2 <= 32"));
    }
  }
  uint32_t out[32];
  for (int l = 0; l < 32; ++l) {
    const int width = a[l]->width, base = l & ~(width - 1);
    int src = a[l]->xor_mode ? (l ^ a[l]->arg) : base + (a[l]->arg & (width - 1));
    if (src < base || src >= base + width) src = l;  // outside the segment: own value
    out[l] = a[src]->value;
  }
  for (int l = 0; l < 32; ++l) a[l]->result = out[l];
  ++w.counters.shfl;
}

uint16_t smem_u16(uint32_t offset) {
  uint16_t v;
  std::memcpy(&v, smem_base() + offset, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane 8j + r gives the address of row r of
// matrix j (16 bytes). Without .trans lane l receives, in register j, elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix j; with .trans elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4). The lower element is the low half.
void exec_ldmatrix(Worker& w, int wi, void* const* lane_args, int op) {
  const bool trans = op == kLdmatrixTrans;
  Ldmatrix_args* a[32];
  for (int l = 0; l < 32; ++l) a[l] = static_cast<Ldmatrix_args*>(lane_args[l]);
  for (int l = 0; l < 32; ++l) {  // errors and races name the lane that gave the address
    smem_offset_checked(w, wi * 32 + l, a[l]->addr, 16, 16, trans ? "ldmatrix.trans row" : "ldmatrix row");
    shadow_read(w, a[l]->addr, 16, wi * 32 + l);
  }
  uint32_t out[32][4];
  for (int j = 0; j < 4; ++j) {
    for (int l = 0; l < 32; ++l) {
      const int r0 = trans ? 2 * (l % 4) : l / 4, c0 = trans ? l / 4 : 2 * (l % 4);
      const int r1 = trans ? r0 + 1 : r0, c1 = trans ? c0 : c0 + 1;
      const uint16_t lo = smem_u16(a[8 * j + r0]->addr + 2 * c0), hi = smem_u16(a[8 * j + r1]->addr + 2 * c1);
      out[l][j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    Access acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = {a[8 * j + r]->addr, 16};
    w.counters.ldmatrix_wavefronts += uint64_t(wavefronts(acc, 8));
    w.counters.ldmatrix_ideal += 1;
  }
  for (int l = 0; l < 32; ++l) std::memcpy(a[l]->r, out[l], sizeof out[l]);
  ++w.counters.ldmatrix;
}

float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A (16x16) B (16x8) + C, fp32 accumulate.
// With g = lane / 4 and q = lane % 4: A registers a0..a3 hold (g, 2q..2q+1), (g+8, 2q..),
// (g, 2q+8..), (g+8, 2q+8..); B registers b0, b1 hold (k = 2q..2q+1, n = g), (k = 2q+8.., n = g);
// C/D hold (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1). The products are exact in fp32 and are
// summed in k order onto C.
void exec_mma(Worker& w, int, void* const* lane_args, int op) {
  const bool bf16 = op == kMmaBf16;
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const Mma_args* m = static_cast<const Mma_args*>(lane_args[l]);
    const int g = l / 4, q = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i & 1) * 8, col = 2 * q + (i >> 1) * 8;
      A[row][col] = half_bits_to_float(uint16_t(m->a[i] & 0xffff), bf16);
      A[row][col + 1] = half_bits_to_float(uint16_t(m->a[i] >> 16), bf16);
    }
    const uint32_t b[2] = {m->b0, m->b1};
    for (int i = 0; i < 2; ++i) {
      B[2 * q + 8 * i][g] = half_bits_to_float(uint16_t(b[i] & 0xffff), bf16);
      B[2 * q + 8 * i + 1][g] = half_bits_to_float(uint16_t(b[i] >> 16), bf16);
    }
    C[g][2 * q] = m->c[0];
    C[g][2 * q + 1] = m->c[1];
    C[g + 8][2 * q] = m->c[2];
    C[g + 8][2 * q + 1] = m->c[3];
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
      C[i][j] = acc;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const Mma_args* m = static_cast<const Mma_args*>(lane_args[l]);
    const int g = l / 4, q = l % 4;
    m->c[0] = C[g][2 * q];
    m->c[1] = C[g][2 * q + 1];
    m->c[2] = C[g + 8][2 * q];
    m->c[3] = C[g + 8][2 * q + 1];
  }
  ++w.counters.mma;
}

const Region* find_region(const Launch& l, uintptr_t p, size_t bytes) {
  auto it = std::upper_bound(l.regions.begin(), l.regions.end(), p,
                             [](uintptr_t v, const Region& r) { return v < r.begin; });
  if (it == l.regions.begin()) return nullptr;
  --it;
  // Regions may overlap (views of one buffer): look back for any that holds the access.
  for (;; --it) {
    if (p >= it->begin && p + bytes <= it->end) return &*it;
    if (it == l.regions.begin()) return nullptr;
  }
}

std::string describe_miss(const Launch& l, uintptr_t p, size_t bytes) {
  std::string nearest;
  uint64_t best = UINT64_MAX;
  for (const Region& r : l.regions) {
    const uint64_t d = p >= r.end ? p + bytes - r.end : r.begin > p ? r.begin - p : 0;
    if (d < best) {
      best = d;
      nearest = r.name + " [" + hex(r.begin) + ", " + hex(r.end) + ")";
      nearest += p >= r.begin ? ", " + std::to_string(p + bytes - r.end) + " bytes past its end"
                              : ", " + std::to_string(r.begin - p) + " bytes before its start";
    }
  }
  return l.regions.empty() ? std::string("no tensors were registered for the launch") : "nearest: " + nearest;
}

}  // namespace

// ------------------------------------------------------------------- the kernel-side API

void syncthreads() {
  Worker& w = worker();
  Thread* me = w.current;
  if (++w.bar_arrived < w.live) {
    me->state = State::kAtBarrier;
    yield_to_scheduler();
    return;
  }
  release_barrier(w);
}

uint32_t shfl(uint32_t value, int lane_arg, int width, bool xor_mode, unsigned mask) {
  Shfl_args a{value, lane_arg, width, xor_mode, mask, 0};
  warp_rendezvous(kShfl, &a, exec_shfl);
  return a.result;
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Ldmatrix_args a{r, addr};
  warp_rendezvous(trans ? kLdmatrixTrans : kLdmatrix, &a, exec_ldmatrix);
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Mma_args m{c, a, b0, b1};
  warp_rendezvous(bf16 ? kMmaBf16 : kMmaF16, &m, exec_mma);
}

uint32_t cvta_to_shared(const void* p) {
  Worker& w = worker();
  const uintptr_t base = reinterpret_cast<uintptr_t>(smem_base()), v = reinterpret_cast<uintptr_t>(p);
  if (w.current != nullptr && (v < base || v > base + kSmemCapacity)) {
    SIMT_FAIL(where(w, w.current->tid), ": __cvta_generic_to_shared of ", hex(v),
              ", which is not in shared memory (the emulator provides the dynamic `extern __shared__` array)");
  }
  return uint32_t(v - base);
}

const void* checked_global(const void* p, unsigned long bytes, bool write) {
  Worker& w = worker();
  if (w.current == nullptr) return p;  // host code outside a launch
  const Launch& l = *w.launch;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (find_region(l, a, bytes) == nullptr) {
    SIMT_FAIL(where(w, w.current->tid), ": global ", write ? "store" : "load", " of ", std::to_string(bytes),
              " bytes at ", hex(a), " is outside every tensor of the launch (", describe_miss(l, a, bytes), ")");
  }
  w.current->log[write ? kGlobalStore : kGlobalLoad].push_back({a, uint32_t(bytes)});
  return p;
}

float atomic_add(float* p, float v) {
  Worker& w = worker();
  if (w.current != nullptr) {
    checked_global(p, 4, true);
    ++w.counters.atomics;
  }
  return std::atomic_ref<float>(*p).fetch_add(v);
}

void st_shared_b32(uint32_t addr, uint32_t v) {
  Worker& w = worker();
  const int tid = w.current->tid;
  smem_offset_checked(w, tid, addr, 4, 4, "st.shared.b32");
  shadow_write(w, addr, 4, tid, false);
  std::memcpy(smem_base() + addr, &v, 4);
  w.current->log[kSharedStore].push_back({addr, 4});
}

void cp_async_16(uint32_t dst, const void* src, bool valid) {
  Worker& w = worker();
  Thread* me = w.current;
  smem_offset_checked(w, me->tid, dst, 16, 16, "cp.async destination");
  Copy c{dst, me->groups_committed, {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      SIMT_FAIL(where(w, me->tid), ": cp.async source ", hex(reinterpret_cast<uintptr_t>(src)),
                " is not 16-byte aligned");
    }
    checked_global(src, 16, false);
    std::memcpy(c.data, src, 16);
  }
  shadow_write(w, dst, 16, me->tid, false);
  for (uint32_t wd = dst / 4; wd < dst / 4 + 4; ++wd) w.shadow[wd].pending = uint16_t(me->tid);
  std::memset(smem_base() + dst, 0xff, 16);
  me->copies.push_back(c);
  me->log[kCpAsyncShared].push_back({dst, 16});
  ++w.counters.cp_async;
}

void cp_async_commit() { ++worker().current->groups_committed; }

void cp_async_wait(int pending) {
  Worker& w = worker();
  Thread* me = w.current;
  const int done_below = me->groups_committed - pending;  // groups [0, done_below) must land
  size_t keep = 0;
  for (size_t i = 0; i < me->copies.size(); ++i) {
    Copy& c = me->copies[i];
    if (c.group < done_below) {
      shadow_write(w, c.dst, 16, me->tid, true);
      for (uint32_t wd = c.dst / 4; wd < c.dst / 4 + 4; ++wd) w.shadow[wd].pending = kNoThread;
      std::memcpy(smem_base() + c.dst, c.data, 16);
    } else {
      me->copies[keep++] = c;
    }
  }
  me->copies.resize(keep);
}

// ---------------------------------------------------------------------- launches

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > max_dynamic_smem_optin()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_mu);
  g_max_smem[kernel] = bytes;
  return cudaSuccess;
}

int emulated_sm() {
  const char* arch = std::getenv("PHI_SIMT_ARCH");
  if (arch == nullptr || *arch == '\0') return 80;
  const std::string a(arch);
  for (int sm : {80, 86, 89, 90}) {
    if (a == "sm_" + std::to_string(sm) || a == std::to_string(sm) || a == "sm_" + std::to_string(sm) + "a") {
      return sm;
    }
  }
  throw std::runtime_error("PHI_SIMT_ARCH=" + a + " is not an emulated arch; expected sm_80, sm_86, sm_89 or sm_90");
}

int max_dynamic_smem_optin() {
  switch (emulated_sm()) {
    case 86:
    case 89: return 99 * 1024;
    case 90: return 227 * 1024;
    default: return 163 * 1024;
  }
}

Memory_scope::Memory_scope() {
  delete t_scope;
  t_scope = new std::vector<Region>();
}
Memory_scope::~Memory_scope() {
  delete t_scope;
  t_scope = nullptr;
}

void register_region(const void* p, size_t bytes, const char* name) {
  if (t_scope == nullptr || p == nullptr || bytes == 0) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  t_scope->push_back({b, b + bytes, name});
}

void run_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, void (*thunk)(void*),
                void* ctx) {
  const std::string who = std::string("simt: launch of ") + name + ": ";
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    throw std::runtime_error(who + "invalid configuration: an empty grid or block (cudaErrorInvalidConfiguration)");
  }
  if (threads > uint64_t(kMaxThreads) || block.x > 1024 || block.y > 1024 || block.z > 64) {
    throw std::runtime_error(who + "block of " + std::to_string(threads) + " threads (" + std::to_string(block.x) +
                             ", " + std::to_string(block.y) + ", " + std::to_string(block.z) +
                             ") exceeds 1024 threads or (1024, 1024, 64)");
  }
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error(who + "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ") exceeds (2^31 - 1, 65535, 65535)");
  }
  int allowed = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_max_smem.find(kernel);
    if (it != g_max_smem.end()) allowed = std::max(allowed, it->second);
  }
  if (smem > size_t(allowed)) {
    throw std::runtime_error(who + std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                             std::to_string(allowed) + " this kernel may use (48 KiB unless raised with "
                             "cudaFuncSetAttribute; at most " + std::to_string(max_dynamic_smem_optin()) +
                             " on sm_" + std::to_string(emulated_sm()) + ")");
  }
  auto l = std::make_unique<Launch>();
  l->name = name;
  l->grid = grid;
  l->block = block;
  l->smem = smem;
  l->thunk = thunk;
  l->ctx = ctx;
  const char* seed = std::getenv("PHI_SIMT_SEED");
  l->seed = seed ? std::strtoull(seed, nullptr, 10) : 0;
  if (t_scope != nullptr) l->regions = *t_scope;
  std::sort(l->regions.begin(), l->regions.end(), [](const Region& a, const Region& b) { return a.begin < b.begin; });

  const int64_t ctas = int64_t(grid.x) * grid.y * grid.z;
  Launch& launch = *l;
#pragma omp parallel for schedule(dynamic, 1) if (ctas > 1)
  for (int64_t i = 0; i < ctas; ++i) {
    if (launch.failed.load(std::memory_order_relaxed)) continue;
    Worker& w = worker();
    w.counters = Counters{};
    run_cta(launch, uint64_t(i));
    std::lock_guard<std::mutex> lock(launch.mu);
    launch.counters += w.counters;
  }
  {
    std::lock_guard<std::mutex> lock(g_mu);
    Counters& c = g_stats[l->name];
    c += l->counters;
    ++c.launches;
  }
  if (l->failed.load()) throw std::runtime_error(l->error);
}

std::string stats_json() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string s = "{";
  bool first = true;
  for (const auto& [name, c] : g_stats) {
    s += (first ? "" : ", ") + std::string("\"") + name + "\": " + c.json();
    first = false;
  }
  return s + "}";
}

void stats_reset() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_stats.clear();
}

}  // namespace phi::simt
