// The element-wise kernels' loops, included once per instruction set (elementwise_avx512.cc,
// elementwise_avx2.cc, elementwise_generic.cc), each built with its own instruction set's flags, so the
// compiler vectorises each for its ISA. Everything here has internal linkage and calls no
// library template (a template instantiated under a target pragma could be picked for the
// other units by the linker). exp and tanh are polynomials, to float32 accuracy.
// Requires EW_TABLE (the name of the table this unit defines).
#include <cstdint>

#include "elementwise.h"

namespace {

inline float min_(float a, float b) { return a < b ? a : b; }
inline float max_(float a, float b) { return a > b ? a : b; }

inline float bits_to_float(int32_t i) {
  float f;
  __builtin_memcpy(&f, &i, 4);
  return f;
}

// e^x to float32 accuracy for x in [-87, 88] (clamped outside): 2^n * p(r), r = x - n ln 2.
inline float fast_exp(float x) {
  x = min_(88.0f, max_(-87.0f, x));  // keeps 2^n a normal float
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (int32_t)n + 127;
  return p * bits_to_float(e << 23);
}

// tanh(u) = sign(u) (1 - 2 / (e^{2|u|} + 1)): accurate on both sides; |u| clamped to 10,
// where tanh rounds to exactly 1 in float32
inline float fast_tanh(float u) {
  const float a = min_(10.0f, __builtin_fabsf(u));
  return __builtin_copysignf(1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f), u);
}

constexpr float kGeluS = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr int kLanes = 16;  // independent accumulators (one AVX-512 register)


void adamw_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                            const uint8_t* __restrict mask, int64_t lo, int64_t hi, obf::AdamWParams a) {
  const float b1 = a.beta1, b2 = a.beta2, ob1 = 1 - a.beta1, ob2 = 1 - a.beta2, s = a.grad_scale;
  for (int64_t i = lo; i < hi; i++) {
    const float gi = g[i] * s;
    const float mi = b1 * m[i] + ob1 * gi;
    const float vi = b2 * v[i] + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float wd = mask ? (mask[i] ? a.weight_decay : 0.0f) : a.weight_decay;
    const float pi = p[i];
    p[i] = pi - a.lr * ((mi * a.c1) / (__builtin_sqrtf(vi * a.c2) + a.eps) + wd * pi);
  }
}


double sum_squares_range(const float* __restrict x, int64_t lo, int64_t hi) {
  double acc[kLanes] = {0};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] += double(x[i + j]) * double(x[i + j]);
  double s = 0;
  for (; i < hi; i++) s += double(x[i]) * double(x[i]);
  for (int j = 0; j < kLanes; j++) s += acc[j];
  return s;
}


void gelu_fwd_range(float* __restrict out, const float* __restrict inp, float* __restrict th, int64_t lo,
                               int64_t hi) {
  // two loops, so that neither has a conditional store (both vectorise)
  if (th) {
    for (int64_t i = lo; i < hi; i++) {
      const float x = inp[i];
      const float t = fast_tanh(kGeluS * (x + 0.044715f * x * x * x));
      th[i] = t;
      out[i] = 0.5f * x * (1.0f + t);
    }
  } else {
    for (int64_t i = lo; i < hi; i++) {
      const float x = inp[i];
      out[i] = 0.5f * x * (1.0f + fast_tanh(kGeluS * (x + 0.044715f * x * x * x)));
    }
  }
}


void gelu_bwd_range(float* __restrict dinp, const float* __restrict inp, const float* __restrict dout,
                               const float* __restrict th, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i++) {
    const float x = inp[i];
    const float x2 = x * x;
    const float t = th ? th[i] : fast_tanh(kGeluS * (x + 0.044715f * x2 * x));
    const float sech2 = 1.0f - t * t;
    const float local = 0.5f * (1.0f + t) + 0.5f * x * sech2 * kGeluS * (1.0f + 3.0f * 0.044715f * x2);
    dinp[i] += local * dout[i];
  }
}


float row_max(const float* __restrict x, int64_t V) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; j++) acc[j] = -__builtin_inff();
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
  float mx = -__builtin_inff();
  for (; i < V; i++) mx = mx > x[i] ? mx : x[i];
  for (int j = 0; j < kLanes; j++) mx = mx > acc[j] ? mx : acc[j];
  return mx;
}

// x[i] = e^{x[i] - mx}; returns the sum (float64)
double row_exp(float* __restrict x, int64_t V, float mx) {
  double acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; j++) {
      const float e = fast_exp(x[i + j] - mx);
      x[i + j] = e;
      acc[j] += e;
    }
  double s = 0;
  for (; i < V; i++) {
    x[i] = fast_exp(x[i] - mx);
    s += x[i];
  }
  for (int j = 0; j < kLanes; j++) s += acc[j];
  return s;
}

