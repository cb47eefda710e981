/**
 * The element-wise kernels of a training step on every core: AdamW and the gradient norm
 * (124M parameters for GPT-2 124M: memory-bound loops), GELU and softmax + cross-entropy.
 *
 * With the native backend they run in the addon (native/src/elementwise.cc: vectorised for
 * AVX-512, AVX2 or the baseline, on the GEMM's threads). Otherwise (the TypeScript backend,
 * or an addon built without them), when every buffer lives in a SharedArrayBuffer, the range
 * is split between this thread and worker threads running the same TypeScript kernels
 * (./kernels_ew.ts), and the call stays synchronous (Atomics.wait); for other buffers, or
 * small ones, the kernels run on this thread.
 *
 * A worker that fails never leaves a call waiting. A kernel that throws in a worker fails
 * that call with a WorkerError (the worker stays in service). A worker thread that ends
 * (killed, out of memory, a crash) is seen by the supervisor thread that started it
 * (./parallel_supervisor.ts), which marks it dead in shared memory and wakes this thread:
 * the call fails with a WorkerError naming the worker, once the other workers are done with
 * the call's buffers, and so does every later call, at once, until `resetParallelPool()`
 * (the pool does not silently carry on with fewer threads). The waits are bounded: a call
 * whose workers make no progress for OBFUSCATUNE_WORKER_TIMEOUT_MS (default 60 s) fails too.
 */
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import os from 'node:os';
import { crossEntropyForward, RANGE_KERNELS, type AdamWArgs, type RangeArgs, type RangeOp } from './kernels_ew.js';

import { InputError, WorkerError } from '../errors.js';
import { STATUS_BUSY, STATUS_DEAD, STATUS_FAILED, STATUS_IDLE, type ExitReport } from './parallel_shared.js';

import { isShared } from './shared.js';
import { native, type NativeAddon } from './native.js';
import { backendName } from './gemm.js';

/** The addon's element-wise kernels, when the native backend is active and has them. */
function ew(): NativeAddon | null {
  return native && typeof native.adamw === 'function' && backendName() === 'native' ? native : null;
}

const MIN_PARALLEL = 1 << 20;
/** how often a waiting call looks at the status words when nothing wakes it */
const POLL_MS = 20;

interface Pool {
  supervisor: Worker;
  /** job port of each worker */
  ports: MessagePort[];
  /** exit reports from the supervisor */
  reports: MessagePort;
  /** [0] = jobs outstanding; [1 + i] = status of worker i */
  ctrl: Int32Array;
  results: Float64Array;
  /** exit reports read so far, by worker */
  exits: Map<number, ExitReport>;
  /** set once a worker is gone: every later call fails with it */
  broken: WorkerError | null;
}

let pool: Pool | null | undefined;

function threads(): number {
  const env = Number(process.env.OBFUSCATUNE_THREADS);
  return Number.isInteger(env) && env > 0 ? env : os.availableParallelism();
}

function timeoutMs(): number {
  const env = Number(process.env.OBFUSCATUNE_WORKER_TIMEOUT_MS);
  return Number.isFinite(env) && env > 0 ? env : 60_000;
}

function getPool(): Pool | null {
  if (pool !== undefined) return pool;
  const n = threads() - 1;
  if (n < 1 || process.env.OBFUSCATUNE_PARALLEL === '0') return (pool = null);
  const ctrlBuf = new SharedArrayBuffer(4 * (1 + n));
  const resBuf = new SharedArrayBuffer(8 * (n + 1));
  const jobs = Array.from({ length: n }, () => new MessageChannel());
  const reports = new MessageChannel();
  const supervisor = new Worker(new URL('./parallel_supervisor.js', import.meta.url), {
    workerData: { ctrl: ctrlBuf, results: resBuf, ports: jobs.map((c) => c.port1), reports: reports.port1 },
    transferList: [...jobs.map((c) => c.port1), reports.port1],
  });
  supervisor.unref();
  // this thread reads its ports with receiveMessageOnPort only: no listener, nothing keeps the process alive
  for (const c of jobs) c.port2.unref();
  reports.port2.unref();
  const p: Pool = {
    supervisor, ports: jobs.map((c) => c.port2), reports: reports.port2, ctrl: new Int32Array(ctrlBuf), results: new Float64Array(resBuf),
    exits: new Map(), broken: null,
  };
  // seen between calls (this thread's event loop); during a call the status words tell
  supervisor.on('error', (e) => {
    p.broken ??= new WorkerError(`parallel kernels: the supervisor thread failed: ${e instanceof Error ? e.message : String(e)}`, -1, { cause: e });
  });
  supervisor.on('exit', (code) => {
    p.broken ??= new WorkerError(`parallel kernels: the supervisor thread exited (code ${code})`, -1);
  });
  pool = p;
  return p;
}

