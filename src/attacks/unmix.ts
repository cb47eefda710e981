/**
 * unmix (public-base setting): against per-call token mixing. The attacker holds the public
 * base, so weight-alignment gives it the residual basis (sealed Q; paper R1^-1) and it carries
 * every first-layer call X~ = P [X; S] into the plain layer-norm space. Three attacks:
 *
 *   ica          FastICA (symmetric, tanh) on the call's rows: its d columns are d samples of
 *                an n'-dimensional mixture; each separated source is decoded to the public
 *                (token, position) row it is most parallel to, when the cosine is >= 0.95.
 *   dictionary   is a candidate first-layer row LN(wte[t] + wpe[p]) in the span of the call's
 *                rows? (relative residual <= 0.05 against an orthonormal basis of the rows). When
 *                n' < d the span is the real rows' and the candidates in it are the batch's bag of
 *                (token, position) pairs (a span holding more than twice as many candidates as
 *                its dimension is taken as uninformative).
 *   intersection the row spaces of consecutive calls intersect in the rows they share (a
 *                (token, position) pair in both batches); the dictionary on the intersection.
 *
 * Metric: bag-of-tokens recovery per batch: the attacker's n guesses (n: the batch's real rows;
 * its confident recoveries, the rest filled with the public corpus' most frequent tokens)
 * against the batch's tokens as a multiset, the better of ica and dictionary. Baseline: the n
 * guesses of the corpus prior alone. Scoring ignores positions and row order (the attack gets
 * the benefit of the doubt).
 */
import type { GPT2Weights } from '../model/weights.js';
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { haarOrthogonal, mat } from '../linalg/mat64.js';
import { KeyedRng } from '../tensor/rng.js';
import { InputError } from '../errors.js';
import { gemm, gemmABt, polar } from './linalg.js';
import { alignWeights } from './weight_alignment.js';
import { toPlainRows } from './decode.js';
import { firstLayerBatches, truthOf, scoredRow, resultBase, corpusStats, ranked, twoPhases, type AttackProgress, type AttackResult } from './common.js';

export interface UnmixOptions {
  /** public corpus (JSONL): the prior that fills guesses, and the baseline */
  corpus: string;
  maxBatches?: number;
  /** candidate positions 0..positions-1 (default min(n_ctx, 64)) */
  positions?: number;
  /** candidate tokens: the whole vocabulary (default), or only the tokens of the public corpus (faster) */
  vocab?: 'all' | 'corpus';
  seed?: number;
  onProgress?: AttackProgress;
}

/** An orthonormal basis [k, d] of the span of rows x [n, d] (modified Gram-Schmidt twice, float64). */
export function rowBasis(x: ArrayLike<number>, n: number, d: number, tol = 1e-6): Float64Array[] {
  const basis: Float64Array[] = [];
  let maxN = 0;
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let j = 0; j < d; j++) s += x[i * d + j] ** 2;
    maxN = Math.max(maxN, Math.sqrt(s));
  }
  for (let i = 0; i < n && basis.length < d; i++) {
    const v = Float64Array.from({ length: d }, (_, j) => x[i * d + j]);
    for (let pass = 0; pass < 2; pass++) {
      for (const u of basis) {
        let dot = 0;
        for (let j = 0; j < d; j++) dot += u[j] * v[j];
        for (let j = 0; j < d; j++) v[j] -= dot * u[j];
      }
    }
    const nv = Math.sqrt(v.reduce((a, b) => a + b * b, 0));
    if (nv <= tol * maxN) continue;
    for (let j = 0; j < d; j++) v[j] /= nv;
    basis.push(v);
  }
  return basis;
}

/** Symmetric FastICA with the tanh contrast on whitened signals z [k, m] (unit variance rows): the sources [k, m]. */
const ICA_ITERATIONS = 200;

