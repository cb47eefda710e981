/**
 * Integrity against a lying accelerator: Freivalds checks with secret vectors.
 *
 * For each obfuscated linear y = x W + b the enclave keeps K secret vectors r_k (d_out),
 * w_k = W r_k (d_in), c_k = b . r_k, and for the backward product dx = dy W^T secret s_k
 * (d_in) with v_k = W^T s_k (d_out). A reply is accepted only if, row by row,
 *   y r_k = x w_k + c_k   and   dx s_k = dy v_k
 * hold within float tolerance: O(n (d_in + d_out) K) work instead of recomputing the product.
 * A wrong entry, a skipped bias or stale weights fail the check unless the error happens to
 * be orthogonal to every secret vector (probability ~0 for Gaussian vectors).
 *
 * Under full fine-tuning the accelerator updates W with SGD-momentum; the enclave, which
 * knows every x it sent and every dy it computed, updates w, c, v the same way:
 *   G r = x^T (dy r),  G^T s = dy^T (x s),  buf <- mu buf + scale G,  W <- W - lr buf.
 * Tracking is in float64.
 */
import { ALL_LINEARS, type BlockLinearName } from '../model/block.js';
import { layerLinearNames, type AcceleratorWeights } from './linears.js';
import type { RandomSource } from '../tensor/rng.js';
import { sgdMomentumStep } from '../tensor/sgd.js';
import { freivaldsRows } from '../tensor/parallel.js';
import { sgemm } from '../tensor/gemm.js';
import { IntegrityError } from '../errors.js';

export const CHECK_VECTORS = 2;

export { IntegrityError } from '../errors.js';

interface Track {
  din: number;
  dout: number;
  /** the linear has a bias (its gradient trains and counts) */
  bias: boolean;
  r: Float64Array; // [dout, K]
  w: Float64Array; // [din, K]
  c: Float64Array; // [K]
  s: Float64Array; // [din, K]
  v: Float64Array; // [dout, K]
  // this step's gradient projections and the momentum buffers' projections
  gr: Float64Array; gc: Float64Array; gs: Float64Array;
  mr: Float64Array; mc: Float64Array; ms: Float64Array;
  touched: boolean;
  fresh: boolean;
  /** this step's exact ||dW||_F^2 + ||db||^2 and how many backward calls made it */
  exactSq: number;
  calls: number;
}

/** One linear's secret vectors (K per side): r [dout, K], s [din, K], w = W r [din, K], v = W^T s [dout, K], c = b . r [K]. */
export interface LinearCheck { r: Float32Array; s: Float32Array; w: Float32Array; v: Float32Array; c: Float32Array }
/** The secret vectors of every linear, per layer (an enclave bundle's `chk.{l}.{name}.{r,s,w,v,c}`). */
export type CheckVectors = Partial<Record<BlockLinearName, LinearCheck>>[];

/** Provider side: secret check vectors for every linear, computed from the obfuscated weights. */
export function makeCheckVectors(acc: AcceleratorWeights, rng: RandomSource, K = CHECK_VECTORS): CheckVectors {
  return acc.layers.map((layer) => {
    const rec: CheckVectors[number] = {};
    for (const name of layerLinearNames(layer)) {
      const { w: W, b, din, dout } = layer[name]!;
      const [r, s, w, v, c] = [dout * K, din * K, din * K, dout * K, K].map((n) => new Float64Array(n));
      rng.fillNormal(r);
      rng.fillNormal(s);
      for (let i = 0; i < din; i++) {
        const row = i * dout;
        for (let j = 0; j < dout; j++) {
          const x = W[row + j];
          for (let k = 0; k < K; k++) {
            w[i * K + k] += x * r[j * K + k];
            v[j * K + k] += x * s[i * K + k];
          }
        }
      }
      for (let j = 0; j < b.length; j++) for (let k = 0; k < K; k++) c[k] += b[j] * r[j * K + k]; // no bias: c = 0
      // w, v, c are stored rounded; the check tolerance absorbs it
      rec[name] = { r: Float32Array.from(r), s: Float32Array.from(s), w: Float32Array.from(w), v: Float32Array.from(v), c: Float32Array.from(c) };
    }
    return rec;
  });
}

export class IntegrityChecker {
  private tracks = new Map<string, Track>();
  /** scratch for the Gram matrices of accumulate (x x^T, dy dy^T) */
  private gram = new Float32Array(0);
  /** relative tolerance of a row check, against the sum of absolute terms */
  tol = 2e-5;
  checks = 0;
  ms = 0;

