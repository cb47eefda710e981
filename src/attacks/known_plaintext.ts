/**
 * known-plaintext: the attacker knows some of the owner's records (a fraction, 10% by
 * default) and where they sit in the batches, and no model. From the known rows it learns
 *   - the exact table row -> token (a repeated (token, position) is the same row), and
 *   - the linear structure of the first layer's input: centring is linear, so a row is
 *     s * (E[t] + P[p]) + c for per-token and per-position vectors in the masked basis, a
 *     per-row scale s (the layer norm's 1/std) and a constant c (paper mode's beta R1).
 *     E, P, c and s are fitted by alternating least squares.
 * Unknown rows decode by the table, else by the nearest s (E[t] + P[p]) + c over the tokens
 * seen in known records. Metric: token recovery on the unknown records' rows.
 */
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { Rng } from '../tensor/rng.js';
import { InputError } from '../errors.js';
import { gemmABt } from './linalg.js';
import { firstLayerBatches, truthOf, scoredRow, resultBase, batchKeys, inferPositions, ranked, type AttackProgress, type AttackResult } from './common.js';

export interface KnownPlaintextOptions {
  /** fraction of the owner's records the attacker knows */
  knownFraction?: number;
  seed?: number;
  /** alternating least-squares rounds */
  rounds?: number;
  onProgress?: AttackProgress;
}

