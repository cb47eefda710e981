/**
 * Truncated SVD in float64 for low-rank factors: randomized subspace iteration (Gaussian
 * start, power steps re-orthonormalised by Gram-Schmidt twice), then the exact SVD of the
 * small projected matrix by cyclic Jacobi on its Gram matrix. With as many columns as the
 * smaller dimension the subspace is the whole range and the result is the exact SVD.
 */
import { Rng } from '../tensor/rng.js';
import { orthonormalise } from './mat64.js';

export interface TruncatedSvd {
  /** [m, r] left factor U_r diag(sqrt(s)) */
  U: Float64Array;
  /** [r, n] right factor diag(sqrt(s)) V_r^T: A ~ U V */
  V: Float64Array;
  rank: number;
  /** singular values found (descending; at least `rank` of them) */
  s: Float64Array;
  /** ||A - U V||_F^2 / ||A||_F^2, measured (0 for a zero matrix) */
  residualEnergy: number;
}

export interface RankChoice {
  /** keep exactly this many singular directions (capped by the dimensions) */
  rank?: number;
  /** keep the fewest directions holding this share of ||A||_F^2 (0 < energy <= 1) */
  energy?: number;
}

/** Eigenvalues (descending) and eigenvectors (columns of W [k, k]) of a symmetric S [k, k] by cyclic Jacobi. */
export function symmetricEigen(S0: Float64Array, k: number): { values: Float64Array; W: Float64Array } {
  const S = Float64Array.from(S0);
  const W = new Float64Array(k * k);
  for (let i = 0; i < k; i++) W[i * k + i] = 1;
  for (let sweep = 0; sweep < 60; sweep++) {
    let off = 0, diag = 0;
    for (let i = 0; i < k; i++) for (let j = 0; j < k; j++) (i === j ? (diag += S[i * k + j] ** 2) : (off += S[i * k + j] ** 2));
    if (off <= 1e-30 * diag || off === 0) break;
    for (let p = 0; p < k - 1; p++) {
      for (let q = p + 1; q < k; q++) {
        const apq = S[p * k + q];
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (S[q * k + q] - S[p * k + p]) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let r = 0; r < k; r++) { // columns p, q
          const a = S[r * k + p], b = S[r * k + q];
          S[r * k + p] = c * a - s * b; S[r * k + q] = s * a + c * b;
        }
        for (let r = 0; r < k; r++) { // rows p, q
          const a = S[p * k + r], b = S[q * k + r];
          S[p * k + r] = c * a - s * b; S[q * k + r] = s * a + c * b;
        }
        for (let r = 0; r < k; r++) {
          const a = W[r * k + p], b = W[r * k + q];
          W[r * k + p] = c * a - s * b; W[r * k + q] = s * a + c * b;
        }
      }
    }
  }
  const order = Array.from({ length: k }, (_, i) => i).sort((a, b) => S[b * k + b] - S[a * k + a]);
  const values = Float64Array.from(order, (i) => S[i * k + i]);
  const Ws = new Float64Array(k * k);
  for (let r = 0; r < k; r++) order.forEach((i, j) => { Ws[r * k + j] = W[r * k + i]; });
  return { values, W: Ws };
}

