/**
 * Defence 1: per-call token mixing, a decorator of the accelerator's linears. Every call
 * sends X~ = P [X*; S] instead of the obfuscated rows X* [n, d_in]: P is a fresh invertible
 * n' x n' matrix (n' = n + s) with P 1 = 1, and S are s shield rows (when n < d_in, so that
 * the sent rows span the whole input space) drawn with the real rows' statistics. Since
 * P 1 = 1, P (Z W + 1 b) = P Z W + 1 b: the accelerator adds its bias as before and the
 * enclave keeps the first n rows of P^-1 Y~.
 *
 *   P = H diag(1, P0) H, H the Householder reflection with H e1 = 1 / sqrt(n'), P0 a
 *   kappa-controlled mask of size n' - 1 (src/linalg/masks.ts; kappa > 1: not orthogonal).
 *
 * Backward, the weights frozen (LoRA, inference): a fresh P2 around [dY*; S2]. Backward,
 * the weights training (full fine-tuning): dY~ = P^-T [dY*; 0] with the forward's P, so that
 * X~^T dY~ = X*^T dY* and 1^T dY~ = 1^T dY* exactly, and dX* is the first n rows of
 * P^T (dY~ W*^T): one call. The client's Freivalds checks run unchanged on the mixed tensors.
 * `block` > 0 mixes blocks of that many real rows (each with its own shields) for cost.
 *
 * The mixed tensors are row combinations of tensors already obfuscated (and of shields
 * drawn from them): this module makes `Obfuscated` tensors only that way.
 */
import type { GPT2Config } from '../model/config.js';
import type { BlockLinearName, Linears } from '../model/block.js';
import { blockLinearDims } from '../model/family.js';
import { sgemm } from '../tensor/gemm.js';
import { KeyedRng, type RandomSource } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { kappaMask, oneStream } from '../linalg/masks.js';
import { asObfuscated, type Obfuscated } from '../protocol/messages.js';
import { InputError } from '../errors.js';

export interface MixingConfig {
  /** condition number of P0 (>= 1; 1: orthogonal P) */
  kappa: number;
  /** real rows per block of P (0: one block over all rows) */
  block: number;
  /** add shield rows up to d_in rows per block */
  shields: boolean;
}

export const MIXING_DEFAULTS: MixingConfig = { kappa: 10, block: 0, shields: true };

export function checkMixingConfig(c: MixingConfig): MixingConfig {
  if (!(c.kappa >= 1) || !Number.isFinite(c.kappa)) throw new InputError(`token mixing: kappa must be a finite number >= 1, got ${c.kappa}`);
  if (!Number.isInteger(c.block) || c.block < 0) throw new InputError(`token mixing: the block size must be an integer >= 0 (0: one block), got ${c.block}`);
  return c;
}

/** One block of a mixing: rows r0..r0+r of the real rows, mixed with s shields into n' = r + s rows. */
interface Block {
  r0: number;
  r: number;
  np: number;
  /** P [n', n'] */
  P: Float32Array;
  /** the first r rows of P^-1 [r, n'] */
  Pinv: Float32Array;
}

/** A mixing of `rows` real rows: its blocks, and where each block starts in the mixed tensor. */
interface Plan {
  rows: number;
  sent: number;
  blocks: Block[];
  at: number[];
}

/** P = H D H for D = diag(1, M) (M [n-1, n-1], row-major), H e1 = 1 / sqrt(n): O(n^2). */
function conjugate(M: Float64Array, n: number): Float32Array {
  const D = new Float64Array(n * n);
  D[0] = 1;
  if (n === 1) return Float32Array.from(D); // one row: P = [1]
  for (let i = 1; i < n; i++) D.set(M.subarray((i - 1) * (n - 1), i * (n - 1)), i * n + 1);
  const w = new Float64Array(n).fill(-1 / Math.sqrt(n));
  w[0] += 1; // e1 - u, normalised (H = I - 2 w w^T swaps e1 and u)
  const wn = Math.sqrt(w.reduce((a, v) => a + v * v, 0));
  for (let i = 0; i < n; i++) w[i] /= wn;
  const t = new Float64Array(n); // H D = D - 2 w (w^T D)
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) t[j] += w[i] * D[i * n + j];
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) D[i * n + j] -= 2 * w[i] * t[j];
  for (let i = 0; i < n; i++) { // (H D) H = HD - 2 (HD w) w^T
    let dw = 0;
    for (let j = 0; j < n; j++) dw += D[i * n + j] * w[j];
    for (let j = 0; j < n; j++) D[i * n + j] -= 2 * dw * w[j];
  }
  return Float32Array.from(D);
}

