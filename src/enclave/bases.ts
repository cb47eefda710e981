/**
 * The enclave's bases around the remote linears: paper and sealed, and local (the plain
 * basis, unmasked: the baseline). Each is the one place where its mode's masks are applied,
 * and this file is the only code that makes an `Obfuscated` tensor. Each takes its mode's
 * enclave tensors (src/obfuscate/enclave_tensors.ts) as they are.
 *
 * paper:  the stream is plain; each linear input is masked explicitly (a* = LN(h) R1,
 *         a2* = LN2(h) R2); outputs come back plain, or masked by Ro / Rp with two-sided
 *         masks and unmasked here.
 * sealed: the stream lives in a secret orthogonal basis h* = h Q; layer-norm statistics
 *         are taken there (u = Q^T 1) and the affine part is folded into the accelerator's
 *         weights, so the enclave does no d x d product per layer.
 * Both:   q, k, v are masked per head (q A, k A^-T, v B, heads permuted) and the MLP hidden
 *         is permuted (Pi); adapters act in the plain basis and are carried across here.
 */
import type { GPT2Config } from '../model/config.js';
import { maskedNormForward, maskedNormBackward } from '../model/kernels.js';
import type { Basis, NormActs, QkvPart } from '../model/block.js';
import type { AdapterInput } from '../model/lora.js';
import { PlainBasis, type NormParams, type TrunkBasis } from '../model/plain_basis.js';
import { sgemm } from '../tensor/gemm.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { asObfuscated, type Obfuscated } from '../protocol/messages.js';
import type { HeadMasks, PaperEnclaveTensors, SealedEnclaveTensors } from '../obfuscate/enclave_tensors.js';

/** What a mode's masks do to the heads and the MLP hidden (the section methods of a basis). */
export type HeadOps = Pick<Basis<Float32Array>, 'addQkv' | 'qkvGradToPlain' | 'headsToPlain' | 'addHeadsGrad' | 'addHidden' | 'hiddenToPlain'>;

/** The norms, input masks and two-sided output masks of paper mode (either family). */
export type PaperMasks = NormParams & Pick<PaperEnclaveTensors, 'R1' | 'R2' | 'RoInv' | 'RpInv'>;

/** What sealed mode's norms and tables need: Q, G, the centring vector (none for RMSNorm), the head bias, the gains for adapters. */
export interface SealedParts {
  Q: Float32Array; G: Float32Array;
  u: Float32Array | null; headBias: Float32Array | null;
  ln1w: Float32Array; ln2w: Float32Array; ln1b: Float32Array | null; ln2b: Float32Array | null;
}

type Kind = 'q' | 'k' | 'v';

/** The shape of a family's masked heads and MLP hidden (GPT-2: NKV = NH, I = 4C). */
export interface HeadLayout {
  L: number; C: number; NH: number; NKV: number;
  hd: number; //  head width
  KV: number; //  k and v section width, NKV hd
  W: number; //   qkv row width, C + 2 KV
  I: number; //   MLP hidden width
  /** per part, [L, heads, hd, hd]: the mask and its inverse (null where no map needs it) */
  masks: Record<Kind, [Float32Array, Float32Array | null]>;
  headPerm: Int32Array; // [L, NKV] masked kv slot j holds group headPerm[j] (its query heads move with it)
  pi: Int32Array; //       [L, I]   f*[:, j] = f[:, pi[j]]
}

/** GPT-2's heads: q A, k A^-T, v B (B^-1 back to plain), slots and hidden permuted. */
export function gpt2Heads(config: GPT2Config, m: HeadMasks): HeadLayout {
  const C = config.n_embd, NH = config.n_head;
  return {
    L: config.n_layer, C, NH, NKV: NH, hd: C / NH, KV: C, W: 3 * C, I: 4 * C,
    masks: { q: [m.hA, null], k: [m.hAinvT, null], v: [m.hB, m.hBinv] }, headPerm: m.headPerm, pi: m.pi,
  };
}

