/**
 * decode-public-base: with the basis that weight-alignment recovers (Q in sealed mode, R1^-1 in
 * paper mode), every first-layer row the accelerator saw maps back to a plain layer-norm
 * output LN(wte[t] + wpe[p]); the nearest (token, position) of the public model decodes it.
 *
 * Nearest over the whole vocabulary at once: with c(.) the centring, a candidate is
 * g * (c(e_t) + c(p)) / s_tp + beta with s_tp^2 = |c(e_t) + c(p)|^2 / d + eps, so
 * |a - cand|^2 needs only a . (g c(e_t)) (one GEMM per batch), per-position dot products
 * with the vocabulary (cached) and norms.
 */
import type { GPT2Weights } from '../model/weights.js';
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { InputError } from '../errors.js';
import { gemm, gemmABt } from './linalg.js';
import { alignWeights, type Alignment } from './weight_alignment.js';
import { firstLayerBatches, truthOf, scoredRow, resultBase, corpusStats, mode, twoPhases, type AttackProgress, type AttackResult, type RowBatch } from './common.js';

interface PosTerms {
  Pg: Float32Array; // [d] g * c(p)
  cross1: Float32Array; // [V] c(e_t) . c(p)
  cross2: Float32Array; // [V] (g c(e_t)) . (g c(p))
  pN2: number;
  pgN2: number;
}

/** Nearest (token | position) of the public model's first layer-norm output. */
export class NearestToken {
  readonly V: number;
  readonly d: number;
  private readonly Ec: Float32Array;
  private readonly Eg: Float32Array;
  private readonly eN2: Float64Array;
  private readonly egN2: Float64Array;
  private readonly pos = new Map<number, PosTerms>();

  constructor(private readonly w: GPT2Weights, private readonly gain: Float32Array, private readonly beta: Float32Array) {
    const { vocab_size: V, n_embd: d } = w.config;
    this.V = V; this.d = d;
    const wte = w.layout.view(w.params, 'wte');
    this.Ec = new Float32Array(V * d);
    this.Eg = new Float32Array(V * d);
    this.eN2 = new Float64Array(V);
    this.egN2 = new Float64Array(V);
    for (let t = 0; t < V; t++) {
      let m = 0;
      for (let j = 0; j < d; j++) m += wte[t * d + j];
      m /= d;
      let s1 = 0, s2 = 0;
      for (let j = 0; j < d; j++) {
        const c = wte[t * d + j] - m;
        this.Ec[t * d + j] = c;
        this.Eg[t * d + j] = c * gain[j];
        s1 += c * c; s2 += (c * gain[j]) ** 2;
      }
      this.eN2[t] = s1; this.egN2[t] = s2;
    }
  }

  private terms(p: number): PosTerms {
    let t = this.pos.get(p);
    if (t) return t;
    const { d, V } = this;
    if (p < 0 || p >= this.w.config.n_ctx) throw new InputError(`position ${p} is outside the model's context`);
    const wpe = this.w.layout.view(this.w.params, 'wpe').subarray(p * d, (p + 1) * d);
    let m = 0;
    for (let j = 0; j < d; j++) m += wpe[j];
    m /= d;
    const Pc = new Float32Array(d), Pg = new Float32Array(d);
    let pN2 = 0, pgN2 = 0;
    for (let j = 0; j < d; j++) { Pc[j] = wpe[j] - m; Pg[j] = Pc[j] * this.gain[j]; pN2 += Pc[j] ** 2; pgN2 += Pg[j] ** 2; }
    const cross1 = gemm(this.Ec, Pc, V, 1, d);
    const cross2 = gemm(this.Eg, Pg, V, 1, d);
    t = { Pg, cross1, cross2, pN2, pgN2 };
    this.pos.set(p, t);
    return t;
  }

  /** squared distances of rows a [m, d] at positions pos to every token: best token and its distance per row */
  decode(a: Float32Array, m: number, pos: ArrayLike<number>, eps: number): { tokens: Int32Array; dist: Float64Array } {
    const { d, V } = this;
    const tokens = new Int32Array(m), dist = new Float64Array(m);
    const CH = 128;
    for (let r0 = 0; r0 < m; r0 += CH) {
      const k = Math.min(CH, m - r0);
      const ap = new Float32Array(k * d);
      for (let r = 0; r < k; r++) for (let j = 0; j < d; j++) ap[r * d + j] = a[(r0 + r) * d + j] - this.beta[j];
      const dots = gemmABt(ap, this.Eg, k, V, d);
      for (let r = 0; r < k; r++) {
        const T = this.terms(pos[r0 + r]);
        let aPg = 0, aa = 0;
        for (let j = 0; j < d; j++) { aPg += ap[r * d + j] * T.Pg[j]; aa += ap[r * d + j] ** 2; }
        let best = Infinity, bt = 0;
        const o = r * V;
        for (let t = 0; t < V; t++) {
          const s2 = (this.eN2[t] + 2 * T.cross1[t] + T.pN2) / d + eps;
          const s = 1 / Math.sqrt(s2);
          const dd = -2 * s * (dots[o + t] + aPg) + (this.egN2[t] + 2 * T.cross2[t] + T.pgN2) / s2;
          if (dd < best) { best = dd; bt = t; }
        }
        tokens[r0 + r] = bt;
        dist[r0 + r] = best + aa;
      }
    }
    return { tokens, dist };
  }
}

