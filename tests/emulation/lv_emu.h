// Host emulation of the CUDA execution model for the kernel bodies in csrc/cuda/*.cuh, with a race checker.
// Test support only: compiled by the test suite (tests/cuda_emu.py) into a temporary shared library, never
// part of the package.
//
// Execution: a launch runs its blocks one after the other; the threads of a block run as fibers (started
// with ucontext, switched with _setjmp / _longjmp) on one OS thread, each until it blocks: at a barrier (LV_SYNC, LV_SYNC_OR), at a warp shuffle
// (LV_SHFL_*), or at its end. Warps are not run in lockstep (they are not since Volta): a shuffle waits
// for every lane of its mask, nothing else does.
//
// Checks (modelled on compute-sanitizer racecheck / synccheck), each a report (kernel, what, where):
//  - shared memory through a shadow, per 4-byte word: the last writer (thread, barrier interval, phase) and
//    the readers of the current interval. Two threads touching a word in one barrier interval, one of them
//    writing, is a race (read-after-write, write-after-read, write-after-write). Reads of words never
//    written, and accesses outside every shared array, are reported too.
//  - cp.async: the copy's destination is written (poisoned with 0xff bytes: NaN in every float type) when
//    the copy is issued and gets its data only at the cp.async.wait_group that retires the copy's group (the
//    latest legal moment); touching it in between is a report.
//  - barriers: every live thread of the block must wait at the same barrier; a thread that has exited, or
//    waits at another barrier or a shuffle, while others wait is a report (divergent barrier).
//  - shuffles: every lane of the mask must arrive at the same shuffle with the same mask; a lane not in its
//    own mask, a source lane outside the mask, or a lane that never arrives is a report.
// "Phase" of an access: the sync point the thread passed last (its id and line), so that a report names
// the two stretches of code between sync points that conflict.
//
// Mutation testing: set_mutation(id) disables the sync point named id (a barrier does nothing, a
// __syncthreads_or returns the thread's own predicate, a wait_group waits for one group less, a shuffle
// mask loses its highest lane), so that one build serves every mutation.
#pragma once
#include <setjmp.h>
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/kernel_args.h"
#include "cpu/cpu_common.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() {}
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
using __half = leanvae::cpu::Half;
using __nv_bfloat16 = leanvae::cpu::BFloat16;

// The CUDA built-in variables of the running emulated thread (set by the scheduler before each switch).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace lvemu {

enum SyncKind { kBarrier = 0, kBarrierOr = 1, kShuffle = 2, kWaitGroup = 3 };
inline const char* kind_name(int k) {
  static const char* n[] = {"barrier", "syncthreads_or", "shuffle", "cp.async.wait_group"};
  return n[k];
}

struct SiteInfo {
  int kind = 0;
  std::string file;
  int line = 0;
  int64_t hits = 0;
};

// ------------------------------------------------------------------------------------------ global state
struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  int bytes;
};

enum FiberState { kReady = 0, kAtBarrier = 1, kAtShuffle = 2, kDone = 3 };

struct Fiber {
  ucontext_t ctx;  // to start the fiber; switches after that by _setjmp / _longjmp (no signal-mask syscall)
  jmp_buf jb;
  bool started = false;
  void* stack = nullptr;
  unsigned tid = 0;
  int state = kReady;
  const char* wait_id = nullptr;  // barrier or shuffle it waits at
  int wait_kind = 0;
  int pred = 0;
  float sh_val = 0.f, sh_out = 0.f;
  unsigned sh_mask = 0;
  int sh_src = 0;
  std::deque<std::vector<Copy>> groups;
  std::vector<Copy> open;
  const char* phase = "kernel start";
  size_t next_array = 0;  // shared_array calls made by this thread (k-th call: k-th array of the block)
};

struct Word {
  uint32_t w_epoch = 0, r_epoch = 0;
  int32_t w_tid = -1, r_tid = -1;
  const char* w_phase = nullptr;
  const char* r_phase = nullptr;
  bool r_multi = false;
  bool pending = false;  // destination of an in-flight cp.async
  bool async_w = false;  // the last write was a cp.async
};

struct Array {
  std::string name;
  size_t off, bytes;
};