/** The per-head masks, the kv-group permutation and the hidden permutation of both obfuscated bases. */
export class Heads implements HeadOps {
  /** per layer: the query head of each q slot, the kv group of each kv slot */
  private readonly qOf: Int32Array[] = [];
  private readonly kvOf: Int32Array[] = [];
  private readonly pis: Int32Array[] = [];

  constructor(protected readonly d: HeadLayout) {
    const rep = d.NH / d.NKV;
    for (let l = 0; l < d.L; l++) {
      const perm = d.headPerm.subarray(l * d.NKV, (l + 1) * d.NKV);
      this.kvOf.push(perm);
      this.qOf.push(Int32Array.from({ length: d.NH }, (_, s) => perm[Math.floor(s / rep)] * rep + (s % rep)));
      this.pis.push(d.pi.subarray(l * d.I, (l + 1) * d.I));
    }
  }

  /** section of a qkv row: column offset, heads, the head of each slot */
  protected section(l: number, part: Kind): { off: number; heads: Int32Array } {
    const { C, KV } = this.d;
    return part === 'q' ? { off: 0, heads: this.qOf[l] } : { off: part === 'k' ? C : C + KV, heads: this.kvOf[l] };
  }

  /** the [hd, hd] mask (or its inverse) of one head of a layer */
  protected mask(l: number, kind: Kind, head: number, inv: boolean): Float32Array {
    const { hd } = this.d, count = kind === 'q' ? this.d.NH : this.d.NKV;
    const all = this.d.masks[kind][inv ? 1 : 0];
    if (!all) throw new Error(`internal: no inverse ${kind} mask`);
    return all.subarray((l * count + head) * hd * hd, (l * count + head + 1) * hd * hd);
  }

  /**
   * toMasked: dst[slot j] (+)= src[head of j] M ; else dst[head of j] (+)= src[slot j] M (M^T with trans).
   * Heads are hd-wide column blocks from column so of src (row stride sld) and do_ of dst (stride dld).
   */
  private map(l: number, kind: Kind, inv: boolean, heads: Int32Array, src: Float32Array, sld: number, so: number, dst: Float32Array, dld: number, do_: number, rows: number, toMasked: boolean, trans: boolean, accumulate: boolean, maskOf: (h: number) => number = (h) => h): void {
    const hd = this.d.hd;
    heads.forEach((h, j) => {
      const [from, to] = toMasked ? [h, j] : [j, h];
      sgemm(false, trans, rows, hd, hd, 1, src.subarray(so + from * hd), sld, this.mask(l, kind, maskOf(h), inv), hd, accumulate ? 1 : 0, dst.subarray(do_ + to * hd), dld);
    });
  }

  private width(part: QkvPart): number {
    return part === 'q' ? this.d.C : this.d.KV;
  }

  addQkv(l: number, part: QkvPart, delta: Float32Array, qkv: Float32Array, n: number): void {
    const { off, heads } = this.section(l, part);
    this.map(l, part, false, heads, delta, this.width(part), 0, qkv, this.d.W, off, n, true, false, true);
  }

  // q* = q M, so dq = dq* M^T
  qkvGradToPlain(l: number, part: QkvPart, dqkv: Float32Array, n: number): Float32Array {
    const { off, heads } = this.section(l, part);
    const w = this.width(part), out = new Float32Array(n * w);
    this.map(l, part, false, heads, dqkv, this.d.W, off, out, w, 0, n, false, true, false);
    return out;
  }

  private groupOf = (h: number): number => Math.floor(h / (this.d.NH / this.d.NKV));

  // o*[slot] = o[h] Mv(g(h)): o[h] = o*[slot] Mv^-1
  headsToPlain(l: number, o: Float32Array, n: number): Float32Array {
    const C = this.d.C, out = new Float32Array(n * C);
    this.map(l, 'v', true, this.qOf[l], o, C, 0, out, C, 0, n, false, false, false, this.groupOf);
    return out;
  }

  addHeadsGrad(l: number, dplain: Float32Array, dO: Float32Array, n: number): void {
    const C = this.d.C;
    this.map(l, 'v', true, this.qOf[l], dplain, C, 0, dO, C, 0, n, true, true, true, this.groupOf);
  }

