import { InputError } from '../errors.js';

/** GPT-2 architecture hyper-parameters, named as in Hugging Face's `GPT2Config`. */
export interface GPT2Config {
  /** Number of transformer blocks. */
  n_layer: number;
  /** Number of attention heads per block. */
  n_head: number;
  /** Residual width (d). */
  n_embd: number;
  /** Maximum sequence length (rows of the position embedding). */
  n_ctx: number;
  /** Vocabulary size (rows of the token embedding). */
  vocab_size: number;
  /** Layer-norm epsilon (1e-5 for every released GPT-2). */
  layer_norm_epsilon: number;
}

const base = { layer_norm_epsilon: 1e-5 };

/** The released GPT-2 sizes plus small ones for tests and quick runs. */
export const PRESETS: Record<string, GPT2Config> = {
  gpt2: { n_layer: 12, n_head: 12, n_embd: 768, n_ctx: 1024, vocab_size: 50257, ...base },
  'gpt2-medium': { n_layer: 24, n_head: 16, n_embd: 1024, n_ctx: 1024, vocab_size: 50257, ...base },
  'gpt2-large': { n_layer: 36, n_head: 20, n_embd: 1280, n_ctx: 1024, vocab_size: 50257, ...base },
  'gpt2-xl': { n_layer: 48, n_head: 25, n_embd: 1600, n_ctx: 1024, vocab_size: 50257, ...base },
  /** The project's pretrained base sizes (GPT-2 tokenizer, 256-token context). */
  'base-small': { n_layer: 4, n_head: 4, n_embd: 128, n_ctx: 256, vocab_size: 50257, ...base },
  'base-large': { n_layer: 6, n_head: 8, n_embd: 256, n_ctx: 256, vocab_size: 50257, ...base },
  /** About 6.7M parameters (most of them the 50257-row embedding). */
  'gpt2-mini': { n_layer: 4, n_head: 4, n_embd: 128, n_ctx: 256, vocab_size: 50257, ...base },
  /** A few hundred thousand parameters with a 512-token vocabulary; for tests. */
  'gpt2-tiny': { n_layer: 2, n_head: 4, n_embd: 64, n_ctx: 64, vocab_size: 512, ...base },
  /** Smallest model that still exercises every code path; for gradient checks. */
  'gpt2-micro': { n_layer: 2, n_head: 2, n_embd: 16, n_ctx: 16, vocab_size: 64, ...base },
};

export function presetNames(): string[] {
  return Object.keys(PRESETS);
}

export function getPreset(name: string): GPT2Config {
  const c = PRESETS[name];
  if (!c) throw new Error(`unknown model preset "${name}"; known presets: ${presetNames().join(', ')}`);
  return { ...c };
}

/** Throws a descriptive error when a config is not a usable GPT-2 config. */
export function validateConfig(c: GPT2Config, where = 'config'): GPT2Config {
  for (const k of ['n_layer', 'n_head', 'n_embd', 'n_ctx', 'vocab_size'] as const) {
    const v = c[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) throw new Error(`${where}: "${k}" must be a positive integer, got ${JSON.stringify(v)}`);
  }
  if (c.n_embd % c.n_head !== 0) {
    throw new Error(`${where}: n_embd (${c.n_embd}) is not divisible by n_head (${c.n_head})`);
  }
  if (!(typeof c.layer_norm_epsilon === 'number' && c.layer_norm_epsilon > 0 && Number.isFinite(c.layer_norm_epsilon))) {
    throw new Error(`${where}: layer_norm_epsilon must be a positive number, got ${JSON.stringify(c.layer_norm_epsilon)}`);
  }
  return c;
}

/** Frequency scaling of the rotary embedding (HF `rope_scaling`). */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  | { type: 'llama3'; factor: number; low_freq_factor: number; high_freq_factor: number; original_max_position_embeddings: number };

/**
 * A Llama-family model (Llama, Mistral, Qwen2): the GPT-2 fields keep their meaning
 * (`n_embd` = hidden_size, `n_ctx` = max_position_embeddings, `layer_norm_epsilon` =
 * rms_norm_eps), the rest is what the family adds.
 */
export interface LlamaConfig extends GPT2Config {
  family: 'llama';
  /** key/value heads (grouped-query attention; n_head when there is no grouping) */
  n_kv_head: number;
  /** MLP width I (gate and up project to it) */
  intermediate_size: number;
  rope_theta: number;
  rope_scaling: RopeScaling | null;
  /** the LM head is the token embedding */
  tie_word_embeddings: boolean;
  /** q, k and v have biases (Qwen2) */
  qkv_bias: boolean;
}

export type ModelConfig = GPT2Config | LlamaConfig;

