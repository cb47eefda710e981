/**
 * The provider's delta over a public base, kept in the enclave (public-base bundles): a
 * `Linears` decorator around the accelerator's linears, which hold the masked public base.
 * Each linear's output gets the masked low-rank delta of the unmixed masked input,
 *   y* = Linears(x*) + (x* U*) V* + db*,
 * and its input gradient the delta's share, dx* += (dy* V*^T) U*^T. The delta does not
 * train: full fine-tuning updates the accelerator's base copy, and since the gradient of
 * W*b + U* V* is that of W*b, the result is full fine-tuning of the factored model. Another
 * decorator that mixes rows composes outside or inside this one: both are linear in x*.
 */
import type { LinearName, Linears } from '../model/block.js';
import type { DeltaTensors } from '../obfuscate/enclave_tensors.js';
import type { Obfuscated } from '../protocol/messages.js';
import { sgemm } from '../tensor/gemm.js';

export class DeltaLinears implements Linears<Obfuscated> {
  constructor(readonly inner: Linears<Obfuscated>, private readonly delta: DeltaTensors) {}

  // y*[rows, dout] = inner(x*) + (x*[rows, din] U*[din, r]) V*[r, dout] + 1 db*
  async forward(l: number, name: LinearName, x: Obfuscated, rows: number, train: boolean): Promise<Obfuscated> {
    const y = await this.inner.forward(l, name, x, rows, train);
    const { U, V, b, rank: r } = this.delta[l][name];
    const dout = b.length, din = x.length / rows;
    if (r > 0) {
      const h = new Float32Array(rows * r);
      sgemm(false, false, rows, r, din, 1, x, din, U, r, 0, h, r);
      sgemm(false, false, rows, dout, r, 1, h, r, V, dout, 1, y, dout);
    }
    for (let i = 0; i < rows; i++) for (let j = 0, o = i * dout; j < dout; j++) y[o + j] += b[j];
    return y;
  }

  // dx*[rows, din] = inner(dy*) + (dy*[rows, dout] V*^T) U*^T ; the delta has no weight gradient
  async backward(l: number, name: LinearName, dy: Obfuscated, rows: number, input: boolean): Promise<Obfuscated | null> {
    const dx = await this.inner.backward(l, name, dy, rows, input);
    const { U, V, b, rank: r } = this.delta[l][name];
    if (!dx || r === 0) return dx;
    const dout = b.length, din = dx.length / rows;
    const g = new Float32Array(rows * r);
    sgemm(false, true, rows, r, dout, 1, dy, dout, V, dout, 0, g, r);
    sgemm(false, true, rows, din, r, 1, g, r, U, r, 1, dx, din);
    return dx;
  }
}

/** The accelerator's linears, with the bundle's delta when it has one. */
export function withEnclaveDelta(linears: Linears<Obfuscated>, delta: DeltaTensors | null | undefined): Linears<Obfuscated> {
  return delta ? new DeltaLinears(linears, delta) : linears;
}