  /**
   * `chk` as the bundle loader checked it (every vector's size matches its linear);
   * `hasBias`: which linears have a bias (default all; the Llama family's mostly have none)
   */
  constructor(chk: CheckVectors, readonly K = CHECK_VECTORS, hasBias: (l: number, name: BlockLinearName) => boolean = () => true) {
    chk.forEach((layer, l) => {
      for (const name of ALL_LINEARS) {
        const chk = layer[name];
        if (!chk) continue;
        const [r, w, s, v, c] = (['r', 'w', 's', 'v', 'c'] as const).map((k) => Float64Array.from(chk[k]));
        const din = w.length / K, dout = r.length / K;
        this.tracks.set(`${l}.${name}`, {
          din, dout, bias: hasBias(l, name), r, w, c, s, v,
          gr: new Float64Array(din * K), gc: new Float64Array(K), gs: new Float64Array(dout * K),
          mr: new Float64Array(din * K), mc: new Float64Array(K), ms: new Float64Array(dout * K), touched: false, fresh: true, exactSq: 0, calls: 0,
        });
      }
    });
  }

  private track(l: number, name: BlockLinearName): Track {
    const t = this.tracks.get(`${l}.${name}`);
    if (!t) throw new Error(`no integrity vectors for h.${l}.${name}`);
    return t;
  }

  /** y[rows, dout] = x[rows, din] W + b ? */
  checkForward(l: number, name: BlockLinearName, x: Float32Array, y: Float32Array, rows: number): void {
    const t = this.track(l, name);
    this.rowCheck(`forward of h.${l}.${name}`, y, t.r, t.dout, x, t.w, t.din, t.c, rows);
  }

  /** dx[rows, din] = dy[rows, dout] W^T ? */
  checkBackward(l: number, name: BlockLinearName, dy: Float32Array, dx: Float32Array, rows: number): void {
    const t = this.track(l, name);
    this.rowCheck(`backward of h.${l}.${name}`, dx, t.s, t.din, dy, t.v, t.dout, null, rows);
  }

  // lhs[rows, a] . p[a, K]  ==  rhs[rows, b] . q[b, K] + c   (K = 2, unrolled: this runs on every reply)
  private rowCheck(what: string, lhs: Float32Array, p: Float64Array, a: number, rhs: Float32Array, q: Float64Array, b: number, c: Float64Array | null, rows: number): void {
    if (this.K !== 2) throw new Error('integrity checks use two secret vectors');
    const t0 = performance.now();
    const r = freivaldsRows(lhs, a, p, rhs, b, q, c, rows);
    for (let i = 0; i < rows; i++) {
      const e0 = Math.abs(r[4 * i]), e1 = Math.abs(r[4 * i + 1]), m0 = r[4 * i + 2], m1 = r[4 * i + 3];
      // a non-finite value makes its row's scale infinite or NaN: refused as well
      if (!(e0 <= this.tol * m0 + 1e-6) || !(e1 <= this.tol * m1 + 1e-6) || !Number.isFinite(m0 + m1)) {
        const [err, m] = e0 / (m0 + 1e-30) > e1 / (m1 + 1e-30) ? [e0, m0] : [e1, m1];
        throw new IntegrityError(`integrity check failed: the accelerator's ${what} is wrong at row ${i} (secret-vector residual ${err.toExponential(2)}, tolerance ${(this.tol * m).toExponential(2)})`);
      }
    }
    this.checks += rows * 2;
    this.ms += performance.now() - t0;
  }

