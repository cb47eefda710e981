/**
 * THE transformer block: one forward and one backward of a GPT-2 layer, written once against
 * two small interfaces, and used by the plain model, the enclave's inference, generation and
 * split training alike.
 *
 *   Linears<X>  the four linear products of a block (qkv, attproj, fc, fcproj): forward,
 *               backward-input and (inside) backward-weight. Local: plain weights and the
 *               native GEMM. Remote: the accelerator, with every reply checked in one place.
 *   Basis<X>    what a mode does around the linears: the layer norms (plain or rotated
 *               basis), masking of the linears' inputs and unmasking of their outputs, and
 *               the maps between the masked spaces and the plain basis for adapters.
 *
 * X is the type of a tensor in the linears' space: Float32Array for the plain basis,
 * `Obfuscated` for paper and sealed mode. The block cannot make an X from a plaintext
 * array: every X comes from the basis (`norm`, `buffer`) or from the linears.
 */
import type { GPT2Config } from './config.js';
import { attentionForward, attentionBackward, gqaCachedAttention } from './kernels.js';
import { geluForwardPar as geluForward, geluBackwardPar as geluBackward } from '../tensor/parallel.js';
import { LayerAdapters, type AdapterInput, type AdapterOutput, type LoraAdapters, type LoraSaved, type LoraTarget } from './lora.js';
import type { RandomSource } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';

export const LINEARS = ['qkv', 'attproj', 'fc', 'fcproj'] as const;
export type LinearName = (typeof LINEARS)[number];

/**
 * The block linears of every family, as the protocol names them: GPT-2's four, then the
 * Llama family's (qkv, o, gateup, down: src/model/llama_block.ts). A model uses one family's.
 */
export const ALL_LINEARS = [...LINEARS, 'o', 'gateup', 'down'] as const;
export type BlockLinearName = (typeof ALL_LINEARS)[number];

/** [d_in, d_out] of a block linear for residual width d. */
export function linearDims(name: LinearName, d: number): [number, number] {
  switch (name) {
    case 'qkv': return [d, 3 * d];
    case 'attproj': return [d, d];
    case 'fc': return [d, 4 * d];
    case 'fcproj': return [4 * d, d];
  }
}

/** A block's linear products, by name (N: the family's linear names, GPT-2's by default). */
export interface Linears<X extends Float32Array, N extends string = LinearName> {
  /** y[rows, dout] = x[rows, din] W + b ; a training call keeps x when the weights train */
  forward(l: number, name: N, x: X, rows: number, train: boolean): Promise<X>;
  /** dx[rows, din] = dy[rows, dout] W^T (when `input`); dW += x^T dy, db += colsum(dy) when the weights train */
  backward(l: number, name: N, dy: X, rows: number, input: boolean): Promise<X | null>;
}

/** What a layer norm keeps for its backward pass. */
export interface NormActs {
  out: Float32Array; //  [n, C] normalised rows (plain LN output, or n* in the rotated basis)
  mean: Float32Array; // [n]
  rstd: Float32Array; // [n]
}

export type QkvPart = 'q' | 'k' | 'v';

