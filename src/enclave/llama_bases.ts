/**
 * The enclave's bases of the Llama block (src/model/llama_block.ts), paper and sealed: the
 * norms, stream and tables are those of bases.ts (RMSNorm is the layer norm's statistics
 * without centring), the heads and the MLP are the family's:
 *
 *   q, k, v   per-head masks on the sections q [NH hd] | k [NKV hd] | v [NKV hd], kv groups
 *             permuted (a group's query heads move with it);
 *   rotary    `full` masks: q and k are unmasked here, per head, then rotated (O(n C hd));
 *             `blocks`: the masks commute with the rotations, which act on the masked q, k;
 *   gate, up  one permutation Pi on both sections; down's input is the hidden in Pi.
 */
import type { LlamaConfig } from '../model/config.js';
import type { QkvPart } from '../model/block.js';
import { llamaDims, type GateUpPart, type LlamaBasis } from '../model/llama_block.js';
import { ropeBackward, ropeForward, ropeTable, type RopeTable } from '../model/kernels.js';
import { LlamaPlainBasis } from '../model/llama.js';
import type { TrunkBasis } from '../model/plain_basis.js';
import { sgemm } from '../tensor/gemm.js';
import { asObfuscated, type Obfuscated } from '../protocol/messages.js';
import type { LlamaHeadMasks, LlamaPaperTensors, LlamaPlainTensors, LlamaSealedTensors } from '../obfuscate/enclave_tensors.js';
import { PaperBasis, SealedBasis, type HeadOps } from './bases.js';

type Kind = 'q' | 'k' | 'v';

/** The Llama family's per-head masks, the kv-group permutation and the MLP permutation. */
export class LlamaHeads implements HeadOps {
  private readonly d: ReturnType<typeof llamaDims>;
  private readonly rope: RopeTable;
  private readonly NH: number;
  private readonly NKV: number;
  /** per layer: the query head of each q slot, the kv group of each kv slot */
  private readonly qOf: Int32Array[] = [];
  private readonly kvOf: Int32Array[] = [];
  private readonly pis: Int32Array[] = [];

  constructor(private readonly c: LlamaConfig, private readonly m: LlamaHeadMasks) {
    this.d = llamaDims(c);
    this.NH = c.n_head;
    this.NKV = c.n_kv_head;
    this.rope = ropeTable(this.d.hd, c.n_ctx, c.rope_theta, c.rope_scaling);
    const rep = this.NH / this.NKV;
    for (let l = 0; l < c.n_layer; l++) {
      const perm = m.headPerm.subarray(l * this.NKV, (l + 1) * this.NKV);
      this.kvOf.push(perm);
      this.qOf.push(Int32Array.from({ length: this.NH }, (_, s) => perm[Math.floor(s / rep)] * rep + (s % rep)));
      this.pis.push(m.pi.subarray(l * this.d.I, (l + 1) * this.d.I));
    }
  }

  /** section of a qkv row: column offset, heads, the head of each slot */
  private section(l: number, part: Kind): { off: number; heads: Int32Array } {
    const { C, KV } = this.d;
    return part === 'q' ? { off: 0, heads: this.qOf[l] } : { off: part === 'k' ? C : C + KV, heads: this.kvOf[l] };
  }

