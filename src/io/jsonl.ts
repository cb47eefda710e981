/**
 * JSONL datasets. One JSON object per line, in one of these shapes (the field names of the
 * first three are settings of the run: `text_field`, `prompt_field`, `completion_field`,
 * `label_field`):
 *   {"text": ...}                                   causal LM, loss on every token
 *   {"prompt": ..., "completion": ...}              causal LM, loss on the completion only
 *   {"instruction": ..., "input": ..., "output": ...}  Alpaca: a prompt/completion (ALPACA_TEMPLATE)
 *   {"messages": [{"role": ..., "content": ...}]}   chat: a prompt/completion (chatPrompt)
 *   any of these with {"label": ...}                sequence classification
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

/** The names of a record's fields (`--text-field` etc.): the run's mapping onto text, prompt, completion and label. */
export interface DataFields {
  text_field: string;
  prompt_field: string;
  completion_field: string;
  label_field: string;
}

export const DEFAULT_FIELDS: DataFields = { text_field: 'text', prompt_field: 'prompt', completion_field: 'completion', label_field: 'label' };

/** The Alpaca prompt (the "### Input" section only when the input is not empty); the output is the completion. */
export const ALPACA_TEMPLATE = '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n';
export const CHAT_ROLES = ['system', 'user', 'assistant'] as const;

export function alpacaPrompt(instruction: string, input: string): string {
  const t = input === '' ? ALPACA_TEMPLATE.replace('### Input:\n{input}\n\n', '') : ALPACA_TEMPLATE;
  return t.replace(/\{(instruction|input)\}/g, (_, k: string) => (k === 'input' ? input : instruction));
}

/** A chat's prompt: each message as "### Role:\n{content}\n\n", then the assistant's header "### Assistant:\n". */
export function chatPrompt(messages: { role: string; content: string }[]): string {
  return messages.map((m) => `### ${m.role[0].toUpperCase()}${m.role.slice(1)}:\n${m.content}\n\n`).join('') + '### Assistant:\n';
}

export const MAX_DATASET_BYTES = 512 * 1024 * 1024;

export type JsonObject = Record<string, unknown>;

/**
 * One record of a dataset in the run's terms. `where` names it in errors ("FILE:LINE").
 * With `inference`, a record needs no completion (Alpaca's output, a chat's final
 * assistant message): its prompt is what the model completes.
 */
export function toRecord(r: JsonObject, fields: DataFields, where: string, o: { inference?: boolean } = {}): Record_ {
  const f = fields;
  const str = (k: string, what: string, optional = false): string | undefined => {
    const v = r[k];
    if (v === undefined && optional) return undefined;
    if (typeof v !== 'string') throw new InputError(`${where}: ${what} "${k}" ${v === undefined ? 'is missing' : `must be a string, got ${JSON.stringify(v)}`}`);
    return v;
  };
  const rec: Record_ = {};
  const label = r[f.label_field];
  if (label !== undefined) {
    if (typeof label !== 'string' && typeof label !== 'number') throw new InputError(`${where}: "${f.label_field}" (the label) must be a string or a number, got ${JSON.stringify(label)}`);
    rec.label = String(label);
  }
  if (r[f.text_field] !== undefined) rec.text = str(f.text_field, 'the text');
  else if (r[f.prompt_field] !== undefined || r[f.completion_field] !== undefined) {
    rec.prompt = str(f.prompt_field, 'the prompt');
    rec.completion = str(f.completion_field, 'the completion', o.inference);
  } else if ('instruction' in r || 'output' in r) {
    rec.prompt = alpacaPrompt(str('instruction', 'the Alpaca record\'s')!, str('input', 'the Alpaca record\'s', true) ?? '');
    rec.completion = str('output', 'the Alpaca record\'s', o.inference);
  } else if ('messages' in r) {
    const ms = r.messages;
    if (!Array.isArray(ms) || ms.length === 0) throw new InputError(`${where}: "messages" must be a non-empty array of {"role", "content"}, got ${JSON.stringify(ms)}`);
    const list = ms.map((m, i) => {
      const at = `${where}: messages[${i}]`;
      if (typeof m !== 'object' || m === null || Array.isArray(m)) throw new InputError(`${at} must be an object {"role", "content"}`);
      const { role, content } = m as JsonObject;
      if (!CHAT_ROLES.includes(role as (typeof CHAT_ROLES)[number])) throw new InputError(`${at}.role must be one of ${CHAT_ROLES.join(', ')}, got ${JSON.stringify(role)}`);
      if (typeof content !== 'string') throw new InputError(`${at}.content must be a string, got ${JSON.stringify(content)}`);
      return { role: role as string, content };
    });
    const last = list[list.length - 1];
    if (last.role === 'assistant') {
      rec.prompt = chatPrompt(list.slice(0, -1));
      rec.completion = last.content;
    } else if (o.inference) rec.prompt = chatPrompt(list);
    else throw new InputError(`${where}: the last message must be the assistant's (the completion), got role ${JSON.stringify(last.role)}`);
  } else {
    throw new InputError(`${where}: needs "${f.text_field}", or "${f.prompt_field}" and "${f.completion_field}", or "instruction" and "output" (Alpaca), or "messages" (chat); it has ${Object.keys(r).map((k) => JSON.stringify(k)).join(', ') || 'no fields'}`);
  }
  return rec;
}

