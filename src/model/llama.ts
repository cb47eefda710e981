/**
 * The Llama family's plain model (plain_model.ts): the Llama block (llama_block.ts) with its
 * plain basis (RMSNorm, rotary) and local linears, no position table, the LM head tied to the
 * token embedding or its own.
 */
import { validateLlamaConfig, type LlamaConfig } from './config.js';
import { Layout, one, per } from './params.js';
import { ropeTable, ropeForward, ropeBackward, type RopeTable } from './kernels.js';
import { LLAMA_LINEARS, llamaBlock, llamaDims, llamaLinearDims, type GateUpPart, type LlamaBasis, type LlamaLinearName } from './llama_block.js';
import type { QkvPart } from './block.js';
import { addSection, getSection, PlainBasis } from './plain_basis.js';
import { linearViews } from './local_linears.js';
import { PlainModel, randomWeights, type FamilyParts, type PlainWeights } from './plain_model.js';
import { LoraAdapters, type LoraTarget } from './lora.js';

export const LLAMA_KINDS = ['wte', 'ln1w', 'qkvw', 'qkvb', 'ow', 'ln2w', 'guw', 'downw', 'lnfw', 'head'] as const;
export type LlamaKind = (typeof LLAMA_KINDS)[number];

/**
 * Parameter layout (weights `in x out`, as the block multiplies them):
 * wte [V, C] ; ln1w, ln2w [L, C] ; qkvw [L, C, W] (q | k | v) ; qkvb [L, W] or empty ;
 * ow [L, C, C] ; guw [L, C, 2I] (gate | up) ; downw [L, I, C] ; lnfw [C] ; head [V, C] or empty (tied).
 */
export class LlamaLayout extends Layout<LlamaKind> {
  declare readonly config: LlamaConfig;
  constructor(config: LlamaConfig) {
    const { C, W, I } = llamaDims(config);
    const V = config.vocab_size;
    super(config, {
      wte: one(V, C), ln1w: per(C), qkvw: per(C, W), qkvb: per(config.qkv_bias ? W : 0), ow: per(C, C),
      ln2w: per(C), guw: per(C, 2 * I), downw: per(I, C), lnfw: one(C), head: config.tie_word_embeddings ? one(0) : one(V, C),
    } satisfies Record<LlamaKind, unknown>);
  }
}

const LINEAR_KINDS: Record<LlamaLinearName, LlamaKind> = { qkv: 'qkvw', o: 'ow', gateup: 'guw', down: 'downw' };
const EMPTY = new Float32Array(0);

/** LoRA target widths of a Llama config. */
export function llamaTargetDims(t: LoraTarget, c: LlamaConfig): [number, number] {
  const { C, KV, I } = llamaDims(c);
  if (t === 'fc') throw new Error('LoRA target "fc" is GPT-2\'s; a Llama-family model has gate and up');
  const dims: Record<Exclude<LoraTarget, 'fc'>, [number, number]> = {
    q: [C, C], proj: [C, C], k: [C, KV], v: [C, KV], gate: [C, I], up: [C, I], 'mlp-proj': [I, C], wte: [c.vocab_size, C],
  };
  return dims[t];
}

/** Adapters for a Llama config. */
export function llamaAdapters(cfg: ConstructorParameters<typeof LoraAdapters>[0], c: LlamaConfig): LoraAdapters {
  return new LoraAdapters(cfg, c.n_layer, c.n_embd, c.vocab_size, (t) => llamaTargetDims(t, c));
}

/** RMSNorm gains: [L, C] per block norm, [C] final; gradients or null (frozen). */
export interface RmsParams { ln1w: Float32Array; ln2w: Float32Array; lnfw: Float32Array }

/** The plain basis of the Llama block: RMSNorm, rotary on plain heads, the family's section widths. */
export class LlamaPlainBasis extends PlainBasis implements LlamaBasis<Float32Array> {
  private readonly dims: ReturnType<typeof llamaDims>;
  private readonly rope: RopeTable;

  constructor(private readonly cfg: LlamaConfig, p: RmsParams, g: Partial<RmsParams> | null) {
    super(cfg, { ...p, ln1b: EMPTY, ln2b: EMPTY, lnfb: EMPTY }, g);
    this.dims = llamaDims(cfg);
    this.rope = ropeTable(this.dims.hd, cfg.n_ctx, cfg.rope_theta, cfg.rope_scaling);
  }

