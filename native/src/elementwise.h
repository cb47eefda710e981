// Element-wise and row-wise kernels on the GEMM's thread pool (elementwise.cc).
#pragma once

#include <cstdint>

namespace obf {

struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay;
  float c1, c2;        // bias corrections 1/(1-beta1^t), 1/(1-beta2^t)
  float grad_scale;    // gradients are multiplied by this first (clipping)
};

// The loops of one instruction set (elementwise_impl.h); ranges [lo, hi) of whole buffers.
struct EwKernels {
  void (*adamw)(float* p, const float* g, float* m, float* v, const uint8_t* mask, int64_t lo, int64_t hi, AdamWParams a);
  double (*sum_squares)(const float* x, int64_t lo, int64_t hi);
  void (*gelu_fwd)(float* out, const float* inp, float* th, int64_t lo, int64_t hi);
  void (*gelu_bwd)(float* dinp, const float* inp, const float* dout, const float* th, int64_t lo, int64_t hi);
  float (*row_max)(const float* x, int64_t V);
  double (*row_exp)(float* x, int64_t V, float mx);  // x = e^{x - mx}, returns the sum
  void (*row_scale)(float* x, int64_t V, float s);
  bool (*any_non_finite)(const float* x, int64_t lo, int64_t hi);
  void (*dot2_abs)(const float* y, const float* p0, const float* p1, int64_t n, double* out, double sign);
  void (*reflect)(const double* u, double* col, int64_t n);
  void (*lmul)(const float* A, int64_t m, const float* X, float* C, int64_t ld, int64_t j0, int64_t j1);
  void (*norm_fwd)(float* out, const float* x, const float* u, const float* w, const float* b, int64_t C, float eps,
                   float* mean, float* rstd);
  void (*norm_bwd)(float* dx, const float* dout, const float* x, float mean, float rstd, const float* u, const float* w,
                   int64_t C);
  void (*norm_param_grads)(float* dw, float* db, const float* dout, const float* x, const float* mean,
                           const float* rstd, int64_t rows, int64_t C, int64_t j0, int64_t j1);
};
extern const EwKernels ew_generic;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
extern const EwKernels ew_avx2, ew_avx512;
#endif

// p[n] -= lr (m^/(sqrt(v^)+eps) + wd p), moments updated in place; decay where mask != 0 (mask may be null: everywhere)
void adamw(float* p, const float* g, float* m, float* v, const uint8_t* mask, int64_t n, const AdamWParams& a);
// x[n] = 0 on every thread
void zero(float* x, int64_t n);
// sum of x[n]^2 in float64, the same for any number of threads
double sum_squares(const float* x, int64_t n);
// out[n] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); th[n] keeps the tanh values (may be null)
void gelu_forward(float* out, const float* inp, float* th, int64_t n);
// dinp[n] += dout * GELU'(inp); th: the forward's tanh values (may be null)
void gelu_backward(float* dinp, const float* inp, const float* dout, const float* th, int64_t n);
// logits[rows, V] replaced by softmax probabilities; losses[row] = -log p[target] (0 where target < 0)
void softmax_xent(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V);

// a[mats, T, T] scores -> causal softmax probabilities row by row (row t over columns 0..t, the rest zeroed)
void causal_softmax(float* a, int64_t mats, int64_t T);

// layer norm of rows x C along u (u null: the ones vector, GPT-2's; sealed mode's u = Q^T 1):
//   mean = x.u / C, rstd = 1 / sqrt(|x - mean u|^2 / C + eps), out = (x - mean u) rstd (* w + b; w, b may be null)
void norm_forward(float* out, float* mean, float* rstd, const float* x, const float* u, const float* w, const float* b,
                  int64_t rows, int64_t C, float eps);
// its backward: dx += (g - (g.u / C) u - z (g.z / C)) rstd for g = dout (* w) and z the normalised
// row: (x - mean) rstd, or along u x itself (sealed mode keeps z; mean unused);
// dw += sum over rows of z * dout, db += sum of dout (u null only; w, dw, db may be null)
void norm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* mean,
                   const float* rstd, const float* u, const float* w, int64_t rows, int64_t C);

// index of the first NaN or infinity in x[n], or -1
int64_t first_non_finite(const float* x, int64_t n);
// Freivalds residuals of `rows` rows, two secret vectors: for each row i,
//   out[4i + k] = lhs[i, :a] . p[:, k] - rhs[i, :b] . q[:, k] - c[k]   (k = 0, 1)
//   out[4i + 2 + k] = the sum of the absolute values of those terms
void freivalds_rows(const float* lhs, int64_t a, const double* p, const float* rhs, int64_t b, const double* q,
                    const double* c, int64_t rows, double* out);

// a[n, n] (row-major, e.g. Gaussian) replaced by the Q of its Householder QR with Q's
// columns multiplied by sign(diag R): Haar-distributed when a is Gaussian. float64; the
// columns are spread over the pool, the same result for any number of threads.
void haar_qr(double* a, int64_t n);

// One butterfly program (token mixing) over `sent` rows of width w, column slice by column slice
// so that every step runs in cache. The rows are X [xrows, w] then S [sent - xrows, w] (zeros
// when S is null). ops [nops, 4]: (kind, m, t, off) with kind
//   0  gather   ws'[i] = ws[perms[off + i]]
//   1  scatter  ws'[perms[off + i]] = ws[i]
//   2  stage    rows h m t + q t + s mixed over q by the m x m block at mats + off (3: its transpose)
// out [orows, w] gets the first orows rows. Arguments are assumed validated (addon.cc).
void butterfly(const int32_t* ops, int64_t nops, const float* mats, const int32_t* perms, const float* X, int64_t xrows,
               const float* S, int64_t sent, int64_t w, float* out, int64_t orows);

}  // namespace obf
