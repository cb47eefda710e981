/**
 * The plain model of either family over one contiguous parameter buffer and one gradient
 * buffer (llm.c's layout): the family's block with its plain basis and local linears, through
 * the shared trunk (transformer.ts). Heads: the language-model head and an optional
 * sequence classifier (last non-pad token or mean -> linear, as HF's *ForSequenceClassification);
 * LoRA adapters in the plain basis when set. A family gives its parts (`familyParts`).
 */
import type { GPT2Config } from './config.js';
import type { Layout } from './params.js';
import type { ClassifierHead } from './weights.js';
import type { BlockDef } from './block.js';
import type { TrunkBasis } from './plain_basis.js';
import { LocalLinears, type BlockLinears } from './local_linears.js';
import type { LoraAdapters } from './lora.js';
import { Transformer, type HeadResult, type KVCache, type Tables } from './transformer.js';
import { Rng } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { zeroFill } from '../tensor/parallel.js';

/** A plain model's weights: the parameter buffer laid out by `layout`, the classifier, the pad token. */
export interface PlainWeights<C extends GPT2Config = GPT2Config> {
  config: C;
  layout: Layout<string>;
  params: Float32Array;
  cls?: ClassifierHead;
  padTokenId?: number;
}

/** A family's part of the trunk over the parameters p and their gradients g (null: frozen). */
export interface FamilyParts {
  basis: TrunkBasis<Float32Array>;
  /** the block linears of a buffer laid out as the parameters (p or g), as views */
  linearsOf(buf: Float32Array): BlockLinears<string>;
  /** the family's block (default: GPT-2's) */
  block?: BlockDef<Float32Array, string>;
  tables: Tables;
}

export abstract class PlainModel<C extends GPT2Config, W extends PlainWeights<C>> {
  readonly config: C;
  readonly layout: W['layout'];
  readonly params: Float32Array;
  grads: Float32Array | null = null;
  cls: ClassifierHead | undefined;
  clsGrad: Float32Array | null = null;
  padTokenId: number | undefined;
  /** LoRA adapters (plain basis), when set */
  adapters: LoraAdapters | null = null;
  private net: Transformer<Float32Array> | null = null;
  private netKey = '';

  /** `config`: the weights' config, validated by the family */
  constructor(w: W, config: C) {
    this.config = config;
    this.layout = w.layout;
    if (w.params.length !== this.layout.total) throw new Error(`parameter buffer has ${w.params.length} floats, config needs ${this.layout.total}`);
    this.params = w.params;
    this.cls = w.cls;
    this.padTokenId = w.padTokenId;
  }

  protected abstract familyParts(p: Float32Array, g: Float32Array | null): FamilyParts;

  weights(): W {
    return { config: this.config, layout: this.layout, params: this.params, cls: this.cls, padTokenId: this.padTokenId } as W;
  }

  numParams(): number {
    return this.layout.total + (this.cls ? this.cls.weight.length : 0);
  }

  ensureGrads(): Float32Array {
    if (!this.grads) this.grads = sharedFloat32(this.layout.total);
    if (this.cls && (!this.clsGrad || this.clsGrad.length !== this.cls.weight.length)) this.clsGrad = new Float32Array(this.cls.weight.length);
    return this.grads;
  }

  zeroGrad(): void {
    if (this.grads) zeroFill(this.grads);
    this.clsGrad?.fill(0);
    this.adapters?.grads.fill(0);
  }

