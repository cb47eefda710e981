/**
 * The untrusted side. Holds only the obfuscated linear weights (the accelerator bundle)
 * and answers requests addressed to a named obfuscated layer: forward, backward (input and
 * weight gradients, using the inputs it saved during the forward pass), SGD-momentum
 * updates of its own weights, and checkpoints of its own state. It never sees token ids,
 * labels, logits, losses or plaintext activations: no request type carries them.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type { AcceleratorWeights, LinearName, ObfLinear } from '../obfuscate/transform.js';
import { LINEARS } from '../obfuscate/transform.js';
import { sgemm } from '../tensor/gemm.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../model/safetensors.js';
import { Rng } from '../tensor/rng.js';
import { asObfuscated, type AcceleratorReply, type AcceleratorRequest } from './messages.js';

export type EvilMode = 'tamper' | 'skip-bias' | 'stale';
export const EVIL_MODES: EvilMode[] = ['tamper', 'skip-bias', 'stale'];

export interface AcceleratorOptions {
  /** where checkpoint_save / checkpoint_load keep the accelerator's own state */
  stateDir?: string;
  /**
   * A lying accelerator, for tests and demonstrations: `tamper` changes one random entry of
   * every tensor it returns, `skip-bias` leaves the bias out of forward products, `stale`
   * acknowledges updates without applying them.
   */
  evil?: EvilMode;
  evilSeed?: number;
}

export class Accelerator {
  private saved = new Map<string, { x: Float32Array; rows: number }>();
  private gradW = new Map<string, Float32Array>();
  private gradB = new Map<string, Float32Array>();
  private momW = new Map<string, Float32Array>();
  private momB = new Map<string, Float32Array>();
  /** requests served (for reports) */
  served = 0;

  private evilRng: Rng;
  private outAlloc: ((n: number) => Float32Array) | null = null;

  constructor(readonly weights: AcceleratorWeights, readonly opts: AcceleratorOptions = {}) {
    if (opts.evil && !EVIL_MODES.includes(opts.evil)) throw new Error(`unknown evil mode "${opts.evil}" (use ${EVIL_MODES.join(', ')})`);
    this.evilRng = new Rng(opts.evilSeed ?? 666);
  }

  /**
   * Where reply tensors are allocated. A server that is done with each reply once it is
   * written lends pooled buffers here; by default every reply is a fresh array (the caller
   * keeps it, as an in-process enclave does).
   */
  useOutputAllocator(alloc: ((n: number) => Float32Array) | null): void {
    this.outAlloc = alloc;
  }

  private out(n: number): Float32Array {
    return this.outAlloc ? this.outAlloc(n) : new Float32Array(n);
  }

  private tamper(y: Float32Array): Float32Array {
    if (this.opts.evil === 'tamper' && y.length > 0) {
      const k = this.evilRng.int(y.length);
      y[k] += 0.5 * (1 + Math.abs(y[k]));
    }
    return y;
  }

  private linear(layer: number, name: LinearName): ObfLinear {
    if (!Number.isInteger(layer) || layer < 0 || layer >= this.weights.n_layer) throw new Error(`accelerator: no layer ${layer} (model has ${this.weights.n_layer})`);
    const l = this.weights.layers[layer][name];
    if (!l) throw new Error(`accelerator: unknown linear "${name}"`);
    return l;
  }

  private checkLen(what: string, got: number, rows: number, cols: number): void {
    if (got !== rows * cols) throw new Error(`accelerator: ${what} has ${got} values, expected ${rows} x ${cols}`);
  }

  private checkFinite(what: string, x: Float32Array): void {
    for (let i = 0; i < x.length; i++) {
      if (!Number.isFinite(x[i])) throw new Error(`accelerator: ${what} contains a non-finite value at index ${i}`);
    }
  }

  /** Answers one request; failures become an error reply, the accelerator keeps serving. */
  handle(req: AcceleratorRequest): AcceleratorReply {
    this.served++;
    try {
      return this.dispatch(req);
    } catch (e) {
      return { op: 'error', message: (e as Error).message };
    }
  }

  protected forward(L: ObfLinear, x: Float32Array, rows: number): Float32Array {
    const y = this.out(rows * L.dout);
    sgemm(false, false, rows, L.dout, L.din, 1, x, L.din, L.w, L.dout, 0, y, L.dout, this.opts.evil === 'skip-bias' ? null : L.b);
    return this.tamper(y);
  }

