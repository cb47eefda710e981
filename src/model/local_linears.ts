/**
 * The block's linears on weights held in this process: the plain model's own weights, or
 * the accelerator's obfuscated ones (the accelerator serves requests with this class).
 * Forward, backward-input, backward-weight (accumulated) and the SGD-momentum update.
 */
import { sgemm } from '../tensor/gemm.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { sgdMomentumStep } from '../tensor/sgd.js';
import type { LinearName, Linears } from './block.js';

/** One linear y = x W + b (HF Conv1D layout). */
export interface LinearWeights {
  w: Float32Array; // [din, dout]
  b: Float32Array; // [dout], or empty: no bias (Llama's linears)
  din: number;
  dout: number;
}

/** A model's block linears: one record per layer. */
export interface BlockLinears<N extends string = LinearName> {
  n_layer: number;
  layers: Record<N, LinearWeights>[];
}

/** Some family's block linears, per layer by name (the accelerator's weights). */
export interface LinearSet<N extends string = string> {
  n_layer: number;
  layers: Partial<Record<N, LinearWeights>>[];
}

/** A model's block linears as views of a parameter buffer: `views(l, name)` gives a layer's weight and bias. */
export function linearViews<N extends string>(n_layer: number, names: readonly N[], dims: (name: N) => [number, number],
  views: (l: number, name: N) => [Float32Array, Float32Array]): BlockLinears<N> {
  const layers = Array.from({ length: n_layer }, (_, l) => Object.fromEntries(names.map((name) => {
    const [w, b] = views(l, name), [din, dout] = dims(name);
    return [name, { w, b, din, dout }];
  })) as Record<N, LinearWeights>);
  return { n_layer, layers };
}

export interface LocalLinearsOptions<N extends string = LinearName> {
  /** accumulate weight gradients in backward (full fine-tuning, plain training) */
  trainWeights: boolean;
  /** gradient buffers (views of a model's gradient buffer); allocated on first use otherwise */
  grads?: (l: number, name: N) => { gw: Float32Array; gb: Float32Array };
  /** keep a copy of each saved input (a server whose request buffers are reused) instead of a reference */
  copyInputs?: boolean;
  /** where outputs are allocated; default: one reused (shared) buffer per layer, linear and direction */
  alloc?: (n: number) => Float32Array;
}

type Momentum = { buf: Float32Array; fresh: boolean };

export class LocalLinears<N extends string = LinearName> implements Linears<Float32Array, N> {
  private saved = new Map<string, { x: Float32Array; rows: number }>();
  private g = new Map<string, { gw: Float32Array; gb: Float32Array }>();
  private mom = new Map<string, Momentum>();
  private bufs = new Map<string, Float32Array>();
  /** the linears whose gradient holds something since the last update */
  private touched = new Set<string>();

  constructor(readonly weights: LinearSet<N>, readonly opts: LocalLinearsOptions<N>) {}

  /** the weights of one linear (refuses a layer or name the model does not have) */
  linear(l: number, name: N): LinearWeights {
    if (!Number.isInteger(l) || l < 0 || l >= this.weights.n_layer) throw new Error(`accelerator: no layer ${l} (model has ${this.weights.n_layer})`);
    const L = this.weights.layers[l][name];
    if (!L) throw new Error(`accelerator: unknown linear "${name}"`);
    return L;
  }

  private out(key: string, n: number): Float32Array {
    if (this.opts.alloc) return this.opts.alloc(n);
    let b = this.bufs.get(key);
    if (!b || b.length !== n) {
      b = sharedFloat32(n);
      this.bufs.set(key, b);
    }
    return b;
  }

  private grads(l: number, name: N, key: string): { gw: Float32Array; gb: Float32Array } {
    if (this.opts.grads) return this.opts.grads(l, name);
    let g = this.g.get(key);
    if (!g) {
      const L = this.linear(l, name);
      g = { gw: new Float32Array(L.din * L.dout), gb: new Float32Array(L.b.length) };
      this.g.set(key, g);
    }
    return g;
  }

  /** y[rows, dout] = x W + b */
  async forward(l: number, name: N, x: Float32Array, rows: number, train: boolean): Promise<Float32Array> {
    return this.forwardSync(l, name, x, rows, train);
  }