/**
 * Stops the kernel workers (if any) and forgets them: the next parallel call starts new
 * ones. The way back to threaded kernels after a WorkerError.
 */
export async function resetParallelPool(): Promise<void> {
  const p = pool;
  pool = undefined;
  if (p) await p.supervisor.terminate();
}

function readExits(p: Pool): void {
  for (let m = receiveMessageOnPort(p.reports); m; m = receiveMessageOnPort(p.reports)) {
    const r = m.message as ExitReport;
    p.exits.set(r.index, r);
  }
}

function deadWorker(p: Pool, i: number, during: string): WorkerError {
  readExits(p);
  const r = p.exits.get(i);
  const how = r ? `thread ${r.threadId} exited with code ${r.code}${r.error ? ` (${r.error})` : ''}` : 'its thread exited';
  return new WorkerError(`parallel kernels: worker ${i} died ${during}: ${how}`, i);
}

/** Fails at once when the pool is broken or one of its workers is gone. */
function checkPool(p: Pool): void {
  if (!p.broken) {
    const n = p.ports.length;
    for (let i = 0; i < n; i++) {
      if (Atomics.load(p.ctrl, 1 + i) === STATUS_DEAD) {
        p.broken = deadWorker(p, i, 'between calls');
        break;
      }
    }
  }
  if (p.broken) {
    void p.supervisor.terminate();
    throw new WorkerError(`${p.broken.message}; the kernel workers are stopped (resetParallelPool() starts new ones)`, p.broken.worker, { cause: p.broken });
  }
}

/**
 * Waits, in bounded steps, until no worker is busy with this call. Returns the first worker
 * that died meanwhile (-1: none) and whether the wait gave up for lack of progress.
 */
function waitForWorkers(p: Pool): { dead: number; stalled: number[] } {
  const n = p.ports.length;
  const limit = timeoutMs();
  let last = Atomics.load(p.ctrl, 0);
  let lastChange = Date.now();
  for (;;) {
    let dead = -1;
    const busy: number[] = [];
    for (let i = 0; i < n; i++) {
      const st = Atomics.load(p.ctrl, 1 + i);
      if (st === STATUS_DEAD && dead < 0) dead = i;
      else if (st === STATUS_BUSY) busy.push(i);
    }
    if (busy.length === 0) return { dead, stalled: [] };
    const left = Atomics.load(p.ctrl, 0);
    if (left !== last) {
      last = left;
      lastChange = Date.now();
    } else if (Date.now() - lastChange > limit) {
      return { dead, stalled: busy };
    }
    Atomics.wait(p.ctrl, 0, left, POLL_MS);
  }
}

/**
 * Splits [0, n) of kernel `op` into parts; part 0 runs here, the others on workers; waits for
 * all. Buffers that are not all `shared`, or small ones, are done on this thread alone.
 */
function run<K extends RangeOp>(op: K, args: RangeArgs[K], n: number, shared: boolean, minSize = MIN_PARALLEL, align = 16): number {
  const job = (lo: number, hi: number) => RANGE_KERNELS[op](args, lo, hi);
  const p = shared && n >= minSize ? getPool() : null;
  if (!p) return job(0, n);
  checkPool(p);
  const workers = p.ports.length;
  const parts = workers + 1;
  const chunk = Math.ceil(n / parts / align) * align;
  Atomics.store(p.ctrl, 0, workers);
  for (let i = 0; i < workers; i++) {
    // a worker marked dead since checkPool stays marked: the wait below reports it
    for (let cur = Atomics.load(p.ctrl, 1 + i); cur !== STATUS_DEAD; cur = Atomics.load(p.ctrl, 1 + i)) {
      if (Atomics.compareExchange(p.ctrl, 1 + i, cur, STATUS_BUSY) === cur) break;
    }
    p.ports[i].postMessage({ op, args, lo: Math.min(n, (i + 1) * chunk), hi: Math.min(n, (i + 2) * chunk) });
  }
  let total = 0;
  let failed = false;
  let own: unknown;
  try {
    total = job(0, Math.min(n, chunk));
  } catch (e) {
    failed = true;
    own = e;
  }
  // even when this thread's part failed: no worker may still write into the buffers on return
  const { dead, stalled } = waitForWorkers(p);
  if (stalled.length > 0) {
    p.broken = new WorkerError(`parallel kernels: worker${stalled.length > 1 ? 's' : ''} ${stalled.join(', ')} made no progress on ${op} for ${timeoutMs()} ms`, stalled[0]);
    void p.supervisor.terminate();
  } else if (dead >= 0) {
    p.broken = deadWorker(p, dead, `during ${op}`);
    void p.supervisor.terminate();
  }
  if (failed) throw own;
  if (p.broken) throw p.broken;
  // a kernel that threw in a worker: the call fails, the workers stay in service
  let error: WorkerError | null = null;
  for (let i = 0; i < workers; i++) {
    if (Atomics.load(p.ctrl, 1 + i) !== STATUS_FAILED) continue;
    Atomics.store(p.ctrl, 1 + i, STATUS_IDLE);
    const m = receiveMessageOnPort(p.ports[i]);
    const text = (m?.message as { error?: string } | undefined)?.error ?? 'no details';
    error ??= new WorkerError(`parallel kernels: worker ${i} failed in ${op}: ${text}`, i);
  }
  if (error) throw error;
  for (let i = 0; i < workers; i++) total += p.results[i];
  return total;
}

