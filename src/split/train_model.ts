/**
 * Fine-tuning through the split. One engine for three modes:
 *   local  - plain weights on both sides (the baseline: same code, no masks);
 *   paper  - explicit input masks, plain residual stream in the enclave;
 *   sealed - rotated residual stream, layer norm folded into the accelerator's weights.
 * Methods: `lora` (adapters and their optimiser state in the enclave, base frozen) and
 * `full` (the accelerator trains its obfuscated linears with SGD-momentum; the enclave
 * trains embeddings, head, classifier and, outside sealed mode, the layer norms).
 * The enclave keeps every activation it produced; the accelerator keeps the inputs it saw.
 */
import type { GPT2Config } from '../model/config.js';
import type { GPT2Weights } from '../model/weights.js';
import {
  encoderForward, encoderBackward, layernormForward, layernormBackward, geluForward, geluBackward,
  attentionForward, attentionBackward, crossEntropyForward, crossEntropyBackward, maskedNormForward, maskedNormBackward,
  poolForward, poolBackward, type Pooling,
} from '../model/kernels.js';
import { sgemm } from '../tensor/gemm.js';
import type { RandomSource } from '../tensor/rng.js';
import { LINEARS, linearDims, permuteCols, type AcceleratorWeights, type EnclaveTensors, type LinearName } from '../obfuscate/transform.js';
import { asObfuscated, type Obfuscated } from './messages.js';
import type { AcceleratorLink } from './link.js';
import { LoraAdapters, checkLoraTask, loraForward, loraBackward, loraEmbedForward, loraEmbedBackward, type LoraConfig, type LoraSaved, type LoraTarget } from '../train/lora.js';
import { IntegrityChecker } from './integrity.js';
import { sharedFloat32 } from '../tensor/shared.js';

export type TrainMode = 'local' | 'sealed' | 'paper';
export type Method = 'lora' | 'full';
export type Task = 'lm' | 'cls';

export interface SplitModelOptions {
  mode: TrainMode;
  method: Method;
  task: Task;
  config: GPT2Config;
  tensors: EnclaveTensors;
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
}

/** Plain weights arranged as the two sides of the `local` mode. */
export function plainSplitParts(w: GPT2Weights): { accelerator: AcceleratorWeights; tensors: EnclaveTensors } {
  const { n_layer: L, n_embd: d } = w.config;
  const lay = w.layout;
  const p = w.params;
  const kinds: Record<LinearName, ['qkvw' | 'attprojw' | 'fcw' | 'fcprojw', 'qkvb' | 'attprojb' | 'fcb' | 'fcprojb']> = {
    qkv: ['qkvw', 'qkvb'], attproj: ['attprojw', 'attprojb'], fc: ['fcw', 'fcb'], fcproj: ['fcprojw', 'fcprojb'],
  };
  const layers = [];
  for (let l = 0; l < L; l++) {
    const rec = {} as AcceleratorWeights['layers'][number];
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d);
      rec[name] = { w: Float32Array.from(lay.layer(p, kinds[name][0], l)), b: Float32Array.from(lay.layer(p, kinds[name][1], l)), din, dout };
    }
    layers.push(rec);
  }
  const tensors: EnclaveTensors = new Map();
  for (const k of ['wte', 'wpe', 'ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb'] as const) tensors.set(k, Float32Array.from(lay.view(p, k)));
  if (w.cls) tensors.set('score', Float32Array.from(w.cls.weight));
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

interface LayerStore {
  hIn: Float32Array; x1: Float32Array; mean1: Float32Array; rstd1: Float32Array;
  qkv: Float32Array; att: Float32Array; o: Float32Array;
  h2: Float32Array; x2: Float32Array; mean2: Float32Array; rstd2: Float32Array;
  f: Float32Array; g: Float32Array; th: Float32Array;
  lora: Map<LoraTarget, LoraSaved>;
  /** what was sent to each linear (the enclave mirrors the accelerator's weight updates from it) */
  sent: Map<LinearName, Float32Array>;
  /** LoRA proj / mlp-proj inputs in plain space (paper mode), else aliases */
  oPlain?: Float32Array; gPlain?: Float32Array;
}

interface StepState {
  B: number; T: number; tokens: Int32Array; targets: Int32Array; count: number;
  layers: LayerStore[];
  hL: Float32Array; xf: Float32Array; meanf: Float32Array; rstdf: Float32Array; hf: Float32Array;
  probs: Float32Array; lens?: Int32Array; pooledH?: Float32Array;
  /** the embedding adapter's A[tokens] */
  embU?: Float32Array;
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

const SECTION: Record<'q' | 'k' | 'v', number> = { q: 0, k: 1, v: 2 };

/** Refuses to send a diverged (NaN/Inf) tensor across the boundary. */
function assertFinite(x: Float32Array, what: string): void {
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) throw new Error(`${what} contains a non-finite value at index ${i}`);
}

