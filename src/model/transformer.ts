/**
 * The whole trunk and its heads around THE block (block.ts): embedding, L blocks, final
 * norm, the tied language-model head or the sequence classifier, the loss, and the backward
 * of all of it. Generic over the basis and the linears: the plain GPT-2, the enclave's
 * inference and split training are instances of this one class, and `generate` (KV cache)
 * serves all of them.
 */
import type { GPT2Config } from './config.js';
import {
  encoderForward, encoderBackward, poolForward, poolBackward, type Pooling,
} from './kernels.js';
import { crossEntropyForwardPar as crossEntropyForward } from '../tensor/parallel.js';
import { crossEntropyBackward } from '../tensor/kernels_ew.js';
import { gpt2Block, normActs, type BlockDef, type BlockEnv, type BlockScratch, type LayerActs, type LayerCache, type Linears, type NormActs } from './block.js';
import { isLlama, kvWidth } from './config.js';
import type { TrunkBasis } from './plain_basis.js';
import { loraEmbedForward, loraEmbedBackward, type LoraAdapters } from './lora.js';
import { sgemm } from '../tensor/gemm.js';
import { Rng, type RandomSource } from '../tensor/rng.js';
import { sharedFloat32 } from '../tensor/shared.js';

/** Embedding tables in the tables' basis, and their gradients (null: frozen). */
export interface Tables {
  wte: Float32Array; // [V, C] (the LM head too, unless `head` is given)
  wpe: Float32Array | null; // [maxT, C] (null: no position table, rotary models)
  gwte: Float32Array | null;
  gwpe: Float32Array | null;
  /** an untied LM head [V, C] and its gradient */
  head?: Float32Array | null;
  ghead?: Float32Array | null;
}

/** A sequence-classification head on pooled final states (plain basis). */
export interface ClsHead {
  numLabels: number;
  weight: Float32Array; // [K, C]
  grad: Float32Array | null; // [K, C]
  pooling: Pooling;
}

export interface TrunkParts<X extends Float32Array> {
  config: GPT2Config;
  basis: TrunkBasis<X>;
  linears: Linears<X, string>;
  tables: Tables;
  /** the family's block (default: GPT-2's) */
  block?: BlockDef<X, string>;
  cls?: ClsHead | null;
  adapters?: LoraAdapters | null;
  /** adapter dropout */
  rng?: RandomSource | null;
}

export interface HeadResult {
  /** LM [B*T, V] or cls [B, K]: logits, replaced by probabilities when targets were given */
  logits: Float32Array;
  loss: number | null;
  /** rows that counted in the loss (tokens for lm, examples for cls) */
  count: number;
  /** cls: predicted label per example and how many match the labels */
  predictions?: Int32Array;
  correct?: number;
}

/** Per-(B, T) activations of every layer, allocated once per shape. */
class Acts<X extends Float32Array> {
  readonly layers: LayerActs<X>[];
  readonly h: Float32Array; //   [n, C] the stream
  readonly hL: Float32Array; //  [n, C] the stream after the last block
  readonly nf: NormActs; //      final norm
  readonly hf: Float32Array; //  [n, C] final norm output (tables' basis)
  readonly dh: Float32Array; //  [n, C] the stream's gradient
  readonly dhf: Float32Array; // [n, C]
  scratch: BlockScratch<X> | null = null;
  logits: Float32Array | null = null;
  readonly losses: Float32Array;

  constructor(readonly B: number, readonly T: number, readonly layerCount: number, c: GPT2Config, basis: TrunkBasis<X>, block: BlockDef<X, string>) {
    const C = c.n_embd;
    const n = B * T;
    this.layers = Array.from({ length: layerCount }, () => block.acts(B, T, basis));
    [this.h, this.hL, this.hf, this.dh, this.dhf] = Array.from({ length: 5 }, () => new Float32Array(n * C));
    this.nf = normActs(n, C);
    this.losses = sharedFloat32(n);
  }
}

interface Pending {
  head: 'lm' | 'cls';
  B: number; T: number;
  tokens: Int32Array;
  targets: Int32Array;
  count: number;
  lens?: Int32Array;
  pooled?: Float32Array;
  probs?: Float32Array;
  embU?: Float32Array;
}

export class Transformer<X extends Float32Array> {
  readonly config: GPT2Config;
  readonly env: BlockEnv<X, string>;
  readonly block: BlockDef<X, string>;
  private acts: Acts<X> | null = null;
  private pending: Pending | null = null;

  constructor(readonly parts: TrunkParts<X>) {
    this.config = parts.config;
    this.env = { config: parts.config, basis: parts.basis, linears: parts.linears, adapters: parts.adapters ?? null, rng: parts.rng ?? null };
    this.block = parts.block ?? (gpt2Block<X>(parts.config) as BlockDef<X, string>);
    if (isLlama(parts.config) && !parts.block) throw new Error('a Llama-family trunk needs the Llama block');
  }

