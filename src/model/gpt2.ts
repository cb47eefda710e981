/**
 * GPT-2 with a hand-written forward and backward pass over one contiguous parameter
 * buffer and one contiguous gradient buffer (llm.c's layout, Hugging Face's Conv1D
 * orientation). Two heads: the tied language-model head and an optional
 * sequence-classification head (last non-pad token -> linear, as HF's
 * GPT2ForSequenceClassification).
 */
import type { GPT2Config } from './config.js';
import { validateConfig } from './config.js';
import { ParamLayout } from './params.js';
import type { GPT2Weights, ClassifierHead } from './weights.js';
import { sgemm } from '../tensor/gemm.js';
import { Rng } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';
import {
  encoderForward, encoderBackward, layernormForward, layernormBackward,
  attentionForward, attentionBackward, crossEntropyForward, crossEntropyBackward, poolForward, poolBackward,
} from './kernels.js';
import { geluForwardPar as geluForward, geluBackwardPar as geluBackward, crossEntropyForwardPar } from '../train/parallel.js';

/** out[m,n] = x[m,k] w[k,n] + bias (+ out when accumulate) */
export function linear(out: Float32Array, x: Float32Array, w: Float32Array, bias: Float32Array | null, m: number, k: number, n: number, accumulate = false): void {
  sgemm(false, false, m, n, k, 1, x, k, w, n, accumulate ? 1 : 0, out, n, bias);
}

/** dx[m,k] (+)= dy[m,n] w^T ; dw[k,n] += x^T dy ; db[n] += colsum(dy) */
export function linearBackward(dx: Float32Array | null, dw: Float32Array | null, db: Float32Array | null, dy: Float32Array, x: Float32Array, w: Float32Array, m: number, k: number, n: number, accumulateDx = false): void {
  if (dx) sgemm(false, true, m, k, n, 1, dy, n, w, n, accumulateDx ? 1 : 0, dx, k);
  if (dw) sgemm(true, false, k, n, m, 1, x, k, dy, n, 1, dw, n);
  if (db) {
    for (let r = 0; r < m; r++) {
      const o = r * n;
      for (let j = 0; j < n; j++) db[j] += dy[o + j];
    }
  }
}

/** Per-(B,T) activation buffers, allocated once per shape. */
export class Activations {
  readonly encoded: Float32Array; //   [B,T,C]
  readonly ln1: Float32Array; //       [L,B,T,C]
  readonly ln1Mean: Float32Array; //   [L,B,T]
  readonly ln1Rstd: Float32Array; //   [L,B,T]
  readonly qkv: Float32Array; //       [L,B,T,3C]
  readonly atty: Float32Array; //      [L,B,T,C]
  readonly att: Float32Array; //       [L,B,NH,T,T]
  readonly residual2: Float32Array; // [L,B,T,C]
  readonly ln2: Float32Array; //       [L,B,T,C]
  readonly ln2Mean: Float32Array; //   [L,B,T]
  readonly ln2Rstd: Float32Array; //   [L,B,T]
  readonly fch: Float32Array; //       [L,B,T,4C]
  readonly fchGelu: Float32Array; //   [L,B,T,4C]
  readonly fchTanh: Float32Array; //   [L,B,T,4C] tanh inside GELU, reused by the backward pass
  readonly residual3: Float32Array; // [L,B,T,C]
  readonly lnf: Float32Array; //       [B,T,C]
  readonly lnfMean: Float32Array; //   [B,T]
  readonly lnfRstd: Float32Array; //   [B,T]
  logits: Float32Array | null = null; // [B,T,V] (probabilities after the loss)
  readonly losses: Float32Array; //    [B,T]

  constructor(readonly B: number, readonly T: number, c: GPT2Config) {
    const { n_layer: L, n_embd: C, n_head: NH } = c;
    const BT = B * T;
    this.encoded = new Float32Array(BT * C);
    this.ln1 = new Float32Array(L * BT * C);
    this.ln1Mean = new Float32Array(L * BT);
    this.ln1Rstd = new Float32Array(L * BT);
    this.qkv = new Float32Array(L * BT * 3 * C);
    this.atty = new Float32Array(L * BT * C);
    this.att = new Float32Array(L * B * NH * T * T);
    this.residual2 = new Float32Array(L * BT * C);
    this.ln2 = new Float32Array(L * BT * C);
    this.ln2Mean = new Float32Array(L * BT);
    this.ln2Rstd = new Float32Array(L * BT);
    this.fch = sharedFloat32(L * BT * 4 * C);
    this.fchGelu = sharedFloat32(L * BT * 4 * C);
    this.fchTanh = sharedFloat32(L * BT * 4 * C);
    this.residual3 = new Float32Array(L * BT * C);
    this.lnf = new Float32Array(BT * C);
    this.lnfMean = new Float32Array(BT);
    this.lnfRstd = new Float32Array(BT);
    this.losses = sharedFloat32(BT);
  }