void row_scale(float* __restrict x, int64_t V, float s) {
  for (int64_t i = 0; i < V; i++) x[i] *= s;
}

// whether x[lo, hi) has a NaN or an infinity (exponent bits all ones)
bool any_non_finite(const float* __restrict x, int64_t lo, int64_t hi) {
  int32_t acc = 0;
  for (int64_t i = lo; i < hi; i++) {
    int32_t b;
    __builtin_memcpy(&b, x + i, 4);
    acc |= (b & 0x7f800000) == 0x7f800000;
  }
  return acc != 0;
}

// out[0..1] += sign * (y . p0, y . p1), out[2..3] += sum |y_j p0_j|, sum |y_j p1_j|: products
// and partial sums in float32 lanes (16 terms per lane and block), the blocks added in float64.
// The partial sums' rounding stays near 2^-20 of the absolute sum, far inside the check's tolerance.
void dot2_abs(const float* __restrict y, const float* __restrict p0, const float* __restrict p1, int64_t n,
              double* __restrict out, double sign) {
  constexpr int64_t kBlock = 16 * kLanes;
  double d0 = 0, d1 = 0, e0 = 0, e1 = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t hi = b + kBlock < n ? b + kBlock : n;
    float s0[kLanes] = {0}, s1[kLanes] = {0}, m0[kLanes] = {0}, m1[kLanes] = {0};
    int64_t j = b;
    for (; j + kLanes <= hi; j += kLanes)
      for (int i = 0; i < kLanes; i++) {
        const float x = y[j + i], z0 = x * p0[j + i], z1 = x * p1[j + i];
        s0[i] += z0;
        s1[i] += z1;
        m0[i] += __builtin_fabsf(z0);
        m1[i] += __builtin_fabsf(z1);
      }
    for (; j < hi; j++) {
      const float x = y[j], z0 = x * p0[j], z1 = x * p1[j];
      s0[0] += z0;
      s1[0] += z1;
      m0[0] += __builtin_fabsf(z0);
      m1[0] += __builtin_fabsf(z1);
    }
    for (int i = 0; i < kLanes; i++) d0 += s0[i], d1 += s1[i], e0 += m0[i], e1 += m1[i];
  }
  out[0] += sign * d0;
  out[1] += sign * d1;
  out[2] += e0;
  out[3] += e1;
}

// col[n] -= 2 (u . col) u: one Householder reflection (|u| = 1) of one column, float64
void reflect(const double* __restrict u, double* __restrict col, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; k++) acc[k] += u[j + k] * col[j + k];
  double d = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; j++) d += u[j] * col[j];
  const double f = 2 * d;
  for (j = 0; j < n; j++) col[j] -= f * u[j];
}

// ---- C[m, j0:j1] = A[m, m] X[m, j0:j1] (row-major, row stride ld): a small matrix from the left
// (token mixing's blocks). R rows of C at a time, two vectors of columns each: per reduction
// step two loads of X, R broadcasts of A and 2R multiply-adds, all accumulators in registers.
#ifndef EW_VBYTES
#define EW_VBYTES 16
#endif
typedef float vf __attribute__((vector_size(EW_VBYTES)));
typedef float vfu __attribute__((vector_size(EW_VBYTES), aligned(4)));
constexpr int kVl = EW_VBYTES / 4;

template <int R>
inline void lmul_rows(const float* __restrict A, int64_t m, int64_t i, const float* __restrict X, float* __restrict C,
                      int64_t ld, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 2 * kVl <= j1; j += 2 * kVl) {
    vf acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = vf{};
    for (int64_t p = 0; p < m; p++) {
      const vf x0 = *(const vfu*)(X + p * ld + j), x1 = *(const vfu*)(X + p * ld + j + kVl);
      for (int r = 0; r < R; r++) {
        const float a = A[(i + r) * m + p];
        acc[r][0] += a * x0;
        acc[r][1] += a * x1;
      }
    }
    for (int r = 0; r < R; r++) {
      *(vfu*)(C + (i + r) * ld + j) = acc[r][0];
      *(vfu*)(C + (i + r) * ld + j + kVl) = acc[r][1];
    }
  }
  for (; j < j1; j++)
    for (int r = 0; r < R; r++) {
      float s = 0;
      for (int64_t p = 0; p < m; p++) s += A[(i + r) * m + p] * X[p * ld + j];
      C[(i + r) * ld + j] = s;
    }
}

void lmul(const float* __restrict A, int64_t m, const float* __restrict X, float* __restrict C, int64_t ld, int64_t j0, int64_t j1) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) lmul_rows<4>(A, m, i, X, C, ld, j0, j1);
  for (; i < m; i++) lmul_rows<1>(A, m, i, X, C, ld, j0, j1);
}

}  // namespace