  get basis(): TrunkBasis<X> {
    return this.parts.basis;
  }

  private activations(B: number, T: number, train: boolean): Acts<X> {
    const layers = train ? this.config.n_layer : 1;
    const a = this.acts;
    if (!a || a.B !== B || a.T !== T || a.layerCount < layers) this.acts = new Acts(B, T, layers, this.config, this.parts.basis, this.block);
    return this.acts!;
  }

  /** the activations of the last forward pass (tests compare what crossed with the plaintext) */
  lastActivations(): Readonly<Acts<X>> | null {
    return this.acts;
  }

  checkTokens(tokens: Int32Array, B: number, T: number, pos0 = 0): void {
    const { vocab_size: V, n_ctx } = this.config;
    if (!Number.isInteger(B) || !Number.isInteger(T) || B <= 0 || T <= 0) throw new Error(`batch ${B} x ${T} must be positive integers`);
    if (pos0 + T > n_ctx) throw new Error(pos0 > 0 ? `sequence of ${pos0 + T} tokens exceeds the model's context of ${n_ctx}` : `sequence length ${T} exceeds the model's context of ${n_ctx}`);
    if (tokens.length < B * T) throw new Error(`tokens has ${tokens.length} entries, expected B*T = ${B * T}`);
    for (let i = 0; i < B * T; i++) {
      const t = tokens[i];
      if (!Number.isInteger(t) || t < 0 || t >= V) throw new Error(`token id ${t} at position ${i} is out of range [0, ${V})`);
    }
  }

  /**
   * h[B*T, C] = the token and position (from pos0) embeddings in the stream's basis, plus the
   * embedding adapter's update; returns what that adapter's backward needs.
   */
  private embed(h: Float32Array, ids: Int32Array, B: number, T: number, pos0: number): Float32Array | undefined {
    const { basis, tables } = this.parts;
    const C = this.config.n_embd, n = B * T;
    encoderForward(h, ids, tables.wte, tables.wpe ? tables.wpe.subarray(pos0 * C) : null, B, T, C);
    basis.embedded(h, n);
    const embAd = this.env.adapters?.embedding();
    if (!embAd) return undefined;
    const delta = new Float32Array(n * C);
    const u = loraEmbedForward(delta, ids, embAd, n, this.env.adapters!.scale, false);
    basis.addPlain(delta, h, n);
    return u;
  }

  /** Embedding, every block and the final norm: a.hf [n, C] in the tables' basis. */
  private async trunk(tokens: Int32Array, B: number, T: number, train: boolean): Promise<Acts<X>> {
    this.checkTokens(tokens, B, T);
    const a = this.activations(B, T, train);
    const h = a.h;
    const embU = this.embed(h, tokens, B, T, 0);
    for (let l = 0; l < this.config.n_layer; l++) await this.block.forward(this.env, l, h, a.layers[train ? l : 0], B, T, train);
    if (train) a.hL.set(h);
    this.parts.basis.finalNorm(h, a.nf, a.hf, B * T);
    if (train) this.pending = { head: 'lm', B, T, tokens, targets: new Int32Array(0), count: 0, embU };
    return a;
  }

  /**
   * Language-model forward: logits [B*T, V] (a view into internal memory, valid until the next
   * call) and, with targets (-1 = ignore), the mean cross-entropy; the logits are then
   * replaced by probabilities. `train` keeps what `backward` needs.
   */
  async forwardLM(tokens: Int32Array, B: number, T: number, targets: Int32Array | null, train: boolean): Promise<HeadResult> {
    const { n_embd: C, vocab_size: V } = this.config;
    const n = B * T;
    if (targets && targets.length < n) throw new Error(`targets has ${targets.length} entries, expected ${n}`);
    if (train && !targets) throw new Error('a training forward needs targets');
    this.pending = null;
    const a = await this.trunk(tokens, B, T, train);
    if (!a.logits || a.logits.length !== n * V) a.logits = sharedFloat32(n * V);
    // logits[n, V] = hf head^T (head = wte when tied)
    sgemm(false, true, n, V, C, 1, a.hf, C, this.parts.tables.head ?? this.parts.tables.wte, C, 0, a.logits, V);
    let loss: number | null = null;
    let count = 0;
    if (targets) ({ loss, count } = crossEntropyForward(a.logits, targets, a.losses, n, V));
    if (train) Object.assign(this.pending!, { head: 'lm', targets, count });
    return { logits: a.logits, loss, count };
  }

