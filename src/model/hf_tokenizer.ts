/**
 * A checkpoint's own tokenizer: `tokenizer.json` (and `tokenizer_config.json`, when present)
 * through `@huggingface/tokenizers`, and its `chat_template` through `@huggingface/jinja`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer as HFTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import r50kRanks from 'gpt-tokenizer/bpeRanks/r50k_base';
import { EOT_ID, EOT_TOKEN, type Tokenizer } from './tokenizer.js';
import { readJsonObject } from './checkpoint.js';
import { BundleError, InputError } from '../errors.js';

export interface ChatMessage { role: string; content: string }

export interface CheckpointTokenizer extends Tokenizer {
  /** the beginning-of-sequence token, when the tokenizer has one */
  readonly bosId: number | undefined;
  /** the chat template rendered for `messages` (throws when the checkpoint has none) */
  chat(messages: ChatMessage[], addGenerationPrompt?: boolean): string;
}

const tokenString = (t: unknown): string | undefined => (typeof t === 'string' ? t : typeof t === 'object' && t && typeof (t as { content?: unknown }).content === 'string' ? (t as { content: string }).content : undefined);

/** Whether a checkpoint directory has its own tokenizer. */
export function hasCheckpointTokenizer(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'tokenizer.json'));
}

/** The tokenizer of a checkpoint directory; `eos`: the id to use when tokenizer_config.json names none. */
export function loadCheckpointTokenizer(dir: string, eos?: number): CheckpointTokenizer {
  const file = path.join(dir, 'tokenizer.json');
  if (!fs.existsSync(file)) throw new BundleError(`${file}: not found (the checkpoint has no tokenizer.json)`);
  const json = readJsonObject(file);
  const cfgFile = path.join(dir, 'tokenizer_config.json');
  const cfg = fs.existsSync(cfgFile) ? readJsonObject(cfgFile) : {};
  let tok: HFTokenizer;
  try {
    tok = new HFTokenizer(json, cfg);
  } catch (e) {
    throw new BundleError(`${file}: not a usable tokenizer (${(e as Error).message})`, { cause: e });
  }
  const idOf = (k: string) => {
    const s = tokenString(cfg[k]);
    return s === undefined ? undefined : tok.token_to_id(s);
  };
  const vocab = tok.get_vocab(true);
  let size = 0;
  for (const id of vocab.values()) size = Math.max(size, id + 1);
  const eotId = idOf('eos_token') ?? eos ?? -1;
  const bosId = idOf('bos_token');
  const template = typeof cfg['chat_template'] === 'string' ? new Template(cfg['chat_template']) : null;
  return {
    name: path.basename(path.resolve(dir)),
    vocabSize: size,
    eotId,
    bosId,
    encode: (text) => tok.encode(text, { add_special_tokens: false }).ids,
    decode: (ids) => tok.decode([...ids], { skip_special_tokens: false }),
    chat(messages, addGenerationPrompt = true) {
      if (!template) throw new InputError(`${cfgFile}: the checkpoint has no chat_template`);
      return template.render({
        messages, add_generation_prompt: addGenerationPrompt,
        bos_token: tokenString(cfg['bos_token']) ?? '', eos_token: tokenString(cfg['eos_token']) ?? '',
      });
    },
  };
}

/** GPT-2's map of the 256 bytes to printable characters (the byte-level BPE alphabet). */
function bytesToUnicode(): string[] {
  const printable = (b: number) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let n = 0;
  return Array.from({ length: 256 }, (_, b) => String.fromCharCode(printable(b) ? b : 256 + n++));
}

/**
 * GPT-2's byte-level BPE as Hugging Face `tokenizer.json` and `tokenizer_config.json`, built from
 * the ranks the GPT-2 tokenizer uses (gpt-tokenizer's r50k_base). Each token's merge is recovered
 * by running BPE on its bytes with the lower-ranked tokens only, which ends in exactly two parts.
 */
export function gpt2TokenizerFiles(): { tokenizer: Record<string, unknown>; config: Record<string, unknown> } {
  const enc = new TextEncoder(), uni = bytesToUnicode();
  const bytes = r50kRanks.map((t) => (typeof t === 'string' ? enc.encode(t) : Uint8Array.from(t)));
  const key = (b: Uint8Array) => String.fromCharCode(...b);
  const rank = new Map(bytes.map((b, r) => [key(b), r]));
  const vocab: Record<string, number> = {};
  const merges: string[] = [];
  bytes.forEach((b, r) => {
    vocab[Array.from(b, (x) => uni[x]).join('')] = r;
    if (b.length < 2) return;
    let parts = Array.from(b, (x) => String.fromCharCode(x));
    for (;;) {
      let best = -1, bestRank = r;
      for (let i = 0; i + 1 < parts.length; i++) {
        const q = rank.get(parts[i] + parts[i + 1]);
        if (q !== undefined && q < bestRank) [best, bestRank] = [i, q];
      }
      if (best < 0) break;
      parts = [...parts.slice(0, best), parts[best] + parts[best + 1], ...parts.slice(best + 2)];
    }
    if (parts.length !== 2) throw new Error(`GPT-2 token ${r} does not split into one merge (${parts.length} parts)`);
    merges.push(parts.map((p) => Array.from(p, (c) => uni[c.charCodeAt(0)]).join('')).join(' '));
  });
  vocab[EOT_TOKEN] = EOT_ID;
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
  const tokenizer = {
    version: '1.0', truncation: null, padding: null,
    added_tokens: [{ id: EOT_ID, content: EOT_TOKEN, single_word: false, lstrip: false, rstrip: false, normalized: true, special: true }],
    normalizer: null, pre_tokenizer: byteLevel, post_processor: byteLevel, decoder: byteLevel,
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '', fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
  };
  const config = { tokenizer_class: 'GPT2Tokenizer', bos_token: EOT_TOKEN, eos_token: EOT_TOKEN, unk_token: EOT_TOKEN, add_prefix_space: false, model_max_length: 1024, clean_up_tokenization_spaces: false };
  return { tokenizer, config };
}

/** Writes GPT-2's tokenizer.json and tokenizer_config.json into a checkpoint directory. */
export function writeGpt2Tokenizer(dir: string): void {
  const { tokenizer, config } = gpt2TokenizerFiles();
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tokenizer) + '\n');
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config, null, 2) + '\n');
}
