/**
 * GPT-2 byte-level BPE, from the maintained `gpt-tokenizer` package (its `r50k_base`
 * encoding is GPT-2's vocabulary and merge list, 50257 tokens, bundled: no download).
 */
import * as r50k from 'gpt-tokenizer/encoding/r50k_base';

export const GPT2_VOCAB_SIZE = 50257;
export const EOT_TOKEN = '<|endoftext|>';
export const EOT_ID = 50256;

export interface Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  readonly eotId: number;
  encode(text: string): number[];
  decode(ids: Iterable<number>): string;
}

const allowed = new Set([EOT_TOKEN]);

export const gpt2Tokenizer: Tokenizer = {
  name: 'gpt2',
  vocabSize: GPT2_VOCAB_SIZE,
  eotId: EOT_ID,
  encode: (text) => r50k.encode(text, { allowedSpecial: allowed }),
  decode: (ids) => r50k.decode(ids),
};

/**
 * The tokenizer for a model with `vocabSize` rows: GPT-2's BPE needs at least 50257.
 * Throws when the model cannot represent GPT-2 token ids.
 */
export function tokenizerFor(vocabSize: number): Tokenizer {
  if (vocabSize < GPT2_VOCAB_SIZE) {
    throw new Error(`the GPT-2 tokenizer needs a vocabulary of ${GPT2_VOCAB_SIZE} tokens; this model has ${vocabSize} (it cannot encode text)`);
  }
  return gpt2Tokenizer;
}