export function isLlama(c: GPT2Config): c is LlamaConfig {
  return (c as Partial<LlamaConfig>).family === 'llama';
}

const llama = (c: Omit<LlamaConfig, 'family' | 'rope_scaling' | 'qkv_bias' | 'layer_norm_epsilon'> & Partial<LlamaConfig>): LlamaConfig =>
  ({ family: 'llama', rope_scaling: null, qkv_bias: false, layer_norm_epsilon: 1e-5, ...c });

/** Llama-family configurations: published ones (for share and fidelity) and small ones for tests. */
export const LLAMA_PRESETS: Record<string, LlamaConfig> = {
  'tinyllama-1.1b': llama({ n_layer: 22, n_head: 32, n_kv_head: 4, n_embd: 2048, intermediate_size: 5632, n_ctx: 2048, vocab_size: 32000, rope_theta: 10000, tie_word_embeddings: false }),
  'llama-3.2-1b': llama({
    n_layer: 16, n_head: 32, n_kv_head: 8, n_embd: 2048, intermediate_size: 8192, n_ctx: 131072, vocab_size: 128256, rope_theta: 500000,
    tie_word_embeddings: true, rope_scaling: { type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
  }),
  'llama-2-7b': llama({ n_layer: 32, n_head: 32, n_kv_head: 32, n_embd: 4096, intermediate_size: 11008, n_ctx: 4096, vocab_size: 32000, rope_theta: 10000, tie_word_embeddings: false }),
  /** about GPT-2 124M's size */
  'llama-124m': llama({ n_layer: 12, n_head: 12, n_kv_head: 4, n_embd: 768, intermediate_size: 2048, n_ctx: 1024, vocab_size: 50257, rope_theta: 10000, tie_word_embeddings: true }),
  /** the bundled base model (models/llama-small): base-small's size, GPT-2's vocabulary, grouped queries, tied head */
  'llama-small': llama({ n_layer: 4, n_head: 4, n_kv_head: 2, n_embd: 128, intermediate_size: 344, n_ctx: 256, vocab_size: 50257, rope_theta: 10000, tie_word_embeddings: true }),
  /** for tests: grouped queries, untied head */
  'llama-tiny': llama({ n_layer: 2, n_head: 4, n_kv_head: 2, n_embd: 64, intermediate_size: 96, n_ctx: 64, vocab_size: 512, rope_theta: 10000, tie_word_embeddings: false }),
  'llama-micro': llama({ n_layer: 2, n_head: 4, n_kv_head: 2, n_embd: 16, intermediate_size: 24, n_ctx: 16, vocab_size: 64, rope_theta: 10000, tie_word_embeddings: false }),
};

/** Throws an InputError naming the field when a Llama config is not usable. */
export function validateLlamaConfig(c: LlamaConfig, where = 'config'): LlamaConfig {
  validateConfig(c, where);
  for (const k of ['n_kv_head', 'intermediate_size'] as const) {
    if (!Number.isInteger(c[k]) || c[k] <= 0) throw new InputError(`${where}: "${k}" must be a positive integer, got ${JSON.stringify(c[k])}`);
  }
  if (c.n_head % c.n_kv_head !== 0) throw new InputError(`${where}: num_attention_heads (${c.n_head}) is not a multiple of num_key_value_heads (${c.n_kv_head})`);
  if ((c.n_embd / c.n_head) % 2 !== 0) throw new InputError(`${where}: the head width ${c.n_embd / c.n_head} must be even for rotary embeddings`);
  if (!(c.rope_theta > 0 && Number.isFinite(c.rope_theta))) throw new InputError(`${where}: rope_theta must be a positive number, got ${JSON.stringify(c.rope_theta)}`);
  const s = c.rope_scaling;
  if (s) {
    const pos = (k: string, v: unknown) => {
      if (!(typeof v === 'number' && v > 0 && Number.isFinite(v))) throw new InputError(`${where}: rope_scaling.${k} must be a positive number, got ${JSON.stringify(v)}`);
    };
    pos('factor', s.factor);
    if (s.type === 'llama3') {
      for (const k of ['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'] as const) pos(k, s[k]);
      if (!(s.high_freq_factor > s.low_freq_factor)) throw new InputError(`${where}: rope_scaling.high_freq_factor (${s.high_freq_factor}) must exceed low_freq_factor (${s.low_freq_factor})`);
    }
  }
  return c;
}

/** Key/value width of one position in a layer's cache: C for GPT-2, n_kv_head * head width for Llama. */
export function kvWidth(c: GPT2Config): number {
  return isLlama(c) ? c.n_kv_head * (c.n_embd / c.n_head) : c.n_embd;
}
