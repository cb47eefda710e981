// Blocked, packed GEMM driver (GotoBLAS/BLIS structure), parameterised by a
// micro-kernel description K. This header is included by each ISA-specific
// translation unit *after* its target pragma, and everything in it has
// internal linkage, so every ISA gets its own copy compiled for its own target
// and no AVX code can leak into a generic code path through the linker.
//
// Requirements on K:
//   static constexpr int MR, NR;           register tile (rows x columns of C)
//   static void kernel(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc,
//                      float alpha, float beta, const float* bias, int mr, int nr, RowPrefetch pf);
//       C[0:mr, 0:nr] = alpha * Ap*Bp + beta*C (+ bias[0:nr]); beta == 0 never reads C.
//       May prefetch the rows described by pf (a hint; ignoring it is correct).
//   template <int W> static void pack_trans(const float* s, int64_t ld, int64_t kc, int w, float* d);
//       d[p*W + i] = s[i*ld + p] for i < w, 0 for w <= i < W
//   template <int W> static void pack_copy_panels(const float* s, int64_t ld, int64_t kc, int64_t cols, float* d);
//       for every W-wide panel q of `cols` columns: d[q*W*kc + p*W + i] = s[p*ld + q*W + i]
//       (zero beyond `cols`), sweeping each source row once
// Include only after <algorithm>, <cstdint>, <cstring> and "gemm.h".

namespace {

using obf::Blocking;
using obf::GemmArgs;

// Rows of a not-yet-packed B panel to prefetch while a micro-kernel runs: `rows` rows of
// up to 32 floats, `stride` floats apart, from `ptr`.
struct RowPrefetch {
  const float* ptr = nullptr;
  int64_t stride = 0;
  int64_t rows = 0;
};

inline int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Splits `total` into ceil(total / maxb) near-equal blocks, each a multiple of `unit`.
inline int64_t even_block(int64_t total, int64_t maxb, int64_t unit) {
  if (total <= 0) return unit;
  int64_t nb = (total + maxb - 1) / maxb;
  return round_up((total + nb - 1) / nb, unit);
}

template <int W>
inline void generic_pack_copy_panels(const float* s, int64_t ld, int64_t kc, int64_t cols, float* d) {
  const int64_t full = cols / W, rem = cols % W;
  for (int64_t p = 0; p < kc; ++p) {
    const float* sp = s + p * ld;
    for (int64_t q = 0; q < full; ++q) {
      float* dp = d + q * W * kc + p * W;
      for (int i = 0; i < W; ++i) dp[i] = sp[q * W + i];
    }
    if (rem) {
      float* dp = d + full * W * kc + p * W;
      int i = 0;
      for (; i < rem; ++i) dp[i] = sp[full * W + i];
      for (; i < W; ++i) dp[i] = 0.0f;
    }
  }
}

template <int W>
inline void generic_pack_trans(const float* s, int64_t ld, int64_t kc, int w, float* d) {
  // Blocks of 8 along p keep the reads of each source row sequential.
  constexpr int PB = 8;
  int64_t p0 = 0;
  for (; p0 + PB <= kc; p0 += PB) {
    for (int i = 0; i < w; ++i) {
      const float* si = s + i * ld + p0;
      for (int q = 0; q < PB; ++q) d[(p0 + q) * W + i] = si[q];
    }
    for (int i = w; i < W; ++i)
      for (int q = 0; q < PB; ++q) d[(p0 + q) * W + i] = 0.0f;
  }
  for (; p0 < kc; ++p0) {
    for (int i = 0; i < w; ++i) d[p0 * W + i] = s[i * ld + p0];
    for (int i = w; i < W; ++i) d[p0 * W + i] = 0.0f;
  }
}

// The packing of a kernel that uses the portable loops above (inherit it).
struct GenericPacking {
  template <int W>
  static void pack_copy_panels(const float* s, int64_t ld, int64_t kc, int64_t cols, float* d) {
    generic_pack_copy_panels<W>(s, ld, kc, cols, d);
  }
  template <int W>
  static void pack_trans(const float* s, int64_t ld, int64_t kc, int w, float* d) {
    generic_pack_trans<W>(s, ld, kc, w, d);
  }
};

// Scalar epilogue for edge tiles computed into a dense MR x NR buffer.
inline void update_c_scalar(const float* t, int tld, float* C, int64_t ldc, int mr, int nr, float alpha,
                            float beta, const float* bias) {
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    const float* r = t + i * tld;
    for (int j = 0; j < nr; ++j) {
      float v = alpha * r[j];
      if (beta != 0.0f) v += beta * c[j];
      if (bias) v += bias[j];
      c[j] = v;
    }
  }
}

template <class K>
struct Driver {
  static constexpr int MR = K::MR;
  static constexpr int NR = K::NR;

