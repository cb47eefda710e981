/**
 * Dense float64 linear algebra for mask generation: row-major n x n (or m x n) matrices
 * in Float64Array. Masks are generated and inverted here, then applied in float32.
 */
import type { RandomSource } from '../tensor/rng.js';
import { haarQrNative } from '../tensor/parallel.js';

export interface Mat64 {
  rows: number;
  cols: number;
  data: Float64Array;
}

export function mat(rows: number, cols: number, data?: Float64Array): Mat64 {
  return { rows, cols, data: data ?? new Float64Array(rows * cols) };
}

export function identity(n: number): Mat64 {
  const m = mat(n, n);
  for (let i = 0; i < n; i++) m.data[i * n + i] = 1;
  return m;
}

export function transpose(a: Mat64): Mat64 {
  const t = mat(a.cols, a.rows);
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) t.data[j * a.rows + i] = a.data[i * a.cols + j];
  return t;
}

/** C = A B (float64, i-k-j order, blocked over k for cache reuse). */
export function matmul(a: Mat64, b: Mat64): Mat64 {
  if (a.cols !== b.rows) throw new Error(`matmul: ${a.rows}x${a.cols} times ${b.rows}x${b.cols}`);
  const n = a.rows, k = a.cols, m = b.cols;
  const c = mat(n, m);
  const A = a.data, B = b.data, C = c.data;
  for (let i = 0; i < n; i++) {
    const ci = i * m;
    for (let p = 0; p < k; p++) {
      const aip = A[i * k + p];
      if (aip === 0) continue;
      const bp = p * m;
      for (let j = 0; j < m; j++) C[ci + j] += aip * B[bp + j];
    }
  }
  return c;
}

/** Scales column j of a by s[j] (a diag(s)), in place. */
export function scaleCols(a: Mat64, s: ArrayLike<number>): Mat64 {
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) a.data[i * a.cols + j] *= s[j];
  return a;
}

/**
 * Haar-distributed random orthogonal matrix: QR of a Gaussian matrix (Householder),
 * with Q's columns multiplied by sign(diag(R)) so the distribution is exactly Haar.
 */
export function haarOrthogonal(n: number, rng: RandomSource): Mat64 {
  const A = new Float64Array(n * n);
  rng.fillNormal(A);
  if (haarQrNative(A, n)) return { rows: n, cols: n, data: A };
  // Householder QR on A (row-major); store reflectors in place below the diagonal.
  const vs: Float64Array[] = [];
  const rdiag = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    let norm = 0;
    for (let i = k; i < n; i++) norm += A[i * n + k] * A[i * n + k];
    norm = Math.sqrt(norm);
    const akk = A[k * n + k];
    const alpha = akk > 0 ? -norm : norm;
    const v = new Float64Array(n - k);
    for (let i = k; i < n; i++) v[i - k] = A[i * n + k];
    v[0] -= alpha;
    let vnorm2 = 0;
    for (let i = 0; i < v.length; i++) vnorm2 += v[i] * v[i];
    rdiag[k] = alpha;
    if (vnorm2 === 0) {
      vs.push(v);
      continue;
    }
    const beta = 2 / vnorm2;
    // apply H = I - beta v v^T to columns k+1..n-1
    const w = new Float64Array(n);
    for (let i = k; i < n; i++) {
      const vi = v[i - k];
      if (vi === 0) continue;
      const row = i * n;
      for (let j = k + 1; j < n; j++) w[j] += vi * A[row + j];
    }
    for (let i = k; i < n; i++) {
      const f = beta * v[i - k];
      if (f === 0) continue;
      const row = i * n;
      for (let j = k + 1; j < n; j++) A[row + j] -= f * w[j];
    }
    // normalise v so that H = I - 2 u u^T with |u| = 1
    const s = Math.sqrt(vnorm2);
    for (let i = 0; i < v.length; i++) v[i] /= s;
    vs.push(v);
  }
  // Q = H_0 H_1 ... H_{n-1}: apply reflectors in reverse to the identity.
  const Q = identity(n);
  const q = Q.data;
  const w = new Float64Array(n);
  for (let k = n - 1; k >= 0; k--) {
    const v = vs[k];
    w.fill(0);
    for (let i = k; i < n; i++) {
      const vi = v[i - k];
      if (vi === 0) continue;
      const row = i * n;
      for (let j = 0; j < n; j++) w[j] += vi * q[row + j];
    }
    for (let i = k; i < n; i++) {
      const f = 2 * v[i - k];
      if (f === 0) continue;
      const row = i * n;
      for (let j = 0; j < n; j++) q[row + j] -= f * w[j];
    }
  }
  // sign fix: Q <- Q diag(sign(r_kk))
  for (let j = 0; j < n; j++) {
    if (rdiag[j] < 0) for (let i = 0; i < n; i++) q[i * n + j] = -q[i * n + j];
  }
  return Q;
}

/** LU decomposition with partial pivoting; returns the inverse, or throws if singular. */
export function inverseLU(a: Mat64): Mat64 {
  const n = a.rows;
  if (a.cols !== n) throw new Error('inverse of a non-square matrix');
  const LU = Float64Array.from(a.data);
  const perm = Int32Array.from({ length: n }, (_, i) => i);
  let maxAbs = 0;
  for (let i = 0; i < n * n; i++) maxAbs = Math.max(maxAbs, Math.abs(LU[i]));
  if (!Number.isFinite(maxAbs)) throw new Error('matrix has non-finite entries');
  for (let k = 0; k < n; k++) {
    let p = k;
    let best = Math.abs(LU[k * n + k]);
    for (let i = k + 1; i < n; i++) {
      const v = Math.abs(LU[i * n + k]);
      if (v > best) { best = v; p = i; }
    }
    if (best <= maxAbs * n * 1e-15) throw new Error(`matrix is singular to working precision (pivot ${best.toExponential(2)} at column ${k})`);
    if (p !== k) {
      for (let j = 0; j < n; j++) {
        const t = LU[k * n + j]; LU[k * n + j] = LU[p * n + j]; LU[p * n + j] = t;
      }
      const t = perm[k]; perm[k] = perm[p]; perm[p] = t;
    }
    const pivot = LU[k * n + k];
    for (let i = k + 1; i < n; i++) {
      const f = (LU[i * n + k] /= pivot);
      if (f === 0) continue;
      for (let j = k + 1; j < n; j++) LU[i * n + j] -= f * LU[k * n + j];
    }
  }
  // solve LU X = P I column block by column block (row-major friendly: solve for X^T rows)
  const inv = mat(n, n);
  const X = inv.data;
  // X = U^-1 L^-1 P ; do forward/back substitution on all columns at once, row by row
  // Y = L^-1 P
  const Y = new Float64Array(n * n);
  for (let i = 0; i < n; i++) Y[i * n + perm[i]] = 1;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < i; k++) {
      const f = LU[i * n + k];
      if (f === 0) continue;
      for (let j = 0; j < n; j++) Y[i * n + j] -= f * Y[k * n + j];
    }
  }
  for (let i = n - 1; i >= 0; i--) {
    for (let j = 0; j < n; j++) X[i * n + j] = Y[i * n + j];
    for (let k = i + 1; k < n; k++) {
      const f = LU[i * n + k];
      if (f === 0) continue;
      for (let j = 0; j < n; j++) X[i * n + j] -= f * X[k * n + j];
    }
    const d = LU[i * n + i];
    for (let j = 0; j < n; j++) X[i * n + j] /= d;
  }
  return inv;
}
