/**
 * Defence 1: per-call token mixing, a decorator of the accelerator's linears. Every call
 * sends X~ = P [X*; S] instead of the obfuscated rows X* [n, d_in]: P is a fresh invertible
 * n' x n' matrix (n' = n + s) with P 1 = 1, and S are s shield rows drawn with the real rows'
 * statistics. Since P 1 = 1, P (Z W + 1 b) = P Z W + 1 b: the accelerator adds its bias as
 * before and the enclave keeps the first n rows of P^-1 Y~.
 *
 * Two schemes for P:
 *   butterfly (default)  the rows' index in mixed radix (b, ..., b, m_k), n' = b^(k-1) m_k;
 *                        per round a fresh permutation G, then one stage per digit: a fresh
 *                        block H diag(1, M) H (below) mixing the rows that differ only in
 *                        that digit. After one round every sent row depends on every row.
 *                        P = R_r G_r ... R_1 G_1, cond(P) <= kappa. Drawn in O(r k b^3 + r n'),
 *                        applied in O(r k n' b w) for width w, each stage one GEMM per value
 *                        of the higher digits (no copies but the permutation's).
 *   dense                P = H diag(1, P0) H over all n' rows (or blocks of `block` real rows):
 *                        H the Householder reflection with H e1 = 1 / sqrt(n'), P0 a
 *                        kappa-controlled mask of size n' - 1 (src/linalg/masks.ts). O(n'^3) to
 *                        draw, O(n'^2 w) to apply.
 *
 * Shields (`shields`): the row space of what is sent is that of [X*; S], so rows an attacker
 * can enumerate or sees repeated are hidden only when n' >= the width of the sent rows.
 * 'first-layer' pads layer 0's qkv input to d_in (its rows are functions of (token,
 * position) alone) and any other call with fewer rows than a block up to one block;
 * 'all' pads every call to its width; 'none' sends no shields.
 *
 * Backward, the weights frozen (LoRA, inference): a fresh P2 around [dY*; S2]. Backward,
 * the weights training (full fine-tuning): dY~ = P^-T [dY*; 0] with the forward's P, so that
 * X~^T dY~ = X*^T dY* and 1^T dY~ = 1^T dY* exactly, and dX* is the first n rows of
 * P^T (dY~ W*^T): one call. The client's Freivalds checks run unchanged on the mixed tensors.
 *
 * The mixed tensors are row combinations of tensors already obfuscated (and of shields
 * drawn from them): this module makes `Obfuscated` tensors only that way.
 */
import type { GPT2Config } from '../model/config.js';
import type { BlockLinearName, Linears } from '../model/block.js';
import { blockLinearDims } from '../model/family.js';
import { butterfly, FLY_GATHER, FLY_SCATTER, FLY_STAGE, FLY_STAGE_T, sgemm } from '../tensor/gemm.js';
import { KeyedRng, type RandomSource } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { kappaMask, oneStream, randomPermutation, spreadSingularValues } from '../linalg/masks.js';
import { asObfuscated, type Obfuscated } from '../protocol/messages.js';
import { InputError } from '../errors.js';

export const MIXING_SCHEMES = ['butterfly', 'dense'] as const;
export const SHIELD_POLICIES = ['first-layer', 'all', 'none'] as const;

export interface MixingConfig {
  /** how P is built (above) */
  scheme: (typeof MIXING_SCHEMES)[number];
  /** condition number of P (>= 1; 1: orthogonal) */
  kappa: number;
  /** butterfly: the radix b (0: 16); dense: real rows per block (0: one block over all rows) */
  block: number;
  /** butterfly rounds (0: one, and two where shields fill the width; see butterflyShape) */
  rounds: number;
  /** which calls get shield rows */
  shields: (typeof SHIELD_POLICIES)[number];
}

export const MIXING_DEFAULTS: MixingConfig = { scheme: 'butterfly', kappa: 10, block: 0, rounds: 0, shields: 'first-layer' };
/** the butterfly's rows per block when `block` is 0 */
export const BUTTERFLY_BLOCK = 16;