export function fastIca(z: Float64Array, k: number, m: number, seed = 1, iters = ICA_ITERATIONS, onIteration?: (it: number) => void): Float64Array {
  let W = haarOrthogonal(k, KeyedRng.fromSeed(`ica:${seed}`));
  const Y = new Float64Array(k * m);
  const mul = (A: Float64Array) => { // Y = A z
    Y.fill(0);
    for (let i = 0; i < k; i++) for (let p = 0; p < k; p++) {
      const a = A[i * k + p];
      if (a !== 0) for (let j = 0; j < m; j++) Y[i * m + j] += a * z[p * m + j];
    }
  };
  for (let it = 0; it < iters; it++) {
    onIteration?.(it);
    mul(W.data);
    const Wn = mat(k, k);
    for (let i = 0; i < k; i++) {
      let gp = 0;
      for (let j = 0; j < m; j++) { const g = Math.tanh(Y[i * m + j]); Y[i * m + j] = g; gp += 1 - g * g; }
      for (let p = 0; p < k; p++) {
        let s = 0;
        for (let j = 0; j < m; j++) s += Y[i * m + j] * z[p * m + j];
        Wn.data[i * k + p] = s / m - (gp / m) * W.data[i * k + p];
      }
    }
    const Wd = polar(Wn); // symmetric decorrelation (W W^T)^-1/2 W
    let lim = 0;
    for (let i = 0; i < k; i++) {
      let dot = 0;
      for (let p = 0; p < k; p++) dot += Wd.data[i * k + p] * W.data[i * k + p];
      lim = Math.max(lim, Math.abs(Math.abs(dot) - 1));
    }
    W = Wd;
    if (lim < 1e-6) break;
  }
  mul(W.data);
  return Float64Array.from(Y);
}

/** The public first-layer rows LN(wte[t] + wpe[p]) (with the layer norm's affine in paper mode), unit-normalised, per position. */
class Dictionary {
  private readonly cache = new Map<number, Float32Array>();
  constructor(private readonly w: GPT2Weights, private readonly gain: Float32Array, private readonly beta: Float32Array, readonly positions: number, private readonly tokens: Int32Array) {}

  /** unit rows [V, d] of position p (V candidate tokens) */
  at(p: number): Float32Array {
    let c = this.cache.get(p);
    if (c) return c;
    const { n_embd: d, layer_norm_epsilon: eps } = this.w.config;
    const V = this.tokens.length;
    const wte = this.w.layout.view(this.w.params, 'wte'), wpe = this.w.layout.view(this.w.params, 'wpe');
    c = new Float32Array(V * d);
    const h = new Float64Array(d);
    for (let t = 0; t < V; t++) {
      const e = this.tokens[t] * d;
      let mu = 0;
      for (let j = 0; j < d; j++) { h[j] = wte[e + j] + wpe[p * d + j]; mu += h[j] / d; }
      let v = 0;
      for (let j = 0; j < d; j++) v += (h[j] - mu) ** 2 / d;
      const rs = 1 / Math.sqrt(v + eps);
      let nn = 0;
      for (let j = 0; j < d; j++) { const y = (h[j] - mu) * rs * this.gain[j] + this.beta[j]; c[t * d + j] = y; nn += y * y; }
      const f = 1 / Math.sqrt(nn || 1);
      for (let j = 0; j < d; j++) c[t * d + j] *= f;
    }
    this.cache.set(p, c);
    return c;
  }

  /** candidates (token, position) whose relative residual against the orthonormal basis is <= tol, best first */
  inSpan(basis: Float64Array[], tol: number, onPosition?: (p: number) => void): { t: number; p: number; res: number }[] {
    const d = this.w.config.n_embd, V = this.tokens.length;
    const k = basis.length;
    if (k === 0) return [];
    const U = new Float32Array(k * d);
    basis.forEach((u, i) => U.set(u, i * d));
    const out: { t: number; p: number; res: number }[] = [];
    for (let p = 0; p < this.positions; p++) {
      onPosition?.(p);
      const proj = gemmABt(this.at(p), U, V, k, d); // [V, k]
      for (let t = 0; t < V; t++) {
        let s = 0;
        for (let i = 0; i < k; i++) s += proj[t * k + i] ** 2;
        const res = Math.sqrt(Math.max(0, 1 - s));
        if (res <= tol) out.push({ t: this.tokens[t], p, res });
      }
    }
    return out.sort((a, b) => a.res - b.res);
  }

  /** the best (token, position) of each unit source [k, d] by |cosine| */
  nearest(src: Float32Array, k: number, onPosition?: (p: number) => void): { t: number; p: number; cos: number }[] {
    const d = this.w.config.n_embd, V = this.tokens.length;
    const best = Array.from({ length: k }, () => ({ t: -1, p: -1, cos: 0 }));
    for (let p = 0; p < this.positions; p++) {
      onPosition?.(p);
      const sim = gemmABt(src, this.at(p), k, V, d);
      for (let i = 0; i < k; i++) for (let t = 0; t < V; t++) {
        const c = Math.abs(sim[i * V + t]);
        if (c > best[i].cos) best[i] = { t: this.tokens[t], p, cos: c };
      }
    }
    return best;
  }
}

/** Multiset overlap of guesses with the truth tokens, over the truth's count. */
function bagRecovery(guess: number[], truthToks: number[]): number {
  const m = new Map<number, number>();
  for (const t of truthToks) m.set(t, (m.get(t) ?? 0) + 1);
  let hit = 0;
  for (const g of guess) {
    const c = m.get(g) ?? 0;
    if (c > 0) { hit++; m.set(g, c - 1); }
  }
  return truthToks.length ? hit / truthToks.length : NaN;
}