namespace obf {
namespace {
// ---- layer norm along u (u null: the ones vector, GPT-2's layer norm; sealed mode's u = Q^T 1)
// forward of one row: mean = x.u / C, d = x - mean u, rstd = 1 / sqrt(|d|^2 / C + eps),
// out = d rstd (* w + b when w is given)
template <bool U>
inline void norm_fwd_row_t(float* __restrict out, const float* __restrict x, const float* __restrict u,
                           const float* __restrict w, const float* __restrict b, int64_t C, float eps, float* mean,
                           float* rstd) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    for (int j = 0; j < kLanes; j++) acc[j] += x[i + j] * (U ? u[i + j] : 1.0f);
  double s = 0;
  for (; i < C; i++) s += x[i] * (U ? u[i] : 1.0f);
  for (int j = 0; j < kLanes; j++) s += acc[j];
  const float m = float(s / double(C));
  float vacc[kLanes] = {0};
  for (i = 0; i + kLanes <= C; i += kLanes)
    for (int j = 0; j < kLanes; j++) {
      const float d = x[i + j] - m * (U ? u[i + j] : 1.0f);
      vacc[j] += d * d;
    }
  double v = 0;
  for (; i < C; i++) {
    const float d = x[i] - m * (U ? u[i] : 1.0f);
    v += d * d;
  }
  for (int j = 0; j < kLanes; j++) v += vacc[j];
  const float r = float(1.0 / __builtin_sqrt(v / double(C) + double(eps)));
  if (w)
    for (i = 0; i < C; i++) out[i] = (x[i] - m * (U ? u[i] : 1.0f)) * r * w[i] + (b ? b[i] : 0.0f);
  else
    for (i = 0; i < C; i++) out[i] = (x[i] - m * (U ? u[i] : 1.0f)) * r;
  *mean = m;
  *rstd = r;
}
void norm_fwd_row(float* out, const float* x, const float* u, const float* w, const float* b, int64_t C, float eps,
                  float* mean, float* rstd) {
  if (u) norm_fwd_row_t<true>(out, x, u, w, b, C, eps, mean, rstd);
  else norm_fwd_row_t<false>(out, x, u, w, b, C, eps, mean, rstd);
}

// backward of one row: with g = dout (* w) and z the normalised row,
// dx += (g - (g.u / C) u - z (g.z / C)) rstd. Along u (sealed mode) x holds z itself;
// otherwise z = (x - mean) rstd.
template <bool U>
inline void norm_bwd_row_t(float* __restrict dx, const float* __restrict dout, const float* __restrict x, float mean,
                           float rstd, const float* __restrict u, const float* __restrict w, int64_t C) {
  float au[kLanes] = {0}, az[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    for (int j = 0; j < kLanes; j++) {
      const float g = w ? dout[i + j] * w[i + j] : dout[i + j], z = U ? x[i + j] : (x[i + j] - mean) * rstd;
      au[j] += U ? g * u[i + j] : g;
      az[j] += g * z;
    }
  double su = 0, sz = 0;
  for (; i < C; i++) {
    const float g = w ? dout[i] * w[i] : dout[i], z = U ? x[i] : (x[i] - mean) * rstd;
    su += U ? g * u[i] : g;
    sz += g * z;
  }
  for (int j = 0; j < kLanes; j++) su += au[j], sz += az[j];
  const float mu = float(su / double(C)), mz = float(sz / double(C));
  for (i = 0; i < C; i++) {
    const float g = w ? dout[i] * w[i] : dout[i], z = U ? x[i] : (x[i] - mean) * rstd;
    dx[i] += (g - mu * (U ? u[i] : 1.0f) - z * mz) * rstd;
  }
}
void norm_bwd_row(float* dx, const float* dout, const float* x, float mean, float rstd, const float* u, const float* w,
                  int64_t C) {
  if (u) norm_bwd_row_t<true>(dx, dout, x, mean, rstd, u, w, C);
  else norm_bwd_row_t<false>(dx, dout, x, mean, rstd, u, w, C);
}

// the affine part's gradients over columns [j0, j1): dw += sum_r z * dout, db += sum_r dout
void norm_param_grads(float* __restrict dw, float* __restrict db, const float* __restrict dout,
                      const float* __restrict x, const float* __restrict mean, const float* __restrict rstd,
                      int64_t rows, int64_t C, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * C;
    const float* gr = dout + r * C;
    const float m = mean[r], s = rstd[r];
    if (dw)
      for (int64_t j = j0; j < j1; j++) dw[j] += (xr[j] - m) * s * gr[j];
    if (db)
      for (int64_t j = j0; j < j1; j++) db[j] += gr[j];
  }
}

}  // namespace

extern const EwKernels EW_TABLE = {adamw_range, sum_squares_range, gelu_fwd_range, gelu_bwd_range, row_max, row_exp, row_scale, any_non_finite, dot2_abs, reflect, lmul, norm_fwd_row, norm_bwd_row, norm_param_grads};
}  // namespace obf