/** The first-layer rows of a batch carried back to the plain layer-norm space with the recovered basis. */
export function toPlainRows(al: Alignment, b: RowBatch): Float32Array {
  const d = b.cols;
  if (al.mode === 'sealed') return gemm(b.data, al.Q!, b.rows, d, d, true); // n = n* Q^T
  return gemm(b.data, al.R1inv![0], b.rows, d, d); //                          a = a* R1^-1
}

/**
 * Row positions: the training layout r mod T for each divisor T of the rows, or a
 * continuation of the previous batch (generation through a KV cache); the hypothesis whose
 * sample rows lie nearest to the vocabulary wins.
 */
export function choosePositions(nt: NearestToken, a: Float32Array, rows: number, offset: number, nCtx: number, eps: number): Int32Array {
  const hyps: Int32Array[] = [];
  for (let T = 1; T <= Math.min(rows, nCtx); T++) if (rows % T === 0) hyps.push(Int32Array.from({ length: rows }, (_, r) => r % T));
  if (offset > 0 && offset + rows <= nCtx) hyps.push(Int32Array.from({ length: rows }, (_, r) => offset + r));
  if (hyps.length === 1) return hyps[0];
  const S = Math.min(rows, 48);
  const idx = Array.from({ length: S }, (_, i) => Math.floor((i * rows) / S));
  const d = nt.d;
  const sample = new Float32Array(S * d);
  idx.forEach((r, i) => sample.set(a.subarray(r * d, (r + 1) * d), i * d));
  let best = hyps[0], bestScore = Infinity;
  for (const h of hyps) {
    const { dist } = nt.decode(sample, S, idx.map((r) => h[r]), eps);
    const score = dist.reduce((s, x) => s + x, 0) / S;
    if (score < bestScore) { bestScore = score; best = h; }
  }
  return best;
}

export interface DecodeOptions {
  /** public corpus (JSONL) for the baseline guess */
  corpus: string;
  maxBatches?: number;
  onProgress?: AttackProgress;
}

export function decodePublicBaseAttack(view: LoadedView, publicBase: GPT2Weights, truth: ViewTruth, o: DecodeOptions): AttackResult {
  const t0 = performance.now();
  const batches = firstLayerBatches(view, o.maxBatches);
  const phase = twoPhases(o.onProgress, batches.length);
  const al = alignWeights(view, publicBase, { onProgress: phase.first });
  const c = view.header.config;
  const d = c.n_embd;
  const lay = publicBase.layout, p = publicBase.params;
  const gain = al.mode === 'sealed' ? new Float32Array(d).fill(1) : Float32Array.from(lay.layer(p, 'ln1w', 0));
  const beta = al.mode === 'sealed' ? new Float32Array(d) : Float32Array.from(lay.layer(p, 'ln1b', 0));
  const nt = new NearestToken(publicBase, gain, beta);
  const stats = corpusStats(o.corpus, c.vocab_size, c.n_ctx, null, 0);
  const guess = mode(stats.overall) ?? 0;
  let ok = 0, base = 0, n = 0, offset = 0;
  const perBatch: number[] = [];
  for (const [i, b] of batches.entries()) {
    phase.next(i, `decoding batch ${i + 1}/${batches.length}`);
    const a = toPlainRows(al, b);
    const pos = choosePositions(nt, a, b.rows, offset, c.n_ctx, c.layer_norm_epsilon);
    offset = pos[b.rows - 1] + 1;
    const t = truthOf(truth, b);
    if (!t) continue;
    const { tokens } = nt.decode(a, b.rows, pos, c.layer_norm_epsilon);
    let bo = 0, bn = 0;
    for (let r = 0; r < b.rows; r++) {
      if (!scoredRow(truth, t, r)) continue;
      bn++;
      if (tokens[r] === t.tokens[r]) bo++;
      if (guess === t.tokens[r]) base++;
    }
    ok += bo; n += bn;
    perBatch.push(bn ? bo / bn : NaN);
  }
  phase.next(batches.length, 'done');
  if (n === 0) throw new InputError(`view ${view.file}: no first-layer batch matches its truth file (nothing to score)`);
  return {
    ...resultBase(view, 'decode-public-base', 'public-base'),
    metric: 'token_recovery', value: ok / n, baseline: base / n, observed_batches: perBatch.length,
    details: { scored_tokens: n, per_batch: perBatch.slice(0, 20), seconds: (performance.now() - t0) / 1000, baseline_guess_token: guess },
  };
}