/** A fresh P with P 1 = 1 (and its inverse's first r rows). */
function drawBlock(r0: number, r: number, np: number, kappa: number, rng: RandomSource): Block {
  if (np === 1) return { r0, r, np, P: Float32Array.of(1), Pinv: Float32Array.of(1) };
  const m = kappaMask(np - 1, kappa, oneStream(rng));
  const P = conjugate(m.m.data, np);
  const Pinv = conjugate(m.inv.data, np).slice(0, r * np);
  return { r0, r, np, P, Pinv };
}

/**
 * s shield rows [s, d] with the real rows' statistics: the real rows' column mean, plus half
 * the variance from random combinations of the centred real rows (their covariance) and half
 * isotropic noise of the same total variance (which takes the shields out of the real rows'
 * span); each row is then scaled to the norm of a random real row.
 */
export function shieldRows(x: Float32Array, n: number, d: number, s: number, rng: RandomSource): Float32Array {
  const S = new Float32Array(s * d);
  if (s === 0) return S;
  const mu = new Float32Array(d);
  for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) mu[j] += x[i * d + j] / n;
  const xc = new Float32Array(n * d);
  let tot = 0;
  for (let i = 0; i < n * d; i++) { xc[i] = x[i] - mu[i % d]; tot += xc[i] * xc[i]; }
  const sigma = Math.sqrt(tot / (n * d) / 2);
  rng.fillNormal(S, sigma); // isotropic half
  const G = new Float32Array(s * n);
  rng.fillNormal(G, Math.sqrt(1 / (2 * n))); // G xc: covariance xc^T xc / (2n) per row
  sgemm(false, false, s, d, n, 1, G, n, xc, d, 1, S, d);
  for (let i = 0; i < s; i++) {
    const row = S.subarray(i * d, (i + 1) * d);
    for (let j = 0; j < d; j++) row[j] += mu[j];
    const k = rng.int(n);
    let target = 0, now = 0;
    for (let j = 0; j < d; j++) { target += x[k * d + j] ** 2; now += row[j] ** 2; }
    const f = now > 0 ? Math.sqrt(target / now) : 0;
    for (let j = 0; j < d; j++) row[j] *= f;
  }
  return S;
}

export interface MixingStats {
  calls: number;
  /** rows sent to the accelerator, and the real rows among them */
  rowsSent: number;
  rowsReal: number;
  /** time spent drawing P and the shields, mixing and unmixing */
  ms: number;
}

/** The accelerator's linears behind per-call token mixing. */
export class MixedLinears implements Linears<Obfuscated, BlockLinearName> {
  /** the forward's mixing of each linear in this step (full fine-tuning's backward uses it) */
  private plans = new Map<string, Plan>();
  private readonly config: GPT2Config;
  private readonly rng: RandomSource;
  private readonly shared = new Map<string, Float32Array>();
  readonly stats: MixingStats = { calls: 0, rowsSent: 0, rowsReal: 0, ms: 0 };

  constructor(readonly inner: Linears<Obfuscated, BlockLinearName> & { reset?(): void }, config: GPT2Config, readonly o: MixingConfig & { trainWeights: boolean; rng?: RandomSource }) {
    checkMixingConfig(o);
    this.config = config;
    this.rng = o.rng ?? KeyedRng.secure();
  }

  private plan(rows: number, din: number): Plan {
    const b = this.o.block > 0 ? this.o.block : rows;
    const blocks: Block[] = [], at: number[] = [];
    let sent = 0;
    for (let r0 = 0; r0 < rows; r0 += b) {
      const r = Math.min(b, rows - r0);
      const np = this.o.shields ? Math.max(r, din) : r;
      blocks.push(drawBlock(r0, r, np, this.o.kappa, this.rng));
      at.push(sent);
      sent += np;
    }
    return { rows, sent, blocks, at };
  }

  /** P [x_block; shields] per block: [sent, w] (shields drawn when `shield`, else zero rows). */
  private mix(p: Plan, x: Float32Array, w: number, shield: boolean): Obfuscated {
    const out = new Float32Array(p.sent * w);
    p.blocks.forEach((k, i) => {
      const z = new Float32Array(k.np * w);
      z.set(x.subarray(k.r0 * w, (k.r0 + k.r) * w));
      if (shield && k.np > k.r) z.set(shieldRows(x.subarray(k.r0 * w, (k.r0 + k.r) * w), k.r, w, k.np - k.r, this.rng), k.r * w);
      sgemm(false, false, k.np, w, k.np, 1, k.P, k.np, z, w, 0, out.subarray(p.at[i] * w), w);
    });
    return asObfuscated(out);
  }

