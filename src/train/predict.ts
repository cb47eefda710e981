/**
 * Batch inference with a fine-tuned model (plain, or through the split): class probabilities
 * of texts, greedy completions of prompts, and the JSON line written per record. The
 * enclave service answers the owner's `infer` with it; `eval --predictions` and
 * `generate --file` use it locally.
 */
import { makeBatch, type Record_, type Task } from '../io/jsonl.js';
import { generate, type Generator } from '../model/transformer.js';
import type { Tokenizer } from '../model/tokenizer.js';
import type { SplitModel } from '../enclave/split_model.js';

/** What a record gives the model at inference: the text (classification), or the prompt to complete (LM). */
export function inferenceInput(r: Record_, task: Task): string {
  return task === 'cls' ? r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}` : r.prompt ?? r.text ?? '';
}

export interface Classified {
  /** the predicted label of each text */
  predictions: string[];
  /** per text, the probability of each label (in the order of `labels`) */
  probabilities: number[][];
}

/** Class probabilities of texts (each truncated to maxLen tokens), `batch` texts per forward. */
export async function classify(m: SplitModel, texts: string[], tok: Tokenizer, o: { labels: string[]; maxLen: number; batch?: number }): Promise<Classified> {
  const K = o.labels.length;
  const out: Classified = { predictions: [], probabilities: [] };
  const items = texts.map((t) => {
    const ids = tok.encode(t).slice(0, o.maxLen);
    return { tokens: Int32Array.from(ids.length ? ids : [tok.eotId]), lossFrom: 0, label: 0 };
  });
  const batch = o.batch ?? 16;
  for (let i = 0; i < items.length; i += batch) {
    const b = makeBatch(items.slice(i, i + batch), 'cls', tok.eotId);
    const r = await m.forward(b.tokens, b.B, b.T, b.targets, false);
    for (let j = 0; j < b.B; j++) {
      out.predictions.push(o.labels[r.predictions![j]]);
      out.probabilities.push(Array.from(r.probs!.subarray(j * K, (j + 1) * K)));
    }
  }
  return out;
}

/** Greedy completions (up to maxNewTokens each), the prompt cut to its last tokens so that prompt and completion fit in maxLen. */
export async function complete(m: Generator, prompts: string[], tok: Tokenizer, o: { maxLen: number; maxNewTokens: number }): Promise<string[]> {
  const out: string[] = [];
  for (const p of prompts) {
    const ids = tok.encode(p).slice(-Math.max(1, o.maxLen - o.maxNewTokens));
    if (ids.length === 0) ids.push(tok.eotId);
    out.push(tok.decode(await generate(m, ids, { maxNewTokens: o.maxNewTokens, stopToken: tok.eotId })));
  }
  return out;
}

/** The predictions file's line of record `index`: the predicted label, the probability of every label, and the record's own label when it has one. */
export function classifiedLine(index: number, prediction: string, labels: string[], probs: ArrayLike<number>, truth?: string): Record<string, unknown> {
  return {
    index, prediction, probabilities: Object.fromEntries(labels.map((l, k) => [l, Number(probs[k].toPrecision(6))])), ...(truth !== undefined ? { label: truth } : {}),
  };
}
