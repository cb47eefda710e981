// AVX-512 micro-kernel and packing routines. Compiled for AVX-512 with a
// function-level target pragma so that the rest of the addon stays portable;
// it is only called after a run-time CPU check.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")
#endif

#include "gemm_driver.h"

namespace {

inline __mmask16 tail_mask(int n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// In-register transpose of a 16x16 block: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4q + c]: lane L holds rows 4q..4q+3 of column 4L+c
  for (int q = 0; q < 4; ++q) {
    const __m512d t0 = _mm512_castps_pd(t[4 * q]), t1 = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * q + 2]), t3 = _mm512_castps_pd(t[4 * q + 3]);
    u[4 * q + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[0 + c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// The 14 x 32 micro-kernel, in assembly so that all 28 accumulators stay in registers
// (zmm0-27; the two B vectors of a step in zmm28/29, broadcasts of A in zmm30/31): per
// reduction step 2 loads of B, 14 broadcasts and 28 FMAs, unrolled 4 times. Every 4 steps
// it also prefetches (into L2) one 128-byte row of `pf`, the source of the next B panel.
#define OBF_ROW(i, r0, r1, bc, off)                                   \
  "vbroadcastss (" #off "*56+" #i "*4)(%[a]), %%zmm" #bc "\n\t"      \
  "vfmadd231ps %%zmm28, %%zmm" #bc ", %%zmm" #r0 "\n\t"              \
  "vfmadd231ps %%zmm29, %%zmm" #bc ", %%zmm" #r1 "\n\t"
#define OBF_STEP(off)                                                 \
  "vmovaps (" #off "*128)(%[b]), %%zmm28\n\t"                         \
  "vmovaps (" #off "*128+64)(%[b]), %%zmm29\n\t"                      \
  OBF_ROW(0, 0, 1, 30, off) OBF_ROW(1, 2, 3, 31, off)                 \
  OBF_ROW(2, 4, 5, 30, off) OBF_ROW(3, 6, 7, 31, off)                 \
  OBF_ROW(4, 8, 9, 30, off) OBF_ROW(5, 10, 11, 31, off)               \
  OBF_ROW(6, 12, 13, 30, off) OBF_ROW(7, 14, 15, 31, off)             \
  OBF_ROW(8, 16, 17, 30, off) OBF_ROW(9, 18, 19, 31, off)             \
  OBF_ROW(10, 20, 21, 30, off) OBF_ROW(11, 22, 23, 31, off)           \
  OBF_ROW(12, 24, 25, 30, off) OBF_ROW(13, 26, 27, 31, off)
#define OBF_ZERO2(r0, r1) "vpxord %%zmm" #r0 ", %%zmm" #r0 ", %%zmm" #r0 "\n\t" \
                          "vpxord %%zmm" #r1 ", %%zmm" #r1 ", %%zmm" #r1 "\n\t"
#define OBF_STORE2(r0, r1, i) "vmovaps %%zmm" #r0 ", (" #i "*128)(%[c])\n\t" \
                              "vmovaps %%zmm" #r1 ", (" #i "*128+64)(%[c])\n\t"

// The k loop, shared by the two variants below.
#define OBF_LOOP                                                                            \
  OBF_ZERO2(0, 1) OBF_ZERO2(2, 3) OBF_ZERO2(4, 5) OBF_ZERO2(6, 7) OBF_ZERO2(8, 9)           \
  OBF_ZERO2(10, 11) OBF_ZERO2(12, 13) OBF_ZERO2(14, 15) OBF_ZERO2(16, 17) OBF_ZERO2(18, 19) \
  OBF_ZERO2(20, 21) OBF_ZERO2(22, 23) OBF_ZERO2(24, 25) OBF_ZERO2(26, 27)                   \
  "test %[n4], %[n4]\n\t"                                                                   \
  "jz 2f\n\t"                                                                               \
  ".p2align 5\n"                                                                            \
  "1:\n\t"                                                                                  \
  OBF_STEP(0) OBF_STEP(1) OBF_STEP(2) OBF_STEP(3)                                           \
  /* one row of the next B panel's source per iteration, while any is left */               \
  "test %[pn], %[pn]\n\t"                                                                   \
  "jz 5f\n\t"                                                                               \
  "prefetcht1 (%[pp])\n\t"                                                                  \
  "prefetcht1 64(%[pp])\n\t"                                                                \
  "prefetcht1 124(%[pp])\n\t"                                                               \
  "add %[ps], %[pp]\n\t"                                                                    \
  "dec %[pn]\n"                                                                             \
  "5:\n\t"                                                                                  \
  "add $224, %[a]\n\t"                                                                      \
  "add $512, %[b]\n\t"                                                                      \
  "dec %[n4]\n\t"                                                                           \
  "jnz 1b\n"                                                                                \
  "2:\n\t"                                                                                  \
  "test %[n1], %[n1]\n\t"                                                                   \
  "jz 4f\n"                                                                                 \
  "3:\n\t"                                                                                  \
  OBF_STEP(0)                                                                               \
  "add $56, %[a]\n\t"                                                                       \
  "add $128, %[b]\n\t"                                                                      \
  "dec %[n1]\n\t"                                                                           \
  "jnz 3b\n"                                                                                \
  "4:\n\t"

#define OBF_CLOBBERS                                                                                           \
  "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
      "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",   \
      "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

// Accumulators to a 14 x 32 buffer (for edge tiles, finished in C++).
inline void loop_14x32(int64_t kc, const float* A, const float* B, float* acc, RowPrefetch pf) {
  int64_t n4 = kc >> 2, n1 = kc & 3;
  const float* pp = pf.ptr;
  int64_t pn = pf.rows;
  const int64_t ps = pf.stride * (int64_t)sizeof(float);
  __asm__ volatile(
      OBF_LOOP
      OBF_STORE2(0, 1, 0) OBF_STORE2(2, 3, 1) OBF_STORE2(4, 5, 2) OBF_STORE2(6, 7, 3)
      OBF_STORE2(8, 9, 4) OBF_STORE2(10, 11, 5) OBF_STORE2(12, 13, 6) OBF_STORE2(14, 15, 7)
      OBF_STORE2(16, 17, 8) OBF_STORE2(18, 19, 9) OBF_STORE2(20, 21, 10) OBF_STORE2(22, 23, 11)
      OBF_STORE2(24, 25, 12) OBF_STORE2(26, 27, 13)
      : [a] "+r"(A), [b] "+r"(B), [n4] "+r"(n4), [n1] "+r"(n1), [pp] "+r"(pp), [pn] "+r"(pn)
      : [c] "r"(acc), [ps] "r"(ps)
      : OBF_CLOBBERS);
}

// A full 14 x 32 tile straight into C: C = alpha * acc + beta * C (+ bias); beta == 0
// does not read C.
#define OBF_OUT0(r0, r1)                              \
  "vfmadd213ps %%zmm30, %%zmm28, %%zmm" #r0 "\n\t"    \
  "vfmadd213ps %%zmm31, %%zmm28, %%zmm" #r1 "\n\t"    \
  "vmovups %%zmm" #r0 ", (%[cp])\n\t"                 \
  "vmovups %%zmm" #r1 ", 64(%[cp])\n\t"               \
  "add %[ldcb], %[cp]\n\t"
#define OBF_OUT1(r0, r1)                              \
  "vfmadd213ps %%zmm30, %%zmm28, %%zmm" #r0 "\n\t"    \
  "vfmadd213ps %%zmm31, %%zmm28, %%zmm" #r1 "\n\t"    \
  "vfmadd231ps (%[cp]), %%zmm29, %%zmm" #r0 "\n\t"    \
  "vfmadd231ps 64(%[cp]), %%zmm29, %%zmm" #r1 "\n\t"  \
  "vmovups %%zmm" #r0 ", (%[cp])\n\t"                 \
  "vmovups %%zmm" #r1 ", 64(%[cp])\n\t"               \
  "add %[ldcb], %[cp]\n\t"

inline void full_14x32(int64_t kc, const float* A, const float* B, float* C, int64_t ldc, float alpha, float beta,
                       const float* bias, RowPrefetch pf) {
  int64_t n4 = kc >> 2, n1 = kc & 3;
  const float* pp = pf.ptr;
  int64_t pn = pf.rows;
  const int64_t ps = pf.stride * (int64_t)sizeof(float);
  const int64_t ldcb = ldc * (int64_t)sizeof(float);
  const int64_t ub = beta != 0.0f;
  float* cp = C;
  __asm__ volatile(
      OBF_LOOP
      "vbroadcastss %[alpha], %%zmm28\n\t"
      "vbroadcastss %[beta], %%zmm29\n\t"
      "vpxord %%zmm30, %%zmm30, %%zmm30\n\t"
      "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
      "test %[bias], %[bias]\n\t"
      "jz 6f\n\t"
      "vmovups (%[bias]), %%zmm30\n\t"
      "vmovups 64(%[bias]), %%zmm31\n"
      "6:\n\t"
      "test %[ub], %[ub]\n\t"
      "jnz 7f\n\t"
      OBF_OUT0(0, 1) OBF_OUT0(2, 3) OBF_OUT0(4, 5) OBF_OUT0(6, 7) OBF_OUT0(8, 9) OBF_OUT0(10, 11)
      OBF_OUT0(12, 13) OBF_OUT0(14, 15) OBF_OUT0(16, 17) OBF_OUT0(18, 19) OBF_OUT0(20, 21)
      OBF_OUT0(22, 23) OBF_OUT0(24, 25) OBF_OUT0(26, 27)
      "jmp 8f\n"
      "7:\n\t"
      OBF_OUT1(0, 1) OBF_OUT1(2, 3) OBF_OUT1(4, 5) OBF_OUT1(6, 7) OBF_OUT1(8, 9) OBF_OUT1(10, 11)
      OBF_OUT1(12, 13) OBF_OUT1(14, 15) OBF_OUT1(16, 17) OBF_OUT1(18, 19) OBF_OUT1(20, 21)
      OBF_OUT1(22, 23) OBF_OUT1(24, 25) OBF_OUT1(26, 27)
      "8:\n\t"
      : [a] "+r"(A), [b] "+r"(B), [n4] "+r"(n4), [n1] "+r"(n1), [pp] "+r"(pp), [pn] "+r"(pn), [cp] "+r"(cp)
      : [ps] "r"(ps), [ldcb] "r"(ldcb), [bias] "r"(bias), [ub] "r"(ub), [alpha] "m"(alpha), [beta] "m"(beta)
      : OBF_CLOBBERS);
}
#undef OBF_OUT0
#undef OBF_OUT1
#undef OBF_LOOP
#undef OBF_CLOBBERS
#undef OBF_ROW
#undef OBF_STEP
#undef OBF_ZERO2
#undef OBF_STORE2

template <int MR_, int NV>
struct K512 {
  static constexpr int MR = MR_;
  static constexpr int NR = 16 * NV;

  template <int W>
  static void pack_copy_panels(const float* s, int64_t ld, int64_t kc, int64_t cols, float* d) {
    // Row by row: each source row segment is read once, sequentially.
    constexpr int NCH = (W + 15) / 16;
    const int64_t full = cols / W;
    const int rem = (int)(cols % W);
    __mmask16 lm[NCH], sm[NCH];
    for (int v = 0; v < NCH; ++v) {
      lm[v] = tail_mask(rem - 16 * v);
      sm[v] = tail_mask(W - 16 * v);
    }
    for (int64_t p = 0; p < kc; ++p) {
      const float* sp = s + p * ld;
      if (p + 2 < kc) {
        const float* pf = sp + 2 * ld;
        for (int64_t c = 0; c < cols; c += 16) _mm_prefetch((const char*)(pf + c), _MM_HINT_T0);
      }
      float* dp = d + p * W;
      for (int64_t q = 0; q < full; ++q) {
#pragma GCC unroll 8
        for (int v = 0; v < NCH; ++v) {
          if (W % 16 == 0) {
            _mm512_storeu_ps(dp + q * W * kc + 16 * v, _mm512_loadu_ps(sp + q * W + 16 * v));
          } else {
            const __m512 x = _mm512_maskz_loadu_ps(sm[v], sp + q * W + 16 * v);
            _mm512_mask_storeu_ps(dp + q * W * kc + 16 * v, sm[v], x);
          }
        }
      }
      if (rem) {
#pragma GCC unroll 8
        for (int v = 0; v < NCH; ++v) {
          const __m512 x = _mm512_maskz_loadu_ps(lm[v], sp + full * W + 16 * v);
          _mm512_mask_storeu_ps(dp + full * W * kc + 16 * v, sm[v], x);
        }
      }
    }
  }

  template <int W>
  static void pack_trans(const float* s, int64_t ld, int64_t kc, int w, float* d) {
    // One group of 16 source rows at a time, sweeping each row front to back.
    // Rows are usually far apart (one page or more), so the hardware prefetcher
    // does not help; instead, while a group is transposed, the same columns of
    // the following 16 rows are prefetched (one group of lead time).
    constexpr int NG = (W + 15) / 16;
    for (int gi = 0; gi < NG; ++gi) {
      const int rows = std::max(0, std::min(16, w - 16 * gi));
      const int width = std::min(16, W - 16 * gi);
      const __mmask16 wm = tail_mask(width);
      const float* sg = s + (int64_t)(16 * gi) * ld;
      const float* sn = sg + (int64_t)width * ld;  // the rows that follow this group
      float* dg = d + 16 * gi;
      for (int64_t p0 = 0; p0 < kc; p0 += 16) {
        const int pk = (int)std::min<int64_t>(16, kc - p0);
        const __mmask16 pm = tail_mask(pk);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) _mm_prefetch((const char*)(sn + i * ld + p0), _MM_HINT_T0);
        if (rows == 16 && pk == 16) {
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(sg + i * ld + p0);
        } else {
          for (int i = 0; i < 16; ++i)
            r[i] = i < rows ? _mm512_maskz_loadu_ps(pm, sg + i * ld + p0) : _mm512_setzero_ps();
        }
        transpose16(r);
        float* dp = dg + p0 * W;
        if (width == 16) {
          if (pk == 16) {
            for (int q = 0; q < 16; ++q) _mm512_storeu_ps(dp + q * W, r[q]);
          } else {
            for (int q = 0; q < pk; ++q) _mm512_storeu_ps(dp + q * W, r[q]);
          }
        } else {
          for (int q = 0; q < pk; ++q) _mm512_mask_storeu_ps(dp + q * W, wm, r[q]);
        }
      }
    }
  }

  static void kernel(int64_t kc, const float* __restrict A, const float* __restrict B, float* C, int64_t ldc,
                     float alpha, float beta, const float* bias, int mr, int nr, RowPrefetch pf) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      _mm_prefetch((const char*)(C + i * ldc), _MM_HINT_T0);
      _mm_prefetch((const char*)(C + i * ldc + NR - 1), _MM_HINT_T0);
    }
    __m512 c[MR][NV];
    if constexpr (MR == 14 && NV == 2) {  // the assembly kernel
      if (mr == MR && nr == NR) {
        full_14x32(kc, A, B, C, ldc, alpha, beta, bias, pf);
        return;
      }
      alignas(64) float acc[MR * NR];
      loop_14x32(kc, A, B, acc, pf);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[i][v] = _mm512_load_ps(acc + i * NR + 16 * v);
    } else {
      (void)pf;
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[i][v] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int64_t p = 0; p < kc; ++p) {
        __m512 b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) b[v] = _mm512_load_ps(B + 16 * v);
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) {
          const __m512 a = _mm512_set1_ps(A[i]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
        }
        A += MR;
        B += NR;
      }
    }
    __mmask16 mk[NV];
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      mk[v] = tail_mask(nr - 16 * v);
      bv[v] = bias ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v) : _mm512_setzero_ps();
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      if (i < mr) {
        float* cr = C + i * ldc;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          __m512 x = _mm512_fmadd_ps(c[i][v], va, bv[v]);
          if (beta != 0.0f) x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk[v], cr + 16 * v), x);
          _mm512_mask_storeu_ps(cr + 16 * v, mk[v], x);
        }
      }
    }
  }
};

using Kern = K512<14, 2>;

// mc = 280 rows (20 panels of 14; a 280 x 384 block of A is 420 KiB, L2 is 1 MiB on Zen 4/5),
// kc = 384 (a 384 x 32 panel of B is 48 KiB, about L1), nc = 2048; a reduction of up to 1024
// is done in one step with the block of A kept within 512 KiB.
Blocking g_blocking = {280, 384, 2048, 1024, 1 << 19};

void run_avx512(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  Driver<Kern>::run(g, i0, i1, j0, j1, g_blocking);
}

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace obf {
const IsaImpl* isa_avx512() {
  static const IsaImpl impl = {"avx512", Kern::MR, Kern::NR, run_avx512, &g_blocking};
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return ok ? &impl : nullptr;
}
}  // namespace obf

#else
namespace obf {
const IsaImpl* isa_avx512() { return nullptr; }
}  // namespace obf
#endif