  /** Views of layer l's slices. */
  layer(l: number, c: GPT2Config) {
    const { n_embd: C, n_head: NH } = c;
    const { B, T } = this;
    const BT = B * T;
    const v = (a: Float32Array, w: number) => a.subarray(l * BT * w, (l + 1) * BT * w);
    return {
      residual: l === 0 ? this.encoded : this.residual3.subarray((l - 1) * BT * C, l * BT * C),
      ln1: v(this.ln1, C), qkv: v(this.qkv, 3 * C), atty: v(this.atty, C),
      att: this.att.subarray(l * B * NH * T * T, (l + 1) * B * NH * T * T),
      res2: v(this.residual2, C), ln2: v(this.ln2, C), fch: v(this.fch, 4 * C), fchGelu: v(this.fchGelu, 4 * C), fchTanh: v(this.fchTanh, 4 * C),
      res3: v(this.residual3, C),
      m1: v(this.ln1Mean, 1), r1: v(this.ln1Rstd, 1), m2: v(this.ln2Mean, 1), r2: v(this.ln2Rstd, 1),
    };
  }
}

/** Scratch buffers for the backward pass (one layer at a time). */
class Scratch {
  readonly dresidual: Float32Array; // [B,T,C]
  readonly dln: Float32Array; //       [B,T,C]
  readonly datty: Float32Array; //     [B,T,C]
  readonly dqkv: Float32Array; //      [B,T,3C]
  readonly datt: Float32Array; //      [B,NH,T,T]
  readonly dfch: Float32Array; //      [B,T,4C]
  readonly dfchGelu: Float32Array; //  [B,T,4C]
  constructor(B: number, T: number, c: GPT2Config) {
    const BT = B * T;
    const C = c.n_embd;
    this.dresidual = new Float32Array(BT * C);
    this.dln = new Float32Array(BT * C);
    this.datty = new Float32Array(BT * C);
    this.dqkv = new Float32Array(BT * 3 * C);
    this.datt = new Float32Array(B * c.n_head * T * T);
    this.dfch = sharedFloat32(BT * 4 * C);
    this.dfchGelu = sharedFloat32(BT * 4 * C);
  }
}

export type Head = 'lm' | 'cls';

interface ForwardState {
  head: Head;
  B: number;
  T: number;
  tokens: Int32Array;
  /** LM: targets [B,T]; cls: labels [B] */
  targets: Int32Array | null;
  count: number;
  /** cls: each row's length (one past its last non-pad token), for the pooling backward */
  lens?: Int32Array;
  clsLogits?: Float32Array; // [B, numLabels] (probabilities after the loss)
}

