/**
 * Fine-tuning through the split: THE block (src/model/block.ts) through the shared trunk,
 * with one basis per mode and the accelerator's linears:
 *   local  - plain weights on both sides (the baseline: same code, no masks);
 *   paper  - explicit input masks, plain residual stream in the enclave;
 *   sealed - rotated residual stream, layer norm folded into the accelerator's weights.
 * Methods: `lora` (adapters and their optimiser state in the enclave, base frozen) and
 * `full` (the accelerator trains its obfuscated linears with SGD-momentum; the enclave
 * trains embeddings, head, classifier and, outside sealed mode, the layer norms).
 * This file only builds the parts and keeps the enclave's trainable tensors; no line of the
 * layer is here.
 */
import type { GPT2Config } from '../model/config.js';
import type { GPT2Weights } from '../model/weights.js';
import type { Pooling } from '../model/kernels.js';
import { sgemm } from '../tensor/gemm.js';
import type { KeyedRng, RandomSource } from '../tensor/rng.js';
import type { EnclaveTensors, FloatName, FloatFields, PlainEnclaveTensors } from '../obfuscate/enclave_tensors.js';
import { LINEARS, linearDims, type BlockDef, type BlockLinearName, type LinearName, type Linears } from '../model/block.js';
import { blockLinearDims, blockLinearNames } from '../model/family.js';
import { isLlama, type LlamaConfig } from '../model/config.js';
import { llamaBlock } from '../model/llama_block.js';
import { llamaAdapters } from '../model/llama.js';
import type { LlamaEnclaveTensors } from '../obfuscate/enclave_tensors.js';
import { LlamaLocalBasis, LlamaPaperBasis, LlamaSealedBasis } from './llama_bases.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import type { AcceleratorLink } from '../protocol/link.js';
import { LoraAdapters, checkLoraTask, type LoraConfig } from '../model/lora.js';
import { IntegrityChecker, IntegrityError } from '../protocol/integrity.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { Transformer, type KVCache } from '../model/transformer.js';
import type { TrunkBasis } from '../model/plain_basis.js';
import { LocalBasis, PaperBasis, SealedBasis } from './bases.js';
import { withEnclaveDelta } from './delta.js';
import { RemoteLinears } from '../protocol/client.js';
import { MixedLinears, type MixingConfig, type MixingStats } from './mixing.js';
import type { Obfuscated } from '../protocol/messages.js';
import { BundleError } from '../errors.js';

export type TrainMode = 'local' | 'sealed' | 'paper';
export type Method = 'lora' | 'full';
export type Task = 'lm' | 'cls';

export interface SplitModelOptions {
  mode: TrainMode;
  method: Method;
  task: Task;
  config: GPT2Config;
  /** the family's tensors (Llama-family ones with a Llama config) */
  tensors: EnclaveTensors | LlamaEnclaveTensors;
  link: AcceleratorLink;
  twoSided?: boolean;
  lora?: LoraConfig;
  /** classification: number of labels (a head is created if the bundle has none) */
  numLabels?: number;
  /** classification: how each row's final states are pooled (default: last non-pad token) */
  pooling?: Pooling;
  padTokenId?: number;
  /** full method, local/paper: keep the layer norms frozen (the equivalent of sealed mode) */
  freezeNorms?: boolean;
  /** randomness for LoRA/classifier init and dropout */
  rng: RandomSource;
  /**
   * classification: the fresh head (plain basis) when the bundle has none; without it the
   * head is drawn from `rng`. `buildSession` draws it from Rng(seed + 7) before obfuscation;
   * passing the same draw here makes a service-side job start where a local run starts.
   */
  classifierInit?: Float32Array;
  /** Freivalds checks of every accelerator reply (on by default when the bundle has check vectors) */
  integrity?: IntegrityChecker | null;
  /** per-call token mixing (Defence 1, src/enclave/mixing.ts); null: off */
  mixing?: MixingConfig | null;
  /** the mixing's key and first stream (default: a fresh secret key) */
  mixingRng?: KeyedRng;
}

