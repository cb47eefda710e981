/**
 * Loads the native GEMM addon (native/build/Release/obfuscatune_native.node).
 *
 * Environment:
 *  - OBFUSCATUNE_BACKEND=js      never load the addon (pure-TypeScript kernels only)
 *  - OBFUSCATUNE_BACKEND=native  the addon must load; otherwise importing this module throws
 *  - unset                       use the addon when it loads, else warn once on stderr and fall back
 *  - OBFUSCATUNE_THREADS=N       native thread count (default: os.availableParallelism())
 *  - OBFUSCATUNE_ISA=avx2|generic  run a narrower instruction set's kernels than the CPU has
 *                                (to measure an AVX2 machine's code path on an AVX-512 one)
 *
 * The addon trusts nothing it is given, but the argument checks with readable messages live in
 * gemm.ts; call the addon through that module rather than directly.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeAddon {
  sgemm(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
    A: Float32Array, lda: number, B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number,
    bias?: Float32Array | null): void;
  sgemmBatched(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
    A: Float32Array, lda: number, strideA: number, B: Float32Array, ldb: number, strideB: number,
    beta: number, C: Float32Array, ldc: number, strideC: number, batch: number): void;
  /** AdamW over whole buffers on the addon's threads (see kernels_ew.ts adamwRange). */
  adamw(params: Float32Array, grads: Float32Array, m: Float32Array, v: Float32Array, mask: Uint8Array | null,
    lr: number, beta1: number, beta2: number, eps: number, weightDecay: number, c1: number, c2: number, gradScale: number): void;
  /** Index of the first NaN or infinity in x, or -1. */
  firstNonFinite(x: Float32Array): number;
  /** Freivalds residuals and their scales per row, two secret vectors (see tensor/parallel.ts freivaldsRows). */
  freivaldsRows(lhs: Float32Array, a: number, p: Float64Array, rhs: Float32Array, b: number, q: Float64Array, c: Float64Array | null, rows: number, out: Float64Array): void;
  /** a[n*n] (row-major, Gaussian) replaced by the Q of its Householder QR, columns signed by diag(R): Haar. */
  haarQr(a: Float64Array, n: number): void;
  /** One butterfly program over [X; S] into out (see gemm.ts butterfly). */
  butterfly(ops: Int32Array, mats: Float32Array, perms: Int32Array, X: Float32Array, xrows: number, S: Float32Array | null, sent: number, w: number, out: Float32Array, orows: number): void;
  /** Layer norm of rows along u (null: GPT-2's), affine part w, b optional (see tensor/parallel.ts normForwardNative). */
  normForward(out: Float32Array, mean: Float32Array, rstd: Float32Array, x: Float32Array, u: Float32Array | null, w: Float32Array | null, b: Float32Array | null, rows: number, C: number, eps: number): void;
  /** Its backward (see tensor/parallel.ts normBackwardNative). */
  normBackward(dx: Float32Array, dw: Float32Array | null, db: Float32Array | null, dout: Float32Array, x: Float32Array, mean: Float32Array | null, rstd: Float32Array, u: Float32Array | null, w: Float32Array | null, rows: number, C: number): void;
  /** x = 0, on the addon's threads. */
  zero(x: Float32Array): void;
  /** Sum of squares (float64; the same for any thread count). */
  sumSquares(x: Float32Array): number;
  geluForward(out: Float32Array, inp: Float32Array, th: Float32Array | null, n: number): void;
  geluBackward(dinp: Float32Array, inp: Float32Array, dout: Float32Array, th: Float32Array | null, n: number): void;
  /** logits[rows, V] -> probabilities; losses[r] = -log p[target] (0 where target < 0). */
  softmaxXent(logits: Float32Array, targets: Int32Array, losses: Float32Array, rows: number, V: number): void;
  causalSoftmax(a: Float32Array, mats: number, T: number): void;
  /** Active instruction set ('avx512', 'avx2' or 'generic') and thread count. */
  info(): { isa: string; threads: number };
  setThreads(n: number): void;
  /** Forces a kernel ('avx512' | 'avx2' | 'generic'); false when this CPU or build lacks it. */
  setIsa(isa: string): boolean;
}

const ADDON_FILE = path.join('native', 'build', 'Release', 'obfuscatune_native.node');

/** Finds the addon by walking up from this file (src/tensor or dist/src/tensor) to the package root. */
function findAddon(): string | null {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, ADDON_FILE);
    if (existsSync(candidate)) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  return null;
}

function parseThreads(raw: string | undefined): number {
  if (raw === undefined || raw.trim() === '') return Math.max(1, os.availableParallelism());
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 256) {
    throw new Error(`OBFUSCATUNE_THREADS must be an integer between 1 and 256, got '${raw}'`);
  }
  return n;
}

function load(): { addon: NativeAddon | null; error: string | null } {
  const raw = process.env.OBFUSCATUNE_BACKEND?.trim().toLowerCase() ?? '';
  if (raw !== '' && raw !== 'native' && raw !== 'js') {
    throw new Error(`OBFUSCATUNE_BACKEND must be 'native' or 'js', got '${process.env.OBFUSCATUNE_BACKEND}'`);
  }
  if (raw === 'js') return { addon: null, error: 'disabled by OBFUSCATUNE_BACKEND=js' };
  let addon: NativeAddon | null = null;
  let error: string | null = null;
  const file = findAddon();
  if (!file) {
    error = `${ADDON_FILE} not found (build it with \`npm run install\` or \`node scripts/build-native.mjs\`)`;
  } else {
    try {
      addon = createRequire(import.meta.url)(file) as NativeAddon;
    } catch (e) {
      error = `failed to load ${file}: ${(e as Error).message}`;
    }
  }
  if (!addon) {
    if (raw === 'native') throw new Error(`OBFUSCATUNE_BACKEND=native but the native GEMM addon is unavailable: ${error}`);
    // Written directly (not process.emitWarning) so that --no-warnings cannot hide it.
    process.stderr.write(`obfuscatune: warning: native GEMM addon unavailable (${error}); using the much slower TypeScript kernels\n`);
    return { addon: null, error };
  }
  addon.setThreads(parseThreads(process.env.OBFUSCATUNE_THREADS));
  const isa = process.env.OBFUSCATUNE_ISA?.trim().toLowerCase();
  if (isa && !((isa === 'avx512' || isa === 'avx2' || isa === 'generic') && addon.setIsa(isa))) {
    throw new Error(`OBFUSCATUNE_ISA must be an instruction set this CPU and build have (avx512, avx2 or generic), got '${process.env.OBFUSCATUNE_ISA}'`);
  }
  return { addon, error: null };
}

const loaded = load();

/** The addon, or null when it is disabled or failed to load. */
export const native: NativeAddon | null = loaded.addon;
/** Why the addon is not available (null when it is). */
export const nativeLoadError: string | null = loaded.error;