  /** x*[:, off + j] += delta[:, pi[j]] over an I-wide section of rows of width ld */
  protected addPermuted(l: number, delta: Float32Array, x: Float32Array, ld: number, off: number, n: number): void {
    const pi = this.pis[l], I = this.d.I;
    for (let r = 0; r < n; r++) for (let j = 0; j < I; j++) x[r * ld + off + j] += delta[r * I + pi[j]];
  }

  /** plain[:, pi[j]] = x*[:, off + j] */
  protected unpermute(l: number, x: Float32Array, ld: number, off: number, n: number): Float32Array {
    const pi = this.pis[l], I = this.d.I, out = new Float32Array(n * I);
    for (let r = 0; r < n; r++) for (let j = 0; j < I; j++) out[r * I + pi[j]] = x[r * ld + off + j];
    return out;
  }

  addHidden(l: number, delta: Float32Array, f: Float32Array, n: number): void { this.addPermuted(l, delta, f, this.d.I, 0, n); }
  hiddenToPlain(l: number, g: Float32Array, n: number): Float32Array { return this.unpermute(l, g, this.d.I, 0, n); }
}

/** Local mode: the plain basis, whose tensors cross as they are (nothing is masked). */
export class LocalBasis extends PlainBasis implements TrunkBasis<Obfuscated> {
  override buffer(size: number): Obfuscated { return asObfuscated(super.buffer(size)); }
  override norm(which: 1 | 2, l: number, h: Float32Array, s: NormActs, n: number): Obfuscated { return asObfuscated(super.norm(which, l, h, s, n)); }
  override outputGrad(_w: 'o' | 'p', _l: number, dh: Float32Array, _n: number): Obfuscated { return asObfuscated(dh); }
}

/** Paper mode: plain stream and norms, masked linear inputs (and outputs, two-sided). */
export class PaperBasis extends PlainBasis implements TrunkBasis<Obfuscated> {
  protected readonly heads: HeadOps;

  /** the tensors' norms are the ones used (and, with `grads`, trained); `heads`: default GPT-2's from the tensors */
  constructor(config: GPT2Config, private readonly masks: PaperMasks, grads: Partial<NormParams> | null, heads?: HeadOps) {
    super(config, masks, grads);
    this.heads = heads ?? new Heads(gpt2Heads(config, masks as PaperEnclaveTensors));
  }

  override buffer(size: number): Obfuscated {
    return asObfuscated(sharedFloat32(size));
  }

  private mat(R: Float32Array, l: number): Float32Array {
    const C = this.C;
    return R.subarray(l * C * C, (l + 1) * C * C);
  }

  /** buffers reused per slot (a norm's output lives until the same norm of the next pass; forwards do not overlap) */
  private readonly bufs = new Map<string, Float32Array>();
  private buf(slot: string, size: number): Float32Array {
    let b = this.bufs.get(slot);
    if (b?.length !== size) this.bufs.set(slot, (b = sharedFloat32(size)));
    return b;
  }

  // a* = LN(h) R
  override norm(which: 1 | 2, l: number, h: Float32Array, s: NormActs, n: number): Obfuscated {
    const C = this.C;
    this.ln(which, l, h, s, n);
    const out = this.buf(`${which}.${l}`, n * C);
    sgemm(false, false, n, C, C, 1, s.out, C, this.mat(which === 1 ? this.masks.R1 : this.masks.R2, l), C, 0, out, C);
    return asObfuscated(out);
  }

  // the accelerator's gradient is w.r.t. a R, the adapter's w.r.t. a: unmask first, then add
  override normBackward(which: 1 | 2, l: number, dh: Float32Array, dsent: Float32Array, dplain: Float32Array | null, s: NormActs, h: Float32Array, n: number): void {
    const C = this.C, da = dplain ?? this.buf('da', n * C); // dplain is the adapters' own: it takes the sum
    sgemm(false, true, n, C, C, 1, dsent, C, this.mat(which === 1 ? this.masks.R1 : this.masks.R2, l), C, dplain ? 1 : 0, da, C);
    this.lnBackward(which, l, dh, da, s, h, n);
  }