/** Each GPT-2 linear's weight and bias in the plain parameter layout. */
export const PLAIN_LINEAR_PARAMS = {
  qkv: ['qkvw', 'qkvb'], attproj: ['attprojw', 'attprojb'], fc: ['fcw', 'fcb'], fcproj: ['fcprojw', 'fcprojb'],
} as const satisfies Record<LinearName, [string, string]>;

/** The tensors the enclave holds in the `local` mode, in the plain parameter layout. */
export const PLAIN_ENCLAVE_PARAMS = ['wte', 'wpe', 'ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb'] as const;

/** Plain weights arranged as the two sides of the `local` mode. */
export function plainSplitParts(w: GPT2Weights): { accelerator: AcceleratorWeights; tensors: PlainEnclaveTensors } {
  const { n_layer: L, n_embd: d } = w.config;
  const lay = w.layout, p = w.params;
  const layers = Array.from({ length: L }, (_, l) => Object.fromEntries(LINEARS.map((name) => {
    const [din, dout] = linearDims(name, d), [wn, bn] = PLAIN_LINEAR_PARAMS[name];
    return [name, { w: Float32Array.from(lay.layer(p, wn, l)), b: Float32Array.from(lay.layer(p, bn, l)), din, dout }];
  })) as AcceleratorWeights['layers'][number]);
  const tensors = {
    mode: 'local', ...Object.fromEntries(PLAIN_ENCLAVE_PARAMS.map((k) => [k, Float32Array.from(lay.view(p, k))])),
    score: w.cls ? Float32Array.from(w.cls.weight) : undefined, chk: null,
  } as PlainEnclaveTensors;
  return { accelerator: { n_layer: L, layers }, tensors };
}

/**
 * The layer-norm-folded equivalent of a model (LN1/LN2 affine moved into the next weights:
 * W' = diag(gamma) W, b' = beta W + b, gamma = 1, beta = 0): the plain counterpart of
 * sealed-mode full fine-tuning.
 */
export function foldLayerNorms(w: GPT2Weights): GPT2Weights {
  const { n_layer: L, n_embd: d } = w.config;
  const lay = w.layout;
  const p = Float32Array.from(w.params);
  for (let l = 0; l < L; l++) {
    for (const [g, b, W, bias, n] of [['ln1w', 'ln1b', 'qkvw', 'qkvb', 3 * d], ['ln2w', 'ln2b', 'fcw', 'fcb', 4 * d]] as const) {
      const gam = lay.layer(p, g, l), bet = lay.layer(p, b, l), Wm = lay.layer(p, W, l), bb = lay.layer(p, bias, l);
      sgemm(false, false, 1, n, d, 1, bet, d, Wm, n, 1, bb, n); // b' = beta W + b (with the unscaled W)
      for (let i = 0; i < d; i++) for (let j = 0; j < n; j++) Wm[i * n + j] *= gam[i];
      gam.fill(1);
      bet.fill(0);
    }
  }
  return { ...w, params: p, cls: w.cls ? { ...w.cls, weight: Float32Array.from(w.cls.weight) } : undefined };
}

export interface ForwardResult {
  loss: number;
  /** rows that counted in the loss (tokens for lm, examples for cls) */
  count: number;
  /** cls: correctly classified examples */
  correct?: number;
  /** cls: predicted label per example */
  predictions?: Int32Array;
  /** evaluation forward only: the probabilities (lm [B*T, V], cls [B, K]) */
  probs?: Float32Array;
}

/**
 * The accelerator's reported squared gradient norm against the enclave's own estimate from
 * the secret projections: a report off by more than GRAD_SQ_FACTOR either way is a lie (the
 * estimate's spread stays far inside it, even for a rank-one gradient), and would set the
 * clipping scale; it fails the step like any integrity failure.
 */
