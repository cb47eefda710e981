/**
 * The block's linears on the accelerator: each call is one request over the link, and every
 * reply is checked here, in one place: its op, shape and finiteness, and (when the bundle
 * carries secret vectors) its values with Freivalds checks. Takes only `Obfuscated` tensors.
 */
import type { GPT2Config } from '../model/config.js';
import type { BlockLinearName, Linears } from '../model/block.js';
import { blockLinearDims } from '../model/family.js';
import { isShared, sharedFloat32 } from '../tensor/shared.js';
import { firstNonFinite } from '../tensor/parallel.js';
import { asObfuscated, type Obfuscated, type AcceleratorReply } from './messages.js';
import type { AcceleratorLink } from './link.js';
import type { IntegrityChecker } from './integrity.js';
import { AcceleratorError, InputError } from '../errors.js';

/** Refuses to send a diverged (NaN/Inf) tensor across the boundary. */
function assertFinite(x: Float32Array, what: string): void {
  const i = firstNonFinite(x);
  if (i >= 0) throw new InputError(`${what} contains a non-finite value at index ${i}`);
}

/**
 * The reply must be a finite tensor of rows x cols. `check`: its Freivalds check, which reads
 * every value and fails on a non-finite one, so that the finiteness scan runs only then.
 */
export function checkTensorReply(rep: AcceleratorReply, l: number, name: string, rows: number, cols: number, check?: (y: Float32Array) => void): Obfuscated {
  if (rep.op === 'error') throw new AcceleratorError(`accelerator refused h.${l}.${name}: ${rep.message}`, 'linear');
  if (rep.op !== 'tensor') throw new AcceleratorError(`accelerator sent "${rep.op}" instead of a tensor for h.${l}.${name}`);
  if (rep.rows !== rows || rep.cols !== cols || rep.data.length !== rows * cols) throw new AcceleratorError(`accelerator reply for h.${l}.${name} has shape ${rep.rows} x ${rep.cols} (${rep.data.length} values), expected ${rows} x ${cols}`);
  const y = rep.data;
  const finite = () => {
    const bad = firstNonFinite(y);
    if (bad >= 0) throw new AcceleratorError(`accelerator reply for h.${l}.${name} contains a non-finite value at ${bad}`);
  };
  if (!check) finite();
  else {
    try {
      check(y);
    } catch (e) {
      finite();
      throw e;
    }
  }
  return asObfuscated(y); // the reply to an obfuscated request is in the request's masked basis
}

export interface RemoteLinearsOptions {
  /** the accelerator trains its weights (full fine-tuning): training forwards save, backwards accumulate */
  trainWeights: boolean;
  integrity: IntegrityChecker | null;
}

export class RemoteLinears implements Linears<Obfuscated, BlockLinearName> {
  /** what was sent to each linear in this step (the integrity mirror needs x for x^T dy) */
  private sent = new Map<string, Float32Array>();
  /** shared copies of the MLP tensors the threaded GELU reads */
  private shared = new Map<string, Float32Array>();
  constructor(readonly link: AcceleratorLink, readonly config: GPT2Config, readonly opts: RemoteLinearsOptions) {}

  private toShared(key: string, y: Obfuscated): Obfuscated {
    if (isShared(y)) return y;
    let b = this.shared.get(key);
    if (!b || b.length !== y.length) {
      b = sharedFloat32(y.length);
      this.shared.set(key, b);
    }
    b.set(y);
    return asObfuscated(b);
  }

  async forward(l: number, name: BlockLinearName, x: Obfuscated, rows: number, train: boolean): Promise<Obfuscated> {
    const [din, dout] = blockLinearDims(this.config, name);
    if (x.length !== rows * din) throw new Error(`enclave: input of h.${l}.${name} has ${x.length} values, expected ${rows} x ${din}`);
    assertFinite(x, `the enclave's input to h.${l}.${name}`);
    const save = train && this.opts.trainWeights;
    // training replies live until the next training step (the link may reuse their buffers then)
    const rep = await this.link.call({ op: 'linear_forward', layer: l, name, rows, x, save }, { scratch: train });
    const integrity = this.opts.integrity;
    let y = checkTensorReply(rep, l, name, rows, dout, integrity ? (y) => integrity.checkForward(l, name, x, y, rows) : undefined);
    if (save) this.sent.set(`${l}.${name}`, x);
    if (name === 'fc') y = this.toShared(`${l}.fc`, y); // the threaded GELU reads it
    return y;
  }

  async backward(l: number, name: BlockLinearName, dy: Obfuscated, rows: number, input: boolean): Promise<Obfuscated | null> {
    const weight = this.opts.trainWeights;
    if (!input && !weight) return null;
    const integrity = this.opts.integrity;
    if (weight && integrity) {
      const x = this.sent.get(`${l}.${name}`);
      if (!x) throw new Error(`internal: no record of the input sent to h.${l}.${name}`);
      integrity.accumulate(l, name, x, dy, rows);
    }
    const [din] = blockLinearDims(this.config, name);
    assertFinite(dy, `the enclave's output gradient for h.${l}.${name}`);
    const rep = await this.link.call({ op: 'linear_backward', layer: l, name, rows, dy, input, weight }, { scratch: true });
    if (!input) {
      if (rep.op === 'error') throw new AcceleratorError(`accelerator refused backward of h.${l}.${name}: ${rep.message}`);
      return null;
    }
    let dx = checkTensorReply(rep, l, name, rows, din, integrity ? (dx) => integrity.checkBackward(l, name, dy, dx, rows) : undefined);
    if (name === 'fcproj') dx = this.toShared('fcproj.dx', dx);
    return dx;
  }

  /** Forgets this step's record of sent inputs (an aborted step). */
  reset(): void {
    this.sent.clear();
  }
}
