/**
 * GPT-2 over one contiguous parameter buffer and one contiguous gradient buffer (llm.c's
 * layout, Hugging Face's Conv1D orientation): THE block (block.ts) with the plain basis and
 * local linears, through the shared trunk (transformer.ts). Two heads: the tied language-model
 * head and an optional sequence-classification head (last non-pad token or mean -> linear,
 * as HF's GPT2ForSequenceClassification).
 */
import type { GPT2Config } from './config.js';
import { validateConfig } from './config.js';
import { ParamLayout, type ParamKind } from './params.js';
import type { GPT2Weights, ClassifierHead } from './weights.js';
import { sgemm } from '../tensor/gemm.js';
import { Rng } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { zeroFill } from '../tensor/parallel.js';
import { LINEARS, linearDims, type LinearName } from './block.js';
import { LocalLinears, type BlockLinears } from './local_linears.js';
import { PlainBasis } from './plain_basis.js';
import { Transformer, KVCache, type HeadResult } from './transformer.js';

/** out[m,n] = x[m,k] w[k,n] + bias (+ out when accumulate) */
export function linear(out: Float32Array, x: Float32Array, w: Float32Array, bias: Float32Array | null, m: number, k: number, n: number, accumulate = false): void {
  sgemm(false, false, m, n, k, 1, x, k, w, n, accumulate ? 1 : 0, out, n, bias);
}

export type Head = 'lm' | 'cls';

/** The parameter kinds of each block linear (weight, bias). */
export const LINEAR_KINDS: Record<LinearName, [ParamKind, ParamKind]> = {
  qkv: ['qkvw', 'qkvb'], attproj: ['attprojw', 'attprojb'], fc: ['fcw', 'fcb'], fcproj: ['fcprojw', 'fcprojb'],
};

/** The block linears of a parameter buffer, as views (no copy). */
export function blockLinearsOf(layout: ParamLayout, buf: Float32Array): BlockLinears {
  const { n_layer: L, n_embd: d } = layout.config;
  const layers = [];
  for (let l = 0; l < L; l++) {
    const rec = {} as BlockLinears['layers'][number];
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d);
      rec[name] = { w: layout.layer(buf, LINEAR_KINDS[name][0], l), b: layout.layer(buf, LINEAR_KINDS[name][1], l), din, dout };
    }
    layers.push(rec);
  }
  return { n_layer: L, layers };
}

export class GPT2 {
  readonly config: GPT2Config;
  readonly layout: ParamLayout;
  readonly params: Float32Array;
  grads: Float32Array | null = null;
  cls: ClassifierHead | undefined;
  clsGrad: Float32Array | null = null;
  padTokenId: number | undefined;
  private net: Transformer<Float32Array> | null = null;
  private netKey = '';

  constructor(w: GPT2Weights) {
    this.config = validateConfig(w.config);
    this.layout = w.layout;
    if (w.params.length !== this.layout.total) {
      throw new Error(`parameter buffer has ${w.params.length} floats, config needs ${this.layout.total}`);
    }
    this.params = w.params;
    this.cls = w.cls;
    this.padTokenId = w.padTokenId;
  }

  /** GPT-2 initialisation (normal 0.02, residual projections scaled by 1/sqrt(2L)), seeded. */
  static random(config: GPT2Config, seed: number, numLabels?: number): GPT2 {
    const layout = new ParamLayout(validateConfig(config));
    const params = sharedFloat32(layout.total);
    const rng = new Rng(seed);
    const std = 0.02;
    const projStd = 0.02 / Math.sqrt(2 * config.n_layer);
    rng.fillNormal(layout.view(params, 'wte'), std);
    rng.fillNormal(layout.view(params, 'wpe'), 0.01);
    for (const k of ['ln1w', 'ln2w', 'lnfw'] as const) layout.view(params, k).fill(1);
    rng.fillNormal(layout.view(params, 'qkvw'), std);
    rng.fillNormal(layout.view(params, 'attprojw'), projStd);
    rng.fillNormal(layout.view(params, 'fcw'), std);
    rng.fillNormal(layout.view(params, 'fcprojw'), projStd);
    const w: GPT2Weights = { config, layout, params };
    if (numLabels !== undefined) w.cls = randomClassifier(numLabels, config.n_embd, rng);
    return new GPT2(w);
  }

