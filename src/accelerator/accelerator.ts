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
import type { AcceleratorWeights } from '../protocol/linears.js';
import type { BlockLinearName } from '../model/block.js';
import { LocalLinears } from '../model/local_linears.js';
import { firstNonFinite } from '../tensor/parallel.js';
import { layerLinearNames, linearTensors } from '../protocol/linears.js';
import { openSafetensors, writeSafetensors } from '../io/safetensors.js';
import { Rng } from '../tensor/rng.js';
import type { AcceleratorReply, AcceleratorRequest } from '../protocol/messages.js';

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
  /** the obfuscated linears and their training state: the same code as the plain model's */
  private readonly lin: LocalLinears<BlockLinearName>;
  /** requests served (for reports) */
  served = 0;

  private evilRng: Rng;
  private outAlloc: ((n: number) => Float32Array) | null = null;

  constructor(readonly weights: AcceleratorWeights, readonly opts: AcceleratorOptions = {}) {
    if (opts.evil && !EVIL_MODES.includes(opts.evil)) throw new Error(`unknown evil mode "${opts.evil}" (use ${EVIL_MODES.join(', ')})`);
    this.evilRng = new Rng(opts.evilSeed ?? 666);
    // request buffers are the transport's: saved inputs are copied; replies are fresh unless a server lends buffers
    this.lin = new LocalLinears(weights, { trainWeights: true, copyInputs: true, alloc: (n) => (this.outAlloc ? this.outAlloc(n) : new Float32Array(n)) });
  }

  /**
   * Where reply tensors are allocated. A server that is done with each reply once it is
   * written lends pooled buffers here; by default every reply is a fresh array (the caller
   * keeps it, as an in-process enclave does).
   */
  useOutputAllocator(alloc: ((n: number) => Float32Array) | null): void {
    this.outAlloc = alloc;
  }

  private tamper(y: Float32Array): Float32Array {
    if (this.opts.evil === 'tamper' && y.length > 0) {
      const k = this.evilRng.int(y.length);
      y[k] += 0.5 * (1 + Math.abs(y[k]));
    }
    return y;
  }

  /** A request's tensor must have rows x cols values, all finite. */
  private checkInput(what: string, x: Float32Array, rows: number, cols: number): void {
    if (x.length !== rows * cols) throw new Error(`accelerator: ${what} has ${x.length} values, expected ${rows} x ${cols}`);
    const i = firstNonFinite(x);
    if (i >= 0) throw new Error(`accelerator: ${what} contains a non-finite value at index ${i}`);
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

  private dispatch(req: AcceleratorRequest): AcceleratorReply {
    switch (req.op) {
      case 'linear_forward': {
        const L = this.lin.linear(req.layer, req.name);
        this.checkInput(`input of h.${req.layer}.${req.name}`, req.x, req.rows, L.din);
        const y = this.lin.forwardSync(req.layer, req.name, req.x, req.rows, req.save === true, this.opts.evil !== 'skip-bias');
        return { op: 'tensor', rows: req.rows, cols: L.dout, data: this.tamper(y) };
      }
      case 'linear_backward': {
        const L = this.lin.linear(req.layer, req.name);
        this.checkInput(`output gradient of h.${req.layer}.${req.name}`, req.dy, req.rows, L.dout);
        const dx = this.lin.backwardSync(req.layer, req.name, req.dy, req.rows, req.input, req.weight);
        if (!dx) return { op: 'ack' };
        return { op: 'tensor', rows: req.rows, cols: L.din, data: this.tamper(dx) };
      }
      case 'grad_sq_norm':
        return { op: 'ack', value: this.lin.gradSqNorm() };
      case 'apply_update': {
        if (![req.lr, req.gradScale, req.momentum].every(Number.isFinite)) throw new Error('accelerator: non-finite update parameters');
        if (this.opts.evil === 'stale') this.lin.reset(); // acknowledged, not applied
        else this.lin.update(req.lr, req.momentum, req.gradScale);
        return { op: 'ack' };
      }
      case 'reset':
        this.lin.reset();
        return { op: 'ack' };
      case 'checkpoint_save':
        return { op: 'ack', text: this.saveState(req.tag) };
      case 'checkpoint_load':
        this.loadState(req.tag);
        return { op: 'ack' };
    }
  }

  private stateFile(tag: string): string {
    if (!this.opts.stateDir) throw new Error('accelerator: no state directory configured for checkpoints');
    return path.join(this.opts.stateDir, `${tag}.safetensors`);
  }

  private saveState(tag: string): string {
    const file = this.stateFile(tag);
    mkdirSync(path.dirname(file), { recursive: true });
    const mom = this.lin.momentumState();
    // the momentum buffers of the linears that have them, laid out as the weights
    const momentum: AcceleratorWeights = { n_layer: this.weights.n_layer, layers: this.weights.layers.map((layer, l) => Object.fromEntries(
      layerLinearNames(layer).filter((n) => mom.has(`${l}.${n}.w`) && mom.has(`${l}.${n}.b`))
        .map((n) => [n, { ...layer[n]!, w: mom.get(`${l}.${n}.w`)!, b: mom.get(`${l}.${n}.b`)! }]))) };
    writeSafetensors(file, [...linearTensors(this.weights, 'h'), ...linearTensors(momentum, 'momentum')], { format: 'obfuscatune-accelerator-state/1' });
    return createHash('sha256').update(readFileSync(file)).digest('hex');
  }

  private loadState(tag: string): void {
    const file = this.stateFile(tag);
    if (!existsSync(file)) throw new Error(`accelerator: no checkpoint "${tag}" in ${this.opts.stateDir}`);
    const st = openSafetensors(file);
    for (const t of linearTensors(this.weights, 'h')) st.getInto(t.name, t.data as Float32Array);
    const mom = new Map<string, Float32Array>();
    this.weights.layers.forEach((layer, l) => {
      for (const key of layerLinearNames(layer).map((name) => `${l}.${name}`)) {
        if (!st.has(`momentum.${key}.weight`)) continue;
        mom.set(`${key}.w`, st.get(`momentum.${key}.weight`));
        mom.set(`${key}.b`, st.get(`momentum.${key}.bias`));
      }
    });
    this.lin.loadMomentum(mom);
  }
}
