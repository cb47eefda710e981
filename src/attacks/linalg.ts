/**
 * The attacks' numerics: float64 Procrustes (polar factor by scaled Newton iteration), ridge
 * least squares, the Hungarian assignment, and small helpers on row-major matrices.
 */
import { mat, transpose, matmul, identity, inverseLU, type Mat64 } from '../linalg/mat64.js';
import { sgemm } from '../tensor/gemm.js';

export { mat, transpose, matmul, identity, inverseLU as inverse, type Mat64 };

/** A float64 copy of a row-major float32 block: rows r0.., columns c0.. of a [?, ld] matrix. */
export function block64(a: ArrayLike<number>, ld: number, r0: number, rows: number, c0: number, cols: number): Mat64 {
  const m = mat(rows, cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) m.data[i * cols + j] = a[(r0 + i) * ld + c0 + j];
  return m;
}

export function frob2(a: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * a[i];
  return s;
}

function sub(a: Mat64, b: Mat64): Mat64 {
  const c = mat(a.rows, a.cols);
  for (let i = 0; i < c.data.length; i++) c.data[i] = a.data[i] - b.data[i];
  return c;
}

/**
 * The orthogonal polar factor of a square matrix (U V^T for M = U S V^T): the solution of
 * orthogonal Procrustes, max tr(R^T M). Scaled Newton iteration X <- (g X + X^-T / g) / 2.
 */
export function polar(M: Mat64): Mat64 {
  const n = M.rows;
  let X = mat(n, n, Float64Array.from(M.data));
  // a tiny ridge keeps a rank-deficient M invertible (its null directions are then arbitrary)
  const scale = Math.sqrt(frob2(X.data) / n) || 1;
  for (let i = 0; i < n; i++) X.data[i * n + i] += 1e-10 * scale;
  for (let it = 0; it < 100; it++) {
    const Xi = inverseLU(X);
    const g = Math.sqrt(Math.sqrt(frob2(Xi.data)) / Math.sqrt(frob2(X.data)));
    const XiT = transpose(Xi);
    const Y = mat(n, n);
    for (let i = 0; i < n * n; i++) Y.data[i] = 0.5 * (g * X.data[i] + XiT.data[i] / g);
    const diff = Math.sqrt(frob2(sub(Y, X).data) / frob2(Y.data));
    X = Y;
    if (diff < 1e-14) break;
  }
  return X;
}

/** Ridge least squares: the k x m matrix M minimising ||P M - X||^2 (P: r x k, X: r x m). */
export function lstsq(P: Mat64, X: Mat64, ridge = 1e-10): Mat64 {
  const PT = transpose(P);
  const G = matmul(PT, P);
  const tr = G.data.reduce((s, v, i) => (i % (G.cols + 1) === 0 ? s + v : s), 0) / G.rows;
  for (let i = 0; i < G.rows; i++) G.data[i * G.cols + i] += ridge * (tr || 1);
  return matmul(inverseLU(G), matmul(PT, X));
}

/** ||P M - X||^2 / ||X||^2 */
export function relResidual(P: Mat64, M: Mat64, X: Mat64): number {
  const R = sub(matmul(P, M), X);
  return frob2(R.data) / Math.max(frob2(X.data), 1e-300);
}

/**
 * Minimum-cost assignment (Hungarian algorithm, shortest augmenting paths, O(n^3)): returns,
 * for each row, its column. `cost` is n x n row-major.
 */
export function hungarian(cost: Float64Array, n: number): Int32Array {
  const u = new Float64Array(n + 1), v = new Float64Array(n + 1);
  const p = new Int32Array(n + 1), way = new Int32Array(n + 1);
  const minv = new Float64Array(n + 1);
  const used = new Uint8Array(n + 1);
  for (let i = 1; i <= n; i++) {
    p[0] = i;
    let j0 = 0;
    minv.fill(Infinity);
    used.fill(0);
    do {
      used[j0] = 1;
      const i0 = p[j0];
      const row = (i0 - 1) * n - 1;
      let delta = Infinity, j1 = 0;
      const ui = u[i0];
      for (let j = 1; j <= n; j++) {
        if (used[j]) continue;
        const cur = cost[row + j] - ui - v[j];
        if (cur < minv[j]) { minv[j] = cur; way[j] = j0; }
        if (minv[j] < delta) { delta = minv[j]; j1 = j; }
      }
      for (let j = 0; j <= n; j++) {
        if (used[j]) { u[p[j]] += delta; v[j] -= delta; } else minv[j] -= delta;
      }
      j0 = j1;
    } while (p[j0] !== 0);
    do { const j1 = way[j0]; p[j0] = p[j1]; j0 = j1; } while (j0);
  }
  const ans = new Int32Array(n);
  for (let j = 1; j <= n; j++) if (p[j]) ans[p[j] - 1] = j - 1;
  return ans;
}

/**
 * Squared distances [n, n] of feature rows a [n, F] to feature rows b [n, F], each feature
 * scaled by its standard deviation over b (the public side; 1 where it is 0).
 */
export function scaledDistances(a: Float64Array, b: Float64Array, n: number, F: number): Float64Array {
  const sd = Array.from({ length: F }, (_, c) => {
    let m = 0, v = 0;
    for (let j = 0; j < n; j++) m += b[j * F + c] / n;
    for (let j = 0; j < n; j++) v += (b[j * F + c] - m) ** 2 / n;
    return Math.sqrt(v) || 1;
  });
  const out = new Float64Array(n * n);
  for (let j = 0; j < n; j++) for (let k = 0; k < n; k++) {
    let s = 0;
    for (let c = 0; c < F; c++) s += ((a[j * F + c] - b[k * F + c]) / sd[c]) ** 2;
    out[j * n + k] = s;
  }
  return out;
}

/** Rows of a [n, d] float32 matrix scaled to unit length (zero rows stay zero). */
export function unitRows(a: Float32Array, n: number, d: number): Float32Array {
  const out = new Float32Array(n * d);
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let j = 0; j < d; j++) s += a[i * d + j] * a[i * d + j];
    const f = s > 0 ? 1 / Math.sqrt(s) : 0;
    for (let j = 0; j < d; j++) out[i * d + j] = a[i * d + j] * f;
  }
  return out;
}

/** out[m, n] = a[m, k] b[n, k]^T (float32 GEMM) */
export function gemmABt(a: Float32Array, b: Float32Array, m: number, n: number, k: number): Float32Array {
  const out = new Float32Array(m * n);
  sgemm(false, true, m, n, k, 1, a, k, b, k, 0, out, n);
  return out;
}

/** out[m, n] = a[m, k] b[k, n] (float32 GEMM), b transposed when transB ([n, k]) */
export function gemm(a: Float32Array, b: Float32Array, m: number, n: number, k: number, transB = false): Float32Array {
  const out = new Float32Array(m * n);
  sgemm(false, transB, m, n, k, 1, a, k, b, transB ? k : n, 0, out, n);
  return out;
}

/** [cols, rows] transpose of a row-major float32 matrix */
export function transpose32(a: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) t[j * rows + i] = a[i * cols + j];
  return t;
}

export function toF32(m: Mat64): Float32Array {
  return Float32Array.from(m.data);
}
