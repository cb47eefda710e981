/**
 * Multi-threaded element-wise optimiser kernels in TypeScript. A training step of GPT-2
 * 124M touches 124M parameters in AdamW and in the gradient norm: memory-bound loops that
 * one JavaScript thread runs at a fraction of the machine's bandwidth. When every buffer
 * lives in a SharedArrayBuffer, the range is split between this thread and worker threads
 * running the same kernels (./kernels_ew.ts), and the call stays synchronous
 * (Atomics.wait). Otherwise, or for small buffers, the kernels run on this thread.
 */
import { Worker } from 'node:worker_threads';
import os from 'node:os';
import { adamwRange, sumSquaresRange, type AdamWArgs } from './kernels_ew.js';
import { geluForward, geluBackward, crossEntropyForward } from '../model/kernels.js';

import { isShared } from '../tensor/shared.js';

const MIN_PARALLEL = 1 << 20;

interface Pool {
  workers: Worker[];
  /** [0] = jobs outstanding; per-worker result slots follow (float64 view) */
  ctrl: Int32Array;
  results: Float64Array;
}

let pool: Pool | null | undefined;

function threads(): number {
  const env = Number(process.env.OBFUSCATUNE_THREADS);
  return Number.isInteger(env) && env > 0 ? env : os.availableParallelism();
}

function getPool(): Pool | null {
  if (pool !== undefined) return pool;
  const n = threads() - 1;
  if (n < 1 || process.env.OBFUSCATUNE_PARALLEL === '0') return (pool = null);
  const ctrlBuf = new SharedArrayBuffer(4 * 4);
  const resBuf = new SharedArrayBuffer(8 * (n + 1));
  const workers: Worker[] = [];
  for (let i = 0; i < n; i++) {
    const w = new Worker(new URL('./parallel_worker.js', import.meta.url), { workerData: { ctrl: ctrlBuf, results: resBuf, index: i } });
    w.unref();
    workers.push(w);
  }
  pool = { workers, ctrl: new Int32Array(ctrlBuf), results: new Float64Array(resBuf) };
  return pool;
}

/** Splits [0, n) into parts; part 0 runs here, the others on workers; waits for all. */
function run(n: number, job: (lo: number, hi: number) => number, message: (lo: number, hi: number) => Record<string, unknown>, minSize = MIN_PARALLEL, align = 16): number {
  const p = n >= minSize ? getPool() : null;
  if (!p) return job(0, n);
  const parts = p.workers.length + 1;
  const chunk = Math.ceil(n / parts / align) * align;
  Atomics.store(p.ctrl, 0, p.workers.length);
  p.workers.forEach((w, i) => {
    const lo = Math.min(n, (i + 1) * chunk);
    const hi = Math.min(n, (i + 2) * chunk);
    w.postMessage(message(lo, hi));
  });
  let total = job(0, Math.min(n, chunk));
  for (;;) {
    const left = Atomics.load(p.ctrl, 0);
    if (left === 0) break;
    Atomics.wait(p.ctrl, 0, left, 1000);
  }
  for (let i = 0; i < p.workers.length; i++) total += p.results[i];
  return total;
}

/** AdamW step over whole buffers (params -= lr * (m^/(sqrt(v^)+eps) + wd * params), decay where mask = 1). */
export function adamwStep(a: AdamWArgs): void {
  const n = a.params.length;
  const shared = isShared(a.params) && isShared(a.grads) && isShared(a.m) && isShared(a.v) && (!a.mask || isShared(a.mask));
  if (!shared) {
    adamwRange(a, 0, n);
    return;
  }
  run(n, (lo, hi) => {
    adamwRange(a, lo, hi);
    return 0;
  }, (lo, hi) => ({ op: 'adamw', args: a, lo, hi }));
}

/** Sum of squares of a buffer (float64 accumulation). */
export function sumSquaresParallel(g: Float32Array): number {
  if (!isShared(g)) return sumSquaresRange(g, 0, g.length);
  return run(g.length, (lo, hi) => sumSquaresRange(g, lo, hi), (lo, hi) => ({ op: 'sumsq', g, lo, hi }));
}

const allShared = (...xs: (ArrayBufferView | null)[]) => xs.every((x) => x === null || isShared(x));

/** GELU forward split across threads (see kernels.ts geluForward). */
export function geluForwardPar(out: Float32Array, inp: Float32Array, N: number, th: Float32Array | null = null): void {
  if (!allShared(out, inp, th)) return geluForward(out, inp, N, th);
  run(N, (lo, hi) => {
    geluForward(out.subarray(lo, hi), inp.subarray(lo, hi), hi - lo, th ? th.subarray(lo, hi) : null);
    return 0;
  }, (lo, hi) => ({ op: 'gelu_fwd', a: out, b: inp, d: th, lo, hi }), 1 << 16);
}

/** GELU backward split across threads. */
export function geluBackwardPar(dinp: Float32Array, inp: Float32Array, dout: Float32Array, N: number, th: Float32Array | null = null): void {
  if (!allShared(dinp, inp, dout, th)) return geluBackward(dinp, inp, dout, N, th);
  run(N, (lo, hi) => {
    geluBackward(dinp.subarray(lo, hi), inp.subarray(lo, hi), dout.subarray(lo, hi), hi - lo, th ? th.subarray(lo, hi) : null);
    return 0;
  }, (lo, hi) => ({ op: 'gelu_bwd', a: dinp, b: inp, c: dout, d: th, lo, hi }), 1 << 16);
}

/** Softmax cross-entropy over rows, split across threads (see kernels.ts crossEntropyForward). */
export function crossEntropyForwardPar(logits: Float32Array, targets: Int32Array, losses: Float32Array, N: number, V: number): { loss: number; count: number } {
  let count = 0;
  for (let i = 0; i < N; i++) {
    if (targets[i] >= V) throw new Error(`target ${targets[i]} at row ${i} is out of range [0, ${V})`);
    if (targets[i] >= 0) count++;
  }
  if (!allShared(logits, losses) || N * V < (1 << 20)) return crossEntropyForward(logits, targets, losses, N, V);
  const total = run(N, (lo, hi) => {
    const r = crossEntropyForward(logits.subarray(lo * V, hi * V), targets.subarray(lo, hi), losses.subarray(lo, hi), hi - lo, V);
    return r.loss * r.count;
  }, (lo, hi) => ({ op: 'ce_fwd', a: logits, b: losses, t: targets, V, lo, hi }), 2, 1);
  return { loss: count > 0 ? total / count : 0, count };
}
