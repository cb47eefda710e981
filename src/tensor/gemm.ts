/**
 * Single-precision matrix multiply: the one entry point every other module uses.
 *
 *   C[m,n] = alpha * op(A) op(B) + beta * C   (+ bias[n] added to every row)
 *
 * Row-major storage with BLAS semantics: op(A) is m x k; A is m x k (lda >= k) or, with
 * transA, k x m (lda >= m). Likewise op(B) is k x n: B is k x n (ldb >= n) or, with transB,
 * n x k (ldb >= k). beta == 0 never reads C (it may hold NaN). k == 0 or alpha == 0 gives
 * C = beta * C (+ bias). m == 0 or n == 0 does nothing.
 *
 * Two backends: the native addon (packed, cache-blocked SIMD kernels on a thread pool, see
 * native/) and a pure-TypeScript fallback (gemm_js.ts). Every argument is checked here,
 * before either backend runs, and a bad one throws an Error naming it.
 */
import { native, nativeLoadError } from './native.js';
import { sgemmBatchedJs, sgemmJsAt } from './gemm_js.js';

export type BackendName = 'native' | 'js';

let active: BackendName = native ? 'native' : 'js';

/** The backend currently in use. */
export function backendName(): BackendName {
  return active;
}

/** Backends that can be selected in this process. */
export function availableBackends(): BackendName[] {
  return native ? ['native', 'js'] : ['js'];
}

/** Selects a backend (for tests and benchmarks); throws when it is unavailable. */
export function setBackend(b: BackendName): void {
  if (b !== 'native' && b !== 'js') throw new Error(`setBackend: unknown backend '${String(b)}' (expected 'native' or 'js')`);
  if (b === 'native' && !native) throw new Error(`setBackend: the native backend is unavailable: ${nativeLoadError}`);
  active = b;
}

/** The native kernel's instruction set and thread count, or null without the addon. */
export function nativeInfo(): { isa: string; threads: number } | null {
  return native ? native.info() : null;
}

/** Sets the native thread count (1..256). No effect without the addon. */
export function setThreads(n: number): void {
  if (!Number.isInteger(n) || n < 1 || n > 256) throw new Error(`setThreads: n must be an integer between 1 and 256, got ${String(n)}`);
  native?.setThreads(n);
}

/**
 * Forces the native kernel ('avx512', 'avx2' or 'generic'); returns false when this CPU
 * or build does not have it (the current one stays). For tests and benchmarks.
 */
export function setNativeIsa(isa: 'avx512' | 'avx2' | 'generic'): boolean {
  return native ? native.setIsa(isa) : false;
}

// ------------------------------------------------------------------ checks

function fail(fn: string, msg: string): never {
  throw new Error(`${fn}: ${msg}`);
}

function checkBool(fn: string, name: string, v: unknown): void {
  if (typeof v !== 'boolean') fail(fn, `${name} must be a boolean, got ${describe(v)}`);
}

function checkDim(fn: string, name: string, v: unknown): asserts v is number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) fail(fn, `${name} must be a non-negative integer, got ${describe(v)}`);
}

function checkScalar(fn: string, name: string, v: unknown): asserts v is number {
  if (typeof v !== 'number' || !Number.isFinite(v)) fail(fn, `${name} must be a finite number, got ${describe(v)}`);
}

function checkF32(fn: string, name: string, v: unknown): asserts v is Float32Array {
  if (!(v instanceof Float32Array)) fail(fn, `${name} must be a Float32Array, got ${describe(v)}`);
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (typeof v === 'object') return (v as object).constructor?.name ?? 'object';
  if (typeof v === 'string') return `'${v}'`;
  return String(v);
}

/**
 * Checks one (possibly batched) row-major operand: `rows` x `cols` with leading dimension
 * `ld`, `batch` copies `stride` elements apart, all inside `buf`.
 */
function checkMatrix(fn: string, name: string, buf: Float32Array, rows: number, cols: number, ldName: string, ld: number,
  what: string, batch = 1, stride = 0, strideName = ''): void {
  if (ld < cols) fail(fn, `${ldName} (${ld}) must be >= ${cols}, the row length of ${name} (${what})`);
  if (rows === 0 || cols === 0 || batch === 0) return;
  const one = (rows - 1) * ld + cols;
  const need = (batch - 1) * stride + one;
  if (buf.length < need) {
    const shape = `a ${rows}x${cols} matrix with ${ldName}=${ld}` + (batch > 1 ? `, batch ${batch} with ${strideName}=${stride}` : '');
    fail(fn, `${name} is too short: ${shape} needs ${need} elements, ${name} has ${buf.length}`);
  }
}

