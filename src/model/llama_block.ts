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
import { addInto, blockBuffers, outputOf, streamOut, QKV, PROJ, MLP_PROJ, type Basis, type BlockDef, type BlockEnv, type BlockScratch, type LayerActs, type LayerCache } from './block.js';
import { LayerAdapters } from './lora.js';

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
  const dims: Record<LlamaLinearName, [number, number]> = { qkv: [C, W], o: [C, C], gateup: [C, 2 * I], down: [I, C] };
  return dims[name];
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

const GU: readonly GateUpPart[] = ['gate', 'up'];

async function forward<X extends Float32Array>(env: Env<X>, l: number, h: Float32Array, a: LayerActs<X>, B: number, T: number, train: boolean, cache: LayerCache | null): Promise<void> {
  const { basis, linears, adapters, config } = env;
  const { C, KV, hd, I } = llamaDims(config);
  const NH = config.n_head, NKV = config.n_kv_head;
  const n = B * T;
  const ad = adapters && new LayerAdapters(adapters, l, a.lora, n, train, env.rng);
  if (train) a.hIn.set(h);
  // attention: h += attn(rope(RMS1(h) Wqkv + bqkv)) Wo
  a.x1 = basis.norm(1, l, h, a.n1, n);
  a.qkv = await linears.forward(l, 'qkv', a.x1, n, train);
  const buf = (k: number) => basis.buffer(k);
  ad?.forward(QKV, () => basis.normPlain(1, l, a.n1, n), (t) => outputOf(a.qkv, C + 2 * KV, t === 'q' ? 0 : t === 'k' ? C : C + KV, buf, (B, o, r) => basis.addQkv(l, t, B, o, r), (G, r) => basis.qkvGradToPlain(l, t, G, r)));
  basis.rotary(l, a.qkv, B, T, cache ? cache.pos : 0);
  if (cache) gqaCachedAttention(a.o, a.qkv, cache.k, cache.v, cache.pos, n, NH, NKV, hd);
  else gqaAttentionForward(a.o, a.att, a.qkv, B, T, NH, NKV, hd);
  const y = basis.fromOutput('o', l, await linears.forward(l, 'o', a.o, n, train), n);
  ad?.forward(PROJ, () => basis.headsToPlain(l, a.o, n), () => streamOut(basis, y, C));
  addInto(h, y, n * C);
  if (train) a.h2.set(h);
  // MLP: h += (silu(gate) * up) Wd, [gate | up] = RMS2(h) [Wg | Wu]
  a.x2 = basis.norm(2, l, h, a.n2, n);
  a.f = await linears.forward(l, 'gateup', a.x2, n, train);
  ad?.forward(GU, () => basis.normPlain(2, l, a.n2, n), (t) => outputOf(a.f, 2 * I, t === 'gate' ? 0 : I, buf, (B, o, r) => basis.addGateUp(l, t, B, o, r), (G, r) => basis.gateUpGradToPlain(l, t, G, r)));
  swigluForward(a.g, a.f, n, I); // element-wise: commutes with one permutation shared by gate and up
  const z = basis.fromOutput('p', l, await linears.forward(l, 'down', a.g, n, train), n);
  ad?.forward(MLP_PROJ, () => basis.hiddenToPlain(l, a.g, n), () => streamOut(basis, z, C));
  addInto(h, z, n * C);
}

async function backward<X extends Float32Array>(env: Env<X>, l: number, dh: Float32Array, a: LayerActs<X>, s: BlockScratch<X>, B: number, T: number, needInput: boolean): Promise<void> {
  const { basis, linears, adapters, config } = env;
  const { hd, I } = llamaDims(config);
  const n = B * T;
  const ad = adapters && new LayerAdapters(adapters, l, a.lora, n, false, null);
  // MLP
  const dg = (await linears.backward(l, 'down', basis.outputGrad('p', l, dh, n), n, true))!;
  const dgp = ad?.backward(MLP_PROJ, () => dh);
  if (dgp) basis.addHidden(l, dgp, dg, n);
  swigluBackward(s.df, dg, a.f, n, I);
  const dplain2 = ad?.backward(GU, () => s.df) ?? null;
  const dx2 = (await linears.backward(l, 'gateup', s.df, n, true))!;
  basis.normBackward(2, l, dh, dx2, dplain2, a.n2, a.h2, n);
  // attention
  const dO = (await linears.backward(l, 'o', basis.outputGrad('o', l, dh, n), n, true))!;
  const dop = ad?.backward(PROJ, () => dh);
  if (dop) basis.addHeadsGrad(l, dop, dO, n);
  gqaAttentionBackward(s.dqkv, s.datt, dO, a.att, a.qkv, B, T, config.n_head, config.n_kv_head, hd);
  basis.rotaryBackward(l, s.dqkv, B, T);
  const dplain1 = ad?.backward(QKV, () => s.dqkv) ?? null;
  const dx1 = await linears.backward(l, 'qkv', s.dqkv, n, needInput);
  if (needInput) basis.normBackward(1, l, dh, dx1!, dplain1, a.n1, a.hIn, n);
}

/** The Llama block for a config (its buffers sized by the config's widths; no GELU tanh kept). */
export function llamaBlock<X extends Float32Array>(config: LlamaConfig): BlockDef<X, LlamaLinearName> {
  const { C, W, I } = llamaDims(config);
  return {
    ...blockBuffers<X>(C, config.n_head, W, 2 * I, I, 0),
    forward: (m, l, h, a, B, T, train, cache) => forward(m as Env<X>, l, h, a, B, T, train, cache ?? null),
    backward: (m, l, dh, a, s, B, T, needInput) => backward(m as Env<X>, l, dh, a, s, B, T, needInput),
  };
}
