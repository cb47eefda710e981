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
import { llamaDims, type GateUpPart, type LlamaBasis } from '../model/llama_block.js';
import { ropeBackward, ropeForward, ropeTable, type RopeTable } from '../model/kernels.js';
import { LlamaPlainBasis } from '../model/llama.js';
import type { TrunkBasis } from '../model/plain_basis.js';
import { sgemm } from '../tensor/gemm.js';
import { asObfuscated, type Obfuscated } from '../protocol/messages.js';
import type { LlamaHeadMasks, LlamaPaperTensors, LlamaSealedTensors } from '../obfuscate/enclave_tensors.js';
import { Heads, PaperBasis, SealedBasis } from './bases.js';

/** The Llama family's heads (kv groups, the MLP's gate and up sections) and rotary. */
export class LlamaHeads extends Heads {
  private readonly rope: RopeTable;

  constructor(c: LlamaConfig, private readonly m: LlamaHeadMasks) {
    const dims = llamaDims(c);
    super({
      ...dims, L: c.n_layer, NH: c.n_head, NKV: c.n_kv_head,
      masks: { q: [m.qM, m.qMinv], k: [m.kM, m.kMinv], v: [m.vM, m.vMinv] }, headPerm: m.headPerm, pi: m.pi,
    });
    this.rope = ropeTable(dims.hd, c.n_ctx, c.rope_theta, c.rope_scaling);
  }

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
    ropeForward(qkv, this.d.W, 0, this.d.NH, this.rope, B, T, pos0);
    ropeForward(qkv, this.d.W, this.d.C, this.d.NKV, this.rope, B, T, pos0);
  }

  // the gradient w.r.t. q* is dq M^-T
  rotaryBackward(l: number, dqkv: Float32Array, B: number, T: number): void {
    ropeBackward(dqkv, this.d.W, 0, this.d.NH, this.rope, B, T, 0);
    ropeBackward(dqkv, this.d.W, this.d.C, this.d.NKV, this.rope, B, T, 0);
    if (this.m.rotary === 'full') this.remask(l, dqkv, B * T, true, true);
  }
}

const EMPTY = new Float32Array(0);

/** Local mode of the Llama family: the plain basis, whose tensors cross as they are. */
export class LlamaLocalBasis extends LlamaPlainBasis implements LlamaBasis<Obfuscated>, TrunkBasis<Obfuscated> {
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
