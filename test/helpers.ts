import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import type { EncodedSet } from '../src/io/jsonl.js';

export function randn(n: number, rng: Rng, std = 1): Float32Array {
  const a = new Float32Array(n);
  rng.fillNormal(a, std);
  return a;
}

/** ||a - b|| / max(||b||, tiny) over whole tensors. */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, 'length mismatch');
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-30);
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/**
 * Central finite differences of a scalar function with respect to selected entries of x
 * (evaluated in float64 where f allows it). Returns the numeric derivatives.
 */
export function numericGrad(f: () => number, x: Float32Array, indices: number[], eps = 1e-3): number[] {
  return indices.map((i) => {
    const orig = x[i];
    x[i] = orig + eps;
    const fp = f();
    x[i] = orig - eps;
    const fm = f();
    x[i] = orig;
    return (fp - fm) / (2 * eps);
  });
}

/** numericGrad of an async loss (a model whose forward goes through the block's linears). */
export async function numericGradAsync(f: () => Promise<number>, x: Float32Array, indices: number[], eps = 1e-3): Promise<number[]> {
  const out: number[] = [];
  for (const i of indices) {
    const orig = x[i];
    x[i] = orig + eps;
    const fp = await f();
    x[i] = orig - eps;
    const fm = await f();
    x[i] = orig;
    out.push((fp - fm) / (2 * eps));
  }
  return out;
}

/** A few random indices into an array of length n (always including 0 and n-1). */
export function someIndices(n: number, k: number, rng: Rng): number[] {
  const s = new Set<number>([0, n - 1]);
  while (s.size < Math.min(k, n)) s.add(rng.int(n));
  return [...s];
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** Asserts that analytic and numeric gradients agree on the given entries. */
export function assertGradClose(analytic: ArrayLike<number>, indices: number[], numeric: number[], tol: number, what: string): void {
  const a = indices.map((i) => analytic[i]);
  const err = relErr(a, numeric);
  assert.ok(err < tol, `${what}: analytic vs finite-difference relative error ${err.toExponential(2)} >= ${tol} (analytic ${a.slice(0, 4).map((v) => v.toExponential(3))}, numeric ${numeric.slice(0, 4).map((v) => v.toExponential(3))})`);
}

/** A tiny seeded uniform [0, 1) generator (mulberry32), for tests that need no Rng state. */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A small LM dataset of n sequences drawn from three repeating token patterns (minLen .. T tokens). */
export function patternData(n: number, V: number, T: number, seed: number, minLen = 6): EncodedSet {
  const rng = new Rng(seed);
  const pats = Array.from({ length: 3 }, () => Array.from({ length: 12 }, () => 1 + rng.int(V - 1)));
  const items = Array.from({ length: n }, () => {
    const p = rng.int(3), off = rng.int(6), len = minLen + rng.int(T - 5);
    return { tokens: Int32Array.from({ length: len + 1 }, (_, t) => pats[p][(off + t) % 12]), lossFrom: 0, label: -1 };
  });
  return { items, truncated: 0, dropped: 0, labels: [] };
}

/** Runs `batches` batches of B texts (each cut or padded with the end token to T tokens) through a model's forward. */
export async function forwardRecords(model: { forward(tokens: Int32Array, B: number, T: number): Promise<unknown> }, tok: { encode(s: string): ArrayLike<number>; eotId: number }, texts: string[], batches: number, B: number, T: number): Promise<void> {
  for (let b = 0, i = 0; b < batches; b++) {
    const tokens = new Int32Array(B * T).fill(tok.eotId);
    for (let s = 0; s < B; s++) tokens.set(Array.from(tok.encode(texts[i++])).slice(0, T), s * T);
    await model.forward(tokens, B, T);
  }
}

/**
 * Runs that differ only in their token-mixing keys (two jobs) agree up to float error, not
 * bit for bit: each value within `tol` of the reference, relatively.
 */
export function assertMixedRunsAgree(got: ArrayLike<number>, want: ArrayLike<number>, what: string, tol = 1e-4): void {
  assert.equal(got.length, want.length, `${what}: ${got.length} values, expected ${want.length}`);
  for (let i = 0; i < got.length; i++) {
    const e = Math.abs(got[i] - want[i]) / Math.max(Math.abs(want[i]), 1e-12);
    assert.ok(e <= tol, `${what}: value ${i} is ${got[i]}, the reference ${want[i]} (relative ${e.toExponential(2)})`);
  }
}
