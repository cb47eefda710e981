// Element-wise and row-wise kernels on the GEMM's thread pool: AdamW, sums of squares,
// GELU forward/backward, softmax + cross-entropy. The loops (elementwise_impl.h) are compiled
// once per instruction set; the one of the GEMM's active ISA runs (so `setIsa` selects both).
//
// Work is cut into fixed chunks whatever the number of threads, and partial sums are added
// in chunk order, so every result is the same with 1 or N threads.
#include "elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "threadpool.h"

namespace obf {

ThreadPool& shared_pool();

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task

const EwKernels& kern() {
  const char* isa = active_isa();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::strcmp(isa, "avx512") == 0) return ew_avx512;
  if (std::strcmp(isa, "avx2") == 0) return ew_avx2;
#endif
  (void)isa;
  return ew_generic;
}

struct Range {
  int64_t lo, hi;
};
inline Range chunk(int64_t task, int64_t n) { return {task * kChunk, std::min(n, (task + 1) * kChunk)}; }
inline int64_t chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

struct AdamCtx {
  const EwKernels* k;
  float *p, *m, *v;
  const float* g;
  const uint8_t* mask;
  int64_t n;
  AdamWParams a;
};
void adamw_task(void* ctx, int64_t t) {
  auto* c = static_cast<AdamCtx*>(ctx);
  const Range r = chunk(t, c->n);
  c->k->adamw(c->p, c->g, c->m, c->v, c->mask, r.lo, r.hi, c->a);
}

struct SumCtx {
  const EwKernels* k;
  const float* x;
  int64_t n;
  double* partial;
};
void sum_task(void* ctx, int64_t t) {
  auto* c = static_cast<SumCtx*>(ctx);
  const Range r = chunk(t, c->n);
  c->partial[t] = c->k->sum_squares(c->x, r.lo, r.hi);
}

struct GeluCtx {
  const EwKernels* k;
  float* out;  // forward: out; backward: dinp (accumulated)
  const float* inp;
  const float* dout;
  float* th;  // forward: tanh values kept (or null); backward: the forward's (or null)
  int64_t n;
};
void gelu_fwd_task(void* ctx, int64_t t) {
  auto* c = static_cast<GeluCtx*>(ctx);
  const Range r = chunk(t, c->n);
  c->k->gelu_fwd(c->out, c->inp, c->th, r.lo, r.hi);
}
void gelu_bwd_task(void* ctx, int64_t t) {
  auto* c = static_cast<GeluCtx*>(ctx);
  const Range r = chunk(t, c->n);
  c->k->gelu_bwd(c->out, c->inp, c->dout, c->th, r.lo, r.hi);
}

struct XentCtx {
  const EwKernels* k;
  float* logits;
  const int32_t* targets;
  float* losses;
  int64_t rows, V;
};
void xent_task(void* ctx, int64_t row) {
  auto* c = static_cast<XentCtx*>(ctx);
  float* x = c->logits + row * c->V;
  const int32_t y = c->targets[row];
  const float mx = c->k->row_max(x, c->V);
  const float zy = y >= 0 ? x[y] : 0.0f;
  const double sum = c->k->row_exp(x, c->V, mx);
  c->k->row_scale(x, c->V, float(1.0 / sum));
  // -log p[y] in log-sum-exp form: exact even when p[y] underflows in float32
  c->losses[row] = y >= 0 ? float(std::log(sum) - (double(zy) - double(mx))) : 0.0f;
}

struct CausalCtx {
  const EwKernels* k;
  float* a;
  int64_t T;
};
void causal_task(void* ctx, int64_t m) {
  auto* c = static_cast<CausalCtx*>(ctx);
  for (int64_t t = 0; t < c->T; t++) {
    float* x = c->a + (m * c->T + t) * c->T;
    const float mx = c->k->row_max(x, t + 1);
    const double sum = c->k->row_exp(x, t + 1, mx);
    c->k->row_scale(x, t + 1, float(1.0 / sum));
    std::memset(x + t + 1, 0, size_t(c->T - t - 1) * sizeof(float));
  }
}

struct ZeroCtx {
  float* x;
  int64_t n;
};
void zero_task(void* ctx, int64_t t) {
  auto* c = static_cast<ZeroCtx*>(ctx);
  const Range r = chunk(t, c->n);
  std::memset(c->x + r.lo, 0, size_t(r.hi - r.lo) * sizeof(float));
}

struct FiniteCtx {
  const EwKernels* k;
  const float* x;
  int64_t n;
  uint8_t* bad;
};
void finite_task(void* ctx, int64_t t) {
  auto* c = static_cast<FiniteCtx*>(ctx);
  const Range r = chunk(t, c->n);
  c->bad[t] = c->k->any_non_finite(c->x, r.lo, r.hi);
}

