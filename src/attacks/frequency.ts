/**
 * frequency (secret-model setting): the attacker knows neither the model nor the masks. The
 * first linear input of a (token, position) pair is the same row in every batch (sealed:
 * LN(wte[t] + wpe[p]) Q; paper: LN(.) R1), so rows that repeat (exactly, or up to float noise:
 * equal on a 1/64 grid) are one pair. The batch layout (r -> position) follows from the repeats
 * alone (common.ts, inferSeqLen). At each position the clusters, most frequent first, are
 * mapped to the public corpus' tokens at that position, most frequent first.
 * Metric: token recovery over the observed batches, for 1, 10, 100 (and all) of them.
 */
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { InputError } from '../errors.js';
import {
  firstLayerBatches, truthOf, scoredRow, resultBase, corpusStats, ranked, mode, batchKeys, inferPositions, type AttackProgress, type AttackResult, type CorpusStats, type RowBatch,
} from './common.js';

export interface FrequencyOptions {
  corpus: string;
  /** the pad token the owner's batches are padded with (GPT-2: end-of-text); counted in the public statistics */
  padTokenId?: number | null;
  /** numbers of observed batches to report (default 1, 10, 100, all) */
  counts?: number[];
  onProgress?: AttackProgress;
}

/** Decodes the rows of the first k batches by frequency rank per position. */
function decodeByRank(keys: string[][], pos: Int32Array[], k: number, stats: CorpusStats): Int32Array[] {
  // cluster counts per position
  const counts = new Map<number, Map<string, number>>();
  for (let b = 0; b < k; b++) {
    keys[b].forEach((key, r) => {
      const p = pos[b][r];
      let m = counts.get(p);
      if (!m) counts.set(p, (m = new Map()));
      m.set(key, (m.get(key) ?? 0) + 1);
    });
  }
  const map = new Map<number, Map<string, number>>();
  for (const [p, m] of counts) {
    const clusters = [...m.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map(([key]) => key);
    const toks = p < stats.byPos.length ? ranked(stats.byPos[p]) : [];
    const fallback = mode(stats.overall) ?? 0;
    const mm = new Map<string, number>();
    clusters.forEach((key, i) => mm.set(key, i < toks.length ? toks[i] : fallback));
    map.set(p, mm);
  }
  return keys.slice(0, k).map((ks, b) => Int32Array.from(ks, (key, r) => map.get(pos[b][r])!.get(key)!));
}

export function frequencyAttack(view: LoadedView, truth: ViewTruth, o: FrequencyOptions): AttackResult {
  const t0 = performance.now();
  const c = view.header.config;
  const batches: RowBatch[] = firstLayerBatches(view);
  o.onProgress?.(0, 1, `row keys of ${batches.length} batches`);
  const keys = batchKeys(batches);
  const pos = inferPositions(batches, keys, c.n_ctx);
  const maxT = Math.max(...pos.map((p) => p.reduce((m, x) => Math.max(m, x), 0) + 1));
  // the attacker knows the protocol: GPT-2 batches are padded with end-of-text
  const pad = o.padTokenId !== undefined ? o.padTokenId : c.vocab_size === 50257 ? 50256 : null;
  o.onProgress?.(0, 1, 'public corpus statistics');
  const stats = corpusStats(o.corpus, c.vocab_size, c.n_ctx, pad, maxT);
  const scored = batches.map((b) => truthOf(truth, b));
  if (scored.every((t) => t === null)) throw new InputError(`view ${view.file}: no first-layer batch matches its truth file (nothing to score)`);
  const all = batches.length;
  const counts = [...new Set([...(o.counts ?? [1, 10, 100]).filter((k) => k < all), all])].sort((a, b) => a - b);
  const curve: { observed_batches: number; token_recovery: number; baseline: number; scored_tokens: number }[] = [];
  // baseline: without the view, the most frequent public token at the row's true position
  const guessAt = new Map<number, number | null>();
  const guess = (p: number) => guessAt.get(p) ?? guessAt.set(p, mode(stats.byPos[p]) ?? mode(stats.overall)).get(p)!;
  // progress in batches decoded (each count decodes its first k batches again)
  const units = counts.reduce((s, k) => s + k, 0);
  let done = 0;
  for (const k of counts) {
    o.onProgress?.(done, units, `decoding the first ${k} batches`);
    done += k;
    const dec = decodeByRank(keys, pos, k, stats);
    let ok = 0, base = 0, n = 0;
    for (let b = 0; b < k; b++) {
      const t = scored[b];
      if (!t) continue;
      for (let r = 0; r < batches[b].rows; r++) {
        if (!scoredRow(truth, t, r)) continue;
        n++;
        if (dec[b][r] === t.tokens[r]) ok++;
        if (guess(t.pos[r]) === t.tokens[r]) base++;
      }
    }
    curve.push({ observed_batches: k, token_recovery: n ? ok / n : NaN, baseline: n ? base / n : NaN, scored_tokens: n });
  }
  o.onProgress?.(units, units, 'done');
  const last = curve[curve.length - 1];
  const distinct = new Set(keys.flat()).size;
  return {
    ...resultBase(view, 'frequency', 'secret-model'),
    metric: 'token_recovery', value: last.token_recovery, baseline: last.baseline, observed_batches: last.observed_batches,
    details: { curve, distinct_rows: distinct, rows: keys.reduce((s, k) => s + k.length, 0), seconds: (performance.now() - t0) / 1000 },
  };
}