  /** x Ro^-1 (or x Ro^-T with `trans`; Rp for the MLP) with two-sided masks, else null (outputs cross plain) */
  private unmaskOutput(which: 'o' | 'p', l: number, x: Float32Array, n: number, trans: boolean): Float32Array | null {
    const Rinv = which === 'o' ? this.masks.RoInv : this.masks.RpInv;
    if (!Rinv) return null;
    const C = this.C;
    const out = new Float32Array(n * C);
    sgemm(false, trans, n, C, C, 1, x, C, this.mat(Rinv, l), C, 0, out, C);
    return out;
  }

  override fromOutput(which: 'o' | 'p', l: number, y: Float32Array, n: number): Float32Array { return this.unmaskOutput(which, l, y, n, false) ?? y; }
  override outputGrad(which: 'o' | 'p', l: number, dh: Float32Array, n: number): Obfuscated { return asObfuscated(this.unmaskOutput(which, l, dh, n, true) ?? dh); }

  override addQkv(l: number, part: QkvPart, delta: Float32Array, qkv: Float32Array, n: number): void { this.heads.addQkv(l, part, delta, qkv, n); }
  override qkvGradToPlain(l: number, part: QkvPart, dqkv: Float32Array, n: number): Float32Array { return this.heads.qkvGradToPlain(l, part, dqkv, n); }
  override headsToPlain(l: number, o: Float32Array, n: number): Float32Array { return this.heads.headsToPlain(l, o, n); }
  override addHeadsGrad(l: number, dplain: Float32Array, dO: Float32Array, n: number): void { this.heads.addHeadsGrad(l, dplain, dO, n); }
  override addHidden(l: number, delta: Float32Array, f: Float32Array, n: number): void { this.heads.addHidden(l, delta, f, n); }
  override hiddenToPlain(l: number, g: Float32Array, n: number): Float32Array { return this.heads.hiddenToPlain(l, g, n); }
}

/**
 * Sealed mode. `plainTables`: the embeddings (and the final bias) are held in the plain basis
 * and the embedded stream is rotated here (full fine-tuning trains them exactly as local
 * training does); otherwise the tables are the bundle's rotated ones.
 */
export class SealedBasis implements TrunkBasis<Obfuscated> {
  readonly trainsNorms = false;
  protected readonly heads: HeadOps;
  private readonly C: number;
  private readonly eps: number;
  /** the final norm's output map: G, or G Q^T straight into the plain basis (plain tables) */
  private readonly Gout: Float32Array;
  /** the centring vector Q^T 1 (layer norm), or 0 (RMSNorm: the same statistics without centring) */
  private readonly u: Float32Array;

  /** `heads`: default GPT-2's from the tensors */
  constructor(config: GPT2Config, private readonly p: SealedParts, private readonly plainTables: boolean, private readonly gHeadBias: Float32Array | null, heads?: HeadOps) {
    this.C = config.n_embd;
    this.eps = config.layer_norm_epsilon;
    this.heads = heads ?? new Heads(gpt2Heads(config, p as unknown as SealedEnclaveTensors));
    this.u = p.u ?? new Float32Array(this.C);
    this.Gout = plainTables ? this.rotate(p.G, this.C, false) : p.G;
  }

  /** rows x C: x Q (toRotated) or x Q^T (to plain), accumulated into `into` when given */
  private rotate(x: Float32Array, rows: number, toRotated: boolean, into?: Float32Array): Float32Array {
    const C = this.C;
    const out = into ?? new Float32Array(rows * C);
    sgemm(false, !toRotated, rows, C, C, 1, x, C, this.p.Q, C, into ? 1 : 0, out, C);
    return out;
  }

  buffer(size: number): Obfuscated {
    return asObfuscated(sharedFloat32(size));
  }

  // n* = (h* - mean u^T) rstd: the normalised row in the rotated basis (the affine part is folded downstream)
  norm(_which: 1 | 2, _l: number, h: Float32Array, s: NormActs, n: number): Obfuscated {
    maskedNormForward(s.out, s.mean, s.rstd, h, this.u, n, this.C, this.eps);
    return asObfuscated(s.out);
  }