struct FreivaldsCtx {
  const EwKernels* k;
  const float *lhs, *rhs;
  const float *p, *q;  // p [2, a], q [2, b]: the two secret vectors one after the other
  const double* c;
  int64_t a, b, rows;
  double* out;
};
constexpr int64_t kFreivaldsRows = 8;  // rows per task
void freivalds_task(void* ctx, int64_t t) {
  auto* c = static_cast<FreivaldsCtx*>(ctx);
  for (int64_t i = t * kFreivaldsRows; i < (t + 1) * kFreivaldsRows && i < c->rows; i++) {
    double* o = c->out + 4 * i;
    o[0] = o[1] = o[2] = o[3] = 0;
    c->k->dot2_abs(c->lhs + i * c->a, c->p, c->p + c->a, c->a, o, 1.0);
    c->k->dot2_abs(c->rhs + i * c->b, c->q, c->q + c->b, c->b, o, -1.0);
    if (c->c) {
      o[0] -= c->c[0];
      o[1] -= c->c[1];
      o[2] += std::fabs(c->c[0]);
      o[3] += std::fabs(c->c[1]);
    }
  }
}

struct NormCtx {
  const EwKernels* k;
  float *out, *dw, *db;  // forward: out; backward: dx, dw, db
  float *mean, *rstd;
  const float *x, *dout, *u, *w, *b;
  int64_t rows, C;
  float eps;
};
constexpr int64_t kNormRows = 8;     // rows per task
constexpr int64_t kNormCols = 64;    // columns per task of the affine part's gradients
void norm_fwd_task(void* ctx, int64_t t) {
  auto* c = static_cast<NormCtx*>(ctx);
  for (int64_t r = t * kNormRows; r < std::min(c->rows, (t + 1) * kNormRows); r++)
    c->k->norm_fwd(c->out + r * c->C, c->x + r * c->C, c->u, c->w, c->b, c->C, c->eps, c->mean + r, c->rstd + r);
}
void norm_bwd_task(void* ctx, int64_t t) {
  auto* c = static_cast<NormCtx*>(ctx);
  for (int64_t r = t * kNormRows; r < std::min(c->rows, (t + 1) * kNormRows); r++)
    c->k->norm_bwd(c->out + r * c->C, c->dout + r * c->C, c->x + r * c->C, c->mean ? c->mean[r] : 0.0f, c->rstd[r], c->u, c->w, c->C);
}
void norm_grads_task(void* ctx, int64_t t) {
  auto* c = static_cast<NormCtx*>(ctx);
  c->k->norm_param_grads(c->dw, c->db, c->dout, c->x, c->mean, c->rstd, c->rows, c->C, t * kNormCols,
                         std::min(c->C, (t + 1) * kNormCols));
}

}  // namespace

void norm_forward(float* out, float* mean, float* rstd, const float* x, const float* u, const float* w, const float* b,
                  int64_t rows, int64_t C, float eps) {
  NormCtx c{&kern(), out, nullptr, nullptr, mean, rstd, x, nullptr, u, w, b, rows, C, eps};
  shared_pool().run((rows + kNormRows - 1) / kNormRows, norm_fwd_task, &c);
}

void norm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* mean,
                   const float* rstd, const float* u, const float* w, int64_t rows, int64_t C) {
  NormCtx c{&kern(), dx, dw, db, const_cast<float*>(mean), const_cast<float*>(rstd), x, dout, u, w, nullptr, rows, C, 0};
  shared_pool().run((rows + kNormRows - 1) / kNormRows, norm_bwd_task, &c);
  if (dw || db) shared_pool().run((C + kNormCols - 1) / kNormCols, norm_grads_task, &c);
}

int64_t first_non_finite(const float* x, int64_t n) {
  std::vector<uint8_t> bad(chunks(n));
  FiniteCtx c{&kern(), x, n, bad.data()};
  shared_pool().run(chunks(n), finite_task, &c);
  for (int64_t t = 0; t < chunks(n); t++) {
    if (!bad[t]) continue;
    const Range r = chunk(t, n);
    for (int64_t i = r.lo; i < r.hi; i++)
      if (!std::isfinite(x[i])) return i;
  }
  return -1;
}