export const GRAD_SQ_FACTOR = 1000;

/** Relative tolerance of the reported norm against the enclave's exact one (float32 sums). */
export const GRAD_SQ_TOL = 1e-3;

/**
 * Checks the reported squared norm against the enclave's exact one (from the Gram matrices of
 * what it sent) and returns the enclave's: the accelerator's number never sets the clipping
 * scale. Without an exact value (several backward calls per linear), the estimate bound.
 */
export function checkedGradSq(reported: number, exact: number | null, estimate: number): number {
  if (exact === null) {
    checkGradSq(reported, estimate);
    return reported;
  }
  if (!(Number.isFinite(reported) && Math.abs(reported - exact) <= GRAD_SQ_TOL * exact + 1e-12)) {
    throw new IntegrityError(`integrity check failed: the accelerator reports a squared gradient norm of ${reported.toExponential(6)}, the enclave computes ${exact.toExponential(6)} from what it sent`);
  }
  return exact;
}

export function checkGradSq(reported: number, estimate: number): void {
  const ok = Number.isFinite(reported) && reported >= 0
    && (estimate === 0 ? reported === 0 : reported <= estimate * GRAD_SQ_FACTOR && reported >= estimate / GRAD_SQ_FACTOR);
  if (!ok) throw new IntegrityError(`integrity check failed: the accelerator reports a squared gradient norm of ${reported.toExponential(3)}, the enclave's estimate from the secret projections is ${estimate.toExponential(3)}`);
}

/** The enclave's trainable tensors, in the order of their shared parameter buffer. */
export type TrainableName = Extract<FloatName, 'wte' | 'wpe' | 'head' | 'headBias' | 'ln1w' | 'ln1b' | 'ln2w' | 'ln2b' | 'lnfw' | 'lnfb' | 'score'>;

export class SplitModel {
  readonly mode: TrainMode;
  readonly method: Method;
  readonly task: Task;
  readonly config: GPT2Config;
  readonly link: AcceleratorLink;
  /** the tensors as the model uses them: trainable ones are views into `params`; in sealed
   *  mode the classifier (and, full fine-tuning, the tables and final bias) in the plain basis */
  readonly t: EnclaveTensors | LlamaEnclaveTensors;
  readonly adapters: LoraAdapters | null;
  /** enclave-side trainable tensors: one contiguous buffer and its gradient */
  readonly trainNames: TrainableName[];
  readonly params: Float32Array;
  readonly grads: Float32Array;
  private gradViews: Partial<Record<TrainableName, Float32Array>> = {};
  readonly numLabels: number;
  readonly pooling: Pooling;
  private padId: number;
  readonly integrity: IntegrityChecker | null;
  private readonly remote: RemoteLinears;
  /** what the block calls: the remote linears, behind the token mixing when it is on */
  private readonly linears: RemoteLinears | MixedLinears;
  /** the model is of the Llama family */
  readonly llama: boolean;
  private readonly basis: TrunkBasis<Obfuscated>;
  private readonly net: Transformer<Obfuscated>;
  /**
   * sealed full fine-tuning: the embeddings and the final bias are held and trained in the
   * plain basis (the enclave rotates the embedded stream with Q), so that an optimiser that is
   * not rotation-invariant (AdamW) takes the same steps as in local training
   */
  private readonly plainEmbed: boolean;