export interface Basis<X extends Float32Array> {
  /** a zeroed tensor of `size` values in the linears' space (shared memory, for the threaded kernels) */
  buffer(size: number): X;
  /** LN1 / LN2 of the stream h[n, C]: fills s, returns the linear's input [n, C] */
  norm(which: 1 | 2, l: number, h: Float32Array, s: NormActs, n: number): X;
  /** the plain layer-norm output (what an adapter on qkv / fc reads) [n, C], possibly in a rotated frame */
  normPlain(which: 1 | 2, l: number, s: NormActs, n: number): AdapterInput;
  /** dh[n, C] += norm backward, from the gradient of the linear's input (and of normPlain's, in its frame, for adapters) */
  normBackward(which: 1 | 2, l: number, dh: Float32Array, dsent: X, dplain: Float32Array | null, s: NormActs, h: Float32Array, n: number): void;
  /** a projection's output (o: attention, p: MLP) in the stream's basis [n, C] */
  fromOutput(which: 'o' | 'p', l: number, y: X, n: number): Float32Array;
  /** the stream gradient dh[n, C] as the projection's output gradient */
  outputGrad(which: 'o' | 'p', l: number, dh: Float32Array, n: number): X;
  /** into[n, C] += a plain-basis tensor carried into the stream's basis */
  addPlain(delta: Float32Array, into: Float32Array, n: number): void;
  /** a stream tensor (or gradient) [n, C] in the plain basis */
  toPlain(x: Float32Array, n: number): Float32Array;
  /** qkv*[n, 3C] += a plain update of one section (q, k or v) [n, C] */
  addQkv(l: number, part: QkvPart, delta: Float32Array, qkv: X, n: number): void;
  /** the plain gradient of one section [n, C] from dqkv*[n, 3C] */
  qkvGradToPlain(l: number, part: QkvPart, dqkv: X, n: number): Float32Array;
  /** the attention output o*[n, C] in the plain basis */
  headsToPlain(l: number, o: X, n: number): Float32Array;
  /** dO*[n, C] += the gradient of the plain attention output */
  addHeadsGrad(l: number, dplain: Float32Array, dO: X, n: number): void;
  /** f*[n, 4C] += a plain MLP-hidden update (also: the gradient of the plain hidden into df*) */
  addHidden(l: number, delta: Float32Array, f: X, n: number): void;
  /** an MLP hidden tensor (or its gradient) [n, 4C] in the plain basis */
  hiddenToPlain(l: number, g: X, n: number): Float32Array;
}

/** Per-layer keys and values for generation, in the linears' space: k, v [n_ctx, C]. */
export interface LayerCache {
  k: Float32Array;
  v: Float32Array;
  /** positions already cached (the new rows start here) */
  pos: number;
}

/** Everything one layer's forward keeps for its backward. */
export interface LayerActs<X extends Float32Array> {
  hIn: Float32Array; //  [n, C]  the stream entering the block
  n1: NormActs; //       LN1
  x1: X; //              [n, C]  the qkv input sent
  qkv: X; //             [n, 3C] masked heads
  att: Float32Array; //  [B, NH, T, T] attention probabilities
  o: X; //               [n, C]  attention output (masked heads)
  h2: Float32Array; //   [n, C]  the stream after attention
  n2: NormActs; //       LN2
  x2: X; //              [n, C]  the fc input sent
  f: X; //               [n, 4C] MLP hidden before GELU
  g: X; //               [n, 4C] GELU output
  th: Float32Array; //   [n, 4C] tanh inside GELU (training)
  lora: Map<LoraTarget, LoraSaved>;
}

/** Scratch of the backward pass, one layer at a time. */
export interface BlockScratch<X extends Float32Array> {
  datt: Float32Array; // [B, NH, T, T]
  dqkv: X; //            [n, 3C]
  df: X; //              [n, 4C]
}

export interface BlockEnv<X extends Float32Array, N extends string = LinearName> {
  config: GPT2Config;
  basis: Basis<X>;
  linears: Linears<X, N>;
  adapters: LoraAdapters | null;
  /** adapter dropout randomness (training) */
  rng: RandomSource | null;
}

/** A family's block: its forward and backward, and the per-layer buffers they use. */
export interface BlockDef<X extends Float32Array, N extends string = LinearName> {
  /** one layer's activations for a B x T batch */
  acts(B: number, T: number, basis: Basis<X>): LayerActs<X>;
  /** the backward's scratch */
  scratch(B: number, T: number, basis: Basis<X>): BlockScratch<X>;
  forward(m: BlockEnv<X, N>, l: number, h: Float32Array, a: LayerActs<X>, B: number, T: number, train: boolean, cache?: LayerCache | null): Promise<void>;
  backward(m: BlockEnv<X, N>, l: number, dh: Float32Array, a: LayerActs<X>, s: BlockScratch<X>, B: number, T: number, needInput: boolean): Promise<void>;
}

