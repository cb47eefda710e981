/**
 * Invertible masks. `kappaMask` draws R = U diag(s) V^T with Haar-orthogonal U, V and
 * singular values log-uniform in [1/kappa, 1] (both ends included, so cond(R) = kappa);
 * its inverse is V diag(1/s) U^T, exact in float64. kappa = 1 gives an orthogonal matrix.
 * `naiveMask` is the paper's baseline: i.i.d. Gaussian entries, inverted by LU.
 */
import type { RandomSource } from '../tensor/rng.js';
import { InputError } from '../errors.js';
import { haarOrthogonal, inverseLU, matmul, scaleCols, transpose, type Mat64 } from './mat64.js';

export type MaskSpec = { kind: 'kappa'; kappa: number } | { kind: 'naive' };

export interface MaskPair {
  m: Mat64;
  inv: Mat64;
}

export function parseMaskSpec(s: string): MaskSpec {
  if (s === 'naive') return { kind: 'naive' };
  const k = Number(s);
  if (!Number.isFinite(k) || k < 1) throw new InputError(`kappa must be a number >= 1 or "naive", got "${s}"`);
  return { kind: 'kappa', kappa: k };
}

export function maskSpecLabel(s: MaskSpec): string {
  return s.kind === 'naive' ? 'naive' : String(s.kappa);
}

/** Singular values log-uniform in [1/kappa, 1] with both ends present. */
export function spreadSingularValues(n: number, kappa: number, rng: RandomSource): Float64Array {
  const s = new Float64Array(n);
  if (kappa === 1 || n === 1) return s.fill(1);
  const lk = Math.log(kappa);
  for (let i = 0; i < n; i++) s[i] = Math.exp(-lk * rng.uniform());
  s[0] = 1;
  s[n - 1] = 1 / kappa;
  return s;
}

/**
 * Randomness for one mask: each factor (U, V, singular values, Gaussian entries) comes from
 * its own stream, so a cached factor does not shift the others.
 */
export type StreamFactory = (part: 'U' | 'V' | 's' | 'gauss') => RandomSource;

/** A single stream used for every part, in order (simple callers and tests). */
export function oneStream(rng: RandomSource): StreamFactory {
  return () => rng;
}

/**
 * Optional memo of Haar factors by label: masks that differ only in kappa (same key, same
 * label) share U and V, so sweeping kappa costs one set of QR decompositions.
 */
export type HaarCache = Map<string, Mat64>;

function haar(n: number, rng: RandomSource, cache: HaarCache | undefined, label: string | undefined): Mat64 {
  if (!cache || label === undefined) return haarOrthogonal(n, rng);
  let m = cache.get(label);
  if (!m) {
    m = haarOrthogonal(n, rng);
    cache.set(label, m);
  }
  return { rows: m.rows, cols: m.cols, data: Float64Array.from(m.data) };
}

export function kappaMask(n: number, kappa: number, streams: StreamFactory, cache?: HaarCache, label?: string): MaskPair {
  if (!(kappa >= 1) || !Number.isFinite(kappa)) throw new Error(`kappa must be finite and >= 1, got ${kappa}`);
  const U = haar(n, streams('U'), cache, label && `${label}/U`);
  if (kappa === 1) return { m: U, inv: transpose(U) };
  const V = haar(n, streams('V'), cache, label && `${label}/V`);
  const s = spreadSingularValues(n, kappa, streams('s'));
  const Vt = transpose(V);
  const Ut = transpose(U);
  const m = matmul(scaleCols(U, s), Vt); // U diag(s) V^T  (U is scaled in place: Ut was taken first)
  const inv = matmul(scaleCols(V, s.map((x) => 1 / x)), Ut); // V diag(1/s) U^T
  return { m, inv };
}

export function naiveMask(n: number, streams: StreamFactory): MaskPair {
  const m: Mat64 = { rows: n, cols: n, data: new Float64Array(n * n) };
  streams('gauss').fillNormal(m.data, 1 / Math.sqrt(n));
  return { m, inv: inverseLU(m) };
}

export function makeMask(n: number, spec: MaskSpec, streams: StreamFactory, cache?: HaarCache, label?: string): MaskPair {
  return spec.kind === 'naive' ? naiveMask(n, streams) : kappaMask(n, spec.kappa, streams, cache, label);
}

/** A uniformly random permutation of 0..n-1. */
export function randomPermutation(n: number, rng: RandomSource): Int32Array {
  const p = Int32Array.from({ length: n }, (_, i) => i);
  rng.shuffle(p);
  return p;
}

export function invertPermutation(p: Int32Array): Int32Array {
  const inv = new Int32Array(p.length);
  for (let i = 0; i < p.length; i++) inv[p[i]] = i;
  return inv;
}