/**
 * Test hooks (tests only): make a worker busy for `ms` (as if stuck in a kernel), have the
 * supervisor terminate it after `afterMs`, make its next kernel throw; the pool's size.
 */
export const parallelTestHooks = {
  workers(): number {
    return getPool()?.ports.length ?? 0;
  },
  busy(index: number, ms: number): void {
    getPool()?.ports[index].postMessage({ op: 'test_busy', ms, lo: 0, hi: 0 });
  },
  terminate(index: number, afterMs = 0): void {
    getPool()?.supervisor.postMessage({ op: 'terminate', index, afterMs });
  },
  failNext(index: number): void {
    getPool()?.ports[index].postMessage({ op: 'test_fail_next', lo: 0, hi: 0 });
  },
  /** whether worker `index` is marked dead in shared memory */
  dead(index: number): boolean {
    const p = getPool();
    return !!p && Atomics.load(p.ctrl, 1 + index) === STATUS_DEAD;
  },
};

const allShared = (...xs: (ArrayBufferView | null)[]) => xs.every((x) => x === null || isShared(x));

/** AdamW step over whole buffers (params -= lr * (m^/(sqrt(v^)+eps) + wd * params), decay where mask = 1). */
export function adamwStep(a: AdamWArgs): void {
  const nat = ew();
  if (nat) return nat.adamw(a.params, a.grads, a.m, a.v, a.mask, a.lr, a.beta1, a.beta2, a.eps, a.weightDecay, a.c1, a.c2, a.gradScale);
  run('adamw', a, a.params.length, allShared(a.params, a.grads, a.m, a.v, a.mask));
}

/** x = 0 (on every thread when the native backend has the kernel). */
export function zeroFill(x: Float32Array): void {
  const nat = ew();
  if (nat && x.length >= MIN_PARALLEL) nat.zero(x);
  else x.fill(0);
}

/** Sum of squares of a buffer (float64 accumulation). */
export function sumSquaresParallel(g: Float32Array): number {
  return ew()?.sumSquares(g) ?? run('sumsq', { g }, g.length, isShared(g));
}

/** GELU forward split across threads (see kernels.ts geluForward). */
export function geluForwardPar(out: Float32Array, inp: Float32Array, N: number, th: Float32Array | null = null): void {
  const nat = ew();
  if (nat) return nat.geluForward(out, inp, th, N);
  run('gelu_fwd', { out, inp, th }, N, allShared(out, inp, th), 1 << 16);
}

/** GELU backward split across threads. */
export function geluBackwardPar(dinp: Float32Array, inp: Float32Array, dout: Float32Array, N: number, th: Float32Array | null = null): void {
  const nat = ew();
  if (nat) return nat.geluBackward(dinp, inp, dout, th, N);
  run('gelu_bwd', { dinp, inp, dout, th }, N, allShared(dinp, inp, dout, th), 1 << 16);
}

/** Softmax cross-entropy over rows, split across threads (see kernels.ts crossEntropyForward). */
export function crossEntropyForwardPar(logits: Float32Array, targets: Int32Array, losses: Float32Array, N: number, V: number): { loss: number; count: number } {
  let count = 0;
  for (let i = 0; i < N; i++) {
    if (targets[i] >= V) throw new InputError(`target ${targets[i]} at row ${i} is out of range [0, ${V})`);
    if (targets[i] >= 0) count++;
  }
  const nat = ew();
  if (nat) {
    nat.softmaxXent(logits, targets, losses, N, V);
    let total = 0;
    for (let i = 0; i < N; i++) if (targets[i] >= 0) total += losses[i];
    return { loss: count > 0 ? total / count : 0, count };
  }
  if (!allShared(logits, losses) || N * V < (1 << 20)) return crossEntropyForward(logits, targets, losses, N, V);
  const total = run('ce_fwd', { logits, targets, losses, V }, N, true, 2, 1);
  return { loss: count > 0 ? total / count : 0, count };
}