export class SplitModel {
  readonly mode: TrainMode;
  readonly method: Method;
  readonly task: Task;
  readonly config: GPT2Config;
  readonly link: AcceleratorLink;
  readonly t: EnclaveTensors;
  readonly adapters: LoraAdapters | null;
  /** enclave-side trainable tensors: one contiguous buffer and its gradient */
  readonly trainNames: string[];
  readonly params: Float32Array;
  readonly grads: Float32Array;
  private gradViews = new Map<string, Float32Array>();
  readonly numLabels: number;
  readonly pooling: Pooling;
  private padId: number;
  private rng: RandomSource;
  private state: StepState | null = null;
  private twoSided: boolean;
  readonly integrity: IntegrityChecker | null;
  private sentNow: Map<LinearName, Float32Array> | null = null;
  /** the forward pass in progress is a training one (its replies are scratch) */
  private training = false;
  /**
   * sealed full fine-tuning: the embeddings and the final bias are held and trained in the
   * plain basis (the enclave rotates the embedded stream with Q), so that an optimiser that is
   * not rotation-invariant (AdamW) takes the same steps as in local training
   */
  private readonly plainEmbed: boolean;
  /** sealed, plainEmbed: G Q^T (the final norm's output straight into the plain basis) */
  private gPlain: Float32Array | null = null;

  constructor(o: SplitModelOptions) {
    this.mode = o.mode;
    this.method = o.method;
    this.task = o.task;
    this.config = o.config;
    this.link = o.link;
    this.rng = o.rng;
    this.twoSided = o.twoSided ?? false;
    this.padId = o.padTokenId ?? -1;
    this.pooling = o.pooling ?? 'last';
    this.t = new Map(o.tensors);
    const { n_layer: L, n_embd: d } = o.config;
    if (o.task === 'cls') {
      const K = o.numLabels;
      if (!K || K < 2) throw new Error('classification needs numLabels >= 2');
      const s = this.t.get('score');
      if (!s || s.length !== K * d) {
        if (s) throw new Error(`the bundle's classifier has ${s.length / d} labels, the data has ${K}`);
        if (o.classifierInit && o.classifierInit.length !== K * d) throw new Error(`classifierInit has ${o.classifierInit.length} values, expected ${K} x ${d}`);
        const w = o.classifierInit ? Float32Array.from(o.classifierInit) : new Float32Array(K * d);
        if (!o.classifierInit) o.rng.fillNormal(w, 0.02);
        this.t.set('score', w);
      } else if (o.mode === 'sealed') {
        // the bundle's classifier is in the rotated basis (score Q): train it in the plain one
        this.t.set('score', this.rotate(s, K, false));
      }
      this.numLabels = K;
    } else this.numLabels = 0;
    this.plainEmbed = o.mode === 'sealed' && o.method === 'full';
    if (this.plainEmbed) {
      for (const [n, rows] of this.basisRows()) if (n !== 'score') this.t.set(n, this.rotate(this.tensor(n), rows, false));
      this.gPlain = this.rotate(this.tensor('G'), d, false);
    }
    // trainable enclave tensors
    const names: string[] = [];
    if (o.method === 'full') {
      names.push('wte', 'wpe');
      if (o.mode === 'sealed') names.push('headBias');
      else if (o.freezeNorms) names.push('lnfb');
      else names.push('ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb');
    }
    if (o.task === 'cls') names.push('score');
    this.trainNames = names;
    const total = names.reduce((s, n) => s + this.tensor(n).length, 0);
    this.params = sharedFloat32(total);
    this.grads = sharedFloat32(total);
    let off = 0;
    for (const n of names) {
      const x = this.tensor(n);
      const view = this.params.subarray(off, off + x.length);
      view.set(x);
      this.t.set(n, view);
      this.gradViews.set(n, this.grads.subarray(off, off + x.length));
      off += x.length;
    }
    if (o.method === 'lora') {
      if (!o.lora) throw new Error('method lora needs a LoRA config');
      checkLoraTask(o.lora, o.task);
      this.adapters = new LoraAdapters(o.lora, L, d, o.config.vocab_size);
      this.adapters.init(o.rng);
    } else this.adapters = null;
    this.integrity = o.integrity !== undefined ? o.integrity : this.t.has('chk.0.qkv.r') ? new IntegrityChecker(this.t, L) : null;
    if (o.mode === 'paper' && !this.t.has('R1')) throw new Error('paper mode needs the input masks R1/R2 in the enclave bundle');
    if (o.mode === 'sealed' && !this.t.has('G')) throw new Error('sealed mode needs G and u in the enclave bundle');
    if (o.mode !== 'local' && (o.method === 'lora' || o.task === 'cls') && !this.t.has('hA')) throw new Error('LoRA and classification need the per-head masks (hA, hB, headPerm, pi) in the enclave bundle');
  }

  private tensor(n: string): Float32Array {
    const x = this.t.get(n);
    if (!x) throw new Error(`enclave bundle lacks tensor "${n}"`);
    return x;
  }

  private grad(n: string): Float32Array | null {
    return this.gradViews.get(n) ?? null;
  }