  /** `bias` false leaves the bias out (a lying accelerator, for tests) */
  forwardSync(l: number, name: N, x: Float32Array, rows: number, train: boolean, bias = true): Float32Array {
    const L = this.linear(l, name);
    const key = `${l}.${name}`;
    if (train && this.opts.trainWeights) this.saved.set(key, { x: this.opts.copyInputs ? Float32Array.from(x) : x, rows });
    const y = this.out(`${key}.y`, rows * L.dout);
    sgemm(false, false, rows, L.dout, L.din, 1, x, L.din, L.w, L.dout, 0, y, L.dout, bias && L.b.length > 0 ? L.b : null);
    return y;
  }

  async backward(l: number, name: N, dy: Float32Array, rows: number, input: boolean): Promise<Float32Array | null> {
    return this.backwardSync(l, name, dy, rows, input);
  }

  backwardSync(l: number, name: N, dy: Float32Array, rows: number, input: boolean, weight = this.opts.trainWeights): Float32Array | null {
    const L = this.linear(l, name);
    const key = `${l}.${name}`;
    if (weight) {
      const s = this.saved.get(key);
      if (!s) throw new Error(`accelerator: no saved input for h.${key} (forward was not called with save)`);
      if (s.rows !== rows) throw new Error(`accelerator: h.${key} saved ${s.rows} rows, backward has ${rows}`);
      const { gw, gb } = this.grads(l, name, key);
      // dW[din, dout] += x^T dy ; db[1, dout] += ones[1, rows] dy (colsum)
      sgemm(true, false, L.din, L.dout, rows, 1, s.x, L.din, dy, L.dout, 1, gw, L.dout);
      if (L.b.length > 0) sgemm(false, false, 1, L.dout, rows, 1, this.ones(rows), rows, dy, L.dout, 1, gb, L.dout);
      this.touched.add(key);
      this.saved.delete(key);
    }
    if (!input) return null;
    // dx[rows, din] = dy W^T
    const dx = this.out(`${key}.dx`, rows * L.din);
    sgemm(false, true, rows, L.din, L.dout, 1, dy, L.dout, L.w, L.dout, 0, dx, L.din);
    return dx;
  }

  private onesBuf = new Float32Array(0);
  /** a row of `n` ones (the bias gradient is ones[1, rows] dy) */
  private ones(n: number): Float32Array {
    if (this.onesBuf.length < n) this.onesBuf = new Float32Array(n).fill(1);
    return this.onesBuf;
  }

  /** Squared Frobenius norm of every accumulated weight gradient. */
  gradSqNorm(): number {
    let s = 0;
    for (const { gw, gb } of this.g.values()) for (const g of [gw, gb]) for (let i = 0; i < g.length; i++) s += g[i] * g[i];
    return s;
  }

  /** SGD-momentum on every accumulated gradient (scaled by gradScale first), then zero them. */
  update(lr: number, momentum: number, gradScale: number): void {
    for (const key of this.touched) {
      const [layer, name] = key.split('.') as [string, N];
      const L = this.linear(Number(layer), name);
      const { gw, gb } = this.grads(Number(layer), name, key);
      for (const [w, g, k] of [[L.w, gw, `${key}.w`], [L.b, gb, `${key}.b`]] as const) {
        let m = momentum === 0 ? null : this.mom.get(k);
        if (momentum !== 0 && !m) {
          m = { buf: new Float32Array(w.length), fresh: true };
          this.mom.set(k, m);
        }
        sgdMomentumStep(w, g, m ? m.buf : null, m?.fresh ?? false, lr, momentum, gradScale);
        if (m) m.fresh = false;
        g.fill(0);
      }
    }
    this.touched.clear();
  }

  /** Drops saved inputs and zeroes the accumulated gradients (an aborted step). */
  reset(): void {
    this.saved.clear();
    for (const { gw, gb } of this.g.values()) [gw, gb].forEach((g) => g.fill(0));
    this.touched.clear();
  }

  /** momentum buffers by `<layer>.<name>.(w|b)` (checkpoints) */
  momentumState(): Map<string, Float32Array> {
    return new Map([...this.mom].map(([k, m]) => [k, m.buf]));
  }

  loadMomentum(m: Map<string, Float32Array>): void {
    this.mom.clear();
    for (const [k, buf] of m) this.mom.set(k, { buf, fresh: false });
    this.reset();
  }
}