constexpr size_t kSmemCap = 256 * 1024;  // more than any GPU's shared memory per block
constexpr size_t kGuard = 16;            // gap between arrays: an overrun lands in no array
constexpr size_t kStack = 128 * 1024;
constexpr unsigned kMaxThreads = 1024;

struct State {
  std::string kernel;
  std::string mutation;  // id of the disabled sync point ("" = none)
  int64_t mutation_hits = 0;
  std::map<std::string, SiteInfo> sites;
  std::vector<std::string> reports;
  std::map<std::string, int64_t> seen;  // dedup key -> count
  int64_t n_reports = 0;
  // The running block.
  alignas(16) uint8_t smem[kSmemCap];
  std::vector<Word> shadow = std::vector<Word>(kSmemCap / 4);
  size_t used = 0, dyn_off = 0, dyn_bytes = 0;
  std::vector<Array> arrays;
  uint32_t epoch = 1;
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  unsigned nthreads = 0;
  Fiber* cur = nullptr;
  ucontext_t sched;
  jmp_buf sched_jb;
  const std::function<void()>* body = nullptr;
};

inline State& S() {
  static State* s = new State();
  return *s;
}

inline void report(const std::string& key, const std::string& msg) {
  State& s = S();
  ++s.n_reports;
  if (s.seen[key]++ == 0 && s.reports.size() < 64) s.reports.push_back(s.kernel + ": " + msg);
}