  private layerSlice(name: string, l: number, size: number): Float32Array {
    return this.tensor(name).subarray(l * size, (l + 1) * size);
  }

  // ---------------------------------------------------------------- boundary
  private async fwd(l: number, name: LinearName, x: Float32Array, n: number, save: boolean): Promise<Float32Array> {
    const [, dout] = linearDims(name, this.config.n_embd);
    assertFinite(x, `the enclave's input to h.${l}.${name}`);
    // training replies live until the next training step (see releaseScratch in forward)
    const rep = await this.link.call({ op: 'linear_forward', layer: l, name, rows: n, x: x as Obfuscated, save }, { scratch: this.training });
    const y = this.checkTensor(rep, l, name, n, dout);
    this.integrity?.checkForward(l, name, x, y, n);
    if (save) this.sentNow?.set(name, x);
    return y;
  }

  private async bwd(l: number, name: LinearName, dy: Float32Array, n: number, input: boolean, sent?: Map<LinearName, Float32Array>): Promise<Float32Array | null> {
    const weight = this.method === 'full';
    if (!input && !weight) return null;
    if (weight && this.integrity) {
      const x = sent?.get(name);
      if (!x) throw new Error(`internal: no record of the input sent to h.${l}.${name}`);
      this.integrity.accumulate(l, name, x, dy, n);
    }
    const [din] = linearDims(name, this.config.n_embd);
    assertFinite(dy, `the enclave's output gradient for h.${l}.${name}`);
    const rep = await this.link.call({ op: 'linear_backward', layer: l, name, rows: n, dy: asObfuscated(dy), input, weight }, { scratch: true });
    if (!input) {
      if (rep.op === 'error') throw new Error(`accelerator refused backward of h.${l}.${name}: ${rep.message}`);
      return null;
    }
    const dx = this.checkTensor(rep, l, name, n, din);
    this.integrity?.checkBackward(l, name, dy, dx, n);
    return dx;
  }

  private checkTensor(rep: Awaited<ReturnType<AcceleratorLink['call']>>, l: number, name: string, rows: number, cols: number): Float32Array {
    if (rep.op === 'error') throw new Error(`accelerator refused h.${l}.${name}: ${rep.message}`);
    if (rep.op !== 'tensor') throw new Error(`accelerator sent "${rep.op}" instead of a tensor for h.${l}.${name}`);
    if (rep.rows !== rows || rep.cols !== cols || rep.data.length !== rows * cols) throw new Error(`accelerator reply for h.${l}.${name} has shape ${rep.rows} x ${rep.cols}, expected ${rows} x ${cols}`);
    const y = rep.data;
    for (let i = 0; i < y.length; i++) if (!Number.isFinite(y[i])) throw new Error(`accelerator reply for h.${l}.${name} contains a non-finite value at ${i}`);
    return y;
  }

  // ---------------------------------------------------------------- paper-mode per-head maps
  /** toMasked: dst[slot j] = src[head perm[j]] M ; toPlain: dst[head perm[j]] = src[slot j] M  (M^T with trans) */
  private headMap(l: number, mats: string, src: Float32Array, dst: Float32Array, rows: number, ld: number, off: number, toMasked: boolean, trans: boolean, accumulate: boolean): void {
    const { n_head: H, n_embd: d } = this.config;
    const dh = d / H;
    const perm = this.tensor('headPerm').subarray(l * H, (l + 1) * H);
    const M = this.tensor(mats);
    for (let j = 0; j < H; j++) {
      const h = perm[j];
      const from = off + (toMasked ? h : j) * dh;
      const to = off + (toMasked ? j : h) * dh;
      const m = M.subarray((l * H + h) * dh * dh, (l * H + h + 1) * dh * dh);
      sgemm(false, trans, rows, dh, dh, 1, src.subarray(from), ld, m, dh, accumulate ? 1 : 0, dst.subarray(to), ld);
    }
  }

  private pi(l: number): Int32Array {
    const d = this.config.n_embd;
    return Int32Array.from(this.tensor('pi').subarray(l * 4 * d, (l + 1) * 4 * d));
  }

  // ---------------------------------------------------------------- sealed: plain-basis adapters
  /** rows x d: x Q (toRotated) or x Q^T (to plain); Q is orthogonal. Before the constructor
   *  has finished (the classifier) Q comes straight from the bundle. */
  private rotate(x: Float32Array, rows: number, toRotated: boolean, accumulateInto?: Float32Array): Float32Array {
    const d = this.config.n_embd;
    const out = accumulateInto ?? new Float32Array(rows * d);
    sgemm(false, !toRotated, rows, d, d, 1, x, d, this.tensor('Q'), d, accumulateInto ? 1 : 0, out, d);
    return out;
  }