  /** the real rows back: first r rows of P^-1 y~ per block ([rows, w]); `transposeP`: of P^T y~ */
  private unmix(p: Plan, y: Float32Array, w: number, key: string, transposeP: boolean): Obfuscated {
    let out = key ? this.shared.get(key) : undefined;
    if (!out || out.length !== p.rows * w) {
      out = key ? sharedFloat32(p.rows * w) : new Float32Array(p.rows * w);
      if (key) this.shared.set(key, out);
    }
    for (const [i, k] of p.blocks.entries()) {
      const ys = y.subarray(p.at[i] * w), os = out.subarray(k.r0 * w);
      // (P^T)[:r, :] = (P[:, :r])^T: read P transposed, its first r columns
      if (transposeP) sgemm(true, false, k.r, w, k.np, 1, k.P, k.np, ys, w, 0, os, w);
      else sgemm(false, false, k.r, w, k.np, 1, k.Pinv, k.np, ys, w, 0, os, w);
    }
    return asObfuscated(out);
  }

  private timed<T>(f: () => T): T {
    const t0 = performance.now();
    try { return f(); } finally { this.stats.ms += performance.now() - t0; }
  }

  async forward(l: number, name: BlockLinearName, x: Obfuscated, rows: number, train: boolean): Promise<Obfuscated> {
    const [din, dout] = blockLinearDims(this.config, name);
    if (x.length !== rows * din) throw new InputError(`token mixing: input of h.${l}.${name} has ${x.length} values, expected ${rows} x ${din}`);
    const p = this.timed(() => this.plan(rows, din));
    const xm = this.timed(() => this.mix(p, x, din, true));
    this.count(p);
    const ym = await this.inner.forward(l, name, xm, p.sent, train);
    if (train && this.o.trainWeights) this.plans.set(`${l}.${name}`, p);
    // the fc output feeds the threaded GELU (shared memory), and lives in the step's activations
    return this.timed(() => this.unmix(p, ym, dout, name === 'fc' ? `${l}.fc` : '', false));
  }

  async backward(l: number, name: BlockLinearName, dy: Obfuscated, rows: number, input: boolean): Promise<Obfuscated | null> {
    const [din, dout] = blockLinearDims(this.config, name);
    if (dy.length !== rows * dout) throw new InputError(`token mixing: output gradient of h.${l}.${name} has ${dy.length} values, expected ${rows} x ${dout}`);
    const key = name === 'fcproj' ? 'fcproj.dx' : '';
    if (this.o.trainWeights) {
      const p = this.plans.get(`${l}.${name}`);
      if (!p || p.rows !== rows) throw new Error(`internal: no token mixing recorded for the forward of h.${l}.${name}`);
      this.plans.delete(`${l}.${name}`);
      // dY~ = P^-T [dY*; 0]: per block (P^-1[:r, :])^T dY*_block
      const dym = this.timed(() => {
        const out = new Float32Array(p.sent * dout);
        p.blocks.forEach((k, i) => sgemm(true, false, k.np, dout, k.r, 1, k.Pinv, k.np, dy.subarray(k.r0 * dout), dout, 0, out.subarray(p.at[i] * dout), dout));
        return asObfuscated(out);
      });
      this.count(p);
      const dxm = await this.inner.backward(l, name, dym, p.sent, input);
      return dxm && this.timed(() => this.unmix(p, dxm, din, key, true));
    }
    if (!input) return null;
    const p = this.timed(() => this.plan(rows, din));
    const dym = this.timed(() => this.mix(p, dy, dout, true));
    this.count(p);
    const dxm = await this.inner.backward(l, name, dym, p.sent, true);
    return dxm && this.timed(() => this.unmix(p, dxm, din, key, false));
  }

  private count(p: Plan): void {
    this.stats.calls++;
    this.stats.rowsSent += p.sent;
    this.stats.rowsReal += p.rows;
  }

  /** Forgets this step's mixings (an aborted step) and the inner client's record. */
  reset(): void {
    this.plans.clear();
    this.inner.reset?.();
  }
}