void freivalds_rows(const float* lhs, int64_t a, const double* p, const float* rhs, int64_t b, const double* q,
                    const double* c, int64_t rows, double* out) {
  // the callers' vectors are interleaved ([a, 2]) float64; the row loop wants them apart, in
  // float32 (their rounding, 2^-24 relative, is far inside the check's tolerance)
  std::vector<float> pq(size_t(2 * (a + b)));
  for (int64_t j = 0; j < a; j++) pq[j] = float(p[2 * j]), pq[a + j] = float(p[2 * j + 1]);
  for (int64_t j = 0; j < b; j++) pq[2 * a + j] = float(q[2 * j]), pq[2 * a + b + j] = float(q[2 * j + 1]);
  FreivaldsCtx ctx{&kern(), lhs, rhs, pq.data(), pq.data() + 2 * a, c, a, b, rows, out};
  shared_pool().run((rows + kFreivaldsRows - 1) / kFreivaldsRows, freivalds_task, &ctx);
}

namespace {
// columns [lo, hi) of the column-major t[n, n] (column j at t + j n) get reflection u over rows [k, n)
struct ReflectCtx {
  const EwKernels* k;
  const double* u;
  double* t;
  int64_t n, row, first, cols;
};
constexpr int64_t kReflectCols = 16;
void reflect_task(void* ctx, int64_t task) {
  auto* c = static_cast<ReflectCtx*>(ctx);
  const int64_t lo = c->first + task * kReflectCols, hi = std::min(c->first + c->cols, lo + kReflectCols);
  for (int64_t j = lo; j < hi; j++) c->k->reflect(c->u, c->t + j * c->n + c->row, c->n - c->row);
}
void reflect_columns(ReflectCtx& c) {
  const int64_t tasks = (c.cols + kReflectCols - 1) / kReflectCols;
  if (c.cols * (c.n - c.row) < (1 << 14)) {
    for (int64_t t = 0; t < tasks; t++) reflect_task(&c, t);
  } else {
    shared_pool().run(tasks, reflect_task, &c);
  }
}
}  // namespace

void haar_qr(double* a, int64_t n) {
  const EwKernels* k = &kern();
  std::vector<double> t(n * n), u(n * n), q(n * n, 0.0);
  std::vector<bool> negate(n);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < n; j++) t[j * n + i] = a[i * n + j];
  // A = H_0 ... H_{n-1} R: reflector k (unit, rows k..n-1) stored at u + k n + k
  for (int64_t c = 0; c < n; c++) {
    double* col = t.data() + c * n;
    double norm = 0;
    for (int64_t i = c; i < n; i++) norm += col[i] * col[i];
    norm = std::sqrt(norm);
    const double alpha = col[c] > 0 ? -norm : norm;
    negate[c] = alpha < 0;
    double* uc = u.data() + c * n + c;
    double un = 0;
    for (int64_t i = c; i < n; i++) uc[i - c] = col[i];
    uc[0] -= alpha;
    for (int64_t i = 0; i < n - c; i++) un += uc[i] * uc[i];
    if (un == 0) continue;  // a zero reflector: H = I
    un = std::sqrt(un);
    for (int64_t i = 0; i < n - c; i++) uc[i] /= un;
    ReflectCtx ctx{k, uc, t.data(), n, c, c + 1, n - c - 1};
    reflect_columns(ctx);
  }
  // Q = H_0 ... H_{n-1} I, reflections applied last first; before H_c only columns >= c differ from I
  for (int64_t j = 0; j < n; j++) q[j * n + j] = 1;
  for (int64_t c = n - 1; c >= 0; c--) {
    ReflectCtx ctx{k, u.data() + c * n + c, q.data(), n, c, c, n - c};
    reflect_columns(ctx);
  }
  for (int64_t j = 0; j < n; j++) {
    const double s = negate[j] ? -1.0 : 1.0;
    for (int64_t i = 0; i < n; i++) a[i * n + j] = s * q[j * n + i];
  }
}