  /**
   * Records x^T dy of one backward call (full fine-tuning), projected on the secret vectors,
   * and the exact squared norm of that call's weight and bias gradients from the Gram
   * matrices of what the enclave sent: ||x^T dy||_F^2 = sum((x x^T) * (dy dy^T)),
   * ||1^T dy||^2 = sum(dy dy^T) (O(rows^2 (din + dout)), native GEMM).
   */
  accumulate(l: number, name: BlockLinearName, x: Float32Array, dy: Float32Array, rows: number): void {
    const t0 = performance.now();
    const t = this.track(l, name);
    const K = this.K;
    const { din, dout } = t;
    if (this.gram.length < 2 * rows * rows) this.gram = new Float32Array(2 * rows * rows);
    const gx = this.gram.subarray(0, rows * rows), gd = this.gram.subarray(rows * rows, 2 * rows * rows);
    sgemm(false, true, rows, rows, din, 1, x, din, x, din, 0, gx, rows);
    sgemm(false, true, rows, rows, dout, 1, dy, dout, dy, dout, 0, gd, rows);
    let w = 0, b = 0;
    for (let i = 0; i < gx.length; i++) {
      w += gx[i] * gd[i];
      b += gd[i];
    }
    t.exactSq += w + (t.bias ? b : 0);
    t.calls++;
    const dyr = new Float64Array(K);
    const xs = new Float64Array(K);
    for (let i = 0; i < rows; i++) {
      dyr.fill(0);
      xs.fill(0);
      for (let j = 0; j < dout; j++) { const g = dy[i * dout + j]; for (let k = 0; k < K; k++) dyr[k] += g * t.r[j * K + k]; }
      for (let j = 0; j < din; j++) { const g = x[i * din + j]; for (let k = 0; k < K; k++) xs[k] += g * t.s[j * K + k]; }
      for (let j = 0; j < din; j++) { const g = x[i * din + j]; for (let k = 0; k < K; k++) t.gr[j * K + k] += g * dyr[k]; }
      for (let j = 0; j < dout; j++) { const g = dy[i * dout + j]; for (let k = 0; k < K; k++) t.gs[j * K + k] += g * xs[k]; }
      if (t.bias) for (let k = 0; k < K; k++) t.gc[k] += dyr[k];
    }
    t.touched = true;
    this.ms += performance.now() - t0;
  }

  /** Mirrors the accelerator's SGD-momentum step on the tracked vectors. */
  applyUpdate(lr: number, momentum: number, scale: number): void {
    for (const t of this.tracks.values()) {
      if (!t.touched) continue;
      // the accelerator's own step (tensor/sgd.ts) on the projections w = W r, c = b r, v = W^T s
      const first = momentum === 0 || t.fresh;
      for (const [val, buf, g] of [[t.w, t.mr, t.gr], [t.c, t.mc, t.gc], [t.v, t.ms, t.gs]] as const) {
        sgdMomentumStep(val, g, buf, first, lr, momentum, scale);
      }
      t.fresh = momentum === 0 ? t.fresh : false;
    }
    this.reset(); // the step's projections are spent
  }

  /**
   * An unbiased estimate of the squared norm of this step's accumulated weight and bias
   * gradients over every linear, from their projections on the secret vectors (E||G r||^2 =
   * ||G||_F^2 for a Gaussian r; likewise G^T s and the bias's b.r): what the accelerator's
   * `grad_sq_norm` must roughly equal. Costs nothing beyond `accumulate`.
   */
  gradSqEstimate(): number {
    let total = 0;
    const K = this.K;
    for (const t of this.tracks.values()) {
      if (!t.touched) continue;
      let w = 0;
      for (const x of t.gr) w += x * x;
      for (const x of t.gs) w += x * x;
      let b = 0;
      for (const x of t.gc) b += x * x;
      total += w / (2 * K) + b / K;
    }
    return total;
  }

  /**
   * The exact squared norm of this step's weight and bias gradients over every linear (what
   * the accelerator's `grad_sq_norm` must equal up to float error), or null when a linear had
   * more than one backward call this step (cross terms not kept: the estimate remains).
   */
  gradSqExact(): number | null {
    let total = 0;
    for (const t of this.tracks.values()) {
      if (!t.touched) continue;
      if (t.calls !== 1) return null;
      total += t.exactSq;
    }
    return total;
  }

  /** Drops this step's accumulated projections (aborted step). */
  reset(): void {
    for (const t of this.tracks.values()) {
      t.gr.fill(0); t.gc.fill(0); t.gs.fill(0);
      t.touched = false;
      t.exactSq = 0;
      t.calls = 0;
    }
  }

  /** Serialisable tracked state (for checkpoints), float64. */
  state(): Map<string, Float64Array> {
    const m = new Map<string, Float64Array>();
    for (const [k, t] of this.tracks) {
      for (const [n, v] of [['w', t.w], ['c', t.c], ['v', t.v], ['mr', t.mr], ['mc', t.mc], ['ms', t.ms]] as const) m.set(`${k}.${n}`, v);
      m.set(`${k}.fresh`, Float64Array.of(t.fresh ? 1 : 0));
    }
    return m;
  }

  load(m: Map<string, Float64Array>): void {
    for (const [k, t] of this.tracks) {
      for (const n of ['w', 'c', 'v', 'mr', 'mc', 'ms'] as const) {
        const v = m.get(`${k}.${n}`);
        if (!v || v.length !== t[n].length) throw new Error(`integrity state "${k}.${n}" missing or of the wrong size`);
        t[n].set(v);
      }
      t.fresh = (m.get(`${k}.fresh`)?.[0] ?? 1) === 1;
      t.touched = false;
    }
  }
}