  constructor(o: SplitModelOptions) {
    this.mode = o.mode;
    this.method = o.method;
    this.task = o.task;
    this.config = o.config;
    this.link = o.link;
    this.padId = o.padTokenId ?? -1;
    this.pooling = o.pooling ?? 'last';
    const t = this.t = { ...o.tensors };
    const f: FloatFields = t;
    const c = o.config;
    this.llama = isLlama(c);
    if (this.llama !== ('family' in t && t.family === 'llama')) throw new BundleError(`a ${this.llama ? 'Llama-family' : 'GPT-2'} model needs ${this.llama ? 'Llama-family' : 'GPT-2'} enclave tensors`);
    const { n_layer: L, n_embd: d } = o.config;
    if (t.mode !== o.mode) throw new BundleError(`${o.mode} mode needs ${o.mode}-mode enclave tensors, got ${t.mode} mode`);
    if (o.task === 'cls') {
      const K = o.numLabels;
      if (!K || K < 2) throw new Error('classification needs numLabels >= 2');
      const s = t.score;
      if (!s || s.length !== K * d) {
        if (s) throw new Error(`the bundle's classifier has ${s.length / d} labels, the data has ${K}`);
        if (o.classifierInit && o.classifierInit.length !== K * d) throw new Error(`classifierInit has ${o.classifierInit.length} values, expected ${K} x ${d}`);
        const w = o.classifierInit ? Float32Array.from(o.classifierInit) : new Float32Array(K * d);
        if (!o.classifierInit) o.rng.fillNormal(w, 0.02);
        t.score = w;
      } else if (t.mode === 'sealed') {
        // the bundle's classifier is in the rotated basis (score Q): train it in the plain one
        t.score = this.rotate(s, K, false);
      }
      this.numLabels = K;
    } else this.numLabels = 0;
    this.plainEmbed = t.mode === 'sealed' && o.method === 'full';
    for (const [n, rows] of this.plainRows()) if (n !== 'score') f[n] = this.rotate(f[n]!, rows, false);
    // trainable enclave tensors
    const names: TrainableName[] = [];
    if (o.method === 'full' && this.llama) {
      names.push('wte');
      if (f.head) names.push('head');
      if (o.mode !== 'sealed' && !o.freezeNorms) names.push('ln1w', 'ln2w', 'lnfw');
    } else if (o.method === 'full') {
      names.push('wte', 'wpe');
      if (o.mode === 'sealed') names.push('headBias');
      else if (o.freezeNorms) names.push('lnfb');
      else names.push('ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb');
    }
    if (o.task === 'cls') names.push('score');
    this.trainNames = names;
    const total = names.reduce((s, n) => s + f[n]!.length, 0);
    this.params = sharedFloat32(total);
    this.grads = sharedFloat32(total);
    let off = 0;
    for (const n of names) {
      const x = f[n]!;
      (f[n] = this.params.subarray(off, off + x.length)).set(x);
      this.gradViews[n] = this.grads.subarray(off, off + x.length);
      off += x.length;
    }
    if (o.method === 'lora') {
      if (!o.lora) throw new Error('method lora needs a LoRA config');
      checkLoraTask(o.lora, o.task);
      this.adapters = isLlama(c) ? llamaAdapters(o.lora, c) : new LoraAdapters(o.lora, L, d, o.config.vocab_size);
      this.adapters.init(o.rng);
    } else this.adapters = null;
    const hasBias = (_l: number, name: BlockLinearName) => !isLlama(c) || (name === 'qkv' && c.qkv_bias);
    this.integrity = o.integrity !== undefined ? o.integrity : t.chk ? new IntegrityChecker(t.chk, undefined, hasBias) : null;
    this.remote = new RemoteLinears(o.link, o.config, { trainWeights: o.method === 'full', integrity: this.integrity });
    this.linears = o.mixing ? new MixedLinears(this.remote, o.config, { ...o.mixing, trainWeights: o.method === 'full', rng: o.mixingRng }) : this.remote;
    // paper and local: the norms train where `gradViews` has their gradients
    if ('family' in t) {
      const lc = c as LlamaConfig;
      this.basis = t.mode === 'sealed' ? new LlamaSealedBasis(lc, t, this.plainEmbed)
        : t.mode === 'paper' ? new LlamaPaperBasis(lc, t, this.gradViews) : new LlamaLocalBasis(lc, t, this.gradViews);
    } else {
      this.basis = t.mode === 'sealed' ? new SealedBasis(o.config, t, this.plainEmbed, this.grad('headBias'))
        : t.mode === 'paper' ? new PaperBasis(o.config, t, this.gradViews) : new LocalBasis(o.config, t, this.gradViews);
    }
    const delta = 'family' in t ? null : t.delta;
    this.net = new Transformer({
      config: o.config,
      basis: this.basis,
      linears: withEnclaveDelta(this.linears as Linears<Obfuscated>, delta) as Linears<Obfuscated, string>,
      block: isLlama(c) ? llamaBlock<Obfuscated>(c) as BlockDef<Obfuscated, string> : undefined,
      tables: 'family' in t
        ? { wte: t.wte, wpe: null, gwte: this.grad('wte'), gwpe: null, head: t.head, ghead: this.grad('head') }
        : { wte: t.wte, wpe: t.wpe, gwte: this.grad('wte'), gwpe: this.grad('wpe') },
      cls: o.task === 'cls' ? { numLabels: this.numLabels, weight: t.score!, grad: this.grad('score'), pooling: this.pooling } : null,
      adapters: this.adapters,
      rng: o.rng,
    });
  }

