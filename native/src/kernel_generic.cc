// Portable micro-kernel in plain C++ (auto-vectorised by the compiler for the
// baseline ISA of the build). Used when no specialised kernel is available.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"
#include "gemm_driver.h"

namespace {

struct KGeneric : GenericPacking {
  static constexpr int MR = 6;
  static constexpr int NR = 8;

  static void kernel(int64_t kc, const float* __restrict A, const float* __restrict B, float* C, int64_t ldc,
                     float alpha, float beta, const float* bias, int mr, int nr, RowPrefetch /*pf*/) {
    float acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;
    for (int64_t p = 0; p < kc; ++p) {
      for (int i = 0; i < MR; ++i) {
        const float a = A[i];
        for (int j = 0; j < NR; ++j) acc[i][j] += a * B[j];
      }
      A += MR;
      B += NR;
    }
    update_c_scalar(&acc[0][0], NR, C, ldc, mr, nr, alpha, beta, bias);
  }
};

obf::Blocking g_blocking = {120, 256, 1024, 0, 1 << 19};

void run_generic(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  Driver<KGeneric>::run(g, i0, i1, j0, j1, g_blocking);
}

}  // namespace

namespace obf {
const IsaImpl* isa_generic() {
  static const IsaImpl impl = {"generic", KGeneric::MR, KGeneric::NR, run_generic, &g_blocking};
  return &impl;
}
}  // namespace obf
