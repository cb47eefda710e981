// Dispatch, threading and scratch memory for the GEMM core.
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#if defined(_WIN32)
#include <malloc.h>
#endif

#include "threadpool.h"

namespace obf {

// ---------------------------------------------------------------- scratch

namespace {
void* alloc_aligned(size_t align, size_t bytes) {
#if defined(_WIN32)
  return _aligned_malloc(bytes, align);
#else
  return std::aligned_alloc(align, bytes);
#endif
}
void free_aligned(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}
struct ScratchBuf {
  float* p = nullptr;
  size_t cap = 0;  // in floats
  ~ScratchBuf() { free_aligned(p); }
};
thread_local ScratchBuf t_scratch[2];
}  // namespace

float* scratch(int slot, size_t nfloats) {
  ScratchBuf& b = t_scratch[slot];
  if (b.cap < nfloats) {
    free_aligned(b.p);
    b.p = nullptr;
    b.cap = 0;
    // Page-aligned. (Deliberately no MADV_HUGEPAGE: on some virtualised hosts
    // huge-page-backed scratch that is rewritten constantly made packing ~10x slower.)
    const size_t page = 4096;
    const size_t bytes = (nfloats * sizeof(float) + 64 + page - 1) / page * page;
    void* p = alloc_aligned(page, bytes);
    if (!p) {
      std::fprintf(stderr, "obfuscatune_native: out of memory allocating %zu bytes of GEMM scratch\n", bytes);
      std::abort();
    }
    b.p = static_cast<float*>(p);
    b.cap = bytes / sizeof(float);
  }
  return b.p;
}

// ---------------------------------------------------------------- state

namespace {

const IsaImpl* select_isa() {
  if (const IsaImpl* i = isa_avx512()) return i;
  if (const IsaImpl* i = isa_avx2()) return i;
  return isa_generic();
}

std::atomic<const IsaImpl*> g_isa{nullptr};

const IsaImpl* isa() {
  const IsaImpl* i = g_isa.load(std::memory_order_acquire);
  if (!i) {
    i = select_isa();
    g_isa.store(i, std::memory_order_release);
  }
  return i;
}

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : (int)std::min(n, 256u);
}

ThreadPool& pool() {
  static ThreadPool* p = [] {
    auto* tp = new ThreadPool();
    tp->resize(default_threads());
    return tp;
  }();
  return *p;
}

// Below this many multiply-adds a call runs on the calling thread only.
constexpr int64_t kParallelMinWork = int64_t(1) << 21;

// C = beta * C (+ bias); used for k == 0 and alpha == 0.
void scale_c(const GemmArgs& g) {
  for (int64_t i = 0; i < g.m; ++i) {
    float* c = g.C + i * g.ldc;
    for (int64_t j = 0; j < g.n; ++j) {
      float v = g.beta == 0.0f ? 0.0f : g.beta * c[j];
      if (g.bias) v += g.bias[j];
      c[j] = v;
    }
  }
}

void sgemm_serial(const GemmArgs& g) {
  if (g.m <= 0 || g.n <= 0) return;
  if (g.k <= 0 || g.alpha == 0.0f) {
    scale_c(g);
    return;
  }
  isa()->run(g, 0, g.m, 0, g.n);
}

// A rectangular split of C over threads.
struct Split {
  const GemmArgs* g;
  const IsaImpl* impl;
  int64_t tiles_m, tiles_n;  // register tiles along each dimension
  int64_t tm, tn;            // thread grid
};

void split_task(void* ctx, int64_t t) {
  const Split& s = *static_cast<const Split*>(ctx);
  const GemmArgs& g = *s.g;
  const int64_t ti = t / s.tn, tj = t % s.tn;
  const int64_t i0 = std::min(g.m, ti * s.tiles_m / s.tm * s.impl->mr);
  const int64_t i1 = std::min(g.m, (ti + 1) * s.tiles_m / s.tm * s.impl->mr);
  const int64_t j0 = std::min(g.n, tj * s.tiles_n / s.tn * s.impl->nr);
  const int64_t j1 = std::min(g.n, (tj + 1) * s.tiles_n / s.tn * s.impl->nr);
  s.impl->run(g, i0, i1, j0, j1);
}

}  // namespace