  /** sealed: the plain layer-norm output a = (n* Q^T) diag(gamma) + beta from the enclave's n* */
  private plainNormOut(which: 1 | 2, l: number, x: Float32Array, n: number): Float32Array {
    const d = this.config.n_embd;
    const a = this.rotate(x, n, false);
    const g = this.layerSlice(which === 1 ? 'ln1w' : 'ln2w', l, d), b = this.layerSlice(which === 1 ? 'ln1b' : 'ln2b', l, d);
    for (let r = 0; r < n; r++) for (let j = 0, o = r * d; j < d; j++) a[o + j] = a[o + j] * g[j] + b[j];
    return a;
  }

  /** sealed: gradient w.r.t. a mapped to n*: (da diag(gamma)) Q */
  private plainNormGrad(which: 1 | 2, l: number, da: Float32Array, n: number): Float32Array {
    const d = this.config.n_embd;
    const g = this.layerSlice(which === 1 ? 'ln1w' : 'ln2w', l, d);
    const t = new Float32Array(n * d);
    for (let r = 0; r < n; r++) for (let j = 0, o = r * d; j < d; j++) t[o + j] = da[o + j] * g[j];
    return this.rotate(t, n, true);
  }

  // ---------------------------------------------------------------- norms
  /** norm input of layer l (which = 1 | 2): returns the enclave-side x (a or n*) and what is sent */
  private norm(which: 1 | 2, l: number, h: Float32Array, x: Float32Array, mean: Float32Array, rstd: Float32Array, n: number): Float32Array {
    const { n_embd: d, layer_norm_epsilon: eps } = this.config;
    if (this.mode === 'sealed') {
      maskedNormForward(x, mean, rstd, h, this.tensor('u'), n, d, eps);
      return x;
    }
    layernormForward(x, mean, rstd, h, this.layerSlice(which === 1 ? 'ln1w' : 'ln2w', l, d), this.layerSlice(which === 1 ? 'ln1b' : 'ln2b', l, d), n, d, eps);
    if (this.mode === 'local') return x;
    const out = new Float32Array(n * d);
    sgemm(false, false, n, d, d, 1, x, d, this.layerSlice(which === 1 ? 'R1' : 'R2', l, d * d), d, 0, out, d);
    return out;
  }

  private normBackward(which: 1 | 2, l: number, dh: Float32Array, dsent: Float32Array, x: Float32Array, h: Float32Array, mean: Float32Array, rstd: Float32Array, n: number): void {
    const d = this.config.n_embd;
    if (this.mode === 'sealed') {
      maskedNormBackward(dh, dsent, x, this.tensor('u'), rstd, n, d);
      return;
    }
    let dx = dsent;
    if (this.mode === 'paper') {
      dx = new Float32Array(n * d);
      sgemm(false, true, n, d, d, 1, dsent, d, this.layerSlice(which === 1 ? 'R1' : 'R2', l, d * d), d, 0, dx, d);
    }
    const gw = this.grad(which === 1 ? 'ln1w' : 'ln2w');
    const gb = this.grad(which === 1 ? 'ln1b' : 'ln2b');
    layernormBackward(dh, gw ? gw.subarray(l * d, (l + 1) * d) : null, gb ? gb.subarray(l * d, (l + 1) * d) : null, dx, h, this.layerSlice(which === 1 ? 'ln1w' : 'ln2w', l, d), mean, rstd, n, d);
  }

  /** add an accelerator projection output (attention or MLP) to the residual; returns the value in residual space */
  private unmaskOut(which: 'o' | 'p', l: number, y: Float32Array, n: number): Float32Array {
    if (this.mode !== 'paper' || !this.twoSided) return y;
    const d = this.config.n_embd;
    const out = new Float32Array(n * d);
    sgemm(false, false, n, d, d, 1, y, d, this.layerSlice(which === 'o' ? 'RoInv' : 'RpInv', l, d * d), d, 0, out, d);
    return out;
  }

  private maskOutGrad(which: 'o' | 'p', l: number, dy: Float32Array, n: number): Float32Array {
    if (this.mode !== 'paper' || !this.twoSided) return dy;
    const d = this.config.n_embd;
    const out = new Float32Array(n * d);
    sgemm(false, true, n, d, d, 1, dy, d, this.layerSlice(which === 'o' ? 'RoInv' : 'RpInv', l, d * d), d, 0, out, d);
    return out;
  }