/** The best n guesses from a prior alone: counts in proportion to the corpus frequencies (largest remainder). */
export function priorBag(counts: Map<number, number>, n: number): number[] {
  const order = ranked(counts);
  const total = [...counts.values()].reduce((a, b) => a + b, 0);
  if (!total) return [];
  const alloc = order.map((t) => ({ t, q: (n * counts.get(t)!) / total }));
  const out: number[] = [];
  for (const a of alloc) for (let i = 0; i < Math.floor(a.q); i++) out.push(a.t);
  const rest = alloc.map((a) => ({ t: a.t, r: a.q - Math.floor(a.q) })).sort((a, b) => b.r - a.r);
  for (let i = 0; out.length < n && i < rest.length; i++) out.push(rest[i].t);
  return out.slice(0, n);
}

function fill(confident: number[], prior: number[], n: number): number[] {
  const g = confident.slice(0, n);
  const left = new Map<number, number>();
  for (const t of prior) left.set(t, (left.get(t) ?? 0) + 1);
  for (const t of g) if ((left.get(t) ?? 0) > 0) left.set(t, left.get(t)! - 1); // a prior guess the attack already made
  for (const t of prior) {
    if (g.length >= n) break;
    const c = left.get(t) ?? 0;
    if (c > 0) { g.push(t); left.set(t, c - 1); }
  }
  return g;
}

