/**
 * Pretraining a base model from scratch on a text corpus (the provider's "proprietary"
 * model): random windows of a token stream, AdamW, warmup + cosine, periodic validation.
 * The corpus is made of the TRAIN splits only; validation and test splits never enter it.
 */
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import type { Tokenizer } from '../model/tokenizer.js';
import { parseJsonl } from '../io/jsonl.js';

/** Token stream of the "text" (or prompt + completion) of every record, separated by <|endoftext|>. */
export function corpusFromJsonl(files: string[], tok: Tokenizer, heldOut = false): { stream: Int32Array; documents: number } {
  const ids: number[] = [];
  let documents = 0;
  for (const f of files) {
    if (!existsSync(f)) throw new Error(`corpus file ${f} not found`);
    if (!heldOut && /^(validation|test|valid|dev)\b/.test(path.basename(f))) {
      throw new Error(`refusing ${f}: pretraining may only use training splits`);
    }
    for (const r of parseJsonl(readFileSync(f, 'utf8'), f)) {
      const text = r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}`;
      for (const t of tok.encode(text)) ids.push(t);
      ids.push(tok.eotId);
      documents++;
    }
  }
  return { stream: Int32Array.from(ids), documents };
}

/** Unigram (add-one smoothed) cross-entropy of `test` under token frequencies of `train`: the baseline a real model must beat. */
export function unigramLoss(train: Int32Array, test: Int32Array, V: number): number {
  const counts = new Float64Array(V).fill(1);
  for (const t of train) counts[t]++;
  const total = train.length + V;
  let nll = 0;
  for (const t of test) nll -= Math.log(counts[t] / total);
  return nll / test.length;
}

