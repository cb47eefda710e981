// N-API bindings for the GEMM core.
//
//   sgemm(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, bias?)
//   sgemmBatched(transA, transB, m, n, k, alpha, A, lda, strideA, B, ldb, strideB,
//                beta, C, ldc, strideC, batch)
//   adamw(params, grads, m, v, mask?, lr, beta1, beta2, eps, weightDecay, c1, c2, gradScale)
//   sumSquares(x) -> number            zero(x)
//   geluForward(out, inp, th?, n)          geluBackward(dinp, inp, dout, th?, n)
//   softmaxXent(logits, targets, losses, rows, V)    causalSoftmax(a, mats, T)
//   normForward(out, mean, rstd, x, u?, w?, b?, rows, C, eps)   normBackward(dx, dw?, db?, dout, x, mean, rstd, u?, w?, rows, C)
//   firstNonFinite(x) -> index or -1       freivaldsRows(lhs, a, p, rhs, b, q, c?, rows, out)
//   haarQr(a, n)  a[n*n] (Float64Array, Gaussian) replaced by its Haar-orthogonal QR factor Q
//   info() -> { isa, threads }
//   setThreads(n)
//
// The TypeScript wrapper validates every argument first; the checks here are a
// second line of defence so that a bad call throws instead of touching memory
// outside the given arrays.
#include <node_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "elementwise.h"
#include "gemm.h"

namespace {

struct ArgError {
  std::string msg;
};

#define NAPI_OK(call)                                                        \
  do {                                                                       \
    if ((call) != napi_ok) return throw_error(env, "internal N-API failure"); \
  } while (0)

napi_value throw_error(napi_env env, const std::string& msg) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) napi_throw_range_error(env, nullptr, msg.c_str());
  return nullptr;
}

// Largest integer argument accepted (keeps all extent arithmetic exact in int64).
constexpr double kMaxInt = 4503599627370496.0;  // 2^52

bool get_bool(napi_env env, napi_value v, const char* name, bool* out, std::string* err) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_boolean) {
    *err = std::string(name) + " must be a boolean";
    return false;
  }
  return napi_get_value_bool(env, v, out) == napi_ok;
}

bool get_int(napi_env env, napi_value v, const char* name, int64_t* out, std::string* err) {
  napi_valuetype t;
  double d = 0;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number || napi_get_value_double(env, v, &d) != napi_ok ||
      !std::isfinite(d) || d != std::floor(d) || d < 0 || d > kMaxInt) {
    *err = std::string(name) + " must be a non-negative integer";
    return false;
  }
  *out = (int64_t)d;
  return true;
}

bool get_float(napi_env env, napi_value v, const char* name, float* out, std::string* err) {
  napi_valuetype t;
  double d = 0;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number || napi_get_value_double(env, v, &d) != napi_ok ||
      std::isnan(d)) {
    *err = std::string(name) + " must be a number";
    return false;
  }
  *out = (float)d;
  return true;
}

bool get_f32(napi_env env, napi_value v, const char* name, float** data, int64_t* len, std::string* err) {
  bool is_ta = false;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) {
    *err = std::string(name) + " must be a Float32Array";
    return false;
  }
  napi_typedarray_type type;
  size_t length = 0, byte_offset = 0;
  void* ptr = nullptr;
  napi_value ab;
  // `ptr` already includes byte_offset (it points at element 0 of the view).
  if (napi_get_typedarray_info(env, v, &type, &length, &ptr, &ab, &byte_offset) != napi_ok ||
      type != napi_float32_array) {
    *err = std::string(name) + " must be a Float32Array";
    return false;
  }
  *data = static_cast<float*>(ptr);
  *len = (int64_t)length;
  return true;
}


bool is_nullish(napi_env env, napi_value v) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && (t == napi_undefined || t == napi_null);
}

// A typed array of the given type; `need` elements at least.
bool get_typed(napi_env env, napi_value v, const char* name, napi_typedarray_type want, const char* type_name,
               void** data, int64_t need, std::string* err) {
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length = 0, byte_offset = 0;
  napi_value ab;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, v, &type, &length, data, &ab, &byte_offset) != napi_ok || type != want) {
    *err = std::string(name) + " must be a " + type_name;
    return false;
  }
  if ((int64_t)length < need) {
    *err = std::string(name) + " has " + std::to_string(length) + " elements, needs " + std::to_string(need);
    return false;
  }
  return true;
}

