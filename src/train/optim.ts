/**
 * Optimisers over flat Float32Array parameter/gradient buffers (TypeScript kernels).
 * Each optimiser owns its state buffers, which serialise for exact resume.
 */
import { adamwStep, sumSquaresParallel } from '../tensor/parallel.js';
import { sharedFloat32, isShared } from '../tensor/shared.js';

export interface OptimizerState {
  kind: 'adamw' | 'sgd';
  step: number;
  buffers: Record<string, Float32Array>;
}

export interface Optimizer {
  readonly kind: 'adamw' | 'sgd';
  /** One update of `params` from `grads * gradScale` at learning rate `lr`. */
  step(params: Float32Array, grads: Float32Array, lr: number, gradScale?: number): void;
  state(): OptimizerState;
  load(s: OptimizerState): void;
}

export interface AdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
}

// AdamW (decoupled weight decay, bias-corrected moments): params[n] -= lr (m^/(sqrt(v^)+eps) + wd params)
export class AdamW implements Optimizer {
  readonly kind = 'adamw' as const;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  private m: Float32Array;
  private v: Float32Array;
  private t = 0;

  /** `decayMask`: 1 where weight decay applies (e.g. matrices), 0 elsewhere; all 1 when absent */
  constructor(readonly size: number, opts: AdamWOptions = {}, private decayMask?: Uint8Array) {
    ({ beta1: this.beta1 = 0.9, beta2: this.beta2 = 0.999, eps: this.eps = 1e-8, weightDecay: this.weightDecay = 0 } = opts);
    if (this.decayMask && this.decayMask.length !== size) throw new Error(`decay mask has ${this.decayMask.length} entries, expected ${size}`);
    // shared memory: large steps are split across worker threads (./parallel.ts)
    this.m = sharedFloat32(size);
    this.v = sharedFloat32(size);
    if (this.decayMask && !isShared(this.decayMask)) {
      const sm = new Uint8Array(new SharedArrayBuffer(size));
      sm.set(this.decayMask);
      this.decayMask = sm;
    }
  }

  step(params: Float32Array, grads: Float32Array, lr: number, gradScale = 1): void {
    const n = this.size;
    if (params.length !== n || grads.length !== n) throw new Error(`AdamW expects ${n} parameters and gradients, got ${params.length} and ${grads.length}`);
    this.t++;
    adamwStep({
      params, grads, m: this.m, v: this.v, mask: this.decayMask ?? null, lr, beta1: this.beta1, beta2: this.beta2, eps: this.eps,
      weightDecay: this.weightDecay, c1: 1 / (1 - Math.pow(this.beta1, this.t)), c2: 1 / (1 - Math.pow(this.beta2, this.t)), gradScale,
    });
  }

  state(): OptimizerState {
    return { kind: 'adamw', step: this.t, buffers: { m: this.m, v: this.v } };
  }

  load(s: OptimizerState): void {
    if (s.kind !== 'adamw') throw new Error(`cannot load ${s.kind} state into AdamW`);
    for (const k of ['m', 'v'] as const) {
      if (!s.buffers[k] || s.buffers[k].length !== this.size) throw new Error(`AdamW state "${k}" has the wrong size`);
    }
    this.m.set(s.buffers.m);
    this.v.set(s.buffers.v);
    this.t = s.step;
  }
}

export interface SGDOptions {
  momentum?: number;
  weightDecay?: number;
}

// SGD with (heavy-ball) momentum, PyTorch convention: b = mu b + g ; params -= lr b
export class SGD implements Optimizer {
  readonly kind = 'sgd' as const;
  readonly momentum: number;
  readonly weightDecay: number;
  private buf: Float32Array | null;
  private t = 0;

  constructor(readonly size: number, opts: SGDOptions = {}) {
    ({ momentum: this.momentum = 0, weightDecay: this.weightDecay = 0 } = opts);
    this.buf = this.momentum !== 0 ? new Float32Array(size) : null;
  }

  step(params: Float32Array, grads: Float32Array, lr: number, gradScale = 1): void {
    const n = this.size;
    if (params.length !== n || grads.length !== n) throw new Error(`SGD expects ${n} parameters and gradients, got ${params.length} and ${grads.length}`);
    const mu = this.momentum;
    const wd = this.weightDecay;
    const buf = this.buf;
    const first = this.t === 0;
    this.t++;
    for (let i = 0; i < n; i++) {
      let g = grads[i] * gradScale;
      if (wd !== 0) g += wd * params[i];
      if (buf) {
        const b = first ? g : mu * buf[i] + g;
        buf[i] = b;
        g = b;
      }
      params[i] -= lr * g;
    }
  }

  state(): OptimizerState {
    return { kind: 'sgd', step: this.t, buffers: this.buf ? { momentum: this.buf } : {} };
  }

  load(s: OptimizerState): void {
    if (s.kind !== 'sgd') throw new Error(`cannot load ${s.kind} state into SGD`);
    if (this.buf) {
      const b = s.buffers.momentum;
      if (!b || b.length !== this.size) throw new Error('SGD momentum state has the wrong size');
      this.buf.set(b);
    }
    this.t = s.step;
  }
}

/** Sum of squares of several gradient buffers (float64 accumulation). */
export function sumSquares(...bufs: Float32Array[]): number {
  let s = 0;
  for (const b of bufs) s += sumSquaresParallel(b);
  return s;
}

/** The factor that clips a gradient of norm `norm` to `maxNorm` (1 when under it or off). */
export function clipScale(norm: number, maxNorm: number): number {
  return maxNorm > 0 && norm > maxNorm ? maxNorm / (norm + 1e-6) : 1;
}

/** Linear warmup then cosine decay to minLr (a fraction of the peak). */
export function cosineSchedule(step: number, total: number, peak: number, warmup: number, minFrac = 0.1): number {
  if (warmup > 0 && step < warmup) return (peak * (step + 1)) / warmup;
  if (total <= warmup) return peak;
  const p = Math.min(1, (step - warmup) / Math.max(1, total - warmup));
  const min = peak * minFrac;
  return min + 0.5 * (peak - min) * (1 + Math.cos(Math.PI * p));
}

/** Weight-decay mask for a GPT-2 layout: 1 on matrices (qkvw, attprojw, fcw, fcprojw, wte, wpe), 0 on biases and layer norms. */
export function gpt2DecayMask(layout: { total: number; entries: Record<string, { offset: number; size: number; layerShape: number[] }> }): Uint8Array {
  const mask = new Uint8Array(layout.total);
  for (const e of Object.values(layout.entries)) {
    if (e.layerShape.length === 2) mask.fill(1, e.offset, e.offset + e.size);
  }
  return mask;
}