export class GPT2 {
  readonly config: GPT2Config;
  readonly layout: ParamLayout;
  readonly params: Float32Array;
  grads: Float32Array | null = null;
  cls: ClassifierHead | undefined;
  clsGrad: Float32Array | null = null;
  padTokenId: number | undefined;
  private acts: Activations | null = null;
  private scratch: Scratch | null = null;
  private last: ForwardState | null = null;

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
    this.grads?.fill(0);
    this.clsGrad?.fill(0);
  }

  private activations(B: number, T: number): Activations {
    if (!this.acts || this.acts.B !== B || this.acts.T !== T) {
      this.acts = new Activations(B, T, this.config);
      this.scratch = null;
    }
    return this.acts;
  }

  private checkTokens(tokens: Int32Array, B: number, T: number): void {
    const { vocab_size: V, n_ctx } = this.config;
    if (!Number.isInteger(B) || !Number.isInteger(T) || B <= 0 || T <= 0) throw new Error(`batch ${B} x ${T} must be positive integers`);
    if (T > n_ctx) throw new Error(`sequence length ${T} exceeds the model's context of ${n_ctx}`);
    if (tokens.length < B * T) throw new Error(`tokens has ${tokens.length} entries, expected B*T = ${B * T}`);
    for (let i = 0; i < B * T; i++) {
      const t = tokens[i];
      if (t < 0 || t >= V) throw new Error(`token id ${t} at position ${i} is out of range [0, ${V})`);
    }
  }

  /** Runs the transformer trunk up to the final layer norm: acts.lnf [B,T,C]. */
  private trunk(tokens: Int32Array, B: number, T: number): Activations {
    this.checkTokens(tokens, B, T);
    const c = this.config;
    const { n_layer: L, n_embd: C, n_head: NH } = c;
    const BT = B * T;
    const a = this.activations(B, T);
    const p = this.params;
    const lay = this.layout;
    encoderForward(a.encoded, tokens, lay.view(p, 'wte'), lay.view(p, 'wpe'), B, T, C);
    for (let l = 0; l < L; l++) {
      const { residual, ln1, qkv, atty, att, res2, ln2, fch, fchGelu, fchTanh, res3, m1, r1, m2, r2 } = a.layer(l, c);

      layernormForward(ln1, m1, r1, residual, lay.layer(p, 'ln1w', l), lay.layer(p, 'ln1b', l), BT, C, c.layer_norm_epsilon);
      linear(qkv, ln1, lay.layer(p, 'qkvw', l), lay.layer(p, 'qkvb', l), BT, C, 3 * C);
      attentionForward(atty, att, qkv, B, T, C, NH);
      res2.set(residual);
      linear(res2, atty, lay.layer(p, 'attprojw', l), lay.layer(p, 'attprojb', l), BT, C, C, true);
      layernormForward(ln2, m2, r2, res2, lay.layer(p, 'ln2w', l), lay.layer(p, 'ln2b', l), BT, C, c.layer_norm_epsilon);
      linear(fch, ln2, lay.layer(p, 'fcw', l), lay.layer(p, 'fcb', l), BT, C, 4 * C);
      geluForward(fchGelu, fch, BT * 4 * C, fchTanh);
      res3.set(res2);
      linear(res3, fchGelu, lay.layer(p, 'fcprojw', l), lay.layer(p, 'fcprojb', l), BT, 4 * C, C, true);
    }
    const last = L > 0 ? a.residual3.subarray((L - 1) * BT * C, L * BT * C) : a.encoded;
    layernormForward(a.lnf, a.lnfMean, a.lnfRstd, last, lay.view(p, 'lnfw'), lay.view(p, 'lnfb'), BT, C, c.layer_norm_epsilon);
    return a;
  }

  /**
   * Language-model forward. Returns logits [B,T,V] (a view into internal memory, valid until
   * the next call) and, when targets are given (-1 = ignore), the mean cross-entropy; the
   * logits are then replaced by probabilities in place.
   */
  forward(tokens: Int32Array, B: number, T: number, targets: Int32Array | null = null): { logits: Float32Array; loss: number | null } {
    const a = this.trunk(tokens, B, T);
    const { n_embd: C, vocab_size: V } = this.config;
    const BT = B * T;
    if (!a.logits || a.logits.length !== BT * V) a.logits = sharedFloat32(BT * V);
    // logits = lnf wte^T
    sgemm(false, true, BT, V, C, 1, a.lnf, C, this.layout.view(this.params, 'wte'), C, 0, a.logits, V);
    let loss: number | null = null;
    let count = 0;
    if (targets) {
      if (targets.length < BT) throw new Error(`targets has ${targets.length} entries, expected ${BT}`);
      const r = crossEntropyForwardPar(a.logits, targets, a.losses, BT, V);
      loss = r.loss;
      count = r.count;
    }
    this.last = { head: 'lm', B, T, tokens, targets, count };
    return { logits: a.logits, loss };
  }

  /**
   * Classification forward: pools the final-layer-norm states of each row (its last token
   * that is not `padId`, or the mean up to it: the head's `pooling`) and applies the
   * classifier. Returns logits [B, numLabels] and, with labels, the mean cross-entropy
   * (probabilities then replace the logits).
   */
  forwardCls(tokens: Int32Array, B: number, T: number, labels: Int32Array | null = null, padId = this.padTokenId ?? -1): { logits: Float32Array; loss: number | null } {
    const head = this.cls;
    if (!head) throw new Error('this model has no classification head (load a checkpoint with score.weight or add one with addClassifier)');
    if (labels) {
      if (labels.length < B) throw new Error(`labels has ${labels.length} entries, expected ${B}`);
      for (let b = 0; b < B; b++) {
        if (labels[b] < 0 || labels[b] >= head.numLabels) throw new Error(`label ${labels[b]} of example ${b} is outside [0, ${head.numLabels})`);
      }
    }
    const a = this.trunk(tokens, B, T);
    const C = this.config.n_embd;
    const K = head.numLabels;
    const hidden = new Float32Array(B * C);
    const lens = poolForward(hidden, a.lnf, tokens, B, T, C, padId, head.pooling ?? 'last');
    const logits = new Float32Array(B * K);
    sgemm(false, true, B, K, C, 1, hidden, C, head.weight, C, 0, logits, K);
    let loss: number | null = null;
    let count = 0;
    if (labels) {
      const losses = new Float32Array(B);
      const r = crossEntropyForward(logits, labels, losses, B, K);
      loss = r.loss;
      count = r.count;
    }
    this.last = { head: 'cls', B, T, tokens, targets: labels, count, lens, clsLogits: logits };
    this.clsHidden = hidden;
    return { logits, loss };
  }
  private clsHidden: Float32Array | null = null;

  /** Backward of the last forward with targets; accumulates into grads (and clsGrad). */
  backward(): void {
    const st = this.last;
    if (!st || !st.targets) throw new Error('backward() needs a preceding forward with targets');
    const a = this.acts!;
    const c = this.config;
    const { n_layer: L, n_embd: C, n_head: NH, vocab_size: V } = c;
    const { B, T } = st;
    const BT = B * T;
    const g = this.ensureGrads();
    const p = this.params;
    const lay = this.layout;
    if (!this.scratch) this.scratch = new Scratch(B, T, c);
    const s = this.scratch;

    // head backward -> s.dln holds d(lnf)
    const dlnf = s.dln;
    if (st.head === 'lm') {
      const probs = a.logits!;
      crossEntropyBackward(probs, probs, st.targets, BT, V, st.count);
      // dlnf = dlogits wte ; dwte += dlogits^T lnf
      sgemm(false, false, BT, C, V, 1, probs, V, lay.view(p, 'wte'), C, 0, dlnf, C);
      sgemm(true, false, V, C, BT, 1, probs, V, a.lnf, C, 1, lay.view(g, 'wte'), C);
    } else {
      const head = this.cls!;
      const K = head.numLabels;
      const probs = st.clsLogits!;
      crossEntropyBackward(probs, probs, st.targets, B, K, st.count);
      const dhidden = new Float32Array(B * C);
      sgemm(false, false, B, C, K, 1, probs, K, head.weight, C, 0, dhidden, C);
      sgemm(true, false, K, C, B, 1, probs, K, this.clsHidden!, C, 1, this.clsGrad!, C);
      dlnf.fill(0);
      poolBackward(dlnf, dhidden, st.lens!, B, T, C, head.pooling ?? 'last');
    }
    const dres = s.dresidual;
    dres.fill(0);
    const lastRes = L > 0 ? a.residual3.subarray((L - 1) * BT * C, L * BT * C) : a.encoded;
    layernormBackward(dres, lay.view(g, 'lnfw'), lay.view(g, 'lnfb'), dlnf, lastRes, lay.view(p, 'lnfw'), a.lnfMean, a.lnfRstd, BT, C);

    for (let l = L - 1; l >= 0; l--) {
      const { residual, ln1, qkv, atty, att, res2, ln2, fch, fchGelu, fchTanh, m1, r1, m2, r2 } = a.layer(l, c);

      // MLP: res3 = res2 + gelu(ln2 fcw + fcb) fcprojw + fcprojb
      linearBackward(s.dfchGelu, lay.layer(g, 'fcprojw', l), lay.layer(g, 'fcprojb', l), dres, fchGelu, lay.layer(p, 'fcprojw', l), BT, 4 * C, C);
      s.dfch.fill(0);
      geluBackward(s.dfch, fch, s.dfchGelu, BT * 4 * C, fchTanh);
      linearBackward(s.dln, lay.layer(g, 'fcw', l), lay.layer(g, 'fcb', l), s.dfch, ln2, lay.layer(p, 'fcw', l), BT, C, 4 * C);
      layernormBackward(dres, lay.layer(g, 'ln2w', l), lay.layer(g, 'ln2b', l), s.dln, res2, lay.layer(p, 'ln2w', l), m2, r2, BT, C);
      // attention: res2 = residual + attn(ln1) attprojw + attprojb
      linearBackward(s.datty, lay.layer(g, 'attprojw', l), lay.layer(g, 'attprojb', l), dres, atty, lay.layer(p, 'attprojw', l), BT, C, C);
      attentionBackward(s.dqkv, s.datt, s.datty, att, qkv, B, T, C, NH);
      linearBackward(s.dln, lay.layer(g, 'qkvw', l), lay.layer(g, 'qkvb', l), s.dqkv, ln1, lay.layer(p, 'qkvw', l), BT, C, 3 * C);
      layernormBackward(dres, lay.layer(g, 'ln1w', l), lay.layer(g, 'ln1b', l), s.dln, residual, lay.layer(p, 'ln1w', l), m1, r1, BT, C);
    }
    encoderBackward(lay.view(g, 'wte'), lay.view(g, 'wpe'), dres, st.tokens, B, T, C);
    this.last = null;
  }

  /**
   * The activations of the last forward pass (read-only views; valid until the next call).
   * Used by the security tests to compare what the accelerator saw with the plaintext.
   */
  lastActivations(): Readonly<Activations> | null {
    return this.acts;
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