inline std::string where(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

// Sync point ids name a site: "<id> (<file>:<line>)" is interned so that phases are stable C strings.
inline const char* intern_phase(const char* id, int kind, const char* file, int line) {
  State& s = S();
  auto it = s.sites.find(id);
  if (it == s.sites.end()) {
    SiteInfo si;
    si.kind = kind;
    si.file = file;
    si.line = line;
    it = s.sites.emplace(id, si).first;
  }
  ++it->second.hits;
  static std::map<std::string, std::string>* names = new std::map<std::string, std::string>();
  auto& n = (*names)[id];
  if (n.empty()) n = std::string(id) + " (" + where(file, line) + ")";
  return n.c_str();
}

inline bool mutated(const char* id) {
  State& s = S();
  if (s.mutation.empty() || s.mutation != id) return false;
  ++s.mutation_hits;
  return true;
}

inline Fiber* cur() { return S().cur; }
inline int cur_tid() { return S().cur ? static_cast<int>(S().cur->tid) : -1; }

// ------------------------------------------------------------------------------------------ shared memory
inline std::string describe_word(size_t w) {
  State& s = S();
  const size_t byte = w * 4;
  for (const Array& a : s.arrays)
    if (byte >= a.off && byte < a.off + a.bytes) return "shared array '" + a.name + "' word " + std::to_string((byte - a.off) / 4);
  return "shared byte " + std::to_string(byte);
}

inline bool in_array(size_t off, size_t bytes) {
  for (const Array& a : S().arrays)
    if (off >= a.off && off + bytes <= a.off + a.bytes) return true;
  return false;
}

inline std::string thr(int t, const char* phase) {
  return "thread " + std::to_string(t) + " after " + (phase ? phase : "?");
}

// Records an access of `bytes` at p by the running thread; false (and a report) when p is outside every
// shared array. async: the issue of a cp.async (the destination becomes pending).
inline bool access(const void* p, size_t bytes, bool write, bool async = false) {
  State& s = S();
  Fiber* f = s.cur;
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (b < s.smem || b + bytes > s.smem + s.used || !in_array(static_cast<size_t>(b - s.smem), bytes)) {
    report(std::string("oob:") + (f ? f->phase : ""),
           std::string(write ? "write" : "read") + " of " + std::to_string(bytes) + " bytes outside every shared array by " +
               thr(cur_tid(), f ? f->phase : nullptr));
    return false;
  }
  const int t = static_cast<int>(f->tid);
  const uint32_t e = s.epoch;
  const size_t w0 = static_cast<size_t>(b - s.smem) / 4, w1 = (static_cast<size_t>(b - s.smem) + bytes + 3) / 4;
  for (size_t w = w0; w < w1; ++w) {
    Word& x = s.shadow[w];
    if (x.pending) {
      report(std::string("pending:") + f->phase + (write ? "w" : "r"),
             std::string(write ? "write" : "read") + " of an in-flight cp.async destination (" + describe_word(w) +
                 ") before the wait_group that retires it: " + thr(t, f->phase) + ", copy issued by " +
                 thr(x.w_tid, x.w_phase));
    }
    if (!write) {
      if (x.w_epoch == 0) {
        report(std::string("uninit:") + f->phase, "read of " + describe_word(w) + ", never written, by " + thr(t, f->phase));
      } else if (x.w_epoch == e && x.w_tid != t) {
        report(std::string("raw:") + x.w_phase + "|" + f->phase,
               "race (read after write in one barrier interval) on " + describe_word(w) + ": " + thr(x.w_tid, x.w_phase) +
                   (x.async_w ? " (cp.async)" : "") + " wrote, " + thr(t, f->phase) + " read");
      }
      if (x.r_epoch != e) {
        x.r_epoch = e, x.r_tid = t, x.r_phase = f->phase, x.r_multi = false;
      } else if (x.r_tid != t) {
        x.r_multi = true;
      }
    } else {
      if (x.w_epoch == e && x.w_tid != t) {
        report(std::string("waw:") + x.w_phase + "|" + f->phase,
               "race (write after write in one barrier interval) on " + describe_word(w) + ": " + thr(x.w_tid, x.w_phase) +
                   " and " + thr(t, f->phase));
      }
      if (x.r_epoch == e && (x.r_tid != t || x.r_multi)) {
        report(std::string("war:") + x.r_phase + "|" + f->phase,
               "race (write after read in one barrier interval) on " + describe_word(w) + ": " +
                   thr(x.r_tid == t ? -1 : x.r_tid, x.r_phase) + " read, " + thr(t, f->phase) + " wrote" +
                   (async ? " (cp.async)" : ""));
      }
      x.w_epoch = e, x.w_tid = t, x.w_phase = f->phase, x.async_w = async;
      x.pending = async;
    }
  }
  return true;
}

template <class T>
inline T load(const T* p) {
  T v;
  if (access(p, sizeof(T), false)) std::memcpy(&v, p, sizeof(T));
  else std::memset(&v, 0xff, sizeof(T));
  return v;
}
template <class T>
inline void store(T* p, const T& v) {
  if (access(p, sizeof(T), true)) std::memcpy(p, &v, sizeof(T));
}

// A pointer into shared memory whose every dereference goes through the shadow.
template <class T>
struct SRef {
  T* p;
  operator std::remove_const_t<T>() const { return load(p); }
  template <class V>
  SRef& operator=(V v) {
    store(const_cast<std::remove_const_t<T>*>(p), static_cast<std::remove_const_t<T>>(v));
    return *this;
  }
  SRef& operator=(const SRef& o) { return *this = static_cast<std::remove_const_t<T>>(o); }
  template <class V>
  SRef& operator+=(V v) { return *this = static_cast<std::remove_const_t<T>>(*this) + v; }
};

template <class T>
struct SPtr {
  T* p = nullptr;
  SPtr() {}
  explicit SPtr(T* q) : p(q) {}
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  SPtr(SPtr<U> o) : p(o.p) {}
  SRef<T> operator[](int64_t i) const { return SRef<T>{p + i}; }
  SRef<T> operator*() const { return SRef<T>{p}; }
  SPtr operator+(int64_t i) const { return SPtr(p + i); }
  SPtr operator-(int64_t i) const { return SPtr(p - i); }
  T* raw() const { return p; }
};

// Four consecutive floats with one 16-byte access (the kernels' float4 loads of shared memory).
inline float4 ld4(SPtr<const float> q) {
  if (reinterpret_cast<uintptr_t>(q.p) % 16 != 0)
    report("misaligned4", "16-byte shared load from an address that is not 16-byte aligned, by " +
                              thr(cur_tid(), cur() ? cur()->phase : nullptr));
  return load(reinterpret_cast<const float4*>(q.p));
}

// The block's k-th shared array (every thread asks for the same arrays in the same order and gets the
// same memory; the first to ask allocates it).
inline uint8_t* shared_bytes(const char* name, size_t bytes) {
  State& s = S();
  Fiber* f = s.cur;
  const size_t k = f->next_array++;
  if (k < s.arrays.size()) {
    if (s.arrays[k].name != name || s.arrays[k].bytes != bytes)
      throw std::logic_error("threads of one block declared different shared arrays");
    return s.smem + s.arrays[k].off;
  }
  const size_t off = (s.used + kGuard + 15) / 16 * 16;
  if (off + bytes > kSmemCap) throw std::logic_error("emulated shared memory exhausted");
  s.arrays.push_back(Array{name, off, bytes});
  std::memset(s.smem + s.used, 0xff, off + bytes - s.used);
  std::fill(s.shadow.begin() + s.used / 4, s.shadow.begin() + (off + bytes + 3) / 4, Word());
  s.used = off + bytes;
  return s.smem + off;
}
template <class T>
inline SPtr<T> shared_array(const char* name, size_t n) {
  return SPtr<T>(reinterpret_cast<T*>(shared_bytes(name, n * sizeof(T))));
}
// The launch's dynamic shared memory (`extern __shared__`), of the size given to the launch.
template <class T>
inline SPtr<T> dynamic_shared(const char* name) {
  State& s = S();
  if (s.dyn_off == 0 && s.dyn_bytes > 0) {
    // allocated by the first thread to ask, like a static array
  }
  return shared_array<T>(name, s.dyn_bytes / sizeof(T));
}

// ------------------------------------------------------------------------------------------ scheduler
inline void yield_to_scheduler() {
  State& s = S();
  if (!_setjmp(s.cur->jb)) _longjmp(s.sched_jb, 1);
}

inline void fiber_entry() {
  State& s = S();
  (*s.body)();
  s.cur->state = kDone;
  _longjmp(s.sched_jb, 1);  // never returns: the scheduler resumes where it switched to this fiber
}

inline void switch_to(Fiber& f) {
  State& s = S();
  const unsigned bx = blockDim.x, by = blockDim.y;
  threadIdx = dim3(f.tid % bx, (f.tid / bx) % by, f.tid / (bx * by));
  s.cur = &f;
  if (!_setjmp(s.sched_jb)) {
    if (f.started) {
      _longjmp(f.jb, 1);
    } else {
      f.started = true;
      swapcontext(&s.sched, &f.ctx);  // s.sched is never resumed: the fiber comes back by _longjmp
    }
  }
  s.cur = nullptr;
}

// Resolves the shuffles whose every mask lane has arrived; true if any did.
inline bool resolve_shuffles(bool force) {
  State& s = S();
  bool any = false;
  for (unsigned w0 = 0; w0 < s.nthreads; w0 += 32) {
    const unsigned nl = std::min(32u, s.nthreads - w0);
    unsigned at = 0;
    for (unsigned l = 0; l < nl; ++l)
      if (s.fibers[w0 + l].state == kAtShuffle) at |= 1u << l;
    if (!at) continue;
    unsigned ready = 0;
    for (unsigned l = 0; l < nl; ++l) {
      if (!((at >> l) & 1u)) continue;
      const Fiber& f = s.fibers[w0 + l];
      if ((f.sh_mask & at) == f.sh_mask || force) ready |= 1u << l;
    }
    if (!ready) continue;
    if (force) {
      for (unsigned l = 0; l < nl; ++l) {
        const Fiber& f = s.fibers[w0 + l];
        if (!((ready >> l) & 1u)) continue;
        const unsigned missing = f.sh_mask & ~at;
        for (unsigned m = 0; m < 32; ++m) {
          if (!((missing >> m) & 1u)) continue;
          const std::string why = w0 + m >= s.nthreads ? "does not exist"
                                  : s.fibers[w0 + m].state == kDone ? "has exited"
                                  : std::string("waits at ") + (s.fibers[w0 + m].wait_id ? s.fibers[w0 + m].wait_id : "?");
          report(std::string("shfl-missing:") + f.wait_id,
                 std::string("shuffle ") + f.wait_id + ": lane " + std::to_string(m) + " of the mask of thread " +
                     std::to_string(f.tid) + " never arrives (it " + why + ")");
        }
      }
    }
    for (unsigned l = 0; l < nl; ++l) {
      if (!((ready >> l) & 1u)) continue;
      Fiber& f = s.fibers[w0 + l];
      if (!((f.sh_mask >> l) & 1u))
        report(std::string("shfl-self:") + f.wait_id, std::string("shuffle ") + f.wait_id + ": thread " +
                                                           std::to_string(f.tid) + " calls it with a mask that lacks its own lane");
      const unsigned src = static_cast<unsigned>(f.sh_src);
      float v = std::nanf("");
      if (src >= nl || !((f.sh_mask >> src) & 1u) || !((ready >> src) & 1u)) {
        report(std::string("shfl-src:") + f.wait_id, std::string("shuffle ") + f.wait_id + ": thread " + std::to_string(f.tid) +
                                                          " reads lane " + std::to_string(src) + ", outside the mask or absent");
      } else {
        const Fiber& g = s.fibers[w0 + src];
        if (g.wait_id != f.wait_id || g.sh_mask != f.sh_mask)
          report(std::string("shfl-mismatch:") + f.wait_id,
                 std::string("shuffle ") + f.wait_id + ": lanes " + std::to_string(l) + " and " + std::to_string(src) +
                     " meet at different shuffles or with different masks");
        v = g.sh_val;
      }
      f.sh_out = v;
    }
    for (unsigned l = 0; l < nl; ++l)
      if ((ready >> l) & 1u) s.fibers[w0 + l].state = kReady;
    any = true;
  }
  return any;
}

inline bool resolve_barrier() {
  State& s = S();
  const Fiber* first = nullptr;
  int done = 0;
  for (unsigned t = 0; t < s.nthreads; ++t) {
    const Fiber& f = s.fibers[t];
    if (f.state == kAtShuffle || f.state == kReady) return false;
    if (f.state == kDone) { ++done; continue; }
    if (!first) first = &f;
  }
  if (!first) return false;
  int any_pred = 0;
  for (unsigned t = 0; t < s.nthreads; ++t) {
    Fiber& f = s.fibers[t];
    if (f.state == kDone) continue;
    if (f.wait_id != first->wait_id || f.wait_kind != first->wait_kind)
      report(std::string("diverge:") + first->wait_id + "|" + f.wait_id,
             "divergent barrier: thread " + std::to_string(first->tid) + " waits at " + first->wait_id + ", thread " +
                 std::to_string(f.tid) + " at " + f.wait_id);
    any_pred |= f.pred;
  }
  if (done > 0)
    report(std::string("exited:") + first->wait_id, "divergent barrier: " + std::to_string(done) +
                                                         " thread(s) of the block exited while the others wait at " + first->wait_id);
  ++s.epoch;
  for (unsigned t = 0; t < s.nthreads; ++t) {
    Fiber& f = s.fibers[t];
    if (f.state == kDone) continue;
    f.pred = any_pred;
    f.phase = f.wait_id;
    f.state = kReady;
  }
  return true;
}

inline void run_block(unsigned nthreads) {
  State& s = S();
  s.nthreads = nthreads;
  s.used = 0;
  s.arrays.clear();
  s.dyn_off = 0;
  s.epoch = 1;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    if (!f.stack) {
      f.stack = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.stack == MAP_FAILED) throw std::runtime_error("no memory for an emulated thread's stack");
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    f.tid = t;
    f.started = false;
    f.state = kReady;
    f.wait_id = nullptr;
    f.pred = 0;
    f.groups.clear();
    f.open.clear();
    f.phase = "kernel start";
    f.next_array = 0;
  }
  for (;;) {
    for (unsigned t = 0; t < nthreads; ++t)
      if (s.fibers[t].state == kReady) switch_to(s.fibers[t]);
    bool all_done = true;
    for (unsigned t = 0; t < nthreads && all_done; ++t) all_done = s.fibers[t].state == kDone;
    if (all_done) break;
    if (resolve_shuffles(false)) continue;
    if (resolve_barrier()) continue;
    // Deadlock: shuffles with lanes that never come (they exited or wait at a barrier), or a barrier
    // that shuffling lanes never reach. Report, then let the stuck shuffles go on with what they have.
    if (!resolve_shuffles(true)) throw std::logic_error("emulated block deadlocked");
  }
}