export function unmixAttack(view: LoadedView, publicBase: GPT2Weights, truth: ViewTruth, o: UnmixOptions): AttackResult {
  const t0 = performance.now();
  const c = view.header.config;
  const d = c.n_embd;
  const positions = Math.min(o.positions ?? 64, c.n_ctx);
  if (!(positions >= 1)) throw new InputError(`unmix: --positions must be >= 1, got ${o.positions}`);
  const batches = firstLayerBatches(view, o.maxBatches ?? 8);
  // progress: the alignment, then per batch a unit per dictionary position (three passes) and per ICA iteration
  const per = 3 * positions + ICA_ITERATIONS;
  const phase = twoPhases(o.onProgress, batches.length * per);
  const al = alignWeights(view, publicBase, { onProgress: phase.first });
  const lay = publicBase.layout, pp = publicBase.params;
  const gain = al.mode === 'sealed' ? new Float32Array(d).fill(1) : Float32Array.from(lay.layer(pp, 'ln1w', 0));
  const beta = al.mode === 'sealed' ? new Float32Array(d) : Float32Array.from(lay.layer(pp, 'ln1b', 0));
  const stats = corpusStats(o.corpus, c.vocab_size, c.n_ctx, null, 0);
  const pad = truth.pad_token_id; // the protocol's padding is public: a pad row is no guess
  const cand = o.vocab === 'corpus' ? Int32Array.from(new Set([...stats.overall.keys(), ...(pad !== null ? [pad] : [])])).sort() : Int32Array.from({ length: c.vocab_size }, (_, i) => i);
  const dict = new Dictionary(publicBase, gain, beta, positions, cand);
  let ica = 0, dic = 0, best = 0, base = 0, scoredBatches = 0, scoredTokens = 0, rankSum = 0;
  const inter: { dim: number; guesses: number; precision: number }[] = [];
  let prevBasis: Float64Array[] | null = null, prevTokens: Set<string> | null = null;
  for (const [i, b] of batches.entries()) {
    const step = (at: number, what: string) => phase.next(i * per + at, `batch ${i + 1}/${batches.length}: ${what}`);
    const t = truthOf(truth, b);
    const a = toPlainRows(al, b); // rows carried to the plain layer-norm space (mixing acts on rows: it commutes)
    const basis = rowBasis(a, b.rows, d);
    if (t) {
      const real: number[] = [];
      const pairs = new Set<string>();
      for (let r = 0; r < b.rows; r++) if (scoredRow(truth, t, r)) { real.push(t.tokens[r]); pairs.add(`${t.tokens[r]}@${t.pos[r]}`); }
      const n = real.length;
      if (n > 0) {
        const prior = priorBag(stats.overall, n);
        // dictionary: the candidates in the span, unless the span is (nearly) the whole space
        const hits = basis.length < d ? dict.inSpan(basis, 0.05, (p) => step(p, `dictionary, position ${p + 1}/${positions}`)) : [];
        // at most one candidate per dimension of the span, the nearest first; a span that holds
        // far more candidates than its dimension (nearly the whole space) tells nothing
        const gDict = fill(hits.length <= 2 * basis.length ? hits.slice(0, basis.length).map((h) => h.t).filter((x) => x !== pad) : [], prior, n);
        // ICA on the centred rows, whitened through the row basis
        const k = basis.length;
        let gIca = prior;
        if (k >= 2) {
          const z = new Float64Array(k * d);
          for (let i = 0; i < k; i++) for (let j = 0; j < d; j++) z[i * d + j] = basis[i][j] * Math.sqrt(d);
          const S = fastIca(z, k, d, o.seed ?? 1, ICA_ITERATIONS, (it) => step(positions + it, `ICA, iteration ${it + 1}`));
          const src = new Float32Array(k * d);
          for (let i = 0; i < k; i++) {
            const nn = Math.sqrt(S.subarray(i * d, (i + 1) * d).reduce((s, v) => s + v * v, 0)) || 1;
            for (let j = 0; j < d; j++) src[i * d + j] = S[i * d + j] / nn;
          }
          gIca = fill(dict.nearest(src, k, (p) => step(positions + ICA_ITERATIONS + p, `ICA sources against the dictionary, position ${p + 1}/${positions}`)).filter((x) => x.cos >= 0.95 && x.t !== pad).map((x) => x.t), prior, n);
        }
        const ri = bagRecovery(gIca, real), rd = bagRecovery(gDict, real);
        ica += ri * n; dic += rd * n; best += Math.max(ri, rd) * n; base += bagRecovery(prior, real) * n;
        scoredTokens += n; scoredBatches++; rankSum += basis.length;
      }
      // subspace intersection with the previous call
      if (prevBasis && prevTokens) {
        const U1 = new Float32Array(prevBasis.length * d), U2 = new Float32Array(basis.length * d);
        prevBasis.forEach((u, i) => U1.set(u, i * d));
        basis.forEach((u, i) => U2.set(u, i * d));
        // x = U1^T a lies in span(U2) iff a^T M M^T a = |a|^2 (M = U1 U2^T): (M M^T)^32 keeps those
        // directions and shrinks the others (eigenvalue l -> l^32); keep the ones U2 holds entirely
        const k1 = prevBasis.length, k2 = basis.length;
        const M = gemmABt(U1, U2, k1, k2, d);
        let A = gemmABt(M, M, k1, k1, k2);
        for (let i = 0; i < 5; i++) A = gemm(A, A, k1, k1, k1);
        const ib = rowBasis(gemm(A, U1, k1, d, k1), k1, d, 1e-2).filter((u) => {
          const p2 = gemm(U2, Float32Array.from(u), k2, 1, d);
          return p2.reduce((q, v) => q + v * v, 0) > 0.999;
        });
        const common: number[] = [];
        const found = ib.length < d && ib.length > 0 ? dict.inSpan(ib, 0.05, (p) => step(2 * positions + ICA_ITERATIONS + p, `intersection with the previous call, position ${p + 1}/${positions}`)) : [];
        for (const h of found.length <= 2 * ib.length ? found.slice(0, ib.length) : []) common.push(h.t * 100003 + h.p);
        const both = [...pairs].filter((q) => prevTokens!.has(q));
        const shared = new Set(both);
        const right = common.filter((x) => shared.has(`${Math.floor(x / 100003)}@${x % 100003}`)).length;
        inter.push({ dim: ib.length, guesses: common.length, precision: common.length ? right / common.length : NaN });
      }
      prevBasis = basis; prevTokens = pairs;
    }
    phase.next((i + 1) * per, `batch ${i + 1}/${batches.length} done`);
  }
  if (scoredTokens === 0) throw new InputError(`view ${view.file}: no first-layer batch matches its truth file (nothing to score)`);
  const mean = (xs: number[]) => (xs.length ? xs.reduce((s, x) => s + x, 0) / xs.length : NaN);
  const prec = inter.filter((x) => Number.isFinite(x.precision));
  return {
    ...resultBase(view, 'unmix', 'public-base'),
    metric: 'token_recovery', value: best / scoredTokens, baseline: base / scoredTokens, observed_batches: scoredBatches,
    details: {
      ica_token_recovery: ica / scoredTokens, dictionary_token_recovery: dic / scoredTokens, scored_tokens: scoredTokens,
      rows_rank_mean: rankSum / scoredBatches, width: d, candidates: cand.length * positions, intersection_dim_mean: mean(inter.map((x) => x.dim)),
      intersection_guesses: inter.reduce((s, x) => s + x.guesses, 0), intersection_precision: mean(prec.map((x) => x.precision)),
      seconds: (performance.now() - t0) / 1000,
    },
  };
}