  // ---------------------------------------------------------------- forward
  async forward(tokens: Int32Array, B: number, T: number, targets: Int32Array, train: boolean): Promise<ForwardResult> {
    const c = this.config;
    const { n_layer: L, n_embd: d, n_head: H, vocab_size: V } = c;
    const n = B * T;
    if (T > c.n_ctx) throw new Error(`sequence length ${T} exceeds the model's context of ${c.n_ctx}`);
    if (tokens.length !== n) throw new Error(`tokens has ${tokens.length} entries, expected ${n}`);
    for (let i = 0; i < n; i++) if (tokens[i] < 0 || tokens[i] >= V) throw new Error(`token id ${tokens[i]} at position ${i} is out of range [0, ${V})`);
    const save = train && this.method === 'full';
    if (train) {
      // a new training step: nothing of the previous one is referenced any more (its state is
      // replaced below), so the link may reuse the buffers of its replies
      this.state = null;
      this.link.releaseScratch?.();
    }
    this.training = train;
    const ad = this.adapters;
    const dropout = train && ad ? ad.config.dropout : 0;
    const h = new Float32Array(n * d);
    encoderForward(h, tokens, this.tensor('wte'), this.tensor('wpe'), B, T, d);
    if (this.plainEmbed) h.set(this.rotate(h, n, true));
    const embAd = ad?.embedding();
    let embU: Float32Array | undefined;
    if (embAd && this.mode === 'sealed') {
      // the adapter's update is plain; the sealed stream is rotated
      const delta = new Float32Array(n * d);
      embU = loraEmbedForward(delta, tokens, embAd, n, ad!.scale, false);
      this.rotate(delta, n, true, h);
    } else if (embAd) embU = loraEmbedForward(h, tokens, embAd, n, ad!.scale, true);
    const layers: LayerStore[] = [];
    for (let l = 0; l < L; l++) {
      const s: LayerStore = {
        hIn: Float32Array.from(h), x1: new Float32Array(n * d), mean1: new Float32Array(n), rstd1: new Float32Array(n),
        qkv: new Float32Array(0), att: new Float32Array(B * H * T * T), o: new Float32Array(n * d),
        h2: new Float32Array(0), x2: new Float32Array(n * d), mean2: new Float32Array(n), rstd2: new Float32Array(n),
        f: new Float32Array(0), g: new Float32Array(n * 4 * d), th: train ? new Float32Array(n * 4 * d) : new Float32Array(0), lora: new Map(), sent: new Map(),
      };
      this.sentNow = s.sent;
      // attention
      const send1 = this.norm(1, l, h, s.x1, s.mean1, s.rstd1, n);
      s.qkv = await this.fwd(l, 'qkv', send1, n, save);
      if (ad) {
        let a1: Float32Array | null = null;
        for (const t of ['q', 'k', 'v'] as const) {
          const v = ad.get(l, t);
          if (!v) continue;
          a1 ??= this.mode === 'sealed' ? this.plainNormOut(1, l, s.x1, n) : s.x1;
          const delta = new Float32Array(n * d);
          s.lora.set(t, loraForward(delta, a1, v, n, ad.scale, dropout, this.rng, false));
          this.addSection(l, t, delta, s.qkv, n);
        }
      }
      attentionForward(s.o, s.att, s.qkv, B, T, d, H);
      const y = this.unmaskOut('o', l, await this.fwd(l, 'attproj', s.o, n, save), n);
      const vp = ad?.get(l, 'proj');
      if (vp) {
        s.oPlain = this.mode !== 'local' ? this.oToPlain(l, s.o, n) : s.o;
        if (this.mode === 'sealed') {
          const delta = new Float32Array(n * d);
          s.lora.set('proj', loraForward(delta, s.oPlain, vp, n, ad!.scale, dropout, this.rng, false));
          this.rotate(delta, n, true, y);
        } else s.lora.set('proj', loraForward(y, s.oPlain, vp, n, ad!.scale, dropout, this.rng, true));
      }
      for (let i = 0; i < n * d; i++) h[i] += y[i];
      s.h2 = Float32Array.from(h);
      // MLP
      const send2 = this.norm(2, l, h, s.x2, s.mean2, s.rstd2, n);
      s.f = await this.fwd(l, 'fc', send2, n, save);
      const vf = ad?.get(l, 'fc');
      if (vf) {
        const delta = new Float32Array(n * 4 * d);
        const a2 = this.mode === 'sealed' ? this.plainNormOut(2, l, s.x2, n) : s.x2;
        s.lora.set('fc', loraForward(delta, a2, vf, n, ad!.scale, dropout, this.rng, false));
        const dm = this.mode !== 'local' ? permuteCols(delta, n, 4 * d, this.pi(l), false) : delta;
        for (let i = 0; i < dm.length; i++) s.f[i] += dm[i];
      }
      geluForward(s.g, s.f, n * 4 * d, train ? s.th : null);
      const z = this.unmaskOut('p', l, await this.fwd(l, 'fcproj', s.g, n, save), n);
      const vm = ad?.get(l, 'mlp-proj');
      if (vm) {
        s.gPlain = this.mode !== 'local' ? permuteCols(s.g, n, 4 * d, this.pi(l), true) : s.g;
        if (this.mode === 'sealed') {
          const delta = new Float32Array(n * d);
          s.lora.set('mlp-proj', loraForward(delta, s.gPlain, vm, n, ad!.scale, dropout, this.rng, false));
          this.rotate(delta, n, true, z);
        } else s.lora.set('mlp-proj', loraForward(z, s.gPlain, vm, n, ad!.scale, dropout, this.rng, true));
      }
      for (let i = 0; i < n * d; i++) h[i] += z[i];
      layers.push(s);
    }
    this.sentNow = null;
    // final norm and head
    const xf = new Float32Array(n * d), meanf = new Float32Array(n), rstdf = new Float32Array(n);
    const hf = new Float32Array(n * d);
    if (this.mode === 'sealed') {
      maskedNormForward(xf, meanf, rstdf, h, this.tensor('u'), n, d, c.layer_norm_epsilon);
      // hf = xf G + beta_f Q (rotated), or with plainEmbed xf G Q^T + beta_f (plain)
      sgemm(false, false, n, d, d, 1, xf, d, this.gPlain ?? this.tensor('G'), d, 0, hf, d, this.tensor('headBias'));
    } else {
      layernormForward(hf, meanf, rstdf, h, this.tensor('lnfw'), this.tensor('lnfb'), n, d, c.layer_norm_epsilon);
    }
    let result: ForwardResult;
    let probs: Float32Array;
    let lens: Int32Array | undefined;
    let pooledH: Float32Array | undefined;
    if (this.task === 'lm') {
      if (targets.length !== n) throw new Error(`targets has ${targets.length} entries, expected ${n}`);
      probs = new Float32Array(n * V);
      sgemm(false, true, n, V, d, 1, hf, d, this.tensor('wte'), d, 0, probs, V);
      const r = crossEntropyForward(probs, targets, new Float32Array(n), n, V);
      result = { loss: r.loss, count: r.count };
    } else {
      const K = this.numLabels;
      if (targets.length !== B) throw new Error(`labels has ${targets.length} entries, expected ${B}`);
      for (let b = 0; b < B; b++) if (targets[b] < 0 || targets[b] >= K) throw new Error(`label ${targets[b]} of example ${b} is outside [0, ${K})`);
      pooledH = new Float32Array(B * d);
      lens = poolForward(pooledH, hf, tokens, B, T, d, this.padId, this.pooling);
      if (this.mode === 'sealed' && !this.plainEmbed) pooledH = this.rotate(pooledH, B, false); // the classifier is plain
      probs = new Float32Array(B * K);
      sgemm(false, true, B, K, d, 1, pooledH, d, this.tensor('score'), d, 0, probs, K);
      const predictions = new Int32Array(B);
      let correct = 0;
      for (let b = 0; b < B; b++) {
        let best = 0;
        for (let k = 1; k < K; k++) if (probs[b * K + k] > probs[b * K + best]) best = k;
        predictions[b] = best;
        if (best === targets[b]) correct++;
      }
      const r = crossEntropyForward(probs, targets, new Float32Array(B), B, K);
      result = { loss: r.loss, count: r.count, correct, predictions };
    }
    if (!train) result.probs = probs;
    this.state = train ? { B, T, tokens, targets, count: result.count, layers, hL: Float32Array.from(h), xf, meanf, rstdf, hf, probs, lens, pooledH, embU } : null;
    return result;
  }