  static void pack_a(const GemmArgs& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* dst) {
    if (g.ta) {
      K::template pack_copy_panels<MR>(g.A + p0 * g.lda + i0, g.lda, kc, mc, dst);
      return;
    }
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const int mr = (int)std::min<int64_t>(MR, mc - ir);
      K::template pack_trans<MR>(g.A + (i0 + ir) * g.lda + p0, g.lda, kc, mr, dst + ir * kc);
    }
  }

  // Packs the B panel of columns [j, j + nr) (nr <= NR) for reduction steps [p0, p0 + kc).
  static void pack_b_panel(const GemmArgs& g, int64_t j, int nr, int64_t p0, int64_t kc, float* dst) {
    if (g.tb)
      K::template pack_trans<NR>(g.B + j * g.ldb + p0, g.ldb, kc, nr, dst);
    else
      K::template pack_copy_panels<NR>(g.B + p0 * g.ldb + j, g.ldb, kc, nr, dst);
  }

  // ---- few rows of C: no packing of B (it would cost more than the product itself)

  static constexpr int64_t kSmallM = 8;

  // Epilogue for one row segment: c[j] = alpha * acc[j] + beta * c[j] (+ bias[j]).
  static void store_row(float* c, const float* acc, int64_t n, float alpha, float beta, const float* bias) {
    if (beta == 0.0f) {
      if (bias)
        for (int64_t j = 0; j < n; ++j) c[j] = alpha * acc[j] + bias[j];
      else
        for (int64_t j = 0; j < n; ++j) c[j] = alpha * acc[j];
    } else {
      if (bias)
        for (int64_t j = 0; j < n; ++j) c[j] = alpha * acc[j] + beta * c[j] + bias[j];
      else
        for (int64_t j = 0; j < n; ++j) c[j] = alpha * acc[j] + beta * c[j];
    }
  }

  // R rows of C, B row-major (k x n): rows of B are streamed once per column block and
  // added into R accumulator rows (vectorised axpy).
  template <int R>
  static void small_rows_nn(const GemmArgs& g, const float* a, int64_t i, int64_t j0, int64_t j1) {
    constexpr int64_t JB = 512;
    alignas(64) float acc[R][JB];
    const int64_t kk = g.k;
    for (int64_t jb = j0; jb < j1; jb += JB) {
      const int64_t jn = std::min(JB, j1 - jb);
      for (int r = 0; r < R; ++r)
        for (int64_t j = 0; j < jn; ++j) acc[r][j] = 0.0f;
      for (int64_t p = 0; p < kk; ++p) {
        const float* b = g.B + p * g.ldb + jb;
        float s[R];
        for (int r = 0; r < R; ++r) s[r] = a[r * kk + p];
        for (int64_t j = 0; j < jn; ++j) {
          const float bj = b[j];
          for (int r = 0; r < R; ++r) acc[r][j] += s[r] * bj;
        }
      }
      for (int r = 0; r < R; ++r)
        store_row(g.C + (i + r) * g.ldc + jb, acc[r], jn, g.alpha, g.beta, g.bias ? g.bias + jb : nullptr);
    }
  }

  // R rows of C, B stored n x k: dot products of the rows of op(A) with rows of B, formed in
  // 16 independent lanes (vectorises without reassociating) and summed at the end.
  template <int R>
  static void small_rows_nt(const GemmArgs& g, const float* a, int64_t i, int64_t j0, int64_t j1) {
    constexpr int L = 16;
    const int64_t kk = g.k, k16 = kk / L * L;
    for (int64_t j = j0; j < j1; ++j) {
      const float* b = g.B + j * g.ldb;
      float part[R][L];
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < L; ++l) part[r][l] = 0.0f;
      for (int64_t p = 0; p < k16; p += L)
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < L; ++l) part[r][l] += a[r * kk + p + l] * b[p + l];
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int l = 0; l < L; ++l) sum += part[r][l];
        for (int64_t p = k16; p < kk; ++p) sum += a[r * kk + p] * b[p];
        float* c = g.C + (i + r) * g.ldc + j;
        float v = g.alpha * sum;
        if (g.beta != 0.0f) v += g.beta * *c;
        if (g.bias) v += g.bias[j];
        *c = v;
      }
    }
  }

  template <int R>
  static void small_rows(const GemmArgs& g, const float* a, int64_t i, int64_t j0, int64_t j1) {
    if (g.tb)
      small_rows_nt<R>(g, a, i, j0, j1);
    else
      small_rows_nn<R>(g, a, i, j0, j1);
  }

  static void run_small_m(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t M = i1 - i0, kk = g.k;
    // Rows of op(A), row-major M x kk.
    float* a = obf::scratch(0, (size_t)(M * kk));
    for (int64_t r = 0; r < M; ++r) {
      float* ar = a + r * kk;
      if (g.ta)
        for (int64_t p = 0; p < kk; ++p) ar[p] = g.A[p * g.lda + i0 + r];
      else
        std::memcpy(ar, g.A + (i0 + r) * g.lda, (size_t)kk * sizeof(float));
    }
    for (int64_t r = 0; r < M; r += 4) {
      switch (std::min<int64_t>(4, M - r)) {
        case 4: small_rows<4>(g, a + r * kk, i0 + r, j0, j1); break;
        case 3: small_rows<3>(g, a + r * kk, i0 + r, j0, j1); break;
        case 2: small_rows<2>(g, a + r * kk, i0 + r, j0, j1); break;
        default: small_rows<1>(g, a + r * kk, i0 + r, j0, j1); break;
      }
    }
  }

  // ---- few columns of C: the transposed problem C^T = op(B)^T op(A)^T has few rows, so it
  // takes the path above (no packing of the tall operand), into a scratch C^T stored back here.

  static constexpr int64_t kSmallN = 16;

  static void run_small_n(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t M = i1 - i0, N = j1 - j0;
    GemmArgs t;
    t.ta = !g.tb;
    t.A = g.tb ? g.B + j0 * g.ldb : g.B + j0;
    t.lda = g.ldb;
    t.tb = !g.ta;
    t.B = g.ta ? g.A + i0 : g.A + i0 * g.lda;
    t.ldb = g.lda;
    t.m = N;
    t.n = M;
    t.k = g.k;
    float* ct = obf::scratch(1, (size_t)(N * M));
    t.C = ct;
    t.ldc = M;
    run_small_m(t, 0, N, 0, M);
    for (int64_t i = 0; i < M; ++i) {
      float* c = g.C + (i0 + i) * g.ldc + j0;
      for (int64_t j = 0; j < N; ++j) {
        float v = g.alpha * ct[j * M + i];
        if (g.beta != 0.0f) v += g.beta * c[j];
        if (g.bias) v += g.bias[j0 + j];
        c[j] = v;
      }
    }
  }

  // C[i0:i1, j0:j1] on the calling thread. Requires g.k > 0.
  //
  // Loops (outer to inner): nc-column slabs of C; kc-deep reduction steps; mc-row blocks
  // (A packed, kept in L2); NR-column panels of B; MR-row panels of A. B is packed panel by
  // panel during the first row block, right before its first use (so it is still in cache).
  // When B is row-major its panels are 128-byte pieces of rows far apart, which the hardware
  // prefetchers do not fetch ahead; the micro-kernels then prefetch the next panel's rows, a
  // share per call, while they compute.
  static void run(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const Blocking& bl) {
    const int64_t M = i1 - i0, N = j1 - j0, Kd = g.k;
    if (M <= 0 || N <= 0) return;
    if (M <= kSmallM) {
      run_small_m(g, i0, i1, j0, j1);
      return;
    }
    if (N <= kSmallN) {
      run_small_n(g, i0, i1, j0, j1);
      return;
    }
    int64_t KC, mc_max = bl.mc;
    if (Kd <= bl.kc_single) {
      KC = Kd;
      mc_max = std::max<int64_t>(MR, std::min<int64_t>(bl.mc, bl.a_bytes / (int64_t)sizeof(float) / KC / MR * MR));
    } else {
      KC = even_block(Kd, bl.kc, 8);
    }
    const int64_t MC = std::min(even_block(M, mc_max, MR), round_up(M, MR));
    const int64_t NC = std::min(even_block(N, bl.nc, NR), round_up(N, NR));
    float* Ap = obf::scratch(0, (size_t)(MC * KC));
    float* Bp = obf::scratch(1, (size_t)(NC * KC));
    for (int64_t jc = 0; jc < N; jc += NC) {
      const int64_t nc = std::min(NC, N - jc);
      for (int64_t pc = 0; pc < Kd; pc += KC) {
        const int64_t kc = std::min(KC, Kd - pc);
        const float beta = pc == 0 ? g.beta : 1.0f;
        const float* bias = (pc == 0 && g.bias) ? g.bias + j0 + jc : nullptr;
        for (int64_t ic = 0; ic < M; ic += MC) {
          const int64_t mc = std::min(MC, M - ic);
          const int64_t calls = (mc + MR - 1) / MR;
          const bool packing = ic == 0;
          pack_a(g, i0 + ic, mc, pc, kc, Ap);
          float* Cb = g.C + (i0 + ic) * g.ldc + (j0 + jc);
          for (int64_t jr = 0; jr < nc; jr += NR) {
            const int nr = (int)std::min<int64_t>(NR, nc - jr);
            float* bj = Bp + jr * kc;
            RowPrefetch pf;
            int64_t pf_left = 0, pf_share = 0;
            if (packing) {
              pack_b_panel(g, j0 + jc + jr, nr, pc, kc, bj);
              if (!g.tb && jr + NR < nc) {
                pf.ptr = g.B + pc * g.ldb + (j0 + jc + jr + NR);
                pf.stride = g.ldb;
                pf_left = kc;
                pf_share = (kc + calls - 1) / calls;
              }
            }
            const float* biasj = bias ? bias + jr : nullptr;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = (int)std::min<int64_t>(MR, mc - ir);
              pf.rows = std::min(pf_left, pf_share);
              K::kernel(kc, Ap + ir * kc, bj, Cb + ir * g.ldc + jr, g.ldc, g.alpha, beta, biasj, mr, nr, pf);
              pf_left -= pf.rows;
              pf.ptr += pf.rows * pf.stride;
            }
          }
        }
      }
    }
  }
};

}  // namespace