export function checkMixingConfig(c: MixingConfig): MixingConfig {
  if (!(MIXING_SCHEMES as readonly string[]).includes(c.scheme)) throw new InputError(`token mixing: the scheme must be one of ${MIXING_SCHEMES.join(', ')}, got ${c.scheme}`);
  if (!(c.kappa >= 1) || !Number.isFinite(c.kappa)) throw new InputError(`token mixing: kappa must be a finite number >= 1, got ${c.kappa}`);
  if (!Number.isInteger(c.block) || c.block < 0 || (c.scheme === 'butterfly' && c.block === 1)) throw new InputError(`token mixing: the block size must be an integer >= 0 (0: the scheme's default; a butterfly needs >= 2), got ${c.block}`);
  if (!Number.isInteger(c.rounds) || c.rounds < 0) throw new InputError(`token mixing: the rounds must be an integer >= 0 (0: as the call needs), got ${c.rounds}`);
  if (c.rounds > 0 && c.scheme !== 'butterfly') throw new InputError(`token mixing: rounds are the butterfly scheme's (scheme ${c.scheme} has none), got ${c.rounds}`);
  if (!(SHIELD_POLICIES as readonly string[]).includes(c.shields)) throw new InputError(`token mixing: shields must be one of ${SHIELD_POLICIES.join(', ')}, got ${c.shields}`);
  return c;
}

/** The settings in words (reports, bench and fidelity lines). */
export function mixingLabel(m: MixingConfig): string {
  const blocks = m.scheme === 'dense' ? (m.block ? `blocks of ${m.block} rows` : 'one block') : `radix ${m.block || BUTTERFLY_BLOCK}, ${m.rounds || 'auto'} rounds`;
  return `${m.scheme}, kappa ${m.kappa}, ${blocks}, shields ${m.shields}`;
}

/**
 * The butterfly's shape for at least n0 rows in radix b: the radices (b, ..., b, m_k), k >= 2
 * digits (one when n0 <= b) with m_k <= 2b, their product n' >= n0 (the rows n0..n' are
 * shields), and the rounds: one, or two where the shields fill the width (there the
 * coefficients of a candidate row in the sent rows are unique, and with two rounds each
 * coefficient of a real row is a sum over n' paths, like any other combination's; one round
 * has a single path per entry).
 */