/** Every argument of sgemm (`batch`: of sgemmBatched, with its strides), each operand inside its buffer. */
function checkGemm(fn: string, transA: unknown, transB: unknown, m: number, n: number, k: number, alpha: unknown,
  A: Float32Array, lda: number, B: Float32Array, ldb: number, beta: unknown, C: Float32Array, ldc: number,
  batch?: { strideA: number; strideB: number; strideC: number; batch: number }): void {
  for (const [name, v] of Object.entries({ transA, transB })) checkBool(fn, name, v);
  for (const [name, v] of Object.entries({ m, n, k, lda, ldb, ldc, ...batch })) checkDim(fn, name, v);
  for (const [name, v] of Object.entries({ alpha, beta })) checkScalar(fn, name, v);
  for (const [name, v] of Object.entries({ A, B, C })) checkF32(fn, name, v);
  const ab = m > 0 && n > 0 && k > 0;
  const [count, sA, sB, sC] = batch ? [batch.batch, batch.strideA, batch.strideB, batch.strideC] : [1, 0, 0, 0];
  checkMatrix(fn, 'A', A, ab ? (transA ? k : m) : 0, transA ? m : k, 'lda', lda, transA ? 'transA: A is k x m' : 'A is m x k', count, sA, 'strideA');
  checkMatrix(fn, 'B', B, ab ? (transB ? n : k) : 0, transB ? k : n, 'ldb', ldb, transB ? 'transB: B is n x k' : 'B is k x n', count, sB, 'strideB');
  checkMatrix(fn, 'C', C, m, n, 'ldc', ldc, 'C is m x n', count, sC, 'strideC');
}

// ------------------------------------------------------------------ GEMM

/** C[m,n] = alpha * op(A) op(B) + beta * C (+ bias[n] on every row). */
export function sgemm(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
  A: Float32Array, lda: number, B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number,
  bias?: Float32Array | null): void {
  const fn = 'sgemm';
  checkGemm(fn, transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  if (bias !== undefined && bias !== null) {
    checkF32(fn, 'bias', bias);
    if (bias.length !== n) fail(fn, `bias must have n = ${n} elements, has ${bias.length}`);
  }
  if (m === 0 || n === 0) return;
  const b = bias ?? null;
  if (active === 'native' && native) native.sgemm(transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, b);
  else sgemmJsAt(transA, transB, m, n, k, alpha, A, 0, lda, B, 0, ldb, beta, C, 0, ldc, b);
}

/** `batch` independent products; matrix i of A, B and C starts at i*strideA, i*strideB, i*strideC. */
export function sgemmBatched(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
  A: Float32Array, lda: number, strideA: number, B: Float32Array, ldb: number, strideB: number,
  beta: number, C: Float32Array, ldc: number, strideC: number, batch: number): void {
  checkGemm('sgemmBatched', transA, transB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, { strideA, strideB, strideC, batch });
  if (m === 0 || n === 0 || batch === 0) return;
  if (active === 'native' && native) native.sgemmBatched(transA, transB, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc, strideC, batch);
  else sgemmBatchedJs(transA, transB, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc, strideC, batch);
}

/** A butterfly program's steps (see butterfly): a gather or scatter by a permutation, or a stage. */
export const FLY_GATHER = 0, FLY_SCATTER = 1, FLY_STAGE = 2, FLY_STAGE_T = 3;

/**
 * Runs a butterfly program (token mixing) on the `sent` rows [X; S] of width w (S: the rows
 * after X's `xrows`; null: zeros) and writes the first `orows` rows of the result to out
 * [orows, w]. `ops` holds 4 values per step, (kind, m, t, off):
 *   FLY_GATHER   row i <- row perms[off + i]          FLY_SCATTER  row perms[off + i] <- row i
 *   FLY_STAGE    rows h m t + q t + s (q < m) <- the m x m block at mats[off] times them (FLY_STAGE_T: its transpose)
 * The native kernel runs the whole program on one slice of columns at a time, in cache.
 */
export function butterfly(ops: Int32Array, mats: Float32Array, perms: Int32Array, X: Float32Array, xrows: number, S: Float32Array | null, sent: number, w: number, out: Float32Array, orows: number): void {
  const fn = 'butterfly';
  for (const [k, v] of Object.entries({ xrows, sent, w, orows })) checkDim(fn, k, v);
  if (xrows > sent || orows > sent) throw new Error(`${fn}: xrows (${xrows}) and orows (${orows}) must be at most sent (${sent})`);
  if (X.length < xrows * w || (S && S.length < (sent - xrows) * w) || out.length < orows * w) throw new Error(`${fn}: X, S or out is shorter than its rows x ${w}`);
  if (active === 'native' && native) { native.butterfly(ops, mats, perms, X, xrows, S, sent, w, out, orows); return; }
  let cur = new Float32Array(sent * w);
  cur.set(X.subarray(0, xrows * w));
  if (S) cur.set(S.subarray(0, (sent - xrows) * w), xrows * w);
  for (let o = 0; o < ops.length; o += 4) {
    const [kind, m, t, off] = ops.subarray(o, o + 4), next = new Float32Array(sent * w);
    if (kind === FLY_GATHER || kind === FLY_SCATTER) {
      for (let i = 0; i < sent; i++) {
        const j = perms[off + i];
        if (kind === FLY_GATHER) next.set(cur.subarray(j * w, (j + 1) * w), i * w);
        else next.set(cur.subarray(i * w, (i + 1) * w), j * w);
      }
    } else sgemmBatchedJs(kind === FLY_STAGE_T, false, m, t * w, m, 1, mats.subarray(off, off + m * m), m, 0, cur, t * w, m * t * w, 0, next, t * w, m * t * w, sent / (m * t));
    cur = next;
  }
  out.set(cur.subarray(0, orows * w));
}
