/**
 * The plain basis: the stream, the linears' inputs and outputs and the adapters all live in
 * the model's own coordinates. The plain model is the block with this basis and local
 * linears; the paper mode extends it (its stream is plain, only the linears' inputs are masked).
 */
import { isLlama, type GPT2Config } from './config.js';
import { layernormForward, layernormBackward, rmsnormForward, rmsnormBackward } from './kernels.js';
import type { Basis, NormActs, QkvPart } from './block.js';
import { sharedFloat32 } from '../tensor/shared.js';

/** Layer-norm parameters of a model: ln1/ln2 stacked [L, C], the final one [C]; gradients or null (frozen). */
export interface NormParams {
  ln1w: Float32Array; ln1b: Float32Array; ln2w: Float32Array; ln2b: Float32Array;
  lnfw: Float32Array; lnfb: Float32Array;
}

const SECTION: Record<QkvPart, number> = { q: 0, k: 1, v: 2 };

/** What the trunk needs of a basis besides the block: the embedding, the final norm and the head. */
export interface TrunkBasis<X extends Float32Array> extends Basis<X> {
  /** the embedding h[n, C] (looked up in the tables' basis) carried into the stream's basis, in place */
  embedded(h: Float32Array, n: number): void;
  /** a stream gradient [n, C] in the tables' basis (for the embedding gradients) */
  embeddedGrad(dh: Float32Array, n: number): Float32Array;
  /** final norm: hf[n, C] in the tables' basis (what the tied LM head multiplies with wte) */
  finalNorm(h: Float32Array, s: NormActs, hf: Float32Array, n: number): void;
  /** dh[n, C] += final-norm backward of dhf */
  finalNormBackward(dhf: Float32Array, dh: Float32Array, s: NormActs, h: Float32Array, n: number): void;
  /** tables-basis rows [rows, C] in the plain basis (the classifier is plain) */
  headToPlain(x: Float32Array, rows: number): Float32Array;
  /** and the gradient back */
  headGradFromPlain(dx: Float32Array, rows: number): Float32Array;
  /** the norms' own parameters train (layer 0 then needs its input gradient) */
  readonly trainsNorms: boolean;
}

export class PlainBasis implements TrunkBasis<Float32Array> {
  readonly trainsNorms: boolean;
  protected readonly C: number;
  protected readonly eps: number;
  /** the family's norm is RMSNorm (gain only: the biases are unused) */
  protected readonly rms: boolean;

  constructor(config: GPT2Config, protected readonly p: NormParams, protected readonly g: Partial<NormParams> | null) {
    this.C = config.n_embd;
    this.eps = config.layer_norm_epsilon;
    this.rms = isLlama(config);
    this.trainsNorms = !!g?.ln1w;
  }

  buffer(size: number): Float32Array { return sharedFloat32(size); }

  protected slice(x: Float32Array | undefined, l: number): Float32Array | null {
    return x ? x.subarray(l * this.C, (l + 1) * this.C) : null;
  }

  /** the layer norm itself (plain): s.out = LN(h) */
  protected ln(which: 1 | 2, l: number, h: Float32Array, s: NormActs, n: number): void {
    const w = which === 1 ? this.p.ln1w : this.p.ln2w, b = which === 1 ? this.p.ln1b : this.p.ln2b;
    if (this.rms) return rmsnormForward(s.out, s.rstd, h, this.slice(w, l), n, this.C, this.eps);
    layernormForward(s.out, s.mean, s.rstd, h, this.slice(w, l)!, this.slice(b, l)!, n, this.C, this.eps);
  }

  protected lnBackward(which: 1 | 2, l: number, dh: Float32Array, dout: Float32Array, s: NormActs, h: Float32Array, n: number): void {
    const w = which === 1 ? this.p.ln1w : this.p.ln2w;
    const gw = this.slice(which === 1 ? this.g?.ln1w : this.g?.ln2w, l), gb = this.slice(which === 1 ? this.g?.ln1b : this.g?.ln2b, l);
    if (this.rms) return rmsnormBackward(dh, gw, dout, h, this.slice(w, l)!, s.rstd, n, this.C);
    layernormBackward(dh, gw, gb, dout, h, this.slice(w, l)!, s.mean, s.rstd, n, this.C);
  }