// Runs body() as every thread of every block of the grid. dyn_smem: the launch's dynamic shared memory.
inline void launch(const char* kernel, dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body) {
  State& s = S();
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > kMaxThreads) throw std::invalid_argument(std::string(kernel) + ": bad block size");
  if (dyn_smem > 227 * 1024) throw std::invalid_argument(std::string(kernel) + ": more dynamic shared memory than a GPU has");
  s.kernel = kernel;
  s.body = &body;
  s.dyn_bytes = dyn_smem;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block(n);
      }
  s.body = nullptr;
}

// ------------------------------------------------------------------------------------------ sync points
inline void sync(const char* id, const char* file, int line) {
  const char* phase = intern_phase(id, kBarrier, file, line);
  if (mutated(id)) return;
  Fiber* f = cur();
  f->state = kAtBarrier;
  f->wait_id = phase;
  f->wait_kind = kBarrier;
  f->pred = 0;
  yield_to_scheduler();
}

inline int sync_or(const char* id, const char* file, int line, int pred) {
  const char* phase = intern_phase(id, kBarrierOr, file, line);
  if (mutated(id)) return pred != 0;
  Fiber* f = cur();
  f->state = kAtBarrier;
  f->wait_id = phase;
  f->wait_kind = kBarrierOr;
  f->pred = pred != 0;
  yield_to_scheduler();
  return f->pred;
}