  private dispatch(req: AcceleratorRequest): AcceleratorReply {
    switch (req.op) {
      case 'linear_forward': {
        const L = this.linear(req.layer, req.name);
        const what = `input of h.${req.layer}.${req.name}`;
        this.checkLen(what, req.x.length, req.rows, L.din);
        this.checkFinite(what, req.x);
        if (req.save) this.saved.set(`${req.layer}.${req.name}`, { x: Float32Array.from(req.x), rows: req.rows });
        return { op: 'tensor', rows: req.rows, cols: L.dout, data: asObfuscated(this.forward(L, req.x, req.rows)) };
      }
      case 'linear_backward': {
        const L = this.linear(req.layer, req.name);
        const key = `${req.layer}.${req.name}`;
        const what = `output gradient of h.${key}`;
        this.checkLen(what, req.dy.length, req.rows, L.dout);
        this.checkFinite(what, req.dy);
        if (req.weight) {
          const s = this.saved.get(key);
          if (!s) throw new Error(`accelerator: no saved input for h.${key} (forward was not called with save)`);
          if (s.rows !== req.rows) throw new Error(`accelerator: h.${key} saved ${s.rows} rows, backward has ${req.rows}`);
          let gw = this.gradW.get(key);
          let gb = this.gradB.get(key);
          if (!gw || !gb) {
            gw = new Float32Array(L.din * L.dout);
            gb = new Float32Array(L.dout);
            this.gradW.set(key, gw);
            this.gradB.set(key, gb);
          }
          sgemm(true, false, L.din, L.dout, req.rows, 1, s.x, L.din, req.dy, L.dout, 1, gw, L.dout);
          for (let r = 0; r < req.rows; r++) {
            const o = r * L.dout;
            for (let j = 0; j < L.dout; j++) gb[j] += req.dy[o + j];
          }
        }
        this.saved.delete(key);
        if (!req.input) return { op: 'ack' };
        const dx = this.out(req.rows * L.din);
        sgemm(false, true, req.rows, L.din, L.dout, 1, req.dy, L.dout, L.w, L.dout, 0, dx, L.din);
        return { op: 'tensor', rows: req.rows, cols: L.din, data: asObfuscated(this.tamper(dx)) };
      }
      case 'grad_sq_norm': {
        let s = 0;
        for (const m of [this.gradW, this.gradB]) for (const g of m.values()) for (let i = 0; i < g.length; i++) s += g[i] * g[i];
        return { op: 'ack', value: s };
      }
      case 'apply_update': {
        if (![req.lr, req.gradScale, req.momentum].every(Number.isFinite)) throw new Error('accelerator: non-finite update parameters');
        if (this.opts.evil === 'stale') {
          for (const m of [this.gradW, this.gradB]) for (const g of m.values()) g.fill(0);
          return { op: 'ack' };
        }
        for (const [key, gw] of this.gradW) {
          const [layer, name] = key.split('.') as [string, LinearName];
          const L = this.linear(Number(layer), name);
          const gb = this.gradB.get(key)!;
          sgdStep(L.w, gw, this.momentum(this.momW, key, gw.length, req.momentum), req.lr, req.momentum, req.gradScale);
          sgdStep(L.b, gb, this.momentum(this.momB, key, gb.length, req.momentum), req.lr, req.momentum, req.gradScale);
          gw.fill(0);
          gb.fill(0);
        }
        return { op: 'ack' };
      }
      case 'reset': {
        this.saved.clear();
        for (const m of [this.gradW, this.gradB]) for (const g of m.values()) g.fill(0);
        return { op: 'ack' };
      }
      case 'checkpoint_save':
        return { op: 'ack', text: this.saveState(req.tag) };
      case 'checkpoint_load':
        this.loadState(req.tag);
        return { op: 'ack' };
    }
  }

  private momentum(m: Map<string, Float32Array & { fresh?: boolean }>, key: string, n: number, mu: number): (Float32Array & { fresh?: boolean }) | null {
    if (mu === 0) return null;
    let b = m.get(key);
    if (!b) {
      b = new Float32Array(n) as Float32Array & { fresh?: boolean };
      b.fresh = true;
      m.set(key, b);
    }
    return b;
  }

  private stateFile(tag: string): string {
    if (!this.opts.stateDir) throw new Error('accelerator: no state directory configured for checkpoints');
    return path.join(this.opts.stateDir, `${tag}.safetensors`);
  }

  private saveState(tag: string): string {
    const file = this.stateFile(tag);
    mkdirSync(path.dirname(file), { recursive: true });
    const t: TensorToWrite[] = [];
    this.weights.layers.forEach((layer, l) => {
      for (const name of LINEARS) {
        const L = layer[name];
        const key = `${l}.${name}`;
        t.push({ name: `h.${key}.weight`, dtype: 'F32', shape: [L.din, L.dout], data: L.w });
        t.push({ name: `h.${key}.bias`, dtype: 'F32', shape: [L.dout], data: L.b });
        const mw = this.momW.get(key), mb = this.momB.get(key);
        if (mw && mb) {
          t.push({ name: `momentum.${key}.weight`, dtype: 'F32', shape: [L.din, L.dout], data: mw });
          t.push({ name: `momentum.${key}.bias`, dtype: 'F32', shape: [L.dout], data: mb });
        }
      }
    });
    writeSafetensors(file, t, { format: 'obfuscatune-accelerator-state/1' });
    return createHash('sha256').update(readFileSync(file)).digest('hex');
  }

  private loadState(tag: string): void {
    const file = this.stateFile(tag);
    if (!existsSync(file)) throw new Error(`accelerator: no checkpoint "${tag}" in ${this.opts.stateDir}`);
    const st = openSafetensors(file);
    this.momW.clear();
    this.momB.clear();
    this.weights.layers.forEach((layer, l) => {
      for (const name of LINEARS) {
        const L = layer[name];
        const key = `${l}.${name}`;
        st.getInto(`h.${key}.weight`, L.w);
        st.getInto(`h.${key}.bias`, L.b);
        if (st.has(`momentum.${key}.weight`)) {
          this.momW.set(key, st.get(`momentum.${key}.weight`));
          this.momB.set(key, st.get(`momentum.${key}.bias`));
        }
      }
    });
    this.saved.clear();
    for (const m of [this.gradW, this.gradB]) for (const g of m.values()) g.fill(0);
  }
}

// w -= lr * b, b = mu b + s g  (PyTorch SGD-momentum convention: the first step sets b = s g)
function sgdStep(w: Float32Array, g: Float32Array, buf: (Float32Array & { fresh?: boolean }) | null, lr: number, mu: number, s: number): void {
  const first = buf?.fresh === true;
  for (let i = 0; i < w.length; i++) {
    let gi = g[i] * s;
    if (buf) {
      const b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = b;
    }
    w[i] -= lr * gi;
  }
  if (buf) buf.fresh = false;
}