  norm(which: 1 | 2, l: number, h: Float32Array, s: NormActs, n: number): Float32Array {
    this.ln(which, l, h, s, n);
    return s.out;
  }

  normPlain(_which: 1 | 2, _l: number, s: NormActs, _n: number): Float32Array { return s.out; }

  normBackward(which: 1 | 2, l: number, dh: Float32Array, dsent: Float32Array, dplain: Float32Array | null, s: NormActs, h: Float32Array, n: number): void {
    if (dplain) for (let i = 0; i < n * this.C; i++) dsent[i] += dplain[i];
    this.lnBackward(which, l, dh, dsent, s, h, n);
  }

  fromOutput(_w: 'o' | 'p', _l: number, y: Float32Array, _n: number): Float32Array { return y; }
  outputGrad(_w: 'o' | 'p', _l: number, dh: Float32Array, _n: number): Float32Array { return dh; }
  addPlain(delta: Float32Array, into: Float32Array, n: number): void { for (let i = 0; i < n * this.C; i++) into[i] += delta[i]; }
  toPlain(x: Float32Array, _n: number): Float32Array { return x; }

  addQkv(_l: number, part: QkvPart, delta: Float32Array, qkv: Float32Array, n: number): void { addSection(qkv, 3 * this.C, SECTION[part] * this.C, this.C, delta, n); }
  qkvGradToPlain(_l: number, part: QkvPart, dqkv: Float32Array, n: number): Float32Array { return getSection(dqkv, 3 * this.C, SECTION[part] * this.C, this.C, n); }
  headsToPlain(_l: number, o: Float32Array, _n: number): Float32Array { return o; }
  addHeadsGrad(_l: number, dplain: Float32Array, dO: Float32Array, n: number): void { for (let i = 0; i < n * this.C; i++) dO[i] += dplain[i]; }
  addHidden(_l: number, delta: Float32Array, f: Float32Array, n: number): void { for (let i = 0; i < n * 4 * this.C; i++) f[i] += delta[i]; }
  hiddenToPlain(_l: number, g: Float32Array, _n: number): Float32Array { return g; }
  embedded(_h: Float32Array, _n: number): void {}
  embeddedGrad(dh: Float32Array, _n: number): Float32Array { return dh; }

  finalNorm(h: Float32Array, s: NormActs, hf: Float32Array, n: number): void {
    if (this.rms) return rmsnormForward(hf, s.rstd, h, this.p.lnfw, n, this.C, this.eps);
    layernormForward(hf, s.mean, s.rstd, h, this.p.lnfw, this.p.lnfb, n, this.C, this.eps);
  }

  finalNormBackward(dhf: Float32Array, dh: Float32Array, s: NormActs, h: Float32Array, n: number): void {
    if (this.rms) return rmsnormBackward(dh, this.g?.lnfw ?? null, dhf, h, this.p.lnfw, s.rstd, n, this.C);
    layernormBackward(dh, this.g?.lnfw ?? null, this.g?.lnfb ?? null, dhf, h, this.p.lnfw, s.mean, s.rstd, n, this.C);
  }

  headToPlain(x: Float32Array, _rows: number): Float32Array { return x; }
  headGradFromPlain(dx: Float32Array, _rows: number): Float32Array { return dx; }
}

/** x[n, ld] columns off..off+w += delta[n, w] */
export function addSection(x: Float32Array, ld: number, off: number, w: number, delta: Float32Array, n: number): void {
  for (let r = 0; r < n; r++) for (let j = 0; j < w; j++) x[r * ld + off + j] += delta[r * w + j];
}

/** a copy of columns off..off+w of x[n, ld]: [n, w] */
export function getSection(x: Float32Array, ld: number, off: number, w: number, n: number): Float32Array {
  const out = new Float32Array(n * w);
  for (let r = 0; r < n; r++) out.set(x.subarray(r * ld + off, r * ld + off + w), r * w);
  return out;
}