  weights(): GPT2Weights {
    return { config: this.config, layout: this.layout, params: this.params, cls: this.cls, padTokenId: this.padTokenId };
  }

  numParams(): number {
    return this.layout.total + (this.cls ? this.cls.weight.length : 0);
  }

  ensureGrads(): Float32Array {
    if (!this.grads) this.grads = sharedFloat32(this.layout.total);
    if (this.cls && (!this.clsGrad || this.clsGrad.length !== this.cls.weight.length)) {
      this.clsGrad = new Float32Array(this.cls.weight.length);
    }
    return this.grads;
  }

  zeroGrad(): void {
    if (this.grads) zeroFill(this.grads);
    this.clsGrad?.fill(0);
  }

  /** The plain basis and local linears over this model's buffers (rebuilt when the gradient buffers or the head change). */
  private model(): Transformer<Float32Array> {
    const key = `${this.grads ? 'g' : '-'}${this.cls ? this.cls.weight.length : 0}${this.clsGrad ? 'c' : '-'}${this.cls?.pooling ?? ''}`;
    if (this.net && this.netKey === key && (this.net.parts.cls?.weight ?? null) === (this.cls?.weight ?? null)) return this.net;
    const lay = this.layout, p = this.params, g = this.grads;
    const v = (buf: Float32Array, k: ParamKind) => lay.view(buf, k);
    const norms = (buf: Float32Array) => ({ ln1w: v(buf, 'ln1w'), ln1b: v(buf, 'ln1b'), ln2w: v(buf, 'ln2w'), ln2b: v(buf, 'ln2b'), lnfw: v(buf, 'lnfw'), lnfb: v(buf, 'lnfb') });
    const gradLinears = g ? blockLinearsOf(lay, g) : null;
    this.net = new Transformer({
      config: this.config,
      basis: new PlainBasis(this.config, norms(p), g ? norms(g) : null),
      linears: new LocalLinears(blockLinearsOf(lay, p), {
        trainWeights: g !== null,
        grads: gradLinears ? (l, name) => ({ gw: gradLinears.layers[l][name].w, gb: gradLinears.layers[l][name].b }) : undefined,
      }),
      tables: { wte: v(p, 'wte'), wpe: v(p, 'wpe'), gwte: g ? v(g, 'wte') : null, gwpe: g ? v(g, 'wpe') : null },
      cls: this.cls ? { numLabels: this.cls.numLabels, weight: this.cls.weight, grad: this.clsGrad, pooling: this.cls.pooling ?? 'last' } : null,
    });
    this.netKey = key;
    return this.net;
  }

  /**
   * Language-model forward. Returns logits [B,T,V] (a view into internal memory, valid until
   * the next call) and, when targets are given (-1 = ignore), the mean cross-entropy; the
   * logits are then replaced by probabilities in place, and `backward` may follow.
   */
  async forward(tokens: Int32Array, B: number, T: number, targets: Int32Array | null = null, train = targets !== null): Promise<{ logits: Float32Array; loss: number | null }> {
    if (train) this.ensureGrads();
    const r = await this.model().forwardLM(tokens, B, T, targets, train);
    return { logits: r.logits, loss: r.loss };
  }

  /**
   * Classification forward: pools the final-layer-norm states of each row (its last token
   * that is not `padId`, or the mean up to it: the head's `pooling`) and applies the
   * classifier. Returns logits [B, numLabels] and, with labels, the mean cross-entropy
   * (probabilities then replace the logits).
   */
  async forwardCls(tokens: Int32Array, B: number, T: number, labels: Int32Array | null = null, padId = this.padTokenId ?? -1): Promise<HeadResult> {
    if (!this.cls) throw new Error('this model has no classification head (load a checkpoint with score.weight or add one with addClassifier)');
    if (labels) this.ensureGrads();
    return this.model().forwardCls(tokens, B, T, labels, labels !== null, padId);
  }

  /** Backward of the last forward with targets; accumulates into grads (and clsGrad). */
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

export function randomClassifier(numLabels: number, C: number, rng: Rng, labels?: string[]): ClassifierHead {
  if (!Number.isInteger(numLabels) || numLabels < 2) throw new Error(`a classifier needs at least 2 labels, got ${numLabels}`);
  const weight = new Float32Array(numLabels * C);
  rng.fillNormal(weight, 0.02);
  return { numLabels, weight, labels };
}