  /** the [hd, hd] mask (or its inverse) of one head of a layer */
  private mask(l: number, kind: Kind, head: number, inv: boolean): Float32Array {
    const hd = this.d.hd, count = kind === 'q' ? this.NH : this.NKV;
    const all = { q: [this.m.qM, this.m.qMinv], k: [this.m.kM, this.m.kMinv], v: [this.m.vM, this.m.vMinv] }[kind][inv ? 1 : 0];
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

  private groupOf = (h: number): number => Math.floor(h / (this.NH / this.NKV));

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
  private addPermuted(l: number, delta: Float32Array, x: Float32Array, ld: number, off: number, n: number): void {
    const pi = this.pis[l], I = this.d.I;
    for (let r = 0; r < n; r++) for (let j = 0; j < I; j++) x[r * ld + off + j] += delta[r * I + pi[j]];
  }

  /** plain[:, pi[j]] = x*[:, off + j] */
  private unpermute(l: number, x: Float32Array, ld: number, off: number, n: number): Float32Array {
    const pi = this.pis[l], I = this.d.I, out = new Float32Array(n * I);
    for (let r = 0; r < n; r++) for (let j = 0; j < I; j++) out[r * I + pi[j]] = x[r * ld + off + j];
    return out;
  }

  addHidden(l: number, delta: Float32Array, f: Float32Array, n: number): void { this.addPermuted(l, delta, f, this.d.I, 0, n); }
  hiddenToPlain(l: number, g: Float32Array, n: number): Float32Array { return this.unpermute(l, g, this.d.I, 0, n); }
  addGateUp(l: number, part: GateUpPart, delta: Float32Array, gu: Float32Array, n: number): void { this.addPermuted(l, delta, gu, 2 * this.d.I, part === 'gate' ? 0 : this.d.I, n); }
  gateUpGradToPlain(l: number, part: GateUpPart, dgu: Float32Array, n: number): Float32Array { return this.unpermute(l, dgu, 2 * this.d.I, part === 'gate' ? 0 : this.d.I, n); }

  /** in place, per slot of the q and k sections: x[slot] = x[slot] M (M^T with trans) */
  private remask(l: number, qkv: Float32Array, n: number, inv: boolean, trans: boolean): void {
    const { W, hd } = this.d;
    const tmp = new Float32Array(n * hd);
    for (const part of ['q', 'k'] as const) {
      const { off, heads } = this.section(l, part);
      heads.forEach((h, j) => {
        const col = off + j * hd;
        for (let r = 0; r < n; r++) tmp.set(qkv.subarray(r * W + col, r * W + col + hd), r * hd);
        sgemm(false, trans, n, hd, hd, 1, tmp, hd, this.mask(l, part, h, inv), hd, 0, qkv.subarray(col), W);
      });
    }
  }

  // full masks: q = q* Mq^-1, k = k* Mk^-1, then rotary; blocks: rotary on q*, k* (it commutes with the masks)
  rotary(l: number, qkv: Float32Array, B: number, T: number, pos0: number): void {
    if (this.m.rotary === 'full') this.remask(l, qkv, B * T, true, false);
    ropeForward(qkv, this.d.W, 0, this.NH, this.rope, B, T, pos0);
    ropeForward(qkv, this.d.W, this.d.C, this.NKV, this.rope, B, T, pos0);
  }

  // the gradient w.r.t. q* is dq M^-T
  rotaryBackward(l: number, dqkv: Float32Array, B: number, T: number): void {
    ropeBackward(dqkv, this.d.W, 0, this.NH, this.rope, B, T, 0);
    ropeBackward(dqkv, this.d.W, this.d.C, this.NKV, this.rope, B, T, 0);
    if (this.m.rotary === 'full') this.remask(l, dqkv, B * T, true, true);
  }
}

const EMPTY = new Float32Array(0);

/** Local mode of the Llama family: the plain basis, whose tensors cross as they are. */
export class LlamaLocalBasis extends LlamaPlainBasis implements LlamaBasis<Obfuscated>, TrunkBasis<Obfuscated> {
  constructor(c: LlamaConfig, t: LlamaPlainTensors, g: { ln1w?: Float32Array; ln2w?: Float32Array; lnfw?: Float32Array } | null) {
    super(c, t, g);
  }
  override buffer(size: number): Obfuscated { return asObfuscated(super.buffer(size)); }
  override norm(which: 1 | 2, l: number, h: Float32Array, s: Parameters<LlamaPlainBasis['norm']>[3], n: number): Obfuscated { return asObfuscated(super.norm(which, l, h, s, n)); }
  override outputGrad(_w: 'o' | 'p', _l: number, dh: Float32Array, _n: number): Obfuscated { return asObfuscated(dh); }
}

/** Paper mode of the Llama family. */
export class LlamaPaperBasis extends PaperBasis implements LlamaBasis<Obfuscated> {
  private readonly lh: LlamaHeads;
  constructor(c: LlamaConfig, t: LlamaPaperTensors, grads: { ln1w?: Float32Array; ln2w?: Float32Array; lnfw?: Float32Array } | null) {
    const lh = new LlamaHeads(c, t);
    super(c, { ...t, ln1b: EMPTY, ln2b: EMPTY, lnfb: EMPTY }, grads, lh);
    this.lh = lh;
  }
  rotary(l: number, qkv: Obfuscated, B: number, T: number, pos0: number): void { this.lh.rotary(l, qkv, B, T, pos0); }
  rotaryBackward(l: number, dqkv: Obfuscated, B: number, T: number): void { this.lh.rotaryBackward(l, dqkv, B, T); }
  addGateUp(l: number, part: GateUpPart, delta: Float32Array, gu: Obfuscated, n: number): void { this.lh.addGateUp(l, part, delta, gu, n); }
  gateUpGradToPlain(l: number, part: GateUpPart, dgu: Obfuscated, n: number): Float32Array { return this.lh.gateUpGradToPlain(l, part, dgu, n); }
}

/** Sealed mode of the Llama family (`plainTables`: the embedding and head held in the plain basis). */
export class LlamaSealedBasis extends SealedBasis implements LlamaBasis<Obfuscated> {
  private readonly lh: LlamaHeads;
  constructor(c: LlamaConfig, t: LlamaSealedTensors, plainTables: boolean) {
    const lh = new LlamaHeads(c, t);
    super(c, { Q: t.Q, G: t.G, u: null, headBias: null, ln1w: t.ln1w, ln2w: t.ln2w, ln1b: null, ln2b: null }, plainTables, null, lh);
    this.lh = lh;
  }
  rotary(l: number, qkv: Obfuscated, B: number, T: number, pos0: number): void { this.lh.rotary(l, qkv, B, T, pos0); }
  rotaryBackward(l: number, dqkv: Obfuscated, B: number, T: number): void { this.lh.rotaryBackward(l, dqkv, B, T); }
  addGateUp(l: number, part: GateUpPart, delta: Float32Array, gu: Obfuscated, n: number): void { this.lh.addGateUp(l, part, delta, gu, n); }
  gateUpGradToPlain(l: number, part: GateUpPart, dgu: Obfuscated, n: number): Float32Array { return this.lh.gateUpGradToPlain(l, part, dgu, n); }
}