export function butterflyShape(n0: number, b: number, shielded: boolean, rounds = 0): { radices: number[]; sent: number; rounds: number } {
  let radices = [n0];
  if (n0 > b) for (let k = 2; ; k++) {
    const last = Math.ceil(n0 / b ** (k - 1));
    if (last <= 2 * b) { radices = [...new Array<number>(k - 1).fill(b), last]; break; }
  }
  return { radices, sent: radices.reduce((a, r) => a * r, 1), rounds: rounds || (shielded ? 2 : 1) };
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

/** A Haar orthogonal k x k matrix (row-major): Gram-Schmidt on the rows of a Gaussian matrix, O(k^3), for small k. */
function smallHaar(k: number, rng: RandomSource): Float64Array {
  const g = new Float32Array(k * k);
  rng.fillNormal32(g);
  const A = Float64Array.from(g);
  for (let c = 0; c < k; c++) { // row c against the rows before it (a Gaussian matrix is well conditioned: one pass)
    const o = c * k;
    for (let q = 0; q < c; q++) {
      let dot = 0;
      for (let i = 0; i < k; i++) dot += A[q * k + i] * A[o + i];
      for (let i = 0; i < k; i++) A[o + i] -= dot * A[q * k + i];
    }
    let nn = 0;
    for (let i = 0; i < k; i++) nn += A[o + i] ** 2;
    const f = 1 / Math.sqrt(nn);
    for (let i = 0; i < k; i++) A[o + i] *= f;
  }
  return A;
}

/**
 * A fresh m x m block B with B 1 = 1 and cond(B) = kappa, and B^-1: B = H diag(1, M) H with
 * M = U S E, U Haar, S singular values spread over [1/kappa, 1], E a random signed permutation.
 */
function mixBlock(m: number, kappa: number, rng: RandomSource): [Float32Array, Float32Array] {
  if (m === 1) return [Float32Array.of(1), Float32Array.of(1)];
  const k = m - 1;
  const U = smallHaar(k, rng), s = spreadSingularValues(k, kappa, rng), e = randomPermutation(k, rng);
  const M = new Float64Array(k * k), Mi = new Float64Array(k * k);
  for (let q = 0; q < k; q++) {
    const sg = rng.nextU32() & 1 ? 1 : -1; // E[q, e[q]] = sg: M = U S E, M^-1 = E^T S^-1 U^T
    for (let i = 0; i < k; i++) { M[i * k + e[q]] = U[i * k + q] * s[q] * sg; Mi[e[q] * k + i] = (U[i * k + q] / s[q]) * sg; }
  }
  return [conjugate(M, m), conjugate(Mi, m)];
}

/**
 * s shield rows [s, d] with the real rows' statistics: the real rows' column mean, plus half
 * the variance from random combinations of the centred real rows (their covariance) and half
 * isotropic noise of the same total variance (which takes the shields out of the real rows'
 * span; with one real row, of its spread about its own mean); each row is then scaled to the
 * norm of a random real row.
 */
export function shieldRows(x: Float32Array, n: number, d: number, s: number, rng: RandomSource): Float32Array {
  const S = new Float32Array(s * d);
  if (s === 0) return S;
  const mu = new Float32Array(d);
  for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) mu[j] += x[i * d + j] / n;
  const xc = new Float32Array(n * d);
  let tot = 0, spread = 0;
  for (let i = 0; i < n * d; i++) { xc[i] = x[i] - mu[i % d]; tot += xc[i] * xc[i]; }
  if (n === 1) { // no spread across rows: that of the row about its mean
    const m = mu.reduce((a, v) => a + v, 0) / d;
    for (let j = 0; j < d; j++) spread += (mu[j] - m) ** 2;
  }
  const sigma = Math.sqrt((n > 1 ? tot / (n * d) : spread / d) / 2);
  rng.fillNormal32(S, sigma); // isotropic half
  const G = new Float32Array(s * n);
  rng.fillNormal32(G, Math.sqrt(1 / (2 * n))); // G xc: covariance xc^T xc / (2n) per row
  sgemm(false, false, s, d, n, 1, G, n, xc, d, 1, S, d);
  for (let i = 0; i < s; i++) {
    const row = S.subarray(i * d, (i + 1) * d);
    if (n > 1) for (let j = 0; j < d; j++) row[j] += mu[j];
    const k = rng.int(n);
    let target = 0, now = 0;
    for (let j = 0; j < d; j++) { target += x[k * d + j] ** 2; now += row[j] ** 2; }
    const f = now > 0 ? Math.sqrt(target / now) : 0;
    for (let j = 0; j < d; j++) row[j] *= f;
  }
  return S;
}

/** Shield rows for a block of real rows: (its rows [r, w], r, how many) -> [s, w]. */
type Shields = (xs: Float32Array, r: number, s: number) => Float32Array;

/** One call's mixing of `rows` real rows into `sent` rows. */
interface Plan {
  rows: number;
  sent: number;
  /** P [x; S] (`shields` null: S = 0), or P^-T [x; 0] (`invT`), for x [rows, w], into out [sent, w] */
  apply(x: Float32Array, w: number, invT: boolean, shields: Shields | null, out: Float32Array): void;
  /** the real rows of P^-1 y, or of P^T y (`transposeP`), into out [rows, w] */
  solve(y: Float32Array, w: number, out: Float32Array, transposeP: boolean): void;
  /** the enclave's multiply-adds x 2 of one apply or solve of width w */
  flops(w: number): number;
}

/** Dense P per block of real rows (each with its own shields). */
class DensePlan implements Plan {
  readonly sent: number;
  private readonly blocks: { r0: number; r: number; np: number; at: number; P: Float32Array; Pinv: Float32Array }[] = [];

  constructor(readonly rows: number, block: number, width: number, kappa: number, rng: RandomSource) {
    let sent = 0;
    const b = block > 0 ? block : rows;
    for (let r0 = 0; r0 < rows; r0 += b) {
      const r = Math.min(b, rows - r0), np = Math.max(r, width);
      if (np === 1) this.blocks.push({ r0, r, np, at: sent, P: Float32Array.of(1), Pinv: Float32Array.of(1) });
      else {
        const m = kappaMask(np - 1, kappa, oneStream(rng));
        // P^-1's first r rows suffice: the shields' rows of the reply are dropped
        this.blocks.push({ r0, r, np, at: sent, P: conjugate(m.m.data, np), Pinv: conjugate(m.inv.data, np).slice(0, r * np) });
      }
      sent += np;
    }
    this.sent = sent;
  }