export const normActs = (n: number, C: number): NormActs => ({ out: new Float32Array(n * C), mean: new Float32Array(n), rstd: new Float32Array(n) });

/** A block's per-layer buffers for widths qkv W, MLP hidden F before its activation and G after, the GELU's tanh TH (0: none). */
export function blockBuffers<X extends Float32Array>(C: number, NH: number, W: number, F: number, G: number, TH: number): Pick<BlockDef<X, string>, 'acts' | 'scratch'> {
  return {
    acts: (B, T, basis) => {
      const n = B * T;
      return {
        hIn: new Float32Array(n * C), n1: normActs(n, C), x1: basis.buffer(0), qkv: basis.buffer(0), att: new Float32Array(B * NH * T * T),
        o: basis.buffer(n * C), h2: new Float32Array(n * C), n2: normActs(n, C), x2: basis.buffer(0), f: basis.buffer(0),
        g: basis.buffer(n * G), th: sharedFloat32(n * TH), lora: new Map(),
      };
    },
    scratch: (B, T, basis) => ({ datt: new Float32Array(B * NH * T * T), dqkv: basis.buffer(B * T * W), df: basis.buffer(B * T * F) }),
  };
}

/** GPT-2's block. */
export function gpt2Block<X extends Float32Array>(config: GPT2Config): BlockDef<X> {
  const C = config.n_embd;
  return { ...blockBuffers<X>(C, config.n_head, 3 * C, 4 * C, 4 * C, 4 * C), forward: blockForward, backward: blockBackward };
}

/** The adapter targets on sections of a linear's output, and on the projections. */
export const QKV: readonly QkvPart[] = ['q', 'k', 'v'];
export const PROJ: readonly LoraTarget[] = ['proj'];
export const MLP_PROJ: readonly LoraTarget[] = ['mlp-proj'];
const FC: readonly LoraTarget[] = ['fc'];

/** h[N] += y[N]: a residual add */
export function addInto(h: Float32Array, y: Float32Array, N: number): void {
  for (let i = 0; i < N; i++) h[i] += y[i];
}

/** An adapter update into y[n, ld] at column off, mapped by the basis (on B's rows) from the plain basis and back. */
export function outputOf<Y extends Float32Array>(y: Y, ld: number, off: number, buffer: (size: number) => Y, map: AdapterOutput<Y>['map'], unmap: AdapterOutput<Y>['unmap']): AdapterOutput<Y> {
  return { y, ld, off, buffer, map, unmap };
}

/** An adapter update into the stream y[n, C] (its basis's addPlain and toPlain). */
export const streamOut = (basis: Basis<Float32Array>, y: Float32Array, C: number) =>
  outputOf(y, C, 0, (k) => new Float32Array(k), (B, o, r) => basis.addPlain(B, o, r), (G, r) => basis.toPlain(G, r));

