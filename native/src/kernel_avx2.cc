// AVX2 + FMA micro-kernel (6 x 16). Compiled with a target pragma and only
// called after a run-time CPU check.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "gemm_driver.h"

namespace {

struct K256 : GenericPacking {
  static constexpr int MR = 6;
  static constexpr int NR = 16;

  static void kernel(int64_t kc, const float* __restrict A, const float* __restrict B, float* C, int64_t ldc,
                     float alpha, float beta, const float* bias, int mr, int nr, RowPrefetch /*pf*/) {
    __m256 c[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) _mm_prefetch((const char*)(C + i * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int64_t p = 0; p < kc; ++p) {
      const __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_broadcast_ss(A + i);
        c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
        c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
      }
      A += MR;
      B += NR;
    }
    if (mr == MR && nr == NR) {
      const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
      const __m256 z0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
      const __m256 z1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        float* cr = C + i * ldc;
        __m256 x0 = _mm256_fmadd_ps(c[i][0], va, z0), x1 = _mm256_fmadd_ps(c[i][1], va, z1);
        if (beta != 0.0f) {
          x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(cr), x0);
          x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(cr + 8), x1);
        }
        _mm256_storeu_ps(cr, x0);
        _mm256_storeu_ps(cr + 8, x1);
      }
    } else {
      alignas(32) float t[MR * NR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        _mm256_store_ps(t + i * NR, c[i][0]);
        _mm256_store_ps(t + i * NR + 8, c[i][1]);
      }
      update_c_scalar(t, NR, C, ldc, mr, nr, alpha, beta, bias);
    }
  }
};

obf::Blocking g_blocking = {144, 256, 2048, 0, 1 << 19};

void run_avx2(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  Driver<K256>::run(g, i0, i1, j0, j1, g_blocking);
}

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace obf {
const IsaImpl* isa_avx2() {
  static const IsaImpl impl = {"avx2", K256::MR, K256::NR, run_avx2, &g_blocking};
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok ? &impl : nullptr;
}
}  // namespace obf

#else
namespace obf {
const IsaImpl* isa_avx2() { return nullptr; }
}  // namespace obf
#endif