  apply(x: Float32Array, w: number, invT: boolean, shields: Shields | null, out: Float32Array): void {
    const z = new Float32Array(this.sent * w); // [X_block; S_block] per block
    for (const k of this.blocks) {
      const xs = x.subarray(k.r0 * w, (k.r0 + k.r) * w);
      z.set(xs, k.at * w);
      if (shields && k.np > k.r) z.set(shields(xs, k.r, k.np - k.r), (k.at + k.r) * w);
    }
    // P^-T [dY; 0] per block: (P^-1[:r, :])^T dY_block (the zero rows contribute nothing)
    for (const k of this.blocks) {
      if (invT) sgemm(true, false, k.np, w, k.r, 1, k.Pinv, k.np, z.subarray(k.at * w), w, 0, out.subarray(k.at * w), w);
      else sgemm(false, false, k.np, w, k.np, 1, k.P, k.np, z.subarray(k.at * w), w, 0, out.subarray(k.at * w), w);
    }
  }

  solve(y: Float32Array, w: number, out: Float32Array, transposeP: boolean): void {
    for (const k of this.blocks) {
      const ys = y.subarray(k.at * w), os = out.subarray(k.r0 * w);
      // (P^T)[:r, :] = (P[:, :r])^T: read P transposed, its first r columns
      if (transposeP) sgemm(true, false, k.r, w, k.np, 1, k.P, k.np, ys, w, 0, os, w);
      else sgemm(false, false, k.r, w, k.np, 1, k.Pinv, k.np, ys, w, 0, os, w);
    }
  }

  flops(w: number): number {
    return this.blocks.reduce((a, k) => a + 2 * k.np * k.np * w, 0);
  }
}

/**
 * The butterfly over [X; S] (above), run by tensor/gemm.ts butterfly. A stage along digit s
 * (radix m, stride t = the product of the lower radices) mixes rows h m t + q t + u (q < m) with
 * the stage's fresh block B. Every block has B 1 = 1, so P 1 = 1.
 */
class ButterflyPlan implements Plan {
  /** the blocks (per stage B, then B^-1) and the permutations (per round), as the programs index them */
  private readonly mats: Float32Array;
  private readonly perms: Int32Array;
  /** (m, t, offset of B, offset of B^-1) per stage, rounds in order */
  private readonly stages: [number, number, number, number][][] = [];

  constructor(readonly rows: number, readonly sent: number, radices: number[], rounds: number, kappa: number, rng: RandomSource) {
    const kb = kappa ** (1 / (rounds * radices.length)); // cond(P) <= the product of the stages' conditions = kappa
    const blocks: Float32Array[] = [];
    let at = 0;
    this.perms = new Int32Array(rounds * sent);
    for (let r = 0; r < rounds; r++) {
      let t = 1;
      this.stages.push(radices.map((m) => {
        const [B, Binv] = mixBlock(m, kb, rng);
        blocks.push(B, Binv);
        const st: [number, number, number, number] = [m, t, at, at + m * m];
        at += 2 * m * m;
        t *= m;
        return st;
      }));
      this.perms.set(randomPermutation(sent, rng), r * sent);
    }
    this.mats = new Float32Array(at);
    blocks.reduce((o, b) => (this.mats.set(b, o), o + b.length), 0);
  }

  private run(ops: number[], x: Float32Array, xrows: number, shields: Float32Array | null, w: number, out: Float32Array, orows: number): void {
    butterfly(Int32Array.from(ops), this.mats, this.perms, x, xrows, shields, this.sent, w, out, orows);
  }

  apply(x: Float32Array, w: number, invT: boolean, shields: Shields | null, out: Float32Array): void {
    // P z: per round, gather by its permutation, then its stages; P^-T = ... D^-T G likewise
    const ops = this.stages.flatMap((rd, r) => [FLY_GATHER, 0, 0, r * this.sent, ...rd.flatMap(([m, t, b, bi]) => invT ? [FLY_STAGE_T, m, t, bi] : [FLY_STAGE, m, t, b])]);
    const S = shields && this.sent > this.rows ? shields(x.subarray(0, this.rows * w), this.rows, this.sent - this.rows) : null;
    this.run(ops, x, this.rows, S, w, out, this.sent);
  }

