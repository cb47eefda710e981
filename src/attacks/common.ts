/**
 * What every attack shares: the result record (the JSON contract of `obfuscatune attack`),
 * the first-layer rows of a view batch by batch, the scoring key's alignment with them, row
 * keys for exact and near repeats, the layout of a batch (rows -> positions) inferred from the
 * view alone, and a public corpus' token statistics.
 */
import { readJsonl } from '../io/jsonl.js';
import { tokenizerFor } from '../model/tokenizer.js';
import type { LoadedView, ViewTruth, TruthBatch } from '../protocol/view.js';
import { InputError } from '../errors.js';

export type Setting = 'secret-model' | 'public-base' | 'known-plaintext';
export type Defence = 'none' | 'token-mixing' | 'public-base' | 'both';

export interface AttackResult {
  attack: string;
  mode: string;
  kappa: string;
  defence: Defence;
  setting: Setting;
  metric: string;
  value: number;
  baseline: number;
  observed_batches: number;
  /** attack-specific numbers (curves, per-layer values, secondary metrics) */
  details?: Record<string, unknown>;
}

/** Progress of a long attack: `done` of `total` units, and what it is doing (the CLI prints it on stderr). */
export type AttackProgress = (done: number, total: number, label: string) => void;

/** Progress in two phases: a first one that reports its own units (the alignment), then `rest` units. */
export function twoPhases(p: AttackProgress | undefined, rest: number, name = 'alignment'): { first: AttackProgress; next: (i: number, label: string) => void } {
  let units = 0;
  return {
    first: (d, n, label) => { units = n; p?.(d, n + rest, `${name}: ${label}`); },
    next: (i, label) => p?.(units + i, units + rest, label),
  };
}

export function resultBase(view: LoadedView, attack: string, setting: Setting): Pick<AttackResult, 'attack' | 'mode' | 'kappa' | 'defence' | 'setting'> {
  const h = view.header;
  const mixing = h.token_mixing !== 'off', pub = typeof h.public_base === 'string';
  return { attack, mode: h.mode, kappa: h.spec, defence: mixing ? (pub ? 'both' : 'token-mixing') : pub ? 'public-base' : 'none', setting };
}

/** One batch as the accelerator saw it: the input of layer 0's qkv linear. */
export interface RowBatch {
  call: number;
  rows: number;
  cols: number;
  data: Float32Array;
  /** the view was recorded with token mixing: the rows are mixtures of the real rows and shields */
  mixed?: boolean;
}

/** The first-layer inputs of every forward, in order (what the accelerator saw first). */
export function firstLayerBatches(view: LoadedView, max = Infinity): RowBatch[] {
  const out: RowBatch[] = [];
  view.events.forEach((e, i) => {
    if (out.length >= max) return;
    if (e.direction === 'to_accelerator' && e.op === 'linear_forward' && e.layer === 0 && e.name === 'qkv' && e.field === 'x') {
      out.push({ call: e.call, rows: e.rows, cols: e.cols, data: view.tensor(i), mixed: view.header.token_mixing === 'on' });
    }
  });
  if (out.length === 0) throw new InputError(`view ${view.file} holds no layer-0 qkv inputs (recorded with a filter that left them out?)`);
  return out;
}

/**
 * The truth batch a view batch belongs to (the last one started at or before its call), when
 * its rows match. A mixed batch has more rows than tokens (its shields): its truth is padded
 * with token -1 (never scored), so that an attack's row r is scored against token r.
 */
export function truthOf(truth: ViewTruth, b: RowBatch): TruthBatch | null {
  let lo = 0, hi = truth.batches.length - 1, best = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (truth.batches[mid].call <= b.call) { best = mid; lo = mid + 1; } else hi = mid - 1;
  }
  if (best < 0) return null;
  const t = truth.batches[best];
  if (t.tokens.length === b.rows) return t;
  if (!b.mixed || b.rows < t.tokens.length) return null;
  const extra = b.rows - t.tokens.length;
  return { ...t, tokens: [...t.tokens, ...new Array<number>(extra).fill(-1)], pos: [...t.pos, ...new Array<number>(extra).fill(0)] };
}