  private addSection(l: number, t: 'q' | 'k' | 'v', delta: Float32Array, qkv: Float32Array, n: number): void {
    const d = this.config.n_embd;
    const off = SECTION[t] * d;
    if (this.mode !== 'local') {
      // scatter the plain update into the masked section: q A, k A^-T, v B (per head, permuted)
      const wide = new Float32Array(n * 3 * d);
      for (let r = 0; r < n; r++) wide.set(delta.subarray(r * d, (r + 1) * d), r * 3 * d + off);
      this.headMap(l, t === 'q' ? 'hA' : t === 'k' ? 'hAinvT' : 'hB', wide, qkv, n, 3 * d, off, true, false, true);
      return;
    }
    for (let r = 0; r < n; r++) {
      const o = r * 3 * d + off;
      for (let j = 0; j < d; j++) qkv[o + j] += delta[r * d + j];
    }
  }

  /** section gradient of a q/k/v update, mapped back to plain space in paper mode */
  private sectionGrad(l: number, t: 'q' | 'k' | 'v', dqkv: Float32Array, n: number): Float32Array {
    const d = this.config.n_embd;
    const off = SECTION[t] * d;
    const out = new Float32Array(n * d);
    if (this.mode !== 'local') {
      const wide = new Float32Array(n * 3 * d);
      this.headMap(l, t === 'q' ? 'hA' : t === 'k' ? 'hAinvT' : 'hB', dqkv, wide, n, 3 * d, off, false, true, false);
      for (let r = 0; r < n; r++) out.set(wide.subarray(r * 3 * d + off, r * 3 * d + off + d), r * d);
      return out;
    }
    for (let r = 0; r < n; r++) out.set(dqkv.subarray(r * 3 * d + off, r * 3 * d + off + d), r * d);
    return out;
  }

  private oToPlain(l: number, o: Float32Array, n: number): Float32Array {
    const out = new Float32Array(o.length);
    this.headMap(l, 'hBinv', o, out, n, this.config.n_embd, 0, false, false, false);
    return out;
  }