/** The JSON objects of a JSONL text, with their line numbers (blank lines skipped). */
export function parseJsonObjects(text: string, source: string): { objects: JsonObject[]; lines: number[] } {
  const objects: JsonObject[] = [];
  const lines: number[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '') return;
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch (e) {
      throw new InputError(`${source}:${i + 1}: not valid JSON (${(e as Error).message})`);
    }
    if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new InputError(`${source}:${i + 1}: each line must be a JSON object`);
    objects.push(o as JsonObject);
    lines.push(i + 1);
  });
  return { objects, lines };
}

/** The records of JSON objects (`where(i)` names the i-th in errors; default: "SOURCE record i+1"). */
export function recordsOf(objects: JsonObject[], fields: DataFields, source: string, o: { inference?: boolean; where?: (i: number) => string } = {}): Record_[] {
  return objects.map((r, i) => toRecord(r, fields, o.where?.(i) ?? `${source} record ${i + 1}`, o));
}

export function parseJsonl(text: string, source: string, fields: DataFields = DEFAULT_FIELDS, o: { inference?: boolean } = {}): Record_[] {
  const { objects, lines } = parseJsonObjects(text, source);
  return recordsOf(objects, fields, source, { ...o, where: (i) => `${source}:${lines[i]}` });
}

/** The JSON objects of a dataset file and their line numbers; refuses a missing, over-large or empty file. */
function readDataset(file: string): { objects: JsonObject[]; lines: number[] } {
  if (!existsSync(file)) throw new InputError(`dataset file ${file} not found`);
  const size = statSync(file).size;
  if (size > MAX_DATASET_BYTES) throw new InputError(`dataset file ${file} is ${size} bytes, over the ${MAX_DATASET_BYTES}-byte limit`);
  const r = parseJsonObjects(readFileSync(file, 'utf8'), file);
  if (r.objects.length === 0) throw new InputError(`dataset file ${file} has no records`);
  return r;
}

export function readJsonl(file: string, fields: DataFields = DEFAULT_FIELDS, o: { inference?: boolean } = {}): Record_[] {
  const { objects, lines } = readDataset(file);
  return recordsOf(objects, fields, file, { ...o, where: (i) => `${file}:${lines[i]}` });
}

/** A dataset file's JSON objects as they are (the owner uploads them so; the enclave maps them with the job's fields). */
export function readJsonObjects(file: string): JsonObject[] {
  return readDataset(file).objects;
}

/** Integer labels up to this are class indices (label k is class k); larger ones sort by value. */
export const MAX_INDEX_LABEL = 1023;

/**
 * The label set of a classification dataset, index = class; every record must have a label.
 * When every label is an integer in 0..MAX_INDEX_LABEL the labels are class indices: the
 * set is "0".."max" (label 2 is class 2, also when no record has label 1). Other labels
 * that are all numbers sort by value (2 before 10), the rest as strings.
 */
export function labelSet(recs: Record_[], source: string): string[] {
  const s = new Set<string>();
  recs.forEach((r, i) => {
    if (r.label === undefined) throw new InputError(`${source}: record ${i + 1} has no label (task cls)`);
    s.add(r.label);
  });
  if (s.size < 2) throw new InputError(`${source}: a classification dataset needs at least 2 labels, found ${s.size}`);
  const all = [...s];
  if (all.every((l) => /^(0|[1-9]\d*)$/.test(l) && Number(l) <= MAX_INDEX_LABEL)) {
    return Array.from({ length: Math.max(...all.map(Number)) + 1 }, (_, i) => String(i));
  }
  const numeric = all.every((l) => /^-?\d+(\.\d+)?$/.test(l));
  return numeric ? all.sort((a, b) => Number(a) - Number(b)) : all.sort();
}

/** A run's label set: its training data's (labelSet); every evaluation record must have one of them. */
export function trainLabels(train: Record_[], evalRecs: Record_[] | null, trainSource: string, evalSource: string): string[] {
  const labels = labelSet(train, trainSource);
  const extra = [...new Set((evalRecs ?? []).map((r, i) => {
    if (r.label === undefined) throw new InputError(`${evalSource}: record ${i + 1} has no label (task cls)`);
    return r.label;
  }))].filter((l) => !labels.includes(l));
  if (extra.length) throw new InputError(`${evalSource} has labels not in ${trainSource}'s label set [${labels.join(', ')}]: ${extra.join(', ')}`);
  return labels;
}

/** Notes on a dataset for the run's task: labels ignored by an LM run; integer classes without a record. */
export function datasetWarnings(recs: Record_[], task: Task, labels: string[], source: string): string[] {
  const out: string[] = [];
  if (task === 'lm' && recs.some((r) => r.label !== undefined)) out.push(`${source} has labelled records, and the task is lm: the labels are ignored (classification is --task cls)`);
  if (task === 'cls') {
    const seen = new Set(recs.map((r) => r.label));
    const missing = labels.filter((l) => !seen.has(l));
    if (missing.length) out.push(`${source} has no record of class${missing.length > 1 ? 'es' : ''} ${missing.join(', ')} (integer labels are class indices 0..${labels.length - 1})`);
  }
  return out;
}

export interface Encoded {
  /** token ids of the whole example (LM: with a final end-of-text) */
  tokens: Int32Array;
  /** LM: first position whose next-token prediction counts (0 = all) */
  lossFrom: number;
  /** cls: label index */
  label: number;
  /** the record it encodes (its index in the records given to encodeRecords) */
  index?: number;
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
      items.push({ tokens: Int32Array.from(ids), lossFrom: 0, label: li, index: i });
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
      items.push({ tokens: Int32Array.from(ids), lossFrom, label: -1, index: i });
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