/** The top-k SVD of A [m, n] from a k-dimensional subspace: P [m, k] orthonormal, values and B = P^T A. */
function subspaceSvd(A: ArrayLike<number>, m: number, n: number, k: number, seed: number, powerSteps: number) {
  const P = new Float64Array(m * k);
  const Om = new Float64Array(n * k);
  new Rng(seed).fillNormal(Om);
  const mulA = (X: Float64Array, out: Float64Array) => { // out[m, k] = A X, X [n, k]
    out.fill(0);
    for (let i = 0; i < m; i++) for (let p = 0; p < n; p++) { const a = A[i * n + p]; if (a !== 0) for (let j = 0; j < k; j++) out[i * k + j] += a * X[p * k + j]; }
  };
  const mulAt = (X: Float64Array, out: Float64Array) => { // out[n, k] = A^T X, X [m, k]
    out.fill(0);
    for (let i = 0; i < m; i++) for (let p = 0; p < n; p++) { const a = A[i * n + p]; if (a !== 0) for (let j = 0; j < k; j++) out[p * k + j] += a * X[i * k + j]; }
  };
  mulA(Om, P);
  orthonormalise(P, m, k);
  for (let it = 0; it < powerSteps; it++) {
    mulAt(P, Om);
    orthonormalise(Om, n, k);
    mulA(Om, P);
    orthonormalise(P, m, k);
  }
  mulAt(P, Om); // Om = A^T P = B^T [n, k]
  const G = new Float64Array(k * k); // B B^T
  for (let i = 0; i < k; i++) for (let j = i; j < k; j++) {
    let s = 0;
    for (let p = 0; p < n; p++) s += Om[p * k + i] * Om[p * k + j];
    G[i * k + j] = G[j * k + i] = s;
  }
  return { P, Bt: Om, ...symmetricEigen(G, k) };
}

/**
 * A ~ U V of the chosen rank (exactly `rank`, or the smallest holding `energy` of the
 * squared Frobenius norm). Deterministic for a seed.
 */
export function truncatedSvd(A: ArrayLike<number>, m: number, n: number, choice: RankChoice, seed = 1): TruncatedSvd {
  const full = Math.min(m, n);
  if (choice.rank !== undefined && (!Number.isInteger(choice.rank) || choice.rank < 0)) throw new Error(`rank ${choice.rank} is not a non-negative integer`);
  if (choice.energy !== undefined && !(choice.energy > 0 && choice.energy <= 1)) throw new Error(`energy ${choice.energy} is not in (0, 1]`);
  let total = 0;
  for (let i = 0; i < m * n; i++) total += A[i] * A[i];
  const want = choice.rank !== undefined ? Math.min(choice.rank, full) : null;
  if (total === 0 || want === 0) return { U: new Float64Array(0), V: new Float64Array(0), rank: 0, s: new Float64Array(0), residualEnergy: total === 0 ? 0 : 1 };
  let k = want !== null ? Math.min(full, want + 10) : Math.min(full, 32);
  for (;;) {
    const { P, Bt, values, W } = subspaceSvd(A, m, n, k, seed, 3);
    const s = Float64Array.from(values, (v) => Math.sqrt(Math.max(v, 0)));
    let r = want ?? 0;
    if (want === null) {
      let acc = 0;
      while (r < k && acc < choice.energy! * total * (1 - 1e-12)) acc += s[r++] ** 2;
      if (acc < choice.energy! * total * (1 - 1e-12) && k < full) { k = Math.min(full, 2 * k); continue; }
    }
    while (r > 0 && s[r - 1] === 0) r--;
    // U = P W_r diag(sqrt s), V = diag(1/sqrt s) W_r^T B (= diag(sqrt s) V_r^T)
    const U = new Float64Array(m * r), V = new Float64Array(r * n);
    for (let j = 0; j < r; j++) {
      const f = Math.sqrt(s[j]);
      for (let i = 0; i < m; i++) { let x = 0; for (let c = 0; c < k; c++) x += P[i * k + c] * W[c * k + j]; U[i * r + j] = x * f; }
      for (let p = 0; p < n; p++) { let x = 0; for (let c = 0; c < k; c++) x += W[c * k + j] * Bt[p * k + c]; V[j * n + p] = x / f; }
    }
    let res = 0;
    for (let i = 0; i < m; i++) for (let p = 0; p < n; p++) {
      let x = A[i * n + p];
      for (let j = 0; j < r; j++) x -= U[i * r + j] * V[j * n + p];
      res += x * x;
    }
    return { U, V, rank: r, s, residualEnergy: res / total };
  }
}