  // ---------------------------------------------------------------- backward
  async backward(): Promise<void> {
    const st = this.state;
    if (!st) throw new Error('backward() needs a preceding training forward');
    this.state = null;
    const c = this.config;
    const { n_layer: L, n_embd: d, n_head: H, vocab_size: V } = c;
    const { B, T } = st;
    const n = B * T;
    const ad = this.adapters;
    // head
    const dhf = new Float32Array(n * d);
    if (this.task === 'lm') {
      crossEntropyBackward(st.probs, st.probs, st.targets, n, V, st.count);
      sgemm(false, false, n, d, V, 1, st.probs, V, this.tensor('wte'), d, 0, dhf, d);
      const gwte = this.grad('wte');
      if (gwte) sgemm(true, false, V, d, n, 1, st.probs, V, st.hf, d, 1, gwte, d);
    } else {
      const K = this.numLabels;
      crossEntropyBackward(st.probs, st.probs, st.targets, B, K, st.count);
      const dpooled = new Float32Array(B * d);
      sgemm(false, false, B, d, K, 1, st.probs, K, this.tensor('score'), d, 0, dpooled, d);
      sgemm(true, false, K, d, B, 1, st.probs, K, st.pooledH!, d, 1, this.grad('score')!, d);
      const dp = this.mode === 'sealed' && !this.plainEmbed ? this.rotate(dpooled, B, true) : dpooled;
      poolBackward(dhf, dp, st.lens!, B, T, d, this.pooling);
    }
    const dh = new Float32Array(n * d);
    if (this.mode === 'sealed') {
      const gb = this.grad('headBias');
      if (gb) for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) gb[j] += dhf[r * d + j];
      const dxf = new Float32Array(n * d);
      sgemm(false, true, n, d, d, 1, dhf, d, this.gPlain ?? this.tensor('G'), d, 0, dxf, d);
      maskedNormBackward(dh, dxf, st.xf, this.tensor('u'), st.rstdf, n, d);
    } else {
      layernormBackward(dh, this.grad('lnfw'), this.grad('lnfb'), dhf, st.hL, this.tensor('lnfw'), st.meanf, st.rstdf, n, d);
    }
    const embTrain = this.grad('wte') !== null || this.grad('wpe') !== null;
    const normTrain = this.grad('ln1w') !== null;
    for (let l = L - 1; l >= 0; l--) {
      const s = st.layers[l];
      // MLP: h3 = h2 + z(g(f(x2)))
      const dz = this.maskOutGrad('p', l, dh, n);
      const dg = (await this.bwd(l, 'fcproj', dz, n, true, s.sent))!;
      const vm = ad?.get(l, 'mlp-proj');
      if (vm) {
        const dgp = new Float32Array(n * 4 * d);
        loraBackward(dgp, this.mode === 'sealed' ? this.rotate(dh, n, false) : dh, vm, s.lora.get('mlp-proj')!, n, ad!.scale);
        const back = this.mode !== 'local' ? permuteCols(dgp, n, 4 * d, this.pi(l), false) : dgp;
        for (let i = 0; i < back.length; i++) dg[i] += back[i];
      }
      const df = new Float32Array(n * 4 * d);
      geluBackward(df, s.f, dg, n * 4 * d, s.th);
      const dsend2 = (await this.bwd(l, 'fc', df, n, true, s.sent))!;
      const vf = ad?.get(l, 'fc');
      let loraDx2: Float32Array | null = null;
      if (vf) {
        const dDelta = this.mode !== 'local' ? permuteCols(df, n, 4 * d, this.pi(l), true) : df;
        loraDx2 = new Float32Array(n * d);
        loraBackward(loraDx2, dDelta, vf, s.lora.get('fc')!, n, ad!.scale);
        if (this.mode === 'sealed') loraDx2 = this.plainNormGrad(2, l, loraDx2, n);
      }
      this.normBackwardWithLora(2, l, dh, dsend2, loraDx2, s.x2, s.h2, s.mean2, s.rstd2, n);
      // attention: h2 = h + y(o(qkv(x1)))
      const dy = this.maskOutGrad('o', l, dh, n);
      const dO = (await this.bwd(l, 'attproj', dy, n, true, s.sent))!;
      const vp = ad?.get(l, 'proj');
      if (vp) {
        const doPlain = new Float32Array(n * d);
        loraBackward(doPlain, this.mode === 'sealed' ? this.rotate(dh, n, false) : dh, vp, s.lora.get('proj')!, n, ad!.scale);
        if (this.mode !== 'local') this.headMap(l, 'hBinv', doPlain, dO, n, d, 0, true, true, true);
        else for (let i = 0; i < n * d; i++) dO[i] += doPlain[i];
      }
      const dqkv = new Float32Array(n * 3 * d);
      attentionBackward(dqkv, new Float32Array(B * H * T * T), dO, s.att, s.qkv, B, T, d, H);
      let loraDx1: Float32Array | null = null;
      if (ad) {
        for (const t of ['q', 'k', 'v'] as const) {
          const v = ad.get(l, t);
          if (!v) continue;
          loraDx1 ??= new Float32Array(n * d);
          loraBackward(loraDx1, this.sectionGrad(l, t, dqkv, n), v, s.lora.get(t)!, n, ad.scale);
        }
        if (loraDx1 && this.mode === 'sealed') loraDx1 = this.plainNormGrad(1, l, loraDx1, n);
      }
      const needInput = l > 0 || embTrain || normTrain || st.embU !== undefined;
      const dsend1 = await this.bwd(l, 'qkv', dqkv, n, needInput, s.sent);
      if (needInput) this.normBackwardWithLora(1, l, dh, dsend1!, loraDx1, s.x1, s.hIn, s.mean1, s.rstd1, n);
    }
    if (embTrain) encoderBackward(this.grad('wte'), this.grad('wpe'), this.plainEmbed ? this.rotate(dh, n, false) : dh, st.tokens, B, T, d);
    if (st.embU) loraEmbedBackward(this.mode === 'sealed' ? this.rotate(dh, n, false) : dh, st.tokens, ad!.embedding()!, st.embU, n, ad!.scale);
  }

  private normBackwardWithLora(which: 1 | 2, l: number, dh: Float32Array, dsent: Float32Array, loraDx: Float32Array | null, x: Float32Array, h: Float32Array, mean: Float32Array, rstd: Float32Array, n: number): void {
    if (!loraDx) {
      this.normBackward(which, l, dh, dsent, x, h, mean, rstd, n);
      return;
    }
    const d = this.config.n_embd;
    if (this.mode === 'paper') {
      // the accelerator's gradient is w.r.t. a R, the adapter's w.r.t. a: unmask first, then add
      const da = new Float32Array(n * d);
      sgemm(false, true, n, d, d, 1, dsent, d, this.layerSlice(which === 1 ? 'R1' : 'R2', l, d * d), d, 0, da, d);
      for (let i = 0; i < da.length; i++) da[i] += loraDx[i];
      const gw = this.grad(which === 1 ? 'ln1w' : 'ln2w');
      const gb = this.grad(which === 1 ? 'ln1b' : 'ln2b');
      layernormBackward(dh, gw ? gw.subarray(l * d, (l + 1) * d) : null, gb ? gb.subarray(l * d, (l + 1) * d) : null, da, h, this.layerSlice(which === 1 ? 'ln1w' : 'ln2w', l, d), mean, rstd, n, d);
      return;
    }
    for (let i = 0; i < dsent.length; i++) dsent[i] += loraDx[i];
    this.normBackward(which, l, dh, dsent, x, h, mean, rstd, n);
  }

  /** Drops saved state on both sides (after an aborted step). */
  async reset(): Promise<void> {
    this.state = null;
    this.integrity?.reset();
    const rep = await this.link.call({ op: 'reset' });
    if (rep.op === 'error') throw new Error(`accelerator reset failed: ${rep.message}`);
  }

  /** Squared norm of the accelerator's accumulated weight gradients (full method). */
  async acceleratorGradSq(): Promise<number> {
    if (this.method !== 'full') return 0;
    const rep = await this.link.call({ op: 'grad_sq_norm' });
    if (rep.op !== 'ack' || typeof rep.value !== 'number') throw new Error(`accelerator did not report its gradient norm: ${rep.op === 'error' ? rep.message : rep.op}`);
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
    const d = this.config.n_embd;
    for (let l = 0; l < this.config.n_layer; l++) {
      for (const name of LINEARS) {
        const [din] = linearDims(name, d);
        const x = new Float32Array(din);
        rng.fillNormal(x);
        await this.fwd(l, name, x, 1, false);
      }
    }
  }

  /** The enclave's trainable tensors by name (views into `params`). */
  trainedTensors(): EnclaveTensors {
    const m: EnclaveTensors = new Map();
    for (const n of this.trainNames) m.set(n, this.external(n));
    return m;
  }

  /** All enclave tensors (frozen and trained), in the bundle's bases. */
  allTensors(): EnclaveTensors {
    const m: EnclaveTensors = new Map(this.t);
    for (const [n] of this.basisRows()) if (m.has(n)) m.set(n, this.external(n));
    return m;
  }

  /** sealed mode: the tensors the bundle holds rotated (x Q) and their row counts */
  private basisRows(): [string, number][] {
    const c = this.config;
    const rows: [string, number][] = [['wte', c.vocab_size], ['wpe', c.n_ctx], ['headBias', 1]];
    // a classifier is trained (in the plain basis) only by a classification run; otherwise it
    // stays as the bundle holds it
    if (this.task === 'cls') rows.push(['score', this.numLabels]);
    return rows;
  }

  /** a tensor as the bundle holds it: sealed mode trains the classifier (and, full
   *  fine-tuning, the embeddings and final bias) in the plain basis */
  private external(n: string): Float32Array {
    const x = this.tensor(n);
    const rows = this.mode === 'sealed' ? this.basisRows().find(([k]) => k === n) : undefined;
    const plain = rows && (n === 'score' || this.plainEmbed);
    return plain ? this.rotate(x, rows[1], true) : x;
  }
}