namespace {
struct FlyCtx {
  const EwKernels* k;
  const int32_t* ops;
  int64_t nops;
  const float* mats;  // the stages' blocks, as used (transposed where asked)
  const int32_t* perms;
  const float *X, *S;
  int64_t xrows, sent, w, cw;
  float* out;
  int64_t orows;
};
void fly_task(void* ctx, int64_t task) {
  const FlyCtx& c = *static_cast<FlyCtx*>(ctx);
  const int64_t c0 = task * c.cw, cw = std::min(c.cw, c.w - c0), n = c.sent;
  float* ws = scratch(0, size_t(n * cw));
  float* wt = scratch(1, size_t(n * cw));
  const size_t bytes = size_t(cw) * sizeof(float);
  auto src = [&](int64_t i, float* dst) {
    if (i < c.xrows) std::memcpy(dst, c.X + i * c.w + c0, bytes);
    else if (c.S) std::memcpy(dst, c.S + (i - c.xrows) * c.w + c0, bytes);
    else std::memset(dst, 0, bytes);
  };
  int64_t first = 0, last = c.nops;
  if (c.nops > 0 && c.ops[0] == 0) {  // the first gather, as the slice is loaded
    const int32_t* p = c.perms + c.ops[3];
    for (int64_t i = 0; i < n; i++) src(p[i], ws + i * cw);
    first = 1;
  } else {
    for (int64_t i = 0; i < n; i++) src(i, ws + i * cw);
  }
  const bool scatterOut = last > first && c.ops[4 * (last - 1)] == 1;
  if (scatterOut) last--;
  for (int64_t o = first; o < last; o++) {
    const int32_t* op = c.ops + 4 * o;
    if (op[0] == 0 || op[0] == 1) {
      const int32_t* p = c.perms + op[3];
      for (int64_t i = 0; i < n; i++)
        if (op[0] == 0) std::memcpy(wt + i * cw, ws + int64_t(p[i]) * cw, bytes);
        else std::memcpy(wt + int64_t(p[i]) * cw, ws + i * cw, bytes);
    } else {
      const int64_t m = op[1], ld = int64_t(op[2]) * cw;
      for (int64_t g = 0; g < n / (m * op[2]); g++) c.k->lmul(c.mats + op[3], m, ws + g * m * ld, wt + g * m * ld, ld, 0, ld);
    }
    std::swap(ws, wt);
  }
  if (scatterOut) {
    const int32_t* p = c.perms + c.ops[4 * last + 3];
    for (int64_t i = 0; i < n; i++)
      if (p[i] < c.orows) std::memcpy(c.out + int64_t(p[i]) * c.w + c0, ws + i * cw, bytes);
  } else {
    for (int64_t i = 0; i < c.orows; i++) std::memcpy(c.out + i * c.w + c0, ws + i * cw, bytes);
  }
}
}  // namespace

void butterfly(const int32_t* ops, int64_t nops, const float* mats, const int32_t* perms, const float* X, int64_t xrows,
               const float* S, int64_t sent, int64_t w, float* out, int64_t orows) {
  if (sent <= 0 || w <= 0) return;
  // each stage's block, transposed for kind 3, copied once per call; the ops index the copies
  std::vector<int32_t> o(ops, ops + 4 * nops);
  std::vector<float> blocks;
  for (int64_t i = 0; i < nops; i++) {
    int32_t* op = o.data() + 4 * i;
    if (op[0] < 2) continue;
    const int64_t m = op[1], at = int64_t(blocks.size());
    const float* a = mats + op[3];
    blocks.resize(size_t(at + m * m));
    for (int64_t r = 0; r < m; r++)
      for (int64_t q = 0; q < m; q++) blocks[at + r * m + q] = op[0] == 3 ? a[q * m + r] : a[r * m + q];
    op[0] = 2;
    op[3] = int32_t(at);
  }
  // a slice of columns keeps both work buffers within 256 KiB (at least two vectors wide)
  const int64_t cw = std::min(w, std::max<int64_t>(32, (int64_t(1) << 15) / sent / 32 * 32));
  FlyCtx c{&kern(), o.data(), nops, blocks.data(), perms, X, S, xrows, sent, w, cw, out, orows};
  const int64_t tasks = (w + cw - 1) / cw;
  if (sent * w < (int64_t(1) << 13)) {
    for (int64_t t = 0; t < tasks; t++) fly_task(&c, t);
  } else {
    shared_pool().run(tasks, fly_task, &c);
  }
}

void zero(float* x, int64_t n) {
  ZeroCtx c{x, n};
  shared_pool().run(chunks(n), zero_task, &c);
}

void adamw(float* p, const float* g, float* m, float* v, const uint8_t* mask, int64_t n, const AdamWParams& a) {
  AdamCtx c{&kern(), p, m, v, g, mask, n, a};
  shared_pool().run(chunks(n), adamw_task, &c);
}

double sum_squares(const float* x, int64_t n) {
  std::vector<double> partial(chunks(n));
  SumCtx c{&kern(), x, n, partial.data()};
  shared_pool().run(chunks(n), sum_task, &c);
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

void gelu_forward(float* out, const float* inp, float* th, int64_t n) {
  GeluCtx c{&kern(), out, inp, nullptr, th, n};
  shared_pool().run(chunks(n), gelu_fwd_task, &c);
}

void gelu_backward(float* dinp, const float* inp, const float* dout, const float* th, int64_t n) {
  GeluCtx c{&kern(), dinp, inp, dout, const_cast<float*>(th), n};
  shared_pool().run(chunks(n), gelu_bwd_task, &c);
}

void causal_softmax(float* a, int64_t mats, int64_t T) {
  CausalCtx c{&kern(), a, T};
  shared_pool().run(mats, causal_task, &c);
}

void softmax_xent(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V) {
  XentCtx c{&kern(), logits, targets, losses, rows, V};
  shared_pool().run(rows, xent_task, &c);
}

}  // namespace obf
