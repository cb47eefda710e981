/**
 * The untrusted side. Holds only the obfuscated linear weights (the accelerator bundle)
 * and answers requests addressed to a named obfuscated layer. It never sees token ids,
 * labels, logits, losses or plaintext activations: no request type carries them.
 */
import type { AcceleratorWeights, LinearName, ObfLinear } from '../obfuscate/transform.js';
import { sgemm } from '../tensor/gemm.js';
import { asObfuscated, type AcceleratorReply, type AcceleratorRequest } from './messages.js';

export class Accelerator {
  /** Per-linear accumulated weight gradients (full fine-tuning). */
  private gradW = new Map<string, Float32Array>();
  private gradB = new Map<string, Float32Array>();
  private momW = new Map<string, Float32Array>();
  private momB = new Map<string, Float32Array>();

  constructor(readonly weights: AcceleratorWeights) {}

  private linear(layer: number, name: LinearName): ObfLinear {
    const l = this.weights.layers[layer];
    if (!l) throw new Error(`accelerator: no layer ${layer} (model has ${this.weights.n_layer})`);
    return l[name];
  }

  private checkLen(what: string, got: number, rows: number, cols: number): void {
    if (got !== rows * cols) throw new Error(`accelerator: ${what} has ${got} values, expected ${rows} x ${cols}`);
  }

  private checkFinite(what: string, x: Float32Array): void {
    for (let i = 0; i < x.length; i++) {
      if (!Number.isFinite(x[i])) throw new Error(`accelerator: ${what} contains a non-finite value at index ${i}`);
    }
  }

  handle(req: AcceleratorRequest): AcceleratorReply {
    try {
      return this.dispatch(req);
    } catch (e) {
      return { op: 'error', message: (e as Error).message };
    }
  }

  private dispatch(req: AcceleratorRequest): AcceleratorReply {
    switch (req.op) {
      case 'linear_forward': {
        const L = this.linear(req.layer, req.name);
        this.checkLen(`input of h.${req.layer}.${req.name}`, req.x.length, req.rows, L.din);
        this.checkFinite(`input of h.${req.layer}.${req.name}`, req.x);
        const y = new Float32Array(req.rows * L.dout);
        sgemm(false, false, req.rows, L.dout, L.din, 1, req.x, L.din, L.w, L.dout, 0, y, L.dout, L.b);
        return { op: 'tensor', rows: req.rows, cols: L.dout, data: asObfuscated(y) };
      }
      case 'linear_backward_input': {
        const L = this.linear(req.layer, req.name);
        this.checkLen(`output gradient of h.${req.layer}.${req.name}`, req.dy.length, req.rows, L.dout);
        this.checkFinite(`output gradient of h.${req.layer}.${req.name}`, req.dy);
        const dx = new Float32Array(req.rows * L.din);
        sgemm(false, true, req.rows, L.din, L.dout, 1, req.dy, L.dout, L.w, L.dout, 0, dx, L.din);
        return { op: 'tensor', rows: req.rows, cols: L.din, data: asObfuscated(dx) };
      }
      case 'linear_backward_weight': {
        const L = this.linear(req.layer, req.name);
        this.checkLen(`input of h.${req.layer}.${req.name}`, req.x.length, req.rows, L.din);
        this.checkLen(`output gradient of h.${req.layer}.${req.name}`, req.dy.length, req.rows, L.dout);
        this.checkFinite(`output gradient of h.${req.layer}.${req.name}`, req.dy);
        const key = `${req.layer}.${req.name}`;
        let gw = this.gradW.get(key);
        let gb = this.gradB.get(key);
        if (!gw || !gb) {
          gw = new Float32Array(L.din * L.dout);
          gb = new Float32Array(L.dout);
          this.gradW.set(key, gw);
          this.gradB.set(key, gb);
        }
        sgemm(true, false, L.din, L.dout, req.rows, 1, req.x, L.din, req.dy, L.dout, 1, gw, L.dout);
        for (let r = 0; r < req.rows; r++) for (let j = 0; j < L.dout; j++) gb[j] += req.dy[r * L.dout + j];
        return { op: 'ack' };
      }
      case 'grad_sq_norm': {
        let s = 0;
        for (const m of [this.gradW, this.gradB]) for (const g of m.values()) for (let i = 0; i < g.length; i++) s += g[i] * g[i];
        return { op: 'ack', value: s };
      }
      case 'apply_update': {
        if (!Number.isFinite(req.lr) || !Number.isFinite(req.gradScale) || !Number.isFinite(req.momentum)) throw new Error('accelerator: non-finite update parameters');
        for (const [key, gw] of this.gradW) {
          const [layer, name] = key.split('.') as [string, LinearName];
          const L = this.linear(Number(layer), name);
          sgdStep(L.w, gw, this.mom(this.momW, key, gw.length, req.momentum), req.lr, req.momentum, req.gradScale, req.step === 0);
          const gb = this.gradB.get(key)!;
          sgdStep(L.b, gb, this.mom(this.momB, key, gb.length, req.momentum), req.lr, req.momentum, req.gradScale, req.step === 0);
          gw.fill(0);
          gb.fill(0);
        }
        return { op: 'ack' };
      }
    }
  }

  private mom(m: Map<string, Float32Array>, key: string, n: number, momentum: number): Float32Array | null {
    if (momentum === 0) return null;
    let b = m.get(key);
    if (!b) {
      b = new Float32Array(n);
      m.set(key, b);
    }
    return b;
  }
}

// w -= lr * (b = mu b + s g)  (PyTorch SGD-momentum convention; first step b = s g)
function sgdStep(w: Float32Array, g: Float32Array, buf: Float32Array | null, lr: number, mu: number, s: number, first: boolean): void {
  for (let i = 0; i < w.length; i++) {
    let gi = g[i] * s;
    if (buf) {
      const b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = b;
    }
    w[i] -= lr * gi;
  }
}
