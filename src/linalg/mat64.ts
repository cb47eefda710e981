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
 * Haar-distributed random orthogonal matrix: the Q of a Gaussian matrix's QR with a positive
 * diagonal in R, which makes the distribution exactly Haar. The addon's Householder QR (Q's
 * columns signed by diag(R)), or the same Q by Gram-Schmidt.
 */
export function haarOrthogonal(n: number, rng: RandomSource): Mat64 {
  const A = new Float64Array(n * n);
  rng.fillNormal(A);
  if (!haarQrNative(A, n)) orthonormalise(A, n, n);
  return { rows: n, cols: n, data: A };
}

/** Orthonormalises the k columns of Y [m, k] in place (Gram-Schmidt, twice); returns the columns kept. */
export function orthonormalise(Y: Float64Array, m: number, k: number): number {
  let kept = 0;
  for (let j = 0; j < k; j++) {
    for (let pass = 0; pass < 2; pass++) {
      for (let i = 0; i < kept; i++) {
        let dot = 0;
        for (let r = 0; r < m; r++) dot += Y[r * k + i] * Y[r * k + j];
        for (let r = 0; r < m; r++) Y[r * k + j] -= dot * Y[r * k + i];
      }
    }
    let nrm = 0;
    for (let r = 0; r < m; r++) nrm += Y[r * k + j] ** 2;
    nrm = Math.sqrt(nrm);
    if (nrm < 1e-13) continue; // a dependent column (the range is smaller than k)
    for (let r = 0; r < m; r++) Y[r * k + kept] = Y[r * k + j] / nrm;
    kept++;
  }
  for (let r = 0; r < m; r++) for (let j = kept; j < k; j++) Y[r * k + j] = 0;
  return kept;
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
  // X = U^-1 L^-1 P: forward, then back substitution on all columns at once, row by row
  const inv = mat(n, n);
  const X = inv.data;
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