/** Index of the first NaN or infinity in x, or -1 (every tensor that crosses the boundary is checked). */
export function firstNonFinite(x: Float32Array): number {
  const nat = ew();
  if (nat && x.length >= 4096) return nat.firstNonFinite(x);
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) return i;
  return -1;
}

/**
 * Layer norm of rows [rows, C] along u (null: the ones vector, GPT-2's; sealed mode's u = Q^T 1)
 * on the addon's threads: mean = x.u / C, rstd = 1 / sqrt(|x - mean u|^2 / C + eps),
 * out = (x - mean u) rstd (* w + b). False (nothing done) without the addon.
 */
export function normForwardNative(out: Float32Array, mean: Float32Array, rstd: Float32Array, x: Float32Array, u: Float32Array | null, w: Float32Array | null, b: Float32Array | null, rows: number, C: number, eps: number): boolean {
  const nat = ew();
  nat?.normForward(out, mean, rstd, x, u, w, b, rows, C, eps);
  return nat !== null;
}

/**
 * Its backward: dx += (g - (g.u / C) u - z (g.z / C)) rstd for g = dout (* w) and the normalised
 * row z (along u, x is z itself and mean is unused; otherwise z = (x - mean) rstd); dw, db
 * (u null only) accumulate the affine part's gradients. False (nothing done) without the addon.
 */
export function normBackwardNative(dx: Float32Array, dw: Float32Array | null, db: Float32Array | null, dout: Float32Array, x: Float32Array, mean: Float32Array | null, rstd: Float32Array, u: Float32Array | null, w: Float32Array | null, rows: number, C: number): boolean {
  const nat = ew();
  nat?.normBackward(dx, dw, db, dout, x, mean, rstd, u, w, rows, C);
  return nat !== null;
}

/** a[mats, T, T] scores -> causal softmax probabilities on the addon's threads; false (a untouched) without it. */
export function causalSoftmaxNative(a: Float32Array, mats: number, T: number): boolean {
  const nat = ew();
  nat?.causalSoftmax(a, mats, T);
  return nat !== null;
}

/** a[n, n] (Gaussian) replaced by its Haar-orthogonal QR factor on the addon's threads; false (a untouched) without it. */
export function haarQrNative(a: Float64Array, n: number): boolean {
  const nat = n >= 32 ? ew() : null;
  nat?.haarQr(a, n);
  return nat !== null;
}

/**
 * Freivalds residuals of `rows` rows with two secret vectors, in float64: for row i and k = 0, 1,
 *   out[4i + k]     = lhs[i, :a] . p[:, k] - rhs[i, :b] . q[:, k] - c[k]
 *   out[4i + 2 + k] = the sum of the absolute values of those terms (the tolerance's scale)
 * p [a, 2], q [b, 2], c [2] or null.
 */
export function freivaldsRows(lhs: Float32Array, a: number, p: Float64Array, rhs: Float32Array, b: number, q: Float64Array, c: Float64Array | null, rows: number): Float64Array {
  const out = new Float64Array(4 * rows);
  const nat = ew();
  if (nat) {
    nat.freivaldsRows(lhs, a, p, rhs, b, q, c, rows, out);
    return out;
  }
  for (let i = 0; i < rows; i++) {
    let s0 = 0, s1 = 0, m0 = 0, m1 = 0;
    for (let j = 0; j < a; j++) {
      const y = lhs[i * a + j], z0 = y * p[2 * j], z1 = y * p[2 * j + 1];
      s0 += z0; s1 += z1; m0 += Math.abs(z0); m1 += Math.abs(z1);
    }
    for (let j = 0; j < b; j++) {
      const x = rhs[i * b + j], z0 = x * q[2 * j], z1 = x * q[2 * j + 1];
      s0 -= z0; s1 -= z1; m0 += Math.abs(z0); m1 += Math.abs(z1);
    }
    const c0 = c ? c[0] : 0, c1 = c ? c[1] : 0;
    out.set([s0 - c0, s1 - c1, m0 + Math.abs(c0), m1 + Math.abs(c1)], 4 * i);
  }
  return out;
}