  private grad(n: TrainableName): Float32Array | null {
    return this.gradViews[n] ?? null;
  }

  /** rows x d: x Q (toRotated) or x Q^T (to plain); Q is orthogonal (sealed mode) */
  private rotate(x: Float32Array, rows: number, toRotated: boolean): Float32Array {
    if (this.t.mode !== 'sealed') throw new Error('internal: only sealed mode rotates');
    const d = this.config.n_embd;
    const out = new Float32Array(rows * d);
    sgemm(false, !toRotated, rows, d, d, 1, x, d, this.t.Q, d, 0, out, d);
    return out;
  }

  async forward(tokens: Int32Array, B: number, T: number, targets: Int32Array, train: boolean): Promise<ForwardResult> {
    const n = B * T;
    if (tokens.length !== n) throw new Error(`tokens has ${tokens.length} entries, expected ${n}`);
    if (this.task === 'lm' && targets.length !== n) throw new Error(`targets has ${targets.length} entries, expected ${n}`);
    if (this.task === 'cls' && targets.length !== B) throw new Error(`labels has ${targets.length} entries, expected ${B}`);
    // a new training step: nothing of the previous one is referenced any more, so the link
    // may reuse the buffers of its replies
    if (train) this.link.releaseScratch?.();
    const r = this.task === 'lm'
      ? await this.net.forwardLM(tokens, B, T, targets, train)
      : await this.net.forwardCls(tokens, B, T, targets, train, this.padId);
    const result: ForwardResult = { loss: r.loss!, count: r.count };
    if (this.task === 'cls') Object.assign(result, { correct: r.correct, predictions: r.predictions });
    if (!train) result.probs = Float32Array.from(r.logits);
    return result;
  }

  async backward(): Promise<void> {
    await this.net.backward();
  }

  /** LM logits of the last new position through the KV cache (generation with the fine-tuned model). */
  forwardCached(cache: KVCache, tokens: ArrayLike<number>): Promise<Float32Array> {
    return this.net.forwardCached(cache, tokens);
  }

  /** the token mixing's settings (null when it is off) */
  get mixingConfig(): MixingConfig | null {
    return this.linears instanceof MixedLinears ? this.linears.o : null;
  }

  /** the token mixing's key (null when it is off): a checkpoint keeps it, a resume restores it */
  get mixingKey(): Buffer | null {
    return this.linears instanceof MixedLinears ? this.linears.mixingKey : null;
  }

  set mixingKey(key: Buffer | null) {
    if (key && this.linears instanceof MixedLinears) this.linears.setMixingKey(key);
  }

  /** Starts a named epoch of the token mixing (a step, an evaluation); nothing when it is off. */
  mixingEpoch(label: string): void {
    if (this.linears instanceof MixedLinears) this.linears.epoch(label);
  }