  solve(y: Float32Array, w: number, out: Float32Array, transposeP: boolean): void {
    // P^-1 = G_1^T R_1^-1 ... G_r^T R_r^-1, R^-1 the stages' inverses last first (P^T likewise with B^T); then the scatter
    const ops = [...this.stages.keys()].reverse().flatMap((r) => [...this.stages[r]].reverse()
      .flatMap(([m, t, b, bi]) => transposeP ? [FLY_STAGE_T, m, t, b] : [FLY_STAGE, m, t, bi]).concat([FLY_SCATTER, 0, 0, r * this.sent]));
    this.run(ops, y, this.sent, null, w, out, this.rows);
  }

  flops(w: number): number {
    return this.stages.reduce((a, rd) => a + rd.reduce((q, [m]) => q + 2 * m * this.sent * w, 0), 0);
  }
}

export interface MixingStats {
  calls: number;
  /** rows sent to the accelerator, and the real rows among them */
  rowsSent: number;
  rowsReal: number;
  /** the accelerator's FLOPs on what was sent, and on the real rows alone (2 x multiply-adds) */
  flopsSent: number;
  flopsReal: number;
  /** the enclave's FLOPs mixing and unmixing */
  mixFlops: number;
  /** time spent drawing P and the shields, mixing and unmixing */
  ms: number;
}

/** The accelerator's linears behind per-call token mixing. */
export class MixedLinears implements Linears<Obfuscated, BlockLinearName> {
  /** the forward's mixing of each linear in this step (full fine-tuning's backward uses it) */
  private plans = new Map<string, Plan>();
  /** the job's mixing key (secret, fresh per job unless given) and the stream of the current epoch */
  private key: Buffer;
  private rng: KeyedRng;
  /** the buffers of what is sent and of what comes back unmixed, per linear and direction, reused every step */
  private readonly buffers = new Map<string, Float32Array>();
  readonly stats: MixingStats = { calls: 0, rowsSent: 0, rowsReal: 0, flopsSent: 0, flopsReal: 0, mixFlops: 0, ms: 0 };

  constructor(
    readonly inner: Linears<Obfuscated, BlockLinearName> & { reset?(): void }, private readonly config: GPT2Config,
    readonly o: MixingConfig & { trainWeights: boolean; rng?: KeyedRng },
  ) {
    checkMixingConfig(o);
    this.rng = o.rng ?? KeyedRng.secure();
    this.key = this.rng.key;
  }

  /** The job's mixing key (32 bytes; a checkpoint keeps it so that a resumed run mixes as the uninterrupted one). */
  get mixingKey(): Buffer {
    return this.key;
  }

  /** Takes a job's key (a resumed run), starting its first epoch. */
  setMixingKey(key: Buffer): void {
    this.key = Buffer.from(key);
    this.rng = new KeyedRng(this.key);
  }

  /**
   * Starts a named epoch (a training step, an evaluation): its mixings come from
   * SHA-256(key || label), so a step's P and shields do not depend on what ran before it.
   */
  epoch(label: string): void {
    this.rng = new KeyedRng(this.key).derive(label);
  }

  /**
   * A fresh mixing of `rows` rows of width `width` (the sent tensor's) for a call of h.l.name:
   * shields up to the width where the policy puts them, else (except 'none') up to one block.
   */
  private plan(l: number, name: BlockLinearName, rows: number, width: number, forward: boolean): Plan {
    const { scheme, shields, kappa } = this.o;
    const full = shields === 'all' || (shields === 'first-layer' && forward && l === 0 && name === 'qkv');
    if (scheme === 'dense') return new DensePlan(rows, this.o.block, full ? width : shields === 'none' ? 1 : Math.min(width, BUTTERFLY_BLOCK), kappa, this.rng);
    const b = this.o.block || BUTTERFLY_BLOCK;
    const n0 = full ? Math.max(rows, width) : shields === 'none' ? rows : Math.max(rows, Math.min(b, width));
    const shape = butterflyShape(n0, b, full && n0 >= width, this.o.rounds);
    return new ButterflyPlan(rows, shape.sent, shape.radices, shape.rounds, kappa, this.rng);
  }

  /**
   * The buffer of n floats for `key`, in shared memory (the threaded GELU reads the fc output),
   * reused by the next call with that key: keys name a layer where the tensor must live
   * through the step (activations; inputs the accelerator keeps for the weight gradient), else
   * only the linear. A recorded view copies what it keeps.
   */
  private buffer(key: string, n: number): Float32Array {
    let b = this.buffers.get(key);
    if (!b || b.length !== n) this.buffers.set(key, (b = sharedFloat32(n)));
    return b;
  }

