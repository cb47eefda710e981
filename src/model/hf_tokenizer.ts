/**
 * A checkpoint's own tokenizer: `tokenizer.json` (and `tokenizer_config.json`, when present)
 * through `@huggingface/tokenizers`, and its `chat_template` through `@huggingface/jinja`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer as HFTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import type { Tokenizer } from './tokenizer.js';
import { BundleError, InputError } from '../errors.js';

export interface ChatMessage { role: string; content: string }

export interface CheckpointTokenizer extends Tokenizer {
  /** the beginning-of-sequence token, when the tokenizer has one */
  readonly bosId: number | undefined;
  /** the chat template rendered for `messages` (throws when the checkpoint has none) */
  chat(messages: ChatMessage[], addGenerationPrompt?: boolean): string;
}

const tokenString = (t: unknown): string | undefined => (typeof t === 'string' ? t : typeof t === 'object' && t && typeof (t as { content?: unknown }).content === 'string' ? (t as { content: string }).content : undefined);

function readJsonFile(file: string): Record<string, unknown> {
  try {
    const v = JSON.parse(fs.readFileSync(file, 'utf8'));
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error('not a JSON object');
    return v;
  } catch (e) {
    throw new BundleError(`${file}: cannot read (${(e as Error).message})`, { cause: e });
  }
}

/** Whether a checkpoint directory has its own tokenizer. */
export function hasCheckpointTokenizer(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'tokenizer.json'));
}

/** The tokenizer of a checkpoint directory; `eos`: the id to use when tokenizer_config.json names none. */
export function loadCheckpointTokenizer(dir: string, eos?: number): CheckpointTokenizer {
  const file = path.join(dir, 'tokenizer.json');
  if (!fs.existsSync(file)) throw new BundleError(`${file}: not found (the checkpoint has no tokenizer.json)`);
  const json = readJsonFile(file);
  const cfgFile = path.join(dir, 'tokenizer_config.json');
  const cfg = fs.existsSync(cfgFile) ? readJsonFile(cfgFile) : {};
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