/** Rows scored: the owner's tokens other than padding (and other than a mixed batch's shields). */
export function scoredRow(truth: ViewTruth, t: TruthBatch, r: number): boolean {
  return t.tokens[r] >= 0 && (truth.pad_token_id === null || t.tokens[r] !== truth.pad_token_id);
}

/** A key equal for rows that agree on a grid of `q` (exact repeats, and near ones up to float noise). */
export function rowKey(data: Float32Array, off: number, d: number, q = 64): string {
  let h1 = 0x811c9dc5 | 0, h2 = 0x01000193 | 0;
  for (let j = 0; j < d; j++) {
    const v = Math.round(data[off + j] * q) | 0;
    h1 = Math.imul(h1 ^ v, 0x01000193);
    h2 = Math.imul(h2 ^ (v + 0x9e3779b9), 0x85ebca6b) ^ (h2 >>> 13);
  }
  return `${(h1 >>> 0).toString(36)}.${(h2 >>> 0).toString(36)}`;
}

/**
 * The sequence length of a training batch, from the view alone: a repeated row is one
 * (token, position) pair, so all its occurrences share `r mod T` for the true T (and for every
 * divisor of it). The largest divisor of `rows` (at most n_ctx) on which the repeats agree.
 */
export function inferSeqLen(keys: string[], rows: number, nCtx: number): number {
  const byKey = new Map<string, number[]>();
  keys.forEach((k, r) => {
    const a = byKey.get(k);
    if (a) a.push(r); else byKey.set(k, [r]);
  });
  const reps = [...byKey.values()].filter((a) => a.length > 1);
  const divisors: number[] = [];
  for (let T = 1; T <= Math.min(rows, nCtx); T++) if (rows % T === 0) divisors.push(T);
  if (reps.length === 0) return rows <= nCtx ? rows : divisors[divisors.length - 1];
  let best = 1;
  for (const T of divisors) {
    let agree = 0, total = 0;
    for (const a of reps) {
      const m = a[0] % T;
      for (let i = 1; i < a.length; i++) { total++; if (a[i] % T === m) agree++; }
    }
    if (agree >= 0.98 * total) best = T;
  }
  return best;
}

/** Row positions of every batch: a training layout r mod T, with T inferred per batch. */
export function inferPositions(batches: RowBatch[], keys: string[][], nCtx: number): Int32Array[] {
  return batches.map((b, i) => {
    const T = inferSeqLen(keys[i], b.rows, nCtx);
    return Int32Array.from({ length: b.rows }, (_, r) => r % T);
  });
}

/** Token statistics of a public corpus: per position and overall, with padding counted as pad. */
export interface CorpusStats {
  /** counts[p]: token -> count at position p */
  byPos: Map<number, number>[];
  overall: Map<number, number>;
  records: number;
}

/**
 * Tokenises a public corpus (JSONL with "text", or "prompt"/"completion") as the owner's
 * records are tokenised (LM: text then end-of-text), and counts tokens per position up to
 * `maxLen`, padding shorter records with `pad` to `padTo` positions.
 */
export function corpusStats(file: string, vocab: number, maxLen: number, pad: number | null, padTo: number): CorpusStats {
  const tok = tokenizerFor(vocab);
  const recs = readJsonl(file);
  const byPos: Map<number, number>[] = Array.from({ length: maxLen }, () => new Map());
  const overall = new Map<number, number>();
  const add = (m: Map<number, number>, t: number) => m.set(t, (m.get(t) ?? 0) + 1);
  for (const r of recs) {
    const ids = [...tok.encode(r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}`), tok.eotId].slice(0, maxLen);
    ids.forEach((t, p) => { add(byPos[p], t); add(overall, t); });
    if (pad !== null) for (let p = ids.length; p < Math.min(padTo, maxLen); p++) add(byPos[p], pad);
  }
  return { byPos, overall, records: recs.length };
}

/** Entries of a count map, most frequent first (ties by token id, for determinism). */
export function ranked(m: Map<number, number>): number[] {
  return [...m.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).map(([t]) => t);
}

export function mode(m: Map<number, number> | undefined): number | null {
  if (!m || m.size === 0) return null;
  return ranked(m)[0];
}

/** Keys of every row of every batch. */
export function batchKeys(batches: RowBatch[], q = 64): string[][] {
  return batches.map((b) => Array.from({ length: b.rows }, (_, r) => rowKey(b.data, r * b.cols, b.cols, q)));
}
