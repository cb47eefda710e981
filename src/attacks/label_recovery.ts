/**
 * label-recovery (classification fine-tuning, any setting): the backward pass sends the
 * gradient of the loss with respect to the last block's output to the accelerator (the
 * fcproj output gradient of the last layer). Only the pooled rows carry it, and its
 * direction is (p - onehot(y)) W_score carried through the final norm: rows of one label
 * point the same way, whatever the masks (a rotation keeps angles). Spherical k-means with
 * k = the number of labels clusters the nonzero rows; clusters map to labels by size against
 * the label frequencies of a public labelled corpus.
 * Metric: share of the owner's training examples whose label is recovered.
 */
import { readJsonl } from '../io/jsonl.js';
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { Rng } from '../tensor/rng.js';
import { InputError } from '../errors.js';
import { resultBase, type AttackResult } from './common.js';

export interface LabelRecoveryOptions {
  /** a public labelled corpus (JSONL with "label") of the owner's task: label names and their frequencies */
  corpus: string;
  seed?: number;
}

/** Spherical k-means (k-means++ start, cosine): a cluster index per row of unit rows x [n, d]. */
export function sphericalKMeans(x: Float64Array, n: number, d: number, k: number, rng: Rng, iters = 30): Int32Array {
  const C = new Float64Array(k * d);
  const dot = (i: number, c: number) => { let s = 0; for (let j = 0; j < d; j++) s += x[i * d + j] * C[c * d + j]; return s; };
  C.set(x.subarray(0, d), 0);
  for (let c = 1; c < k; c++) {
    // the next centre: far (low best cosine) from the chosen ones
    const w = new Float64Array(n);
    let tot = 0;
    for (let i = 0; i < n; i++) {
      let best = -Infinity;
      for (let e = 0; e < c; e++) best = Math.max(best, dot(i, e));
      w[i] = (1 - best) ** 2;
      tot += w[i];
    }
    let u = rng.uniform() * tot, pick = n - 1;
    for (let i = 0; i < n; i++) { u -= w[i]; if (u <= 0) { pick = i; break; } }
    C.set(x.subarray(pick * d, (pick + 1) * d), c * d);
  }
  const a = new Int32Array(n);
  for (let it = 0; it < iters; it++) {
    let changed = 0;
    for (let i = 0; i < n; i++) {
      let best = -Infinity, bc = 0;
      for (let c = 0; c < k; c++) { const s = dot(i, c); if (s > best) { best = s; bc = c; } }
      if (a[i] !== bc || it === 0) { changed++; a[i] = bc; }
    }
    C.fill(0);
    for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) C[a[i] * d + j] += x[i * d + j];
    for (let c = 0; c < k; c++) {
      let s = 0;
      for (let j = 0; j < d; j++) s += C[c * d + j] ** 2;
      const f = s > 0 ? 1 / Math.sqrt(s) : 0;
      for (let j = 0; j < d; j++) C[c * d + j] *= f;
    }
    if (changed === 0 && it > 0) break;
  }
  return a;
}

export function labelRecoveryAttack(view: LoadedView, truth: ViewTruth, o: LabelRecoveryOptions): AttackResult {
  const t0 = performance.now();
  const c = view.header.config;
  const d = c.n_embd;
  const last = c.n_layer - 1;
  // the public label prior: names by frequency
  const freq = new Map<string, number>();
  for (const r of readJsonl(o.corpus)) if (r.label !== undefined) freq.set(r.label, (freq.get(r.label) ?? 0) + 1);
  if (freq.size < 2) throw new InputError(`label-recovery: ${o.corpus} has no labelled records (needs "label" fields of at least two labels)`);
  const byFreq = [...freq.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map(([l]) => l);
  const K = byFreq.length;
  if (!truth.labels) throw new InputError(`view ${view.file}: its truth file has no labels (not a classification run)`);
  const names = truth.labels;
  // the nonzero rows of each last-layer fcproj output gradient
  const rows: number[][] = [];
  const owner: { batch: number; seq: number }[] = [];
  const batchOfCall = (call: number) => {
    let best = -1;
    truth.batches.forEach((b, i) => { if (b.call <= call) best = i; });
    return best;
  };
  let steps = 0;
  view.events.forEach((e, i) => {
    if (!(e.direction === 'to_accelerator' && e.op === 'linear_backward' && e.layer === last && e.name === 'fcproj')) return;
    steps++;
    const g = view.tensor(i);
    let mx = 0;
    const norms = new Float64Array(e.rows);
    for (let r = 0; r < e.rows; r++) { let s = 0; for (let j = 0; j < d; j++) s += g[r * d + j] ** 2; norms[r] = Math.sqrt(s); mx = Math.max(mx, norms[r]); }
    const bi = batchOfCall(e.call);
    const tb = bi >= 0 ? truth.batches[bi] : null;
    // a mixed view (token mixing) sends more rows than tokens: row r is scored against the sequence of token r
    const fits = tb?.labels && (tb.tokens.length === e.rows || (view.header.token_mixing === 'on' && tb.tokens.length < e.rows));
    const T = fits ? tb!.tokens.length / tb!.labels!.length : 0;
    for (let r = 0; r < e.rows; r++) {
      if (norms[r] <= 1e-6 * mx || mx === 0) continue;
      rows.push(Array.from(g.subarray(r * d, (r + 1) * d), (v) => v / norms[r]));
      owner.push(T && r < tb!.tokens.length ? { batch: bi, seq: Math.floor(r / T) } : { batch: -1, seq: -1 });
    }
  });
  if (rows.length === 0) throw new InputError(`view ${view.file} holds no gradient of the last layer's output (record the backward pass of layer ${last})`);
  const n = rows.length;
  const x = new Float64Array(n * d);
  rows.forEach((r, i) => x.set(r, i * d));
  const a = sphericalKMeans(x, n, d, K, new Rng(o.seed ?? 1));
  // clusters by size <-> labels by public frequency
  const size = new Array(K).fill(0);
  for (const c0 of a) size[c0]++;
  const order = [...size.keys()].sort((p, q) => size[q] - size[p] || p - q);
  const nameOf = new Map(order.map((cl, i) => [cl, byFreq[i]]));
  // score per training example (its rows vote)
  const votes = new Map<string, Map<string, number>>();
  owner.forEach((w, i) => {
    if (w.batch < 0) return;
    const key = `${w.batch}/${w.seq}`;
    let m = votes.get(key);
    if (!m) votes.set(key, (m = new Map()));
    const nm = nameOf.get(a[i])!;
    m.set(nm, (m.get(nm) ?? 0) + 1);
  });
  let ok = 0, base = 0, total = 0;
  for (const [key, m] of votes) {
    const [b, sq] = key.split('/').map(Number);
    const trueName = names[truth.batches[b].labels![sq]];
    const guess = [...m.entries()].sort((p, q) => q[1] - p[1])[0][0];
    total++;
    if (guess === trueName) ok++;
    if (byFreq[0] === trueName) base++;
  }
  if (total === 0) throw new InputError(`view ${view.file}: no gradient row matches a labelled batch of its truth file`);
  return {
    ...resultBase(view, 'label-recovery', 'secret-model'),
    metric: 'label_recovery', value: ok / total, baseline: base / total, observed_batches: steps,
    details: { examples: total, gradient_rows: n, labels: K, seconds: (performance.now() - t0) / 1000 },
  };
}