  private section(part: QkvPart): [number, number] {
    const { C, KV } = this.dims;
    return part === 'q' ? [0, C] : part === 'k' ? [C, KV] : [C + KV, KV];
  }

  override addQkv(_l: number, part: QkvPart, delta: Float32Array, qkv: Float32Array, n: number): void {
    addSection(qkv, this.dims.W, ...this.section(part), delta, n);
  }

  override qkvGradToPlain(_l: number, part: QkvPart, dqkv: Float32Array, n: number): Float32Array {
    return getSection(dqkv, this.dims.W, ...this.section(part), n);
  }

  override addHidden(_l: number, delta: Float32Array, g: Float32Array, n: number): void {
    for (let i = 0; i < n * this.dims.I; i++) g[i] += delta[i];
  }

  addGateUp(_l: number, part: GateUpPart, delta: Float32Array, gu: Float32Array, n: number): void {
    const I = this.dims.I;
    addSection(gu, 2 * I, part === 'gate' ? 0 : I, I, delta, n);
  }

  gateUpGradToPlain(_l: number, part: GateUpPart, dgu: Float32Array, n: number): Float32Array {
    const I = this.dims.I;
    return getSection(dgu, 2 * I, part === 'gate' ? 0 : I, I, n);
  }

  rotary(_l: number, qkv: Float32Array, B: number, T: number, pos0: number): void {
    const { W, C } = this.dims;
    ropeForward(qkv, W, 0, this.cfg.n_head, this.rope, B, T, pos0);
    ropeForward(qkv, W, C, this.cfg.n_kv_head, this.rope, B, T, pos0);
  }

  rotaryBackward(_l: number, dqkv: Float32Array, B: number, T: number): void {
    const { W, C } = this.dims;
    ropeBackward(dqkv, W, 0, this.cfg.n_head, this.rope, B, T, 0);
    ropeBackward(dqkv, W, C, this.cfg.n_kv_head, this.rope, B, T, 0);
  }
}

/** A Llama-family model's weights. */
export interface LlamaWeights extends PlainWeights<LlamaConfig> {
  layout: LlamaLayout;
}

export class Llama extends PlainModel<LlamaConfig, LlamaWeights> {
  constructor(w: LlamaWeights) {
    super(w, validateLlamaConfig(w.config));
  }

  /** Normal(0, 0.02) weights (HF's initializer_range), unit gains, zero biases; seeded. */
  static random(config: LlamaConfig, seed: number, numLabels?: number): Llama {
    return new Llama(randomWeights(config, new LlamaLayout(validateLlamaConfig(config)), seed, numLabels, (v, rng) => {
      for (const k of ['wte', 'qkvw', 'ow', 'guw', 'downw', 'head'] as const) rng.fillNormal(v(k), 0.02);
      for (const k of ['ln1w', 'ln2w', 'lnfw'] as const) v(k).fill(1);
    }));
  }

  /** The RMSNorm basis, the Llama block and its four linears, the token table and the head (wte when tied). */
  protected familyParts(p: Float32Array, g: Float32Array | null): FamilyParts {
    const lay = this.layout, c = this.config;
    const v = (buf: Float32Array, k: LlamaKind) => lay.view(buf, k);
    const norms = (buf: Float32Array) => ({ ln1w: v(buf, 'ln1w'), ln2w: v(buf, 'ln2w'), lnfw: v(buf, 'lnfw') });
    return {
      basis: new LlamaPlainBasis(c, norms(p), g ? norms(g) : null),
      // q/k/v biases only on qkv, when present
      linearsOf: (buf) => linearViews(c.n_layer, LLAMA_LINEARS, (n) => llamaLinearDims(n, c),
        (l, n) => [lay.layer(buf, LINEAR_KINDS[n], l), n === 'qkv' ? lay.layer(buf, 'qkvb', l) : EMPTY]),
      block: llamaBlock<Float32Array>(c),
      tables: {
        wte: v(p, 'wte'), wpe: null, gwte: g ? v(g, 'wte') : null, gwpe: null,
        head: c.tie_word_embeddings ? null : v(p, 'head'), ghead: g && !c.tie_word_embeddings ? v(g, 'head') : null,
      },
    };
  }
}
