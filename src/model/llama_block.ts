/**
 * The Llama-family block (Llama, Mistral, Qwen2), the second block definition on the seam of
 * block.ts: the same `Linears` (its own four names) and `Basis` (RMSNorm instead of the layer
 * norm; plus rotary, and the fused gate | up sections of the MLP), the same trunk.
 *
 *   h += attn(rope(RMS1(h) Wqkv + bqkv)) Wo ;  h += (silu(gate) * up)(RMS2(h) [Wg | Wu]) Wd
 *
 * Linears: qkv [C, W] with W = C + 2 KV (KV = n_kv_head * hd: grouped-query attention),
 * o [C, C], gateup [C, 2I] (gate | up per row), down [I, C].
 */
import type { LlamaConfig } from './config.js';
import { gqaAttentionForward, gqaAttentionBackward, gqaCachedAttention, swigluForward, swigluBackward } from './kernels.js';
import { normActs, type Basis, type BlockDef, type BlockEnv, type LayerActs, type QkvPart } from './block.js';
import { loraForward, loraBackward, type LoraTarget } from './lora.js';

export const LLAMA_LINEARS = ['qkv', 'o', 'gateup', 'down'] as const;
export type LlamaLinearName = (typeof LLAMA_LINEARS)[number];

/** Widths of a Llama config: head width, key/value width, packed q | k | v width, MLP width. */
export function llamaDims(c: LlamaConfig): { C: number; hd: number; KV: number; W: number; I: number } {
  const C = c.n_embd, hd = C / c.n_head, KV = c.n_kv_head * hd;
  return { C, hd, KV, W: C + 2 * KV, I: c.intermediate_size };
}

/** [d_in, d_out] of a Llama block linear. */
export function llamaLinearDims(name: LlamaLinearName, c: LlamaConfig): [number, number] {
  const { C, W, I } = llamaDims(c);
  switch (name) {
    case 'qkv': return [C, W];
    case 'o': return [C, C];
    case 'gateup': return [C, 2 * I];
    case 'down': return [I, C];
  }
}

export type GateUpPart = 'gate' | 'up';

/**
 * What the Llama block needs of a basis beyond GPT-2's. The sections of qkv are q [C] | k [KV] |
 * v [KV] (addQkv and qkvGradToPlain take and give deltas of those widths); the MLP hidden of
 * addHidden and hiddenToPlain is the down projection's input [n, I].
 */
export interface LlamaBasis<X extends Float32Array> extends Basis<X> {
  /** rotary on the q and k sections of qkv[B*T, W] in place (row (b, t) at position pos0 + t): the attention's input */
  rotary(l: number, qkv: X, B: number, T: number, pos0: number): void;
  /** in place: the gradient of rotary's output becomes the gradient of the qkv linear's output */
  rotaryBackward(l: number, dqkv: X, B: number, T: number): void;
  /** gu*[n, 2I] += a plain update of the gate or up section [n, I] */
  addGateUp(l: number, part: GateUpPart, delta: Float32Array, gu: X, n: number): void;
  /** the plain gradient of the gate or up section [n, I] from dgu*[n, 2I] */
  gateUpGradToPlain(l: number, part: GateUpPart, dgu: X, n: number): Float32Array;
}

type Env<X extends Float32Array> = BlockEnv<X, LlamaLinearName> & { basis: LlamaBasis<X>; config: LlamaConfig };

const QKV: readonly QkvPart[] = ['q', 'k', 'v'];
const GU: readonly GateUpPart[] = ['gate', 'up'];
const width = (t: LoraTarget, C: number, KV: number) => (t === 'q' ? C : KV);

function addInto(h: Float32Array, y: Float32Array, N: number): void {
  for (let i = 0; i < N; i++) h[i] += y[i];
}

async function forward<X extends Float32Array>(env: Env<X>, l: number, h: Float32Array, a: LayerActs<X>, B: number, T: number, train: boolean, cache: { k: Float32Array; v: Float32Array; pos: number } | null = null): Promise<void> {
  const { basis, linears, adapters: ad, config } = env;
  const { C, hd, KV, I } = llamaDims(config);
  const NH = config.n_head, NKV = config.n_kv_head;
  const n = B * T;
  const drop = train && ad ? ad.config.dropout : 0;
  const rng = train ? env.rng : null;
  if (train) a.hIn.set(h);
  // attention: h += attn(rope(RMS1(h) Wqkv + bqkv)) Wo
  a.x1 = basis.norm(1, l, h, a.n1, n);
  a.qkv = await linears.forward(l, 'qkv', a.x1, n, train);
  if (ad) {
    let a1: Float32Array | null = null;
    for (const t of QKV) {
      const v = ad.get(l, t);
      if (!v) continue;
      a1 ??= basis.normPlain(1, l, a.n1, n);
      const delta = new Float32Array(n * width(t, C, KV));
      a.lora.set(t, loraForward(delta, a1, v, n, ad.scale, drop, rng, false));
      basis.addQkv(l, t, delta, a.qkv, n);
    }
  }
  basis.rotary(l, a.qkv, B, T, cache ? cache.pos : 0);
  if (cache) gqaCachedAttention(a.o, a.qkv, cache.k, cache.v, cache.pos, n, NH, NKV, hd);
  else gqaAttentionForward(a.o, a.att, a.qkv, B, T, NH, NKV, hd);
  const y = basis.fromOutput('o', l, await linears.forward(l, 'o', a.o, n, train), n);
  const vp = ad?.get(l, 'proj');
  if (vp) {
    a.oPlain = basis.headsToPlain(l, a.o, n);
    const delta = new Float32Array(n * C);
    a.lora.set('proj', loraForward(delta, a.oPlain, vp, n, ad!.scale, drop, rng, false));
    basis.addPlain(delta, y, n);
  }
  addInto(h, y, n * C);
  if (train) a.h2.set(h);
  // MLP: h += (silu(gate) * up) Wd, [gate | up] = RMS2(h) [Wg | Wu]
  a.x2 = basis.norm(2, l, h, a.n2, n);
  a.f = await linears.forward(l, 'gateup', a.x2, n, train);
  if (ad) {
    let a2: Float32Array | null = null;
    for (const t of GU) {
      const v = ad.get(l, t);
      if (!v) continue;
      a2 ??= basis.normPlain(2, l, a.n2, n);
      const delta = new Float32Array(n * I);
      a.lora.set(t, loraForward(delta, a2, v, n, ad.scale, drop, rng, false));
      basis.addGateUp(l, t, delta, a.f, n);
    }
  }
  swigluForward(a.g, a.f, n, I); // element-wise: commutes with one permutation shared by gate and up
  const z = basis.fromOutput('p', l, await linears.forward(l, 'down', a.g, n, train), n);
  const vm = ad?.get(l, 'mlp-proj');
  if (vm) {
    a.gPlain = basis.hiddenToPlain(l, a.g, n);
    const delta = new Float32Array(n * C);
    a.lora.set('mlp-proj', loraForward(delta, a.gPlain, vm, n, ad!.scale, drop, rng, false));
    basis.addPlain(delta, z, n);
  }
  addInto(h, z, n * C);
}