  // the plain layer-norm output a = (n* Q^T) diag(gamma) + beta, left in the frame of n* (the adapter folds it)
  normPlain(which: 1 | 2, l: number, s: NormActs, _n: number): AdapterInput {
    const C = this.C;
    const gain = (which === 1 ? this.p.ln1w : this.p.ln2w).subarray(l * C, (l + 1) * C);
    return { x: s.out, Q: this.p.Q, gain, bias: (which === 1 ? this.p.ln1b : this.p.ln2b)?.subarray(l * C, (l + 1) * C) ?? null };
  }

  // an adapter's gradient arrives in the frame of n*
  normBackward(_which: 1 | 2, _l: number, dh: Float32Array, dsent: Float32Array, dframe: Float32Array | null, s: NormActs, _h: Float32Array, n: number): void {
    if (dframe) for (let i = 0; i < n * this.C; i++) dsent[i] += dframe[i];
    maskedNormBackward(dh, dsent, s.out, this.u, s.rstd, n, this.C);
  }

  fromOutput(_w: 'o' | 'p', _l: number, y: Float32Array, _n: number): Float32Array {
    return y;
  }

  outputGrad(_w: 'o' | 'p', _l: number, dh: Float32Array, _n: number): Obfuscated {
    return asObfuscated(dh);
  }

  addPlain(delta: Float32Array, into: Float32Array, n: number): void {
    this.rotate(delta, n, true, into);
  }

  toPlain(x: Float32Array, n: number): Float32Array {
    return this.rotate(x, n, false);
  }

  addQkv(l: number, part: QkvPart, delta: Float32Array, qkv: Float32Array, n: number): void { this.heads.addQkv(l, part, delta, qkv, n); }
  qkvGradToPlain(l: number, part: QkvPart, dqkv: Float32Array, n: number): Float32Array { return this.heads.qkvGradToPlain(l, part, dqkv, n); }
  headsToPlain(l: number, o: Float32Array, n: number): Float32Array { return this.heads.headsToPlain(l, o, n); }
  addHeadsGrad(l: number, dplain: Float32Array, dO: Float32Array, n: number): void { this.heads.addHeadsGrad(l, dplain, dO, n); }
  addHidden(l: number, delta: Float32Array, f: Float32Array, n: number): void { this.heads.addHidden(l, delta, f, n); }
  hiddenToPlain(l: number, g: Float32Array, n: number): Float32Array { return this.heads.hiddenToPlain(l, g, n); }

  embedded(h: Float32Array, n: number): void {
    if (this.plainTables) h.set(this.rotate(h, n, true));
  }

  embeddedGrad(dh: Float32Array, n: number): Float32Array {
    return this.plainTables ? this.rotate(dh, n, false) : dh;
  }

  // hf = n_f* G + beta_f Q (rotated tables), or n_f* G Q^T + beta_f (plain tables)
  finalNorm(h: Float32Array, s: NormActs, hf: Float32Array, n: number): void {
    const C = this.C;
    const out = s.out.length >= n * C ? s.out : new Float32Array(n * C);
    maskedNormForward(out, s.mean, s.rstd, h, this.u, n, C, this.eps);
    sgemm(false, false, n, C, C, 1, out, C, this.Gout, C, 0, hf, C, this.p.headBias);
  }

  finalNormBackward(dhf: Float32Array, dh: Float32Array, s: NormActs, _h: Float32Array, n: number): void {
    const C = this.C;
    const gb = this.gHeadBias;
    if (gb) for (let r = 0; r < n; r++) for (let j = 0; j < C; j++) gb[j] += dhf[r * C + j];
    const dxf = new Float32Array(n * C);
    sgemm(false, true, n, C, C, 1, dhf, C, this.Gout, C, 0, dxf, C);
    maskedNormBackward(dh, dxf, s.out, this.u, s.rstd, n, C);
  }

  headToPlain(x: Float32Array, rows: number): Float32Array {
    return this.plainTables ? x : this.rotate(x, rows, false);
  }

  headGradFromPlain(dx: Float32Array, rows: number): Float32Array {
    return this.plainTables ? dx : this.rotate(dx, rows, true);
  }
}
