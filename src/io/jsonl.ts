/**
 * JSONL datasets. One JSON object per line:
 *   {"text": ...}                      causal LM, loss on every token
 *   {"prompt": ..., "completion": ...} causal LM, loss on the completion only
 *   {"text": ..., "label": ...}        sequence classification
 * Records are tokenised (in the enclave) with the GPT-2 tokenizer; over-long records are
 * truncated and counted, never silently.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { Rng } from '../tensor/rng.js';
import { InputError } from '../errors.js';

export type Task = 'lm' | 'cls';

export interface Record_ {
  text?: string;
  prompt?: string;
  completion?: string;
  label?: string;
}

export const MAX_DATASET_BYTES = 512 * 1024 * 1024;

export function parseJsonl(text: string, source: string): Record_[] {
  const out: Record_[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '') continue;
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch (e) {
      throw new InputError(`${source}:${i + 1}: not valid JSON (${(e as Error).message})`);
    }
    if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new InputError(`${source}:${i + 1}: each line must be a JSON object`);
    const r = o as Record<string, unknown>;
    for (const k of ['text', 'prompt', 'completion']) {
      if (k in r && typeof r[k] !== 'string') throw new InputError(`${source}:${i + 1}: "${k}" must be a string`);
    }
    if ('label' in r && typeof r.label !== 'string' && typeof r.label !== 'number') throw new InputError(`${source}:${i + 1}: "label" must be a string or a number`);
    const rec: Record_ = { text: r.text as string | undefined, prompt: r.prompt as string | undefined, completion: r.completion as string | undefined };
    if ('label' in r) rec.label = String(r.label);
    if (rec.text === undefined && (rec.prompt === undefined || rec.completion === undefined)) {
      throw new InputError(`${source}:${i + 1}: needs "text", or "prompt" and "completion"`);
    }
    out.push(rec);
  }
  return out;
}

export function readJsonl(file: string): Record_[] {
  if (!existsSync(file)) throw new InputError(`dataset file ${file} not found`);
  const size = statSync(file).size;
  if (size > MAX_DATASET_BYTES) throw new InputError(`dataset file ${file} is ${size} bytes, over the ${MAX_DATASET_BYTES}-byte limit`);
  const recs = parseJsonl(readFileSync(file, 'utf8'), file);
  if (recs.length === 0) throw new InputError(`dataset file ${file} has no records`);
  return recs;
}

/**
 * The sorted label set of a classification dataset; every record must have a label. Labels
 * that are all numbers sort by value (2 before 10), others as strings.
 */
export function labelSet(recs: Record_[], source: string): string[] {
  const s = new Set<string>();
  recs.forEach((r, i) => {
    if (r.label === undefined) throw new InputError(`${source}: record ${i + 1} has no "label" (task cls)`);
    s.add(r.label);
  });
  if (s.size < 2) throw new InputError(`${source}: a classification dataset needs at least 2 labels, found ${s.size}`);
  const all = [...s];
  const numeric = all.every((l) => /^-?\d+(\.\d+)?$/.test(l));
  return numeric ? all.sort((a, b) => Number(a) - Number(b)) : all.sort();
}

export interface Encoded {
  /** token ids of the whole example (LM: with a final end-of-text) */
  tokens: Int32Array;
  /** LM: first position whose next-token prediction counts (0 = all) */
  lossFrom: number;
  /** cls: label index */
  label: number;
}

export interface EncodedSet {
  items: Encoded[];
  truncated: number;
  dropped: number;
  labels: string[];
}

/** What encoding records needs of a tokenizer (src/model/tokenizer.ts's `Tokenizer` is one). */
export interface TextEncoder {
  readonly eotId: number;
  encode(text: string): number[];
}