bool get_f32n(napi_env env, napi_value v, const char* name, float** data, int64_t need, std::string* err, bool optional = false) {
  if (optional && is_nullish(env, v)) {
    *data = nullptr;
    return true;
  }
  return get_typed(env, v, name, napi_float32_array, "Float32Array", reinterpret_cast<void**>(data), need, err);
}

// Elements spanned by a rows x cols row-major matrix with leading dimension ld.
double extent(int64_t rows, int64_t cols, int64_t ld) {
  if (rows == 0 || cols == 0) return 0;
  return double(rows - 1) * double(ld) + double(cols);
}

bool check_matrix(const char* name, int64_t rows, int64_t cols, int64_t ld, int64_t len, double stride,
                  int64_t batch, std::string* err) {
  if (rows > 0 && cols > 0 && ld < cols) {
    *err = std::string("leading dimension of ") + name + " is smaller than its row length";
    return false;
  }
  const double e = extent(rows, cols, ld);
  if (e == 0 || batch == 0) return true;
  const double need = double(batch - 1) * stride + e;
  if (need > double(len)) {
    *err = std::string(name) + " is too short for the given dimensions";
    return false;
  }
  return true;
}

struct Parsed {
  obf::GemmArgs g;
  int64_t sa = 0, sb = 0, sc = 0, batch = 1;
};

// Parses the shared argument list; `batched` selects the strided layout.
bool parse(napi_env env, napi_value* a, size_t argc, bool batched, Parsed* p, std::string* err) {
  const size_t need = batched ? 17 : 13;
  if (argc < need) {
    *err = "expected " + std::to_string(need) + " arguments";
    return false;
  }
  obf::GemmArgs& g = p->g;
  float *A = nullptr, *B = nullptr, *C = nullptr;
  int64_t la = 0, lb = 0, lc = 0;
  size_t i = 0;
  if (!get_bool(env, a[i++], "transA", &g.ta, err) || !get_bool(env, a[i++], "transB", &g.tb, err) ||
      !get_int(env, a[i++], "m", &g.m, err) || !get_int(env, a[i++], "n", &g.n, err) ||
      !get_int(env, a[i++], "k", &g.k, err) || !get_float(env, a[i++], "alpha", &g.alpha, err) ||
      !get_f32(env, a[i++], "A", &A, &la, err) || !get_int(env, a[i++], "lda", &g.lda, err))
    return false;
  if (batched && !get_int(env, a[i++], "strideA", &p->sa, err)) return false;
  if (!get_f32(env, a[i++], "B", &B, &lb, err) || !get_int(env, a[i++], "ldb", &g.ldb, err)) return false;
  if (batched && !get_int(env, a[i++], "strideB", &p->sb, err)) return false;
  if (!get_float(env, a[i++], "beta", &g.beta, err) || !get_f32(env, a[i++], "C", &C, &lc, err) ||
      !get_int(env, a[i++], "ldc", &g.ldc, err))
    return false;
  if (batched) {
    if (!get_int(env, a[i++], "strideC", &p->sc, err) || !get_int(env, a[i++], "batch", &p->batch, err)) return false;
  } else if (argc > i) {
    napi_valuetype t;
    napi_typeof(env, a[i], &t);
    if (t != napi_undefined && t != napi_null) {
      float* bias = nullptr;
      int64_t lbias = 0;
      if (!get_f32(env, a[i], "bias", &bias, &lbias, err)) return false;
      if (lbias != g.n) {
        *err = "bias length must equal n";
        return false;
      }
      g.bias = bias;
    }
  }
  g.A = A;
  g.B = B;
  g.C = C;
  if (g.m == 0 || g.n == 0 || p->batch == 0) return true;
  const int64_t ar = g.ta ? g.k : g.m, ac = g.ta ? g.m : g.k;
  const int64_t br = g.tb ? g.n : g.k, bc = g.tb ? g.k : g.n;
  const bool use_ab = g.k > 0 && g.alpha != 0.0f;
  if (use_ab && (!check_matrix("A", ar, ac, g.lda, la, double(p->sa), p->batch, err) ||
                 !check_matrix("B", br, bc, g.ldb, lb, double(p->sb), p->batch, err)))
    return false;
  return check_matrix("C", g.m, g.n, g.ldc, lc, double(p->sc), p->batch, err);
}