  /**
   * Classification forward: pools each row's final states (its last token that is not
   * `padId`, or the mean up to it) and applies the classifier: logits [B, K], and with labels
   * the mean cross-entropy (probabilities then replace the logits).
   */
  async forwardCls(tokens: Int32Array, B: number, T: number, labels: Int32Array | null, train: boolean, padId: number): Promise<HeadResult> {
    const head = this.parts.cls;
    if (!head) throw new Error('this model has no classification head (load a checkpoint with score.weight or add one with addClassifier)');
    const K = head.numLabels;
    const C = this.config.n_embd;
    if (labels) {
      if (labels.length < B) throw new Error(`labels has ${labels.length} entries, expected ${B}`);
      for (let b = 0; b < B; b++) if (labels[b] < 0 || labels[b] >= K) throw new Error(`label ${labels[b]} of example ${b} is outside [0, ${K})`);
    }
    if (train && !labels) throw new Error('a training forward needs labels');
    this.pending = null;
    const a = await this.trunk(tokens, B, T, train);
    const hidden = new Float32Array(B * C);
    const lens = poolForward(hidden, a.hf, tokens, B, T, C, padId, head.pooling);
    const pooled = this.parts.basis.headToPlain(hidden, B);
    const logits = new Float32Array(B * K);
    sgemm(false, true, B, K, C, 1, pooled, C, head.weight, C, 0, logits, K);
    const predictions = Int32Array.from({ length: B }, (_, b) => argmax(logits.subarray(b * K, (b + 1) * K)));
    const correct = labels ? predictions.filter((p, b) => p === labels[b]).length : 0;
    let loss: number | null = null;
    let count = 0;
    if (labels) ({ loss, count } = crossEntropyForward(logits, labels, new Float32Array(B), B, K));
    if (train) Object.assign(this.pending!, { head: 'cls', targets: labels, count, lens, pooled, probs: logits });
    return { logits, loss, count, predictions, correct };
  }

  /** Backward of the last training forward: accumulates into every gradient that is not null. */
  async backward(): Promise<void> {
    const st = this.pending;
    const a = this.acts;
    if (!st || !a) throw new Error('backward() needs a preceding forward with targets');
    this.pending = null;
    const { n_layer: L, n_embd: C, vocab_size: V } = this.config;
    const { B, T } = st;
    const n = B * T;
    const { basis, tables } = this.parts;
    const dhf = a.dhf;
    if (st.head === 'lm') {
      // dlogits = (probs - onehot(target)) / count, in place; the 1/count is the products' alpha
      const probs = a.logits!, s = st.count > 0 ? 1 / st.count : 0;
      crossEntropyBackward(probs, probs, st.targets, n, V, 1);
      // dhf = dlogits head ; dhead += dlogits^T hf (head = wte when tied)
      sgemm(false, false, n, C, V, s, probs, V, tables.head ?? tables.wte, C, 0, dhf, C);
      const gh = tables.head ? tables.ghead ?? null : tables.gwte;
      if (gh) sgemm(true, false, V, C, n, s, probs, V, a.hf, C, 1, gh, C);
    } else {
      const head = this.parts.cls!;
      const K = head.numLabels;
      const probs = st.probs!;
      crossEntropyBackward(probs, probs, st.targets, B, K, st.count);
      const dpooled = new Float32Array(B * C);
      sgemm(false, false, B, C, K, 1, probs, K, head.weight, C, 0, dpooled, C);
      if (head.grad) sgemm(true, false, K, C, B, 1, probs, K, st.pooled!, C, 1, head.grad, C);
      dhf.fill(0);
      poolBackward(dhf, basis.headGradFromPlain(dpooled, B), st.lens!, B, T, C, head.pooling);
    }
    const dh = a.dh;
    dh.fill(0);
    basis.finalNormBackward(dhf, dh, a.nf, a.hL, n);
    a.scratch ??= this.block.scratch(B, T, basis);
    const embTrain = tables.gwte !== null || tables.gwpe !== null;
    const below = embTrain || basis.trainsNorms || st.embU !== undefined;
    for (let l = L - 1; l >= 0; l--) await this.block.backward(this.env, l, dh, a.layers[l], a.scratch, B, T, l > 0 || below);
    if (embTrain) encoderBackward(tables.gwte, tables.gwpe, basis.embeddedGrad(dh, n), st.tokens, B, T, C);
    if (st.embU) {
      const ad = this.env.adapters!;
      loraEmbedBackward(basis.toPlain(dh, n), st.tokens, ad.embedding()!, st.embU, n, ad.scale);
    }
  }

