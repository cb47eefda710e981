/**
 * LoRA adapters (Hu et al.): for a target linear y = x W, y += (alpha / r) * dropout(x) A B,
 * A: d_in x r (Gaussian init), B: r x d_out (zero init). The `wte` target adapts the token
 * embedding the way PEFT adapts an nn.Embedding: e(t) += (alpha / r) * A[t] B, A: V x r (zero
 * init), B: r x d (standard normal init), no dropout; it acts on the input embedding only
 * (classification, where GPT-2's tied output embedding is unused). All adapters of a model live
 * in one contiguous buffer (and their gradients in a second one).
 */
import { sgemm } from '../tensor/gemm.js';
import type { RandomSource } from '../tensor/rng.js';
import type { TensorToWrite } from '../io/safetensors.js';

/** Adapter targets: parts of the fused qkv projection, the attention output projection, the MLP up and down projections, the token embedding. */
export const LORA_TARGETS = ['q', 'k', 'v', 'proj', 'fc', 'mlp-proj', 'wte'] as const;
/** The Llama family's: q, k, v, o (`proj`), gate, up, down (`mlp-proj`), also by their HF names. */
export const LLAMA_LORA_TARGETS = ['q', 'k', 'v', 'proj', 'gate', 'up', 'mlp-proj', 'wte'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number] | (typeof LLAMA_LORA_TARGETS)[number];
const HF_TARGETS: Record<string, LoraTarget> = {
  q_proj: 'q', k_proj: 'k', v_proj: 'v', o_proj: 'proj', gate_proj: 'gate', up_proj: 'up', down_proj: 'mlp-proj', embed_tokens: 'wte',
};

export interface LoraConfig {
  rank: number;
  alpha: number;
  dropout: number;
  targets: LoraTarget[];
}


/** Targets of either family (a recipe names them before the model is known; the model refuses another family's). */
const ANY_TARGETS: readonly LoraTarget[] = ['q', 'k', 'v', 'proj', 'fc', 'gate', 'up', 'mlp-proj', 'wte'];

/** `family` 'any': the names of both families (and the HF ones); `mlp` then means GPT-2's fc and mlp-proj. */
export function parseLoraTargets(s: string, family: 'gpt2' | 'llama' | 'any' = 'gpt2'): LoraTarget[] {
  const known: readonly LoraTarget[] = family === 'llama' ? LLAMA_LORA_TARGETS : family === 'any' ? ANY_TARGETS : LORA_TARGETS;
  const out = new Set<LoraTarget>();
  for (const raw of s.split(',').map((x) => x.trim()).filter(Boolean)) {
    const t = family !== 'gpt2' ? HF_TARGETS[raw] ?? raw : raw;
    if (t === 'qkv') ['q', 'k', 'v'].forEach((x) => out.add(x as LoraTarget));
    else if (t === 'mlp') (family === 'llama' ? ['gate', 'up', 'mlp-proj'] : ['fc', 'mlp-proj']).forEach((x) => out.add(x as LoraTarget));
    else if ((known as readonly string[]).includes(t)) out.add(t as LoraTarget);
    else {
      const hf = family === 'llama' ? `, ${Object.keys(HF_TARGETS).join(', ')}` : '';
      throw new Error(`unknown LoRA target "${raw}"${family === 'llama' ? ' for a Llama-family model' : ''}; use any of ${known.join(', ')}, qkv, mlp${hf}`);
    }
  }
  if (out.size === 0) throw new Error('no LoRA targets given');
  return known.filter((t) => out.has(t));
}

export function validateLora(c: LoraConfig): LoraConfig {
  if (!Number.isInteger(c.rank) || c.rank < 1) throw new Error(`LoRA rank must be a positive integer, got ${c.rank}`);
  if (!(c.alpha > 0)) throw new Error(`LoRA alpha must be positive, got ${c.alpha}`);
  if (!(c.dropout >= 0 && c.dropout < 1)) throw new Error(`LoRA dropout must be in [0, 1), got ${c.dropout}`);
  return c;
}

/** The wte target is for classification: GPT-2 ties the input embedding to its output layer. */
export function checkLoraTask(c: Pick<LoraConfig, 'targets'>, task: 'lm' | 'cls'): void {
  if (c.targets.includes('wte') && task !== 'cls') throw new Error('the wte LoRA target adapts the input embedding only, which GPT-2 ties to its output layer: use it for classification');
}

/** Input and output widths of a target for residual width d (the embedding's input is the vocabulary). */
export function targetDims(t: LoraTarget, d: number, vocab = 0): [number, number] {
  switch (t) {
    case 'q': case 'k': case 'v': case 'proj': return [d, d];
    case 'fc': return [d, 4 * d];
    case 'mlp-proj': return [4 * d, d];
    case 'wte': return [vocab, d];
    case 'gate': case 'up': throw new Error(`LoRA target "${t}" belongs to the Llama family (its widths come from the config)`);
  }
}