export function encodeRecords(recs: Record_[], tok: TextEncoder, o: { task: Task; maxLen: number; labels?: string[]; source: string }): EncodedSet {
  const items: Encoded[] = [];
  let truncated = 0;
  let dropped = 0;
  const labels = o.labels ?? [];
  const index = new Map(labels.map((l, i) => [l, i]));
  recs.forEach((r, i) => {
    if (o.task === 'cls') {
      if (r.label === undefined) throw new InputError(`${o.source}: record ${i + 1} has no "label"`);
      const li = index.get(r.label);
      if (li === undefined) throw new InputError(`${o.source}: record ${i + 1} has label "${r.label}", which is not in the label set [${labels.join(', ')}]`);
      let ids = tok.encode(r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}`);
      if (ids.length === 0) { dropped++; return; }
      if (ids.length > o.maxLen) { ids = ids.slice(0, o.maxLen); truncated++; }
      items.push({ tokens: Int32Array.from(ids), lossFrom: 0, label: li });
    } else {
      let ids: number[];
      let lossFrom = 0;
      if (r.text !== undefined) ids = [...tok.encode(r.text), tok.eotId];
      else {
        const p = tok.encode(r.prompt!);
        ids = [...p, ...tok.encode(r.completion!), tok.eotId];
        lossFrom = Math.max(0, p.length - 1);
      }
      if (ids.length < 2) { dropped++; return; }
      // inputs are ids[0..T-1], targets ids[1..T]: keep at most maxLen + 1 ids
      if (ids.length > o.maxLen + 1) { ids = ids.slice(0, o.maxLen + 1); truncated++; }
      if (lossFrom >= ids.length - 1) { dropped++; return; }
      items.push({ tokens: Int32Array.from(ids), lossFrom, label: -1 });
    }
  });
  if (items.length === 0) throw new InputError(`${o.source}: no usable records (all ${recs.length} were empty)`);
  return { items, truncated, dropped, labels };
}

export interface Batch {
  B: number;
  T: number;
  tokens: Int32Array;
  /** LM: next-token targets [B,T] with -1 at padding and masked positions; cls: labels [B] */
  targets: Int32Array;
}

/** Pads a batch to the longest example (right padding with padId). */
export function makeBatch(items: Encoded[], task: Task, padId: number): Batch {
  const B = items.length;
  if (task === 'cls') {
    const T = Math.max(...items.map((x) => x.tokens.length));
    const tokens = new Int32Array(B * T).fill(padId);
    const targets = new Int32Array(B);
    items.forEach((x, b) => {
      tokens.set(x.tokens, b * T);
      targets[b] = x.label;
    });
    return { B, T, tokens, targets };
  }
  const T = Math.max(...items.map((x) => x.tokens.length - 1));
  const tokens = new Int32Array(B * T).fill(padId);
  const targets = new Int32Array(B * T).fill(-1);
  items.forEach((x, b) => {
    const n = x.tokens.length - 1;
    tokens.set(x.tokens.subarray(0, n), b * T);
    for (let t = x.lossFrom; t < n; t++) targets[b * T + t] = x.tokens[t + 1];
  });
  return { B, T, tokens, targets };
}

/** Epoch-wise shuffled order with an exactly resumable position. */
export class Sampler {
  private order: Int32Array;
  constructor(readonly n: number, readonly seed: number, public epoch = 0, public pos = 0) {
    this.order = this.permutation(epoch);
  }

  private permutation(epoch: number): Int32Array {
    const p = Int32Array.from({ length: this.n }, (_, i) => i);
    // a fresh generator per epoch: the order depends only on (seed, epoch)
    const rng = new Rng(this.seed * 1009 + epoch * 7919 + 17);
    rng.shuffle(p);
    return p;
  }

  /** Recomputes the order after epoch/pos were set (resume). */
  reorder(): void {
    this.order = this.permutation(this.epoch);
  }

  next(k: number): number[] {
    const out: number[] = [];
    while (out.length < k) {
      if (this.pos >= this.n) {
        this.epoch++;
        this.pos = 0;
        this.order = this.permutation(this.epoch);
      }
      out.push(this.order[this.pos++]);
    }
    return out;
  }

  state(): { epoch: number; pos: number } {
    return { epoch: this.epoch, pos: this.pos };
  }
}
