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
  const ints: (keyof GPT2Config)[] = ['n_layer', 'n_head', 'n_embd', 'n_ctx', 'vocab_size'];
  for (const k of ints) {
    const v = c[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) {
      throw new Error(`${where}: "${k}" must be a positive integer, got ${JSON.stringify(v)}`);
    }
  }
  if (c.n_embd % c.n_head !== 0) {
    throw new Error(`${where}: n_embd (${c.n_embd}) is not divisible by n_head (${c.n_head})`);
  }
  if (!(typeof c.layer_norm_epsilon === 'number' && c.layer_norm_epsilon > 0 && Number.isFinite(c.layer_norm_epsilon))) {
    throw new Error(`${where}: layer_norm_epsilon must be a positive number, got ${JSON.stringify(c.layer_norm_epsilon)}`);
  }
  return c;
}