export function knownPlaintextAttack(view: LoadedView, truth: ViewTruth, o: KnownPlaintextOptions = {}): AttackResult {
  const t0 = performance.now();
  const frac = o.knownFraction ?? 0.1;
  if (!(frac > 0 && frac < 1)) throw new InputError(`--known-fraction must be in (0, 1), got ${frac}`);
  const c = view.header.config;
  const d = c.n_embd;
  const batches = firstLayerBatches(view);
  const keys = batchKeys(batches);
  const pos = inferPositions(batches, keys, c.n_ctx);
  const rng = new Rng(o.seed ?? 1);
  // records: (batch, first row, length) under the inferred layout; a known record is one the attacker holds
  interface Rec { b: number; r0: number; T: number; known: boolean }
  const recs: Rec[] = [];
  batches.forEach((bt, b) => {
    if (!truthOf(truth, bt)) return;
    for (let r = 0; r < bt.rows; r++) {
      if (pos[b][r] !== 0) continue;
      let T = 1;
      while (r + T < bt.rows && pos[b][r + T] === T) T++;
      recs.push({ b, r0: r, T, known: false });
    }
  });
  const nKnown = Math.max(1, Math.round(frac * recs.length));
  const order = Int32Array.from({ length: recs.length }, (_, i) => i);
  rng.shuffle(order);
  for (let i = 0; i < nKnown; i++) recs[order[i]].known = true;
  // known rows
  const table = new Map<string, number>();
  const kRows: { b: number; r: number; t: number; p: number }[] = [];
  const posCount = new Map<number, Map<number, number>>();
  for (const R of recs) {
    if (!R.known) continue;
    const t = truthOf(truth, batches[R.b])!;
    for (let r = R.r0; r < R.r0 + R.T; r++) {
      const tok = t.tokens[r], p = pos[R.b][r];
      table.set(keys[R.b][r], tok);
      kRows.push({ b: R.b, r, t: tok, p });
      let m = posCount.get(p);
      if (!m) posCount.set(p, (m = new Map()));
      m.set(tok, (m.get(tok) ?? 0) + 1);
    }
  }
  // alternating least squares for row = s (E[t] + P[p]) + c
  const toks = [...new Set(kRows.map((x) => x.t))];
  const tIndex = new Map(toks.map((t, i) => [t, i]));
  const nP = c.n_ctx;
  const E = new Float64Array(toks.length * d), P = new Float64Array(nP * d), C = new Float64Array(d);
  const s = new Float64Array(kRows.length).fill(1);
  const row = (x: { b: number; r: number }) => batches[x.b].data.subarray(x.r * d, (x.r + 1) * d);
  const rounds = o.rounds ?? 10;
  for (let it = 0; it < rounds; it++) {
    o.onProgress?.(it, rounds + 1, `least squares, round ${it + 1}/${rounds}`);
    for (const [M, idx] of [[E, (x: typeof kRows[number]) => tIndex.get(x.t)!], [P, (x: typeof kRows[number]) => x.p]] as const) {
      const other = M === E ? P : E;
      const oIdx = M === E ? (x: typeof kRows[number]) => x.p : (x: typeof kRows[number]) => tIndex.get(x.t)!;
      const acc = new Float64Array(M.length), wsum = new Float64Array(M.length / d);
      kRows.forEach((x, i) => {
        const v = row(x), k = idx(x), ko = oIdx(x), w = s[i] * s[i];
        if (w === 0) return;
        wsum[k] += w;
        for (let j = 0; j < d; j++) acc[k * d + j] += w * ((v[j] - C[j]) / s[i] - other[ko * d + j]);
      });
      for (let k = 0; k < wsum.length; k++) if (wsum[k] > 0) for (let j = 0; j < d; j++) M[k * d + j] = acc[k * d + j] / wsum[k];
    }
    const cs = new Float64Array(d);
    kRows.forEach((x, i) => {
      const v = row(x), te = tIndex.get(x.t)!;
      let num = 0, den = 0;
      for (let j = 0; j < d; j++) { const u = E[te * d + j] + P[x.p * d + j]; num += (v[j] - C[j]) * u; den += u * u; }
      s[i] = den > 0 ? num / den : 1;
      for (let j = 0; j < d; j++) cs[j] += v[j] - s[i] * (E[te * d + j] + P[x.p * d + j]);
    });
    for (let j = 0; j < d; j++) C[j] = cs[j] / kRows.length;
  }
  o.onProgress?.(rounds, rounds + 1, `decoding ${recs.length - nKnown} unknown records`);
  const seenPos = new Set(kRows.map((x) => x.p));
  const Ef = Float32Array.from(E);
  const overall = new Map<number, number>();
  for (const x of kRows) overall.set(x.t, (overall.get(x.t) ?? 0) + 1);
  const fallback = ranked(overall)[0];
  // |E[k] + P[p]| for every known token, per position (cached)
  const eN2 = new Float64Array(toks.length);
  for (let k = 0; k < toks.length; k++) for (let j = 0; j < d; j++) eN2[k] += E[k * d + j] ** 2;
  const normCache = new Map<number, Float64Array>();
  const candNorms = (p: number): Float64Array => {
    let u = normCache.get(p);
    if (u) return u;
    const Pp = Float32Array.from(P.subarray(p * d, (p + 1) * d));
    const EP = gemmABt(Ef, Pp, toks.length, 1, d);
    let pN2 = 0;
    for (let j = 0; j < d; j++) pN2 += Pp[j] ** 2;
    u = new Float64Array(toks.length);
    for (let k = 0; k < toks.length; k++) u[k] = Math.sqrt(Math.max(eN2[k] + 2 * EP[k] + pN2, 1e-30));
    normCache.set(p, u);
    return u;
  };
  // decode unknown records
  let ok = 0, base = 0, n = 0, byTable = 0, byModel = 0;
  for (const R of recs) {
    if (R.known) continue;
    const bt = batches[R.b];
    const t = truthOf(truth, bt)!;
    const rowsIdx: number[] = [];
    for (let r = R.r0; r < R.r0 + R.T; r++) if (scoredRow(truth, t, r)) rowsIdx.push(r);
    if (rowsIdx.length === 0) continue;
    // model scores for all rows of the record at once: cos(row - c, E[t] + P[p])
    const m = rowsIdx.length;
    const X = new Float32Array(m * d);
    rowsIdx.forEach((r, i) => { for (let j = 0; j < d; j++) X[i * d + j] = bt.data[r * d + j] - C[j]; });
    const XE = gemmABt(X, Ef, m, toks.length, d);
    rowsIdx.forEach((r, i) => {
      n++;
      const truthTok = t.tokens[r], p = pos[R.b][r];
      const g = ranked(posCount.get(p) ?? overall)[0] ?? fallback;
      if (g === truthTok) base++;
      let guess = table.get(keys[R.b][r]);
      if (guess !== undefined) byTable++;
      else if (seenPos.has(p)) {
        byModel++;
        let xp = 0;
        for (let j = 0; j < d; j++) xp += X[i * d + j] * P[p * d + j];
        const un = candNorms(p);
        let best = -Infinity;
        for (let k = 0; k < toks.length; k++) {
          const cs = (XE[i * toks.length + k] + xp) / un[k];
          if (cs > best) { best = cs; guess = toks[k]; }
        }
      } else guess = g;
      if (guess === truthTok) ok++;
    });
  }
  o.onProgress?.(rounds + 1, rounds + 1, 'done');
  if (n === 0) throw new InputError(`view ${view.file}: no unknown record to score (too few records for --known-fraction ${frac})`);
  return {
    ...resultBase(view, 'known-plaintext', 'known-plaintext'),
    metric: 'token_recovery_unknown_records', value: ok / n, baseline: base / n, observed_batches: batches.length,
    details: {
      known_fraction: frac, records: recs.length, known_records: nKnown, known_tokens: toks.length, scored_tokens: n,
      decoded_by_table: byTable, decoded_by_linear_model: byModel, seconds: (performance.now() - t0) / 1000,
    },
  };
}