/** Tensor name of an adapter in exported files (`h.<layer>.<target>` or `wte`). */
export function adapterName(v: Pick<AdapterView, 'layer' | 'target'>): string {
  return v.layer < 0 ? v.target : `h.${v.layer}.${v.target}`;
}

/** Every adapter's A [din, r] and B [r, dout] as tensors to write (`<name>.lora_A`, `<name>.lora_B`). */
export function adapterTensors(ad: LoraAdapters): TensorToWrite[] {
  const r = ad.config.rank;
  return ad.views.flatMap((v) => [
    { name: `${adapterName(v)}.lora_A`, dtype: 'F32' as const, shape: [v.din, r], data: v.A },
    { name: `${adapterName(v)}.lora_B`, dtype: 'F32' as const, shape: [r, v.dout], data: v.B },
  ]);
}

export interface AdapterView {
  /** -1 for the embedding adapter */
  layer: number;
  target: LoraTarget;
  din: number;
  dout: number;
  A: Float32Array; // [din, r]
  B: Float32Array; // [r, dout]
  gA: Float32Array;
  gB: Float32Array;
}

export class LoraAdapters {
  readonly params: Float32Array;
  readonly grads: Float32Array;
  readonly views: AdapterView[] = [];
  private index = new Map<string, AdapterView>();
  readonly scale: number;

  /** `dims`: a family's target widths (default: GPT-2's, `targetDims`) */
  constructor(readonly config: LoraConfig, readonly nLayer: number, readonly d: number, readonly vocab = 0, dims: (t: LoraTarget) => [number, number] = (t) => targetDims(t, d, vocab)) {
    validateLora(config);
    const r = config.rank;
    const slots: [number, LoraTarget][] = [];
    if (config.targets.includes('wte')) {
      if (!(vocab > 0)) throw new Error('the wte LoRA target needs the vocabulary size');
      slots.push([-1, 'wte']);
    }
    for (let l = 0; l < nLayer; l++) for (const t of config.targets) if (t !== 'wte') slots.push([l, t]);
    let total = 0;
    for (const [, t] of slots) {
      const [din, dout] = dims(t);
      total += din * r + r * dout;
    }
    this.params = new Float32Array(total);
    this.grads = new Float32Array(total);
    let off = 0;
    for (const [l, t] of slots) {
      const [din, dout] = dims(t);
      const v: AdapterView = {
        layer: l, target: t, din, dout,
        A: this.params.subarray(off, off + din * r), gA: this.grads.subarray(off, off + din * r),
        B: this.params.subarray(off + din * r, off + din * r + r * dout), gB: this.grads.subarray(off + din * r, off + din * r + r * dout),
      };
      off += din * r + r * dout;
      this.views.push(v);
      this.index.set(`${l}/${t}`, v);
    }
    this.scale = config.alpha / r;
  }

  get(layer: number, t: LoraTarget): AdapterView | undefined {
    return this.index.get(`${layer}/${t}`);
  }

  /** the token-embedding adapter, if `wte` is a target */
  embedding(): AdapterView | undefined {
    return this.index.get('-1/wte');
  }

  /**
   * Linears: A ~ N(0, 1/din) (Kaiming-like), B = 0. Embedding (as PEFT): A = 0, B ~ N(0, 1).
   * Either way the adapted model starts equal to the base model.
   */
  init(rng: RandomSource): void {
    for (const v of this.views) {
      if (v.target === 'wte') {
        v.A.fill(0);
        rng.fillNormal(v.B, 1);
      } else {
        rng.fillNormal(v.A, 1 / Math.sqrt(v.din));
        v.B.fill(0);
      }
    }
  }
}

/**
 * An adapter's input as the basis holds it: the plain rows [n, din], or rows x in a rotated
 * frame with plain = (x Q^T) diag(gain) + 1 bias^T (sealed mode's layer-norm output). The
 * frame's map is then applied to A (din x din x r per call) instead of to x (n x din x din),
 * and the input gradient comes back in the frame.
 */
export type AdapterInput = Float32Array | { x: Float32Array; Q: Float32Array; gain: Float32Array; bias: Float32Array | null };

/**
 * Where a target's update lands: columns [off, off + dout) of y [n, ld], in the basis of the
 * linear's output (or of the stream). `map` writes B [r, dout] carried into that basis into a
 * zeroed [r, ld] (from `buffer`) at the same columns; `unmap` carries a gradient [r, ld] back.
 * Both are the basis's row-wise maps, so they run on B's r rows, not the batch's n.
 */