// __shfl_xor_sync / __shfl_down_sync (width 32): src lane = lane ^ lm, or lane + delta (own value past 31).
inline float shfl(const char* id, const char* file, int line, unsigned mask, float v, int src_lane) {
  const char* phase = intern_phase(id, kShuffle, file, line);
  if (mutated(id)) {
    for (int b = 31; b >= 0; --b)
      if ((mask >> b) & 1u) {
        mask &= ~(1u << b);
        break;
      }
  }
  Fiber* f = cur();
  f->state = kAtShuffle;
  f->wait_id = phase;
  f->sh_mask = mask;
  f->sh_val = v;
  f->sh_src = src_lane;
  yield_to_scheduler();
  return f->sh_out;
}
inline float shfl_xor(const char* id, const char* file, int line, unsigned mask, float v, int lm) {
  return shfl(id, file, line, mask, v, static_cast<int>(cur()->tid % 32) ^ lm);
}
inline float shfl_down(const char* id, const char* file, int line, unsigned mask, float v, int delta) {
  const int lane = static_cast<int>(cur()->tid % 32);
  return shfl(id, file, line, mask, v, lane + delta < 32 ? lane + delta : lane);
}

// cp.async of `bytes` from global src to shared dst: the destination is poisoned and pending until the
// wait_group that retires its group.
inline void cp_async(void* dst, const void* src, int bytes) {
  if (!access(dst, bytes, true, true)) return;
  std::memset(dst, 0xff, bytes);
  cur()->open.push_back(Copy{static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes});
}
inline void cp_commit() {
  Fiber* f = cur();
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}
inline void cp_wait(const char* id, const char* file, int line, int n) {
  intern_phase(id, kWaitGroup, file, line);
  if (mutated(id)) ++n;
  State& s = S();
  Fiber* f = cur();
  while (static_cast<int>(f->groups.size()) > n) {
    for (const Copy& c : f->groups.front()) {
      // The copy lands now: a write of the destination by this thread, in its current interval.
      uint8_t* d = c.dst;
      const size_t w0 = static_cast<size_t>(d - s.smem) / 4, w1 = (static_cast<size_t>(d - s.smem) + c.bytes + 3) / 4;
      for (size_t w = w0; w < w1; ++w) s.shadow[w].pending = false;
      access(d, c.bytes, true, false);
      std::memcpy(d, c.src, c.bytes);
    }
    f->groups.pop_front();
  }
}

// ------------------------------------------------------------------------------------------ results
inline void reset(const char* mutation) {
  State& s = S();
  s.reports.clear();
  s.seen.clear();
  s.n_reports = 0;
  s.mutation = mutation ? mutation : "";
  s.mutation_hits = 0;
}

}  // namespace lvemu

// What csrc/cuda/cuda_common.cuh gives the kernels, on the host.
namespace leanvae {
namespace cuda {
template <class T>
inline float to_float(T v) { return leanvae::cpu::to_float(v); }
template <class T>
inline T from_float(float v) { return leanvae::cpu::from_float<T>(v); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::isfinite;
using std::min;
struct DeviceScalar {
  const void* ptr;
  int dtype;
  float get() const {
    switch (dtype) {
      case kFloat16: return to_float(*static_cast<const __half*>(ptr));
      case kBFloat16: return to_float(*static_cast<const __nv_bfloat16*>(ptr));
      case kFloat64: return static_cast<float>(*static_cast<const double*>(ptr));
      default: return *static_cast<const float*>(ptr);
    }
  }
};
}  // namespace cuda
}  // namespace leanvae