async function backward<X extends Float32Array>(env: Env<X>, l: number, dh: Float32Array, a: LayerActs<X>, s: { datt: Float32Array; dqkv: X; df: X }, B: number, T: number, needInput: boolean): Promise<void> {
  const { basis, linears, adapters: ad, config } = env;
  const { C, hd, KV, I } = llamaDims(config);
  const n = B * T;
  // MLP
  const dg = (await linears.backward(l, 'down', basis.outputGrad('p', l, dh, n), n, true))!;
  const vm = ad?.get(l, 'mlp-proj');
  if (vm) {
    const dgp = new Float32Array(n * I);
    loraBackward(dgp, basis.toPlain(dh, n), vm, a.lora.get('mlp-proj')!, n, ad!.scale);
    basis.addHidden(l, dgp, dg, n);
  }
  swigluBackward(s.df, dg, a.f, n, I);
  let dplain2: Float32Array | null = null;
  if (ad) {
    for (const t of GU) {
      const v = ad.get(l, t);
      if (!v) continue;
      dplain2 ??= new Float32Array(n * C);
      loraBackward(dplain2, basis.gateUpGradToPlain(l, t, s.df, n), v, a.lora.get(t)!, n, ad.scale);
    }
  }
  const dx2 = (await linears.backward(l, 'gateup', s.df, n, true))!;
  basis.normBackward(2, l, dh, dx2, dplain2, a.n2, a.h2, n);
  // attention
  const dO = (await linears.backward(l, 'o', basis.outputGrad('o', l, dh, n), n, true))!;
  const vp = ad?.get(l, 'proj');
  if (vp) {
    const dop = new Float32Array(n * C);
    loraBackward(dop, basis.toPlain(dh, n), vp, a.lora.get('proj')!, n, ad!.scale);
    basis.addHeadsGrad(l, dop, dO, n);
  }
  gqaAttentionBackward(s.dqkv, s.datt, dO, a.att, a.qkv, B, T, config.n_head, config.n_kv_head, hd);
  basis.rotaryBackward(l, s.dqkv, B, T);
  let dplain1: Float32Array | null = null;
  if (ad) {
    for (const t of QKV) {
      const v = ad.get(l, t);
      if (!v) continue;
      dplain1 ??= new Float32Array(n * C);
      loraBackward(dplain1, basis.qkvGradToPlain(l, t, s.dqkv, n), v, a.lora.get(t)!, n, ad.scale);
    }
  }
  const dx1 = await linears.backward(l, 'qkv', s.dqkv, n, needInput);
  if (needInput) basis.normBackward(1, l, dh, dx1!, dplain1, a.n1, a.hIn, n);
}

/** The Llama block for a config (its buffers sized by the config's widths). */
export function llamaBlock<X extends Float32Array>(config: LlamaConfig): BlockDef<X, LlamaLinearName> {
  const { C, W, I } = llamaDims(config);
  const NH = config.n_head;
  return {
    acts: (B, T, basis) => {
      const n = B * T;
      return {
        hIn: new Float32Array(n * C), n1: normActs(n, C), x1: basis.buffer(0), qkv: basis.buffer(0), att: new Float32Array(B * NH * T * T),
        o: basis.buffer(n * C), h2: new Float32Array(n * C), n2: normActs(n, C), x2: basis.buffer(0), f: basis.buffer(0),
        g: basis.buffer(n * I), th: new Float32Array(0), lora: new Map(),
      };
    },
    scratch: (B, T, basis) => ({ datt: new Float32Array(B * NH * T * T), dqkv: basis.buffer(B * T * W), df: basis.buffer(B * T * 2 * I) }),
    forward: (m, l, h, a, B, T, train, cache) => forward(m as Env<X>, l, h, a, B, T, train, cache ?? null),
    backward: (m, l, dh, a, s, B, T, needInput) => backward(m as Env<X>, l, dh, a, s, B, T, needInput),
  };
}