export interface AdapterOutput<Y extends Float32Array> {
  y: Y; ld: number; off: number; buffer(size: number): Y;
  map(B: Float32Array, into: Y, r: number): void; unmap(G: Y, r: number): Float32Array;
}

/** Per-call saved state of one adapter application (for backward). */
export interface LoraSaved {
  /** the input the product read: x, x in the frame (folded), or dropout of the plain rows */
  xin: Float32Array;
  /** keep mask (1/(1-p) or 0) when dropout > 0 */
  mask: Float32Array | null;
  /** u = xin A' [n, r] */
  u: Float32Array;
  /** the rotated frame of the input (its gradient goes back there) */
  frame: Exclude<AdapterInput, Float32Array> | null;
  /** A' = Q^T diag(gain) A [din, r] when the frame is folded into A (no dropout) */
  Af: Float32Array | null;
  /** B carried into the output's basis [r, ld], and where it went */
  Bo: Float32Array;
  out: AdapterOutput<Float32Array>;
}

// forward: out.y[:, off:off+dout] += scale * dropout(plain x[n, din]) A (B in out's basis) ; returns what backward needs
export function loraForward(out: AdapterOutput<Float32Array>, x: AdapterInput, v: AdapterView, n: number, scale: number, dropout: number, rng: RandomSource | null): LoraSaved {
  const r = v.A.length / v.din, din = v.din;
  const frame = x instanceof Float32Array ? null : x;
  const drop = dropout > 0 && rng;
  let xin = frame ? frame.x : (x as Float32Array);
  let mask: Float32Array | null = null, Af: Float32Array | null = null;
  const u = new Float32Array(n * r);
  if (frame && !drop) {
    // u = x Q^T diag(gain) A + 1 (bias A): A' = Q^T (gain . A)
    const gA = new Float32Array(din * r);
    for (let i = 0; i < din; i++) for (let j = 0; j < r; j++) gA[i * r + j] = frame.gain[i] * v.A[i * r + j];
    Af = new Float32Array(din * r);
    sgemm(true, false, din, r, din, 1, frame.Q, din, gA, r, 0, Af, r);
    if (frame.bias) {
      const c = new Float32Array(r);
      sgemm(false, false, 1, r, din, 1, frame.bias, din, v.A, r, 0, c, r);
      for (let i = 0; i < n; i++) u.set(c, i * r);
    }
  } else if (frame) {
    xin = new Float32Array(n * din); // the plain rows, for dropout
    sgemm(false, true, n, din, din, 1, frame.x, din, frame.Q, din, 0, xin, din);
    for (let i = 0; i < n * din; i++) xin[i] = xin[i] * frame.gain[i % din] + (frame.bias ? frame.bias[i % din] : 0);
  }
  if (drop) {
    mask = new Float32Array(n * din);
    const keep = 1 / (1 - dropout), plain = xin;
    xin = new Float32Array(n * din);
    for (let i = 0; i < mask.length; i++) {
      mask[i] = rng.uniform() < dropout ? 0 : keep;
      xin[i] = plain[i] * mask[i];
    }
  }
  sgemm(false, false, n, r, din, 1, xin, din, Af ?? v.A, r, Af && frame!.bias ? 1 : 0, u, r);
  const Bo = out.buffer(r * out.ld);
  out.map(v.B, Bo, r);
  sgemm(false, false, n, v.dout, r, scale, u, r, Bo.subarray(out.off), out.ld, 1, out.y.subarray(out.off), out.ld);
  return { xin, mask, u, frame, Af, Bo, out };
}

