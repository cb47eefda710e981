// Single-precision GEMM core: C = alpha * op(A) op(B) + beta * C (+ bias per column).
// Row-major storage, BLAS semantics. Arguments are assumed validated by the caller.
#pragma once

#include <cstddef>
#include <cstdint>

namespace obf {

struct GemmArgs {
  bool ta = false;        // op(A) = A^T; A is stored k x m
  bool tb = false;        // op(B) = B^T; B is stored n x k
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* A = nullptr;
  int64_t lda = 0;
  const float* B = nullptr;
  int64_t ldb = 0;
  float* C = nullptr;
  int64_t ldc = 0;
  const float* bias = nullptr;  // n entries, or null
};

// Computes rows [i0, i1) and columns [j0, j1) of C on the calling thread.
typedef void (*BlockFn)(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1);

// Cache blocking: C is computed in nc-column slabs; the reduction is split into
// kc-deep steps; A is packed mc rows at a time. A reduction of at most kc_single is done
// in one step (C is then read and written once), with mc lowered so that the packed A
// block stays within a_bytes.
struct Blocking {
  int64_t mc, kc, nc;
  int64_t kc_single;
  int64_t a_bytes;
};

struct IsaImpl {
  const char* name;
  int mr, nr;  // register tile
  BlockFn run;
  Blocking* blocking;  // mutable, for tuning
};

// Implementations; a null return means "not compiled in / not supported by this CPU".
const IsaImpl* isa_avx512();
const IsaImpl* isa_avx2();
const IsaImpl* isa_generic();

// Thread-local, 64-byte aligned scratch (slot 0: packed A, slot 1: packed B).
float* scratch(int slot, size_t nfloats);

// Public entry points (thread pool + dispatch live in gemm.cc).
void sgemm(const GemmArgs& g);
void sgemm_batched(const GemmArgs& g, int64_t strideA, int64_t strideB, int64_t strideC, int64_t batch);
const char* active_isa();
int threads();
void set_threads(int n);
// Overrides the ISA (for benchmarking); returns false if unavailable.
bool force_isa(const char* name);

}  // namespace obf