  /** The trunk over this model's buffers (rebuilt when the gradient buffers, the head or the adapters change). */
  private model(): Transformer<Float32Array> {
    const key = `${this.grads ? 'g' : '-'}${this.cls ? this.cls.weight.length : 0}${this.clsGrad ? 'c' : '-'}${this.cls?.pooling ?? ''}`;
    if (this.net && this.netKey === key && this.net.env.adapters === this.adapters && (this.net.parts.cls?.weight ?? null) === (this.cls?.weight ?? null)) return this.net;
    const g = this.grads;
    const f = this.familyParts(this.params, g);
    const gl = g ? f.linearsOf(g) : null;
    this.net = new Transformer({
      config: this.config,
      basis: f.basis,
      linears: new LocalLinears<string>(f.linearsOf(this.params), {
        trainWeights: g !== null,
        grads: gl ? (l, name) => ({ gw: gl.layers[l][name].w, gb: gl.layers[l][name].b }) : undefined,
      }),
      block: f.block,
      tables: f.tables,
      cls: this.cls ? { numLabels: this.cls.numLabels, weight: this.cls.weight, grad: this.clsGrad, pooling: this.cls.pooling ?? 'last' } : null,
      adapters: this.adapters,
    });
    this.netKey = key;
    return this.net;
  }

  /**
   * Language-model forward. Returns logits [B*T, V] (a view into internal memory, valid until
   * the next call) and, when targets are given (-1 = ignore), the mean cross-entropy; the
   * logits are then replaced by probabilities in place, and `backward` may follow.
   */
  async forward(tokens: Int32Array, B: number, T: number, targets: Int32Array | null = null, train = targets !== null): Promise<{ logits: Float32Array; loss: number | null }> {
    if (train) this.ensureGrads();
    const r = await this.model().forwardLM(tokens, B, T, targets, train);
    return { logits: r.logits, loss: r.loss };
  }

  /**
   * Classification forward: pools the final-norm states of each row (its last token that is
   * not `padId`, or the mean up to it: the head's `pooling`) and applies the classifier.
   * Returns logits [B, numLabels] and, with labels, the mean cross-entropy (probabilities
   * then replace the logits).
   */
  async forwardCls(tokens: Int32Array, B: number, T: number, labels: Int32Array | null = null, padId = this.padTokenId ?? -1): Promise<HeadResult> {
    if (!this.cls) throw new Error('this model has no classification head (load a checkpoint with score.weight or add one with addClassifier)');
    if (labels) this.ensureGrads();
    return this.model().forwardCls(tokens, B, T, labels, labels !== null, padId);
  }

  /** Backward of the last forward with targets; accumulates into grads (and clsGrad, the adapters' gradients). */
  async backward(): Promise<void> {
    if (!this.net) throw new Error('backward() needs a preceding forward with targets');
    await this.net.backward();
  }

  /** Logits of the last new position [V], through the KV cache (see `generate`). */
  forwardCached(cache: KVCache, tokens: ArrayLike<number>): Promise<Float32Array> {
    return this.model().forwardCached(cache, tokens);
  }

  /**
   * The activations of the last forward pass (read-only views; valid until the next call).
   * Used by the security tests to compare what the accelerator saw with the plaintext.
   */
  lastActivations() {
    return this.net?.lastActivations() ?? null;
  }

  /** Adds (or replaces) a freshly initialised classification head. */
  addClassifier(numLabels: number, seed: number, labels?: string[]): void {
    this.cls = randomClassifier(numLabels, this.config.n_embd, new Rng(seed), labels);
    this.clsGrad = null;
  }
}

/** Seeded fresh weights: `init` fills the zeroed parameters (views by kind), then comes the classifier when numLabels is given. */
export function randomWeights<C extends GPT2Config, L extends Layout<string>>(config: C, layout: L, seed: number, numLabels: number | undefined, init: (v: (k: Parameters<L['view']>[1]) => Float32Array, rng: Rng) => void): PlainWeights<C> & { layout: L } {
  const params = sharedFloat32(layout.total);
  const rng = new Rng(seed);
  init((k) => layout.view(params, k), rng);
  return { config, layout, params, cls: numLabels === undefined ? undefined : randomClassifier(numLabels, config.n_embd, rng) };
}

export function randomClassifier(numLabels: number, C: number, rng: Rng, labels?: string[]): ClassifierHead {
  if (!Number.isInteger(numLabels) || numLabels < 2) throw new Error(`a classifier needs at least 2 labels, got ${numLabels}`);
  const weight = new Float32Array(numLabels * C);
  rng.fillNormal(weight, 0.02);
  return { numLabels, weight, labels };
}