napi_value Sgemm(napi_env env, napi_callback_info info) {
  size_t argc = 14;
  napi_value argv[14];
  NAPI_OK(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  Parsed p;
  std::string err;
  if (!parse(env, argv, argc, false, &p, &err)) return throw_error(env, "sgemm: " + err);
  obf::sgemm(p.g);
  return nullptr;
}

napi_value SgemmBatched(napi_env env, napi_callback_info info) {
  size_t argc = 17;
  napi_value argv[17];
  NAPI_OK(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  Parsed p;
  std::string err;
  if (!parse(env, argv, argc, true, &p, &err)) return throw_error(env, "sgemmBatched: " + err);
  obf::sgemm_batched(p.g, p.sa, p.sb, p.sc, p.batch);
  return nullptr;
}

#define ARGS(N)                                                        \
  size_t argc = N;                                                     \
  napi_value argv[N];                                                  \
  NAPI_OK(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr)); \
  std::string err;                                                     \
  if (argc < N) return throw_error(env, std::string(fname) + ": expected " #N " arguments")

napi_value Adamw(napi_env env, napi_callback_info info) {
  const char* fname = "adamw";
  ARGS(13);
  float *p = nullptr, *g = nullptr, *m = nullptr, *v = nullptr;
  int64_t n = 0;
  if (!get_f32(env, argv[0], "params", &p, &n, &err) || !get_f32n(env, argv[1], "grads", &g, n, &err) ||
      !get_f32n(env, argv[2], "m", &m, n, &err) || !get_f32n(env, argv[3], "v", &v, n, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  void* mask = nullptr;
  if (!is_nullish(env, argv[4]) && !get_typed(env, argv[4], "mask", napi_uint8_array, "Uint8Array", &mask, n, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::AdamWParams a{};
  float* fields[] = {&a.lr, &a.beta1, &a.beta2, &a.eps, &a.weight_decay, &a.c1, &a.c2, &a.grad_scale};
  const char* names[] = {"lr", "beta1", "beta2", "eps", "weightDecay", "c1", "c2", "gradScale"};
  for (int i = 0; i < 8; i++)
    if (!get_float(env, argv[5 + i], names[i], fields[i], &err)) return throw_error(env, std::string(fname) + ": " + err);
  obf::adamw(p, g, m, v, static_cast<const uint8_t*>(mask), n, a);
  return nullptr;
}

napi_value SumSquares(napi_env env, napi_callback_info info) {
  const char* fname = "sumSquares";
  ARGS(1);
  float* x = nullptr;
  int64_t n = 0;
  if (!get_f32(env, argv[0], "x", &x, &n, &err)) return throw_error(env, std::string(fname) + ": " + err);
  napi_value out;
  NAPI_OK(napi_create_double(env, obf::sum_squares(x, n), &out));
  return out;
}

napi_value Zero(napi_env env, napi_callback_info info) {
  const char* fname = "zero";
  ARGS(1);
  float* x = nullptr;
  int64_t n = 0;
  if (!get_f32(env, argv[0], "x", &x, &n, &err)) return throw_error(env, std::string(fname) + ": " + err);
  obf::zero(x, n);
  return nullptr;
}

napi_value FirstNonFinite(napi_env env, napi_callback_info info) {
  const char* fname = "firstNonFinite";
  ARGS(1);
  float* x = nullptr;
  int64_t n = 0;
  if (!get_f32(env, argv[0], "x", &x, &n, &err)) return throw_error(env, std::string(fname) + ": " + err);
  napi_value out;
  NAPI_OK(napi_create_double(env, double(obf::first_non_finite(x, n)), &out));
  return out;
}

bool get_f64n(napi_env env, napi_value v, const char* name, double** data, int64_t need, std::string* err, bool optional = false) {
  if (optional && is_nullish(env, v)) {
    *data = nullptr;
    return true;
  }
  return get_typed(env, v, name, napi_float64_array, "Float64Array", reinterpret_cast<void**>(data), need, err);
}

napi_value FreivaldsRows(napi_env env, napi_callback_info info) {
  const char* fname = "freivaldsRows";
  ARGS(9);
  int64_t a = 0, b = 0, rows = 0;
  float *lhs = nullptr, *rhs = nullptr;
  double *p = nullptr, *q = nullptr, *c = nullptr, *out = nullptr;
  if (!get_int(env, argv[1], "a", &a, &err) || !get_int(env, argv[4], "b", &b, &err) || !get_int(env, argv[7], "rows", &rows, &err) ||
      !get_f32n(env, argv[0], "lhs", &lhs, rows * a, &err) || !get_f64n(env, argv[2], "p", &p, 2 * a, &err) ||
      !get_f32n(env, argv[3], "rhs", &rhs, rows * b, &err) || !get_f64n(env, argv[5], "q", &q, 2 * b, &err) ||
      !get_f64n(env, argv[6], "c", &c, 2, &err, true) || !get_f64n(env, argv[8], "out", &out, 4 * rows, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::freivalds_rows(lhs, a, p, rhs, b, q, c, rows, out);
  return nullptr;
}

napi_value HaarQr(napi_env env, napi_callback_info info) {
  const char* fname = "haarQr";
  ARGS(2);
  int64_t n = 0;
  double* a = nullptr;
  if (!get_int(env, argv[1], "n", &n, &err) || !get_f64n(env, argv[0], "a", &a, n * n, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::haar_qr(a, n);
  return nullptr;
}

napi_value Butterfly(napi_env env, napi_callback_info info) {
  const char* fname = "butterfly";
  ARGS(10);
  void *opsv = nullptr, *permsv = nullptr;
  float *mats = nullptr, *x = nullptr, *sh = nullptr, *out = nullptr;
  int64_t nops4 = 0, nmats = 0, nperms = 0, xrows = 0, sent = 0, w = 0, orows = 0;
  auto len = [&](napi_value v, int64_t* n) {
    size_t l = 0;
    napi_typedarray_type t;
    napi_value ab;
    size_t off = 0;
    void* d = nullptr;
    if (napi_get_typedarray_info(env, v, &t, &l, &d, &ab, &off) == napi_ok) *n = (int64_t)l;
  };
  if (!get_typed(env, argv[0], "ops", napi_int32_array, "Int32Array", &opsv, 0, &err) ||
      !get_f32(env, argv[1], "mats", &mats, &nmats, &err) ||
      !get_typed(env, argv[2], "perms", napi_int32_array, "Int32Array", &permsv, 0, &err) ||
      !get_int(env, argv[4], "xrows", &xrows, &err) || !get_int(env, argv[6], "sent", &sent, &err) ||
      !get_int(env, argv[7], "w", &w, &err) || !get_int(env, argv[9], "orows", &orows, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  len(argv[0], &nops4);
  len(argv[2], &nperms);
  if (nops4 % 4 || xrows > sent || orows > sent) return throw_error(env, std::string(fname) + ": ops must hold 4 values per op, and xrows and orows at most sent");
  if (!get_f32n(env, argv[3], "X", &x, xrows * w, &err) || !get_f32n(env, argv[5], "S", &sh, (sent - xrows) * w, &err, true) ||
      !get_f32n(env, argv[8], "out", &out, orows * w, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  const int32_t* ops = static_cast<const int32_t*>(opsv);
  const int32_t* perms = static_cast<const int32_t*>(permsv);
  for (int64_t i = 0; i < nops4 / 4; i++) {
    const int64_t kind = ops[4 * i], m = ops[4 * i + 1], t = ops[4 * i + 2], off = ops[4 * i + 3];
    const std::string at = std::string(fname) + ": op " + std::to_string(i);
    if (kind == 0 || kind == 1) {
      if (off < 0 || off + sent > nperms) return throw_error(env, at + ": its permutation lies outside perms");
      for (int64_t j = 0; j < sent; j++)
        if (perms[off + j] < 0 || perms[off + j] >= sent) return throw_error(env, at + ": a row index is out of range");
    } else if (kind == 2 || kind == 3) {
      if (m < 1 || t < 1 || sent % (m * t) || off < 0 || off + m * m > nmats) return throw_error(env, at + ": its block does not fit (m, t, or its offset)");
    } else {
      return throw_error(env, at + ": unknown kind " + std::to_string(kind));
    }
  }
  obf::butterfly(ops, nops4 / 4, mats, perms, x, xrows, sh, sent, w, out, orows);
  return nullptr;
}

napi_value GeluForward(napi_env env, napi_callback_info info) {
  const char* fname = "geluForward";
  ARGS(4);
  int64_t n = 0;
  float *out = nullptr, *inp = nullptr, *th = nullptr;
  if (!get_int(env, argv[3], "n", &n, &err) || !get_f32n(env, argv[0], "out", &out, n, &err) ||
      !get_f32n(env, argv[1], "inp", &inp, n, &err) || !get_f32n(env, argv[2], "th", &th, n, &err, true))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::gelu_forward(out, inp, th, n);
  return nullptr;
}

napi_value GeluBackward(napi_env env, napi_callback_info info) {
  const char* fname = "geluBackward";
  ARGS(5);
  int64_t n = 0;
  float *dinp = nullptr, *inp = nullptr, *dout = nullptr, *th = nullptr;
  if (!get_int(env, argv[4], "n", &n, &err) || !get_f32n(env, argv[0], "dinp", &dinp, n, &err) ||
      !get_f32n(env, argv[1], "inp", &inp, n, &err) || !get_f32n(env, argv[2], "dout", &dout, n, &err) ||
      !get_f32n(env, argv[3], "th", &th, n, &err, true))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::gelu_backward(dinp, inp, dout, th, n);
  return nullptr;
}

napi_value SoftmaxXent(napi_env env, napi_callback_info info) {
  const char* fname = "softmaxXent";
  ARGS(5);
  int64_t rows = 0, V = 0;
  float *logits = nullptr, *losses = nullptr;
  void* targets = nullptr;
  if (!get_int(env, argv[3], "rows", &rows, &err) || !get_int(env, argv[4], "V", &V, &err) || V < 1 ||
      !get_f32n(env, argv[0], "logits", &logits, rows * V, &err) ||
      !get_typed(env, argv[1], "targets", napi_int32_array, "Int32Array", &targets, rows, &err) ||
      !get_f32n(env, argv[2], "losses", &losses, rows, &err))
    return throw_error(env, std::string(fname) + ": " + (err.empty() ? "V must be at least 1" : err));
  const int32_t* t = static_cast<const int32_t*>(targets);
  for (int64_t r = 0; r < rows; r++)
    if (t[r] >= V) return throw_error(env, std::string(fname) + ": target " + std::to_string(t[r]) + " at row " + std::to_string(r) + " is out of range");
  obf::softmax_xent(logits, t, losses, rows, V);
  return nullptr;
}

napi_value CausalSoftmax(napi_env env, napi_callback_info info) {
  const char* fname = "causalSoftmax";
  ARGS(3);
  int64_t mats = 0, T = 0;
  float* a = nullptr;
  if (!get_int(env, argv[1], "mats", &mats, &err) || !get_int(env, argv[2], "T", &T, &err) ||
      !get_f32n(env, argv[0], "a", &a, mats * T * T, &err))
    return throw_error(env, std::string(fname) + ": " + err);
  obf::causal_softmax(a, mats, T);
  return nullptr;
}

napi_value NormForward(napi_env env, napi_callback_info info) {
  const char* fname = "normForward";
  ARGS(10);
  int64_t rows = 0, C = 0;
  float eps = 0;
  float *out = nullptr, *mean = nullptr, *rstd = nullptr, *x = nullptr, *u = nullptr, *w = nullptr, *b = nullptr;
  if (!get_int(env, argv[7], "rows", &rows, &err) || !get_int(env, argv[8], "C", &C, &err) ||
      !get_float(env, argv[9], "eps", &eps, &err) || !get_f32n(env, argv[0], "out", &out, rows * C, &err) ||
      !get_f32n(env, argv[1], "mean", &mean, rows, &err) || !get_f32n(env, argv[2], "rstd", &rstd, rows, &err) ||
      !get_f32n(env, argv[3], "x", &x, rows * C, &err) || !get_f32n(env, argv[4], "u", &u, C, &err, true) ||
      !get_f32n(env, argv[5], "w", &w, C, &err, true) || !get_f32n(env, argv[6], "b", &b, C, &err, true))
    return throw_error(env, std::string(fname) + ": " + err);
  if (b && !w) return throw_error(env, std::string(fname) + ": a bias needs a weight");
  obf::norm_forward(out, mean, rstd, x, u, w, b, rows, C, eps);
  return nullptr;
}

napi_value NormBackward(napi_env env, napi_callback_info info) {
  const char* fname = "normBackward";
  ARGS(11);
  int64_t rows = 0, C = 0;
  float *dx = nullptr, *dw = nullptr, *db = nullptr, *dout = nullptr, *x = nullptr, *mean = nullptr, *rstd = nullptr,
        *u = nullptr, *w = nullptr;
  if (!get_int(env, argv[9], "rows", &rows, &err) || !get_int(env, argv[10], "C", &C, &err) ||
      !get_f32n(env, argv[0], "dx", &dx, rows * C, &err) || !get_f32n(env, argv[1], "dw", &dw, C, &err, true) ||
      !get_f32n(env, argv[2], "db", &db, C, &err, true) || !get_f32n(env, argv[3], "dout", &dout, rows * C, &err) ||
      !get_f32n(env, argv[4], "x", &x, rows * C, &err) || !get_f32n(env, argv[5], "mean", &mean, rows, &err, true) ||
      !get_f32n(env, argv[6], "rstd", &rstd, rows, &err) || !get_f32n(env, argv[7], "u", &u, C, &err, true) ||
      !get_f32n(env, argv[8], "w", &w, C, &err, true))
    return throw_error(env, std::string(fname) + ": " + err);
  if (u && (dw || db || w)) return throw_error(env, std::string(fname) + ": a norm along u has no affine part");
  if (!u && !mean) return throw_error(env, std::string(fname) + ": mean is needed without u");
  obf::norm_backward(dx, dw, db, dout, x, mean, rstd, u, w, rows, C);
  return nullptr;
}

napi_value Info(napi_env env, napi_callback_info /*info*/) {
  napi_value obj, isa, threads;
  NAPI_OK(napi_create_object(env, &obj));
  NAPI_OK(napi_create_string_utf8(env, obf::active_isa(), NAPI_AUTO_LENGTH, &isa));
  NAPI_OK(napi_create_int32(env, obf::threads(), &threads));
  NAPI_OK(napi_set_named_property(env, obj, "isa", isa));
  NAPI_OK(napi_set_named_property(env, obj, "threads", threads));
  return obj;
}

napi_value SetThreads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_OK(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int64_t n = 0;
  std::string err;
  if (argc < 1 || !get_int(env, argv[0], "threads", &n, &err) || n < 1 || n > 256)
    return throw_error(env, "setThreads: threads must be an integer in [1, 256]");
  obf::set_threads((int)n);
  return nullptr;
}

napi_value SetIsa(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_OK(napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  char buf[32] = {0};
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], buf, sizeof buf, &len) != napi_ok)
    return throw_error(env, "setIsa: expected a string");
  napi_value ok;
  NAPI_OK(napi_get_boolean(env, obf::force_isa(buf), &ok));
  return ok;
}

}  // namespace

NAPI_MODULE_INIT() {
  (void)obf::active_isa();  // select the kernel before any call can race on it
  napi_property_descriptor props[] = {
      {"sgemm", nullptr, Sgemm, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"sgemmBatched", nullptr, SgemmBatched, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"adamw", nullptr, Adamw, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"firstNonFinite", nullptr, FirstNonFinite, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"freivaldsRows", nullptr, FreivaldsRows, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"butterfly", nullptr, Butterfly, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"haarQr", nullptr, HaarQr, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"zero", nullptr, Zero, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"sumSquares", nullptr, SumSquares, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"geluForward", nullptr, GeluForward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"geluBackward", nullptr, GeluBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"softmaxXent", nullptr, SoftmaxXent, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"causalSoftmax", nullptr, CausalSoftmax, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"normForward", nullptr, NormForward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"normBackward", nullptr, NormBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"info", nullptr, Info, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"setThreads", nullptr, SetThreads, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"setIsa", nullptr, SetIsa, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return nullptr;
  return exports;
}