  /** P [x; shields], or P^-T [x; 0] (`invT`): [sent, w] (shields drawn from x's statistics) */
  private mix(p: Plan, x: Float32Array, w: number, key: string, invT = false): Obfuscated {
    const out = this.buffer(`${key}.sent`, p.sent * w);
    p.apply(x, w, invT, invT ? null : (xs, r, s) => shieldRows(xs, r, w, s, this.rng), out);
    this.stats.mixFlops += p.flops(w);
    return asObfuscated(out);
  }

  /** the real rows back: of P^-1 y~, or of P^T y~ (`transposeP`), [rows, w] */
  private unmix(p: Plan, y: Float32Array, w: number, key: string, transposeP: boolean): Obfuscated {
    const out = this.buffer(key, p.rows * w);
    p.solve(y, w, out, transposeP);
    this.stats.mixFlops += p.flops(w);
    return asObfuscated(out);
  }

  private timed<T>(f: () => T): T {
    const t0 = performance.now();
    try { return f(); } finally { this.stats.ms += performance.now() - t0; }
  }

  async forward(l: number, name: BlockLinearName, x: Obfuscated, rows: number, train: boolean): Promise<Obfuscated> {
    const [din, dout] = blockLinearDims(this.config, name);
    if (x.length !== rows * din) throw new InputError(`token mixing: input of h.${l}.${name} has ${x.length} values, expected ${rows} x ${din}`);
    const p = this.timed(() => this.plan(l, name, rows, din, true));
    const keep = train && this.o.trainWeights; // the accelerator keeps what was sent until the backward
    const xm = this.timed(() => this.mix(p, x, din, keep ? `${l}.${name}.x` : `${name}.x`));
    this.count(p, din * dout);
    const ym = await this.inner.forward(l, name, xm, p.sent, train);
    if (keep) this.plans.set(`${l}.${name}`, p);
    // the outputs live in the step's activations (the fc output feeds the threaded GELU)
    return this.timed(() => this.unmix(p, ym, dout, `${l}.${name}`, false));
  }

  async backward(l: number, name: BlockLinearName, dy: Obfuscated, rows: number, input: boolean): Promise<Obfuscated | null> {
    const [din, dout] = blockLinearDims(this.config, name);
    if (dy.length !== rows * dout) throw new InputError(`token mixing: output gradient of h.${l}.${name} has ${dy.length} values, expected ${rows} x ${dout}`);
    const key = `${name}.dx`; // consumed before the next call of this linear
    if (this.o.trainWeights) {
      const p = this.plans.get(`${l}.${name}`);
      if (!p || p.rows !== rows) throw new Error(`internal: no token mixing recorded for the forward of h.${l}.${name}`);
      this.plans.delete(`${l}.${name}`);
      // dY~ = P^-T [dY*; 0]
      const dym = this.timed(() => this.mix(p, dy, dout, `${name}.dy`, true));
      this.count(p, din * dout * (input ? 2 : 1)); // the weight gradient, and dX when asked
      const dxm = await this.inner.backward(l, name, dym, p.sent, input);
      return dxm && this.timed(() => this.unmix(p, dxm, din, key, true));
    }
    if (!input) return null;
    const p = this.timed(() => this.plan(l, name, rows, dout, false));
    const dym = this.timed(() => this.mix(p, dy, dout, `${name}.dy`));
    this.count(p, din * dout);
    const dxm = await this.inner.backward(l, name, dym, p.sent, true);
    return dxm && this.timed(() => this.unmix(p, dxm, din, key, false));
  }

  /** one accelerator call: its rows, and its FLOPs (2 x rows x `madds` per row) */
  private count(p: Plan, madds: number): void {
    this.stats.calls++;
    this.stats.rowsSent += p.sent;
    this.stats.rowsReal += p.rows;
    this.stats.flopsSent += 2 * p.sent * madds;
    this.stats.flopsReal += 2 * p.rows * madds;
  }

  /** Forgets this step's mixings (an aborted step) and the inner client's record. */
  reset(): void {
    this.plans.clear();
    this.inner.reset?.();
  }
}