  /** the token mixing's counters (null when it is off) */
  get mixingStats(): MixingStats | null {
    return this.linears instanceof MixedLinears ? this.linears.stats : null;
  }

  /** Drops saved state on both sides (after an aborted step). */
  async reset(): Promise<void> {
    this.linears.reset();
    this.integrity?.reset();
    const rep = await this.link.call({ op: 'reset' });
    if (rep.op === 'error') throw new Error(`accelerator reset failed: ${rep.message}`);
  }

  /** Squared norm of the accelerator's accumulated weight gradients (full method). */
  async acceleratorGradSq(): Promise<number> {
    if (this.method !== 'full') return 0;
    const rep = await this.link.call({ op: 'grad_sq_norm' });
    if (rep.op !== 'ack' || typeof rep.value !== 'number') throw new Error(`accelerator did not report its gradient norm: ${rep.op === 'error' ? rep.message : rep.op}`);
    if (this.integrity) return checkedGradSq(rep.value, this.integrity.gradSqExact(), this.integrity.gradSqEstimate());
    return rep.value;
  }

  async acceleratorUpdate(lr: number, momentum: number, gradScale: number): Promise<void> {
    if (this.method !== 'full') return;
    const rep = await this.link.call({ op: 'apply_update', lr, momentum, gradScale });
    if (rep.op === 'error') throw new Error(`accelerator update failed: ${rep.message}`);
    this.integrity?.applyUpdate(lr, momentum, gradScale);
  }

  /**
   * Probes every linear with one random row and checks the reply against the tracked
   * secret vectors: catches an accelerator that skipped or falsified an update before the
   * enclave commits a checkpoint. Random probes reveal nothing about the data.
   */
  async verifyAccelerator(rng: RandomSource): Promise<void> {
    if (!this.integrity) return;
    for (let l = 0; l < this.config.n_layer; l++) {
      for (const name of blockLinearNames(this.config)) {
        const x = this.basis.buffer(blockLinearDims(this.config, name)[0]);
        rng.fillNormal(x);
        await this.remote.forward(l, name, x, 1, false);
      }
    }
  }

  /** The enclave's trainable tensors by name (views into `params`), as the bundle holds them. */
  trainedTensors(): Map<TrainableName, Float32Array> {
    return new Map(this.trainNames.map((n): [TrainableName, Float32Array] => [n, this.external(n)]));
  }

  /** All enclave tensors (frozen and trained), in the bundle's bases. */
  allTensors(): EnclaveTensors | LlamaEnclaveTensors {
    const m = { ...this.t };
    const f: FloatFields = m;
    for (const [n] of this.plainRows()) f[n] = this.external(n);
    return m;
  }

  /**
   * sealed mode: what the bundle holds rotated (x Q) and this model in the plain basis, with
   * row counts: the classifier of a classification run, the tables and final bias of full
   * fine-tuning (a classifier that does not train stays as the bundle holds it)
   */
  private plainRows(): [TrainableName, number][] {
    const c = this.config;
    if (this.mode !== 'sealed') return [];
    const tables: [TrainableName, number][] = this.llama ? [['wte', c.vocab_size], ...((this.t as FloatFields).head ? [['head', c.vocab_size] as [TrainableName, number]] : [])]
      : [['wte', c.vocab_size], ['wpe', c.n_ctx], ['headBias', 1]];
    const rows: [TrainableName, number][] = this.plainEmbed ? tables : [];
    if (this.task === 'cls') rows.push(['score', this.numLabels]);
    return rows;
  }

  /** a tensor as the bundle holds it */
  private external(n: TrainableName): Float32Array {
    const x = (this.t as FloatFields)[n]!;
    const rows = this.plainRows().find(([k]) => k === n);
    return rows ? this.rotate(x, rows[1], true) : x;
  }
}