  /**
   * Runs `tokens` (new positions cache.pos..) through the model with the KV cache and returns
   * the logits of the last new position [V].
   */
  async forwardCached(cache: KVCache, tokens: ArrayLike<number>): Promise<Float32Array> {
    const { n_layer: L, n_embd: C, vocab_size: V } = this.config;
    const n = tokens.length;
    if (n === 0) throw new Error('forwardCached needs at least one token');
    const pos0 = cache.pos;
    const ids = Int32Array.from(tokens);
    for (let i = 0; i < n; i++) if (!Number.isInteger(tokens[i]) || ids[i] < 0 || ids[i] >= V) throw new Error(`token id ${tokens[i]} is out of range [0, ${V})`);
    if (pos0 + n > this.config.n_ctx) throw new Error(`sequence of ${pos0 + n} tokens exceeds the model's context of ${this.config.n_ctx}`);
    const { basis, tables } = this.parts;
    const h = new Float32Array(n * C);
    this.embed(h, ids, 1, n, pos0);
    const a = new Acts<X>(1, n, 1, this.config, basis, this.block).layers[0];
    const kw = cache.C;
    for (let l = 0; l < L; l++) {
      const lc: LayerCache = { k: cache.k.subarray(l * cache.maxT * kw, (l + 1) * cache.maxT * kw), v: cache.v.subarray(l * cache.maxT * kw, (l + 1) * cache.maxT * kw), pos: pos0 };
      await this.block.forward(this.env, l, h, a, 1, n, false, lc);
    }
    cache.pos = pos0 + n;
    const hf = new Float32Array(C);
    basis.finalNorm(h.subarray((n - 1) * C, n * C), normActs(1, C), hf, 1);
    const logits = new Float32Array(V);
    sgemm(false, true, 1, V, C, 1, hf, C, tables.head ?? tables.wte, C, 0, logits, V);
    return logits;
  }
}

/** Cached keys and values of every layer, in the linears' space: k, v are [L, n_ctx, C] (C: the key/value width). */
export class KVCache {
  readonly k: Float32Array;
  readonly v: Float32Array;
  /** positions cached so far */
  pos = 0;
  constructor(readonly L: number, readonly maxT: number, readonly C: number) {
    this.k = new Float32Array(L * maxT * C);
    this.v = new Float32Array(L * maxT * C);
  }
}

export interface SampleOptions {
  /** 0 = greedy. */
  temperature?: number;
  /** Keep only the k most likely tokens (0 = all). */
  topK?: number;
}

/** Index of the largest of x (the first one on ties). */
function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** Picks the next token from logits [V]. */
export function sampleToken(logits: Float32Array, rng: Rng, opts: SampleOptions = {}): number {
  const temperature = opts.temperature ?? 0;
  const V = logits.length;
  if (!(temperature > 0)) return argmax(logits);
  const k = opts.topK ?? 0;
  let idx = Array.from({ length: V }, (_, i) => i);
  if (k > 0 && k < V) idx = idx.sort((a, b) => logits[b] - logits[a]).slice(0, k);
  let mx = -Infinity;
  for (const i of idx) if (logits[i] > mx) mx = logits[i];
  const probs = idx.map((i) => Math.exp((logits[i] - mx) / temperature));
  const sum = probs.reduce((a, b) => a + b, 0);
  let r = rng.uniform() * sum;
  for (let j = 0; j < idx.length; j++) {
    r -= probs[j];
    if (r <= 0) return idx[j];
  }
  return idx[idx.length - 1];
}

export interface GenerateOptions extends SampleOptions {
  maxNewTokens: number;
  seed?: number;
  /** Stop when this token is produced (it is not included). */
  stopToken?: number;
  onToken?: (id: number) => void;
}

/** What generation needs of a model: its trunk (plain, or through the split). */
export interface Generator {
  readonly config: GPT2Config;
  forwardCached(cache: KVCache, tokens: ArrayLike<number>): Promise<Float32Array>;
}

/**
 * Generates up to maxNewTokens after `prompt` with a KV cache (the prompt is run once, then
 * one row per new token through every layer); stops at the context length or stopToken.
 * The one generator of the plain model, the in-process enclave and the enclave service.
 */
export async function generate(model: Generator, prompt: number[], opts: GenerateOptions): Promise<number[]> {
  if (prompt.length === 0) throw new Error('generation needs a non-empty prompt');
  const c = model.config;
  const cache = new KVCache(c.n_layer, c.n_ctx, kvWidth(c));
  const rng = new Rng(opts.seed ?? 0);
  const out: number[] = [];
  let logits = await model.forwardCached(cache, prompt);
  for (let i = 0; i < opts.maxNewTokens; i++) {
    const next = sampleToken(logits, rng, opts);
    if (opts.stopToken !== undefined && next === opts.stopToken) break;
    out.push(next);
    opts.onToken?.(next);
    if (cache.pos >= c.n_ctx) break;
    logits = await model.forwardCached(cache, [next]);
  }
  return out;
}