// ---------------------------------------------------------------- public

const char* active_isa() { return isa()->name; }

ThreadPool& shared_pool() { return pool(); }

int threads() { return pool().size(); }

void set_threads(int n) { pool().resize(std::max(1, std::min(n, 256))); }

bool force_isa(const char* name) {
  const IsaImpl* cand[] = {isa_avx512(), isa_avx2(), isa_generic()};
  for (const IsaImpl* c : cand)
    if (c && std::strcmp(c->name, name) == 0) {
      g_isa.store(c, std::memory_order_release);
      return true;
    }
  return false;
}

void sgemm(const GemmArgs& g) {
  if (g.m <= 0 || g.n <= 0) return;
  const int nt = threads();
  if (nt <= 1 || g.k <= 0 || g.alpha == 0.0f || g.m * g.n * g.k < kParallelMinWork) {
    sgemm_serial(g);
    return;
  }
  const IsaImpl* impl = isa();
  Split s;
  s.g = &g;
  s.impl = impl;
  s.tiles_m = (g.m + impl->mr - 1) / impl->mr;
  s.tiles_n = (g.n + impl->nr - 1) / impl->nr;
  // Pick the thread grid tm x tn (tm * tn == nt) that minimises the largest
  // per-thread block, counting both multiply-adds and packing (each thread packs
  // the A rows and B columns it needs).
  double best = -1;
  s.tm = 1;
  s.tn = nt;
  for (int64_t tm = 1; tm <= nt; ++tm) {
    if (nt % tm) continue;
    const int64_t tn = nt / tm;
    if (tm > s.tiles_m || tn > s.tiles_n) continue;
    const double rows = double((s.tiles_m + tm - 1) / tm * impl->mr);
    const double cols = double((s.tiles_n + tn - 1) / tn * impl->nr);
    const double cost = rows * cols + 12.0 * (rows + cols);
    if (best < 0 || cost < best) {
      best = cost;
      s.tm = tm;
      s.tn = tn;
    }
  }
  if (best < 0) {  // fewer tiles than threads in both directions: split the longer one
    if (s.tiles_m >= s.tiles_n) {
      s.tm = std::min<int64_t>(nt, s.tiles_m);
      s.tn = 1;
    } else {
      s.tm = 1;
      s.tn = std::min<int64_t>(nt, s.tiles_n);
    }
  }
  pool().run(s.tm * s.tn, split_task, &s);
}

namespace {
struct Batch {
  const GemmArgs* g;
  int64_t sa, sb, sc;
};
void batch_task(void* ctx, int64_t b) {
  const Batch& s = *static_cast<const Batch*>(ctx);
  GemmArgs gi = *s.g;
  gi.A += b * s.sa;
  gi.B += b * s.sb;
  gi.C += b * s.sc;
  sgemm_serial(gi);
}
}  // namespace

void sgemm_batched(const GemmArgs& g, int64_t strideA, int64_t strideB, int64_t strideC, int64_t batch) {
  if (batch <= 0 || g.m <= 0 || g.n <= 0) return;
  const int nt = threads();
  Batch s{&g, strideA, strideB, strideC};
  // Items that share one C (strideC == 0) must run in order.
  int64_t done = 0;
  if (nt > 1 && batch > 1 && strideC != 0) {
    const int64_t work = g.m * g.n * std::max<int64_t>(g.k, 1);
    // Whole rounds of items in parallel, one item per thread; a remainder of big
    // items runs one at a time with all threads on each.
    const int64_t par = work >= kParallelMinWork ? batch / nt * nt : batch;
    if (par >= 2) {
      pool().run(par, batch_task, &s);
      done = par;
    }
  }
  for (int64_t b = done; b < batch; ++b) {
    GemmArgs gi = g;
    gi.A += b * strideA;
    gi.B += b * strideB;
    gi.C += b * strideC;
    sgemm(gi);
  }
}

}  // namespace obf