/** The straight-line layer body: h[n, C] += attn(LN1 h) ; h += mlp(LN2 h), in place. */
export async function blockForward<X extends Float32Array>(m: BlockEnv<X>, l: number, h: Float32Array, a: LayerActs<X>, B: number, T: number, train: boolean, cache: LayerCache | null = null): Promise<void> {
  const { basis, linears, adapters } = m;
  const { n_embd: C, n_head: NH } = m.config;
  const n = B * T;
  const ad = adapters && new LayerAdapters(adapters, l, a.lora, n, train, m.rng);
  if (train) a.hIn.set(h);
  // attention: h += attn(LN1(h) Wqkv + bqkv) Wo + bo
  a.x1 = basis.norm(1, l, h, a.n1, n);
  a.qkv = await linears.forward(l, 'qkv', a.x1, n, train);
  const buf = (k: number) => basis.buffer(k);
  ad?.forward(QKV, () => basis.normPlain(1, l, a.n1, n), (t) => outputOf(a.qkv, 3 * C, QKV.indexOf(t) * C, buf, (B, o, r) => basis.addQkv(l, t, B, o, r), (G, r) => basis.qkvGradToPlain(l, t, G, r)));
  if (cache) gqaCachedAttention(a.o, a.qkv, cache.k, cache.v, cache.pos, n, NH, NH, C / NH); // n new rows against the cache
  else attentionForward(a.o, a.att, a.qkv, B, T, C, NH);
  const y = basis.fromOutput('o', l, await linears.forward(l, 'attproj', a.o, n, train), n);
  ad?.forward(PROJ, () => basis.headsToPlain(l, a.o, n), () => streamOut(basis, y, C));
  addInto(h, y, n * C);
  if (train) a.h2.set(h);
  // MLP: h += gelu(LN2(h) Wfc + bfc) Wp + bp
  a.x2 = basis.norm(2, l, h, a.n2, n);
  a.f = await linears.forward(l, 'fc', a.x2, n, train);
  ad?.forward(FC, () => basis.normPlain(2, l, a.n2, n), () => outputOf(a.f, 4 * C, 0, buf, (B, o, r) => basis.addHidden(l, B, o, r), (G, r) => basis.hiddenToPlain(l, G, r)));
  geluForward(a.g, a.f, n * 4 * C, train ? a.th : null); // element-wise: commutes with the hidden permutation
  const z = basis.fromOutput('p', l, await linears.forward(l, 'fcproj', a.g, n, train), n);
  ad?.forward(MLP_PROJ, () => basis.hiddenToPlain(l, a.g, n), () => streamOut(basis, z, C));
  addInto(h, z, n * C);
}

/**
 * Backward of `blockForward`: dh[n, C] holds the gradient of the block's output and is
 * replaced by the gradient of its input (the residual passes straight through, the norms
 * add to it). `needInput` = false skips the first linear's input gradient (nothing below
 * layer 0 trains).
 */
export async function blockBackward<X extends Float32Array>(m: BlockEnv<X>, l: number, dh: Float32Array, a: LayerActs<X>, s: BlockScratch<X>, B: number, T: number, needInput: boolean): Promise<void> {
  const { basis, linears, adapters } = m;
  const { n_embd: C, n_head: NH } = m.config;
  const n = B * T;
  const ad = adapters && new LayerAdapters(adapters, l, a.lora, n, false, null);
  // MLP
  const dg = (await linears.backward(l, 'fcproj', basis.outputGrad('p', l, dh, n), n, true))!;
  const dgp = ad?.backward(MLP_PROJ, () => dh);
  if (dgp) basis.addHidden(l, dgp, dg, n);
  s.df.fill(0);
  geluBackward(s.df, a.f, dg, n * 4 * C, a.th);
  const dx2 = (await linears.backward(l, 'fc', s.df, n, true))!;
  const dplain2 = ad?.backward(FC, () => s.df) ?? null;
  basis.normBackward(2, l, dh, dx2, dplain2, a.n2, a.h2, n);
  // attention
  const dO = (await linears.backward(l, 'attproj', basis.outputGrad('o', l, dh, n), n, true))!;
  const dop = ad?.backward(PROJ, () => dh);
  if (dop) basis.addHeadsGrad(l, dop, dO, n);
  attentionBackward(s.dqkv, s.datt, dO, a.att, a.qkv, B, T, C, NH);
  const dplain1 = ad?.backward(QKV, () => s.dqkv) ?? null;
  const dx1 = await linears.backward(l, 'qkv', s.dqkv, n, needInput);
  if (needInput) basis.normBackward(1, l, dh, dx1!, dplain1, a.n1, a.hIn, n);
}
