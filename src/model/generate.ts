/**
 * Autoregressive generation with a key/value cache: the prompt is run once (prefill),
 * then each new token costs one row through every layer. Greedy, temperature and top-k
 * sampling, seeded.
 */
import type { GPT2 } from './gpt2.js';
import { linear } from './gpt2.js';
import { layernormForward, geluForward } from './kernels.js';
import { sgemm } from '../tensor/gemm.js';
import { Rng } from '../tensor/rng.js';

/** Cached keys and values of every layer: k, v are [L, n_ctx, C]. */
export class KVCache {
  readonly k: Float32Array;
  readonly v: Float32Array;
  length = 0;
  constructor(readonly L: number, readonly maxT: number, readonly C: number) {
    this.k = new Float32Array(L * maxT * C);
    this.v = new Float32Array(L * maxT * C);
  }
}

/**
 * Causal attention of n new query rows (absolute positions pos0..pos0+n-1) against cached
 * keys/values 0..pos0+n-1 of one layer. q[n,C] (row stride qStride), kc/vc[maxT,C]; out[n,C].
 */
export function cachedAttention(out: Float32Array, q: Float32Array, qStride: number, kc: Float32Array, vc: Float32Array, n: number, pos0: number, C: number, NH: number): void {
  const hs = C / NH;
  const scale = 1 / Math.sqrt(hs);
  const scores = new Float32Array(pos0 + n);
  out.fill(0, 0, n * C);
  for (let i = 0; i < n; i++) {
    const p = pos0 + i;
    for (let h = 0; h < NH; h++) {
      const qo = i * qStride + h * hs;
      let mx = -Infinity;
      for (let s = 0; s <= p; s++) {
        const ko = s * C + h * hs;
        let d = 0;
        for (let j = 0; j < hs; j++) d += q[qo + j] * kc[ko + j];
        d *= scale;
        scores[s] = d;
        if (d > mx) mx = d;
      }
      let sum = 0;
      for (let s = 0; s <= p; s++) {
        const e = Math.exp(scores[s] - mx);
        scores[s] = e;
        sum += e;
      }
      const inv = 1 / sum;
      const oo = i * C + h * hs;
      for (let s = 0; s <= p; s++) {
        const w = scores[s] * inv;
        const vo = s * C + h * hs;
        for (let j = 0; j < hs; j++) out[oo + j] += w * vc[vo + j];
      }
    }
  }
}

/**
 * Runs `tokens` (new positions cache.length..) through the model, appending to the cache.
 * Returns the logits of the last new position [V].
 */
export function forwardCached(model: GPT2, cache: KVCache, tokens: ArrayLike<number>): Float32Array {
  const c = model.config;
  const { n_layer: L, n_embd: C, n_head: NH, vocab_size: V } = c;
  const n = tokens.length;
  const pos0 = cache.length;
  if (n === 0) throw new Error('forwardCached needs at least one token');
  if (pos0 + n > c.n_ctx) throw new Error(`sequence of ${pos0 + n} tokens exceeds the model's context of ${c.n_ctx}`);
  const p = model.params;
  const lay = model.layout;
  const wte = lay.view(p, 'wte');
  const wpe = lay.view(p, 'wpe');
  const x = new Float32Array(n * C);
  for (let i = 0; i < n; i++) {
    const t = tokens[i];
    if (!Number.isInteger(t) || t < 0 || t >= V) throw new Error(`token id ${t} is out of range [0, ${V})`);
    for (let j = 0; j < C; j++) x[i * C + j] = wte[t * C + j] + wpe[(pos0 + i) * C + j];
  }
  const ln = new Float32Array(n * C);
  const mean = new Float32Array(n);
  const rstd = new Float32Array(n);
  const qkv = new Float32Array(n * 3 * C);
  const atty = new Float32Array(n * C);
  const fch = new Float32Array(n * 4 * C);
  const eps = c.layer_norm_epsilon;
  for (let l = 0; l < L; l++) {
    layernormForward(ln, mean, rstd, x, lay.layer(p, 'ln1w', l), lay.layer(p, 'ln1b', l), n, C, eps);
    linear(qkv, ln, lay.layer(p, 'qkvw', l), lay.layer(p, 'qkvb', l), n, C, 3 * C);
    const kc = cache.k.subarray(l * cache.maxT * C, (l + 1) * cache.maxT * C);
    const vc = cache.v.subarray(l * cache.maxT * C, (l + 1) * cache.maxT * C);
    for (let i = 0; i < n; i++) {
      kc.set(qkv.subarray(i * 3 * C + C, i * 3 * C + 2 * C), (pos0 + i) * C);
      vc.set(qkv.subarray(i * 3 * C + 2 * C, i * 3 * C + 3 * C), (pos0 + i) * C);
    }
    cachedAttention(atty, qkv, 3 * C, kc, vc, n, pos0, C, NH);
    linear(x, atty, lay.layer(p, 'attprojw', l), lay.layer(p, 'attprojb', l), n, C, C, true);
    layernormForward(ln, mean, rstd, x, lay.layer(p, 'ln2w', l), lay.layer(p, 'ln2b', l), n, C, eps);
    linear(fch, ln, lay.layer(p, 'fcw', l), lay.layer(p, 'fcb', l), n, C, 4 * C);
    geluForward(fch, fch, n * 4 * C);
    linear(x, fch, lay.layer(p, 'fcprojw', l), lay.layer(p, 'fcprojb', l), n, 4 * C, C, true);
  }
  cache.length = pos0 + n;
  const lastRow = x.subarray((n - 1) * C, n * C);
  const lnLast = new Float32Array(C);
  layernormForward(lnLast, mean, rstd, lastRow, lay.view(p, 'lnfw'), lay.view(p, 'lnfb'), 1, C, eps);
  const logits = new Float32Array(V);
  sgemm(false, true, 1, V, C, 1, lnLast, C, wte, C, 0, logits, V);
  return logits;
}

export interface SampleOptions {
  /** 0 = greedy. */
  temperature?: number;
  /** Keep only the k most likely tokens (0 = all). */
  topK?: number;
}

/** Picks the next token from logits [V]. */
export function sampleToken(logits: Float32Array, rng: Rng, opts: SampleOptions = {}): number {
  const temperature = opts.temperature ?? 0;
  const V = logits.length;
  if (!(temperature > 0)) {
    let best = 0;
    for (let i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  let idx: number[];
  const k = opts.topK ?? 0;
  if (k > 0 && k < V) {
    idx = Array.from({ length: V }, (_, i) => i);
    idx.sort((a, b) => logits[b] - logits[a]);
    idx = idx.slice(0, k);
  } else {
    idx = Array.from({ length: V }, (_, i) => i);
  }
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

/** Generates up to maxNewTokens after `prompt`; stops at the context length or stopToken. */
export function generate(model: GPT2, prompt: number[], opts: GenerateOptions): number[] {
  if (prompt.length === 0) throw new Error('generation needs a non-empty prompt');
  const c = model.config;
  const cache = new KVCache(c.n_layer, c.n_ctx, c.n_embd);
  const rng = new Rng(opts.seed ?? 0);
  const out: number[] = [];
  let logits = forwardCached(model, cache, prompt);
  for (let i = 0; i < opts.maxNewTokens; i++) {
    const next = sampleToken(logits, rng, opts);
    if (opts.stopToken !== undefined && next === opts.stopToken) break;
    out.push(next);
    opts.onToken?.(next);
    if (cache.length >= c.n_ctx) break;
    logits = forwardCached(model, cache, [next]);
  }
  return out;
}