// backward from dy [n, ld] in the output's basis: gB += unmap(scale u^T dy) ; gA += scale xin^T (dy Bo^T)
// (through the fold) ; dx[n, din] += the input gradient (in the frame)
export function loraBackward(dx: Float32Array | null, dy: Float32Array, v: AdapterView, s: LoraSaved, n: number, scale: number): void {
  const r = v.A.length / v.din, din = v.din, { ld, off } = s.out;
  const G = s.out.buffer(r * ld);
  sgemm(true, false, r, v.dout, n, scale, s.u, r, dy.subarray(off), ld, 0, G.subarray(off), ld);
  const gB = s.out.unmap(G, r);
  for (let i = 0; i < gB.length; i++) v.gB[i] += gB[i];
  const du = new Float32Array(n * r);
  sgemm(false, true, n, r, v.dout, scale, dy.subarray(off), ld, s.Bo.subarray(off), ld, 0, du, r);
  if (s.Af) {
    // gA += gain . (Q (x^T du)) + bias colsum(du)^T ; dx += du A'^T
    const f = s.frame!, gAf = new Float32Array(din * r), t = new Float32Array(din * r);
    sgemm(true, false, din, r, n, 1, s.xin, din, du, r, 0, gAf, r);
    sgemm(false, false, din, r, din, 1, f.Q, din, gAf, r, 0, t, r);
    const cs = new Float32Array(r);
    for (let i = 0; i < n; i++) for (let j = 0; j < r; j++) cs[j] += du[i * r + j];
    for (let i = 0; i < din; i++) for (let j = 0; j < r; j++) v.gA[i * r + j] += f.gain[i] * t[i * r + j] + (f.bias ? f.bias[i] * cs[j] : 0);
    if (dx) sgemm(false, true, n, din, r, 1, du, r, s.Af, r, 1, dx, din);
    return;
  }
  sgemm(true, false, din, r, n, 1, s.xin, din, du, r, 1, v.gA, r);
  if (!dx) return;
  if (!s.mask && !s.frame) return sgemm(false, true, n, din, r, 1, du, r, v.A, r, 1, dx, din);
  const t = new Float32Array(n * din);
  sgemm(false, true, n, din, r, 1, du, r, v.A, r, 0, t, din);
  if (s.mask) for (let i = 0; i < t.length; i++) t[i] *= s.mask[i];
  if (!s.frame) {
    for (let i = 0; i < t.length; i++) dx[i] += t[i];
    return;
  }
  // the plain gradient back into the frame: dx += (t . gain) Q
  for (let i = 0; i < t.length; i++) t[i] *= s.frame.gain[i % din];
  sgemm(false, false, n, din, din, 1, t, din, s.frame.Q, din, 1, dx, din);
}

// embedding forward: out[n, d] (+)= scale * A[tokens] B ; returns u = A[tokens] [n, r] for backward
export function loraEmbedForward(out: Float32Array, tokens: Int32Array, v: AdapterView, n: number, scale: number, accumulate: boolean): Float32Array {
  const r = v.A.length / v.din;
  const u = new Float32Array(n * r);
  for (let i = 0; i < n; i++) u.set(v.A.subarray(tokens[i] * r, (tokens[i] + 1) * r), i * r);
  sgemm(false, false, n, v.dout, r, scale, u, r, v.B, v.dout, accumulate ? 1 : 0, out, v.dout);
  return u;
}

// embedding backward: gB += scale u^T dy ; gA[tokens[i]] += scale (dy B^T)[i]
export function loraEmbedBackward(dy: Float32Array, tokens: Int32Array, v: AdapterView, u: Float32Array, n: number, scale: number): void {
  const r = v.A.length / v.din;
  sgemm(true, false, r, v.dout, n, scale, u, r, dy, v.dout, 1, v.gB, v.dout);
  const du = new Float32Array(n * r);
  sgemm(false, true, n, r, v.dout, scale, dy, v.dout, v.B, v.dout, 0, du, r);
  for (let i = 0; i < n; i++) {
    const o = tokens[i] * r;
    for (let j = 0; j < r; j++) v.gA[o + j] += du[i * r + j];
  }
}

/**
 * One layer's adapters in one pass of a block, each call beside the linear it adapts:
 * `forward` hands every present target's update [n, dout] to `add` (the basis puts it in
 * place); `backward` accumulates their gradients and returns that of their plain input
 * [n, din] (null: no target present).
 */
export class LayerAdapters {
  private readonly drop: number;
  private readonly rng: RandomSource | null;

  constructor(private readonly ad: LoraAdapters, private readonly l: number, private readonly saved: Map<LoraTarget, LoraSaved>, private readonly n: number, train: boolean, rng: RandomSource | null) {
    this.drop = train ? ad.config.dropout : 0;
    this.rng = train ? rng : null;
  }

  /** out(t).y += scale * dropout(x) A_t B_t for each target t present (x [n, din]: the plain input, read once) */
  forward<T extends LoraTarget, Y extends Float32Array>(targets: readonly T[], x: () => AdapterInput, out: (t: T) => AdapterOutput<Y>): void {
    let xin: AdapterInput | null = null;
    for (const t of targets) {
      const v = this.ad.get(this.l, t);
      if (!v) continue;
      xin ??= x();
      this.saved.set(t, loraForward(out(t), xin, v, this.n, this.ad.scale, this.drop, this.rng));
    }
  }

  /** dx[n, din] = the sum over the targets present of their input gradient, from the gradient dy(t) of forward's out(t).y */
  backward<T extends LoraTarget>(targets: readonly T[], dy: (t: T) => Float32Array): Float32Array | null {
    let dx: Float32Array | null = null;
    for (const t of targets) {
      const v = this.ad.get(this.l, t);
      if (!v) continue;
      dx ??= new Float32Array(this.n * v.din);
      loraBackward(dx, dy(t), v, this.saved.get(t)!, this.n, this.ad.scale);
    }
    return dx;
  }
}
