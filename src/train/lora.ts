/**
 * LoRA adapters (Hu et al.): for a target linear y = x W, y += (alpha / r) * dropout(x) A B,
 * A: d_in x r (Gaussian init), B: r x d_out (zero init). All adapters of a model live in one
 * contiguous buffer (and their gradients in a second one).
 */
import { sgemm } from '../tensor/gemm.js';
import type { RandomSource } from '../tensor/rng.js';

/** Adapter targets: parts of the fused qkv projection, the attention output projection, the MLP up and down projections. */
export const LORA_TARGETS = ['q', 'k', 'v', 'proj', 'fc', 'mlp-proj'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];

export interface LoraConfig {
  rank: number;
  alpha: number;
  dropout: number;
  targets: LoraTarget[];
}

export const DEFAULT_LORA: LoraConfig = { rank: 8, alpha: 16, dropout: 0, targets: ['q', 'v'] };

export function parseLoraTargets(s: string): LoraTarget[] {
  const out = new Set<LoraTarget>();
  for (const raw of s.split(',').map((x) => x.trim()).filter(Boolean)) {
    if (raw === 'qkv') ['q', 'k', 'v'].forEach((t) => out.add(t as LoraTarget));
    else if (raw === 'mlp') ['fc', 'mlp-proj'].forEach((t) => out.add(t as LoraTarget));
    else if ((LORA_TARGETS as readonly string[]).includes(raw)) out.add(raw as LoraTarget);
    else throw new Error(`unknown LoRA target "${raw}"; use any of ${LORA_TARGETS.join(', ')}, qkv, mlp`);
  }
  if (out.size === 0) throw new Error('no LoRA targets given');
  return LORA_TARGETS.filter((t) => out.has(t));
}

export function validateLora(c: LoraConfig): LoraConfig {
  if (!Number.isInteger(c.rank) || c.rank < 1) throw new Error(`LoRA rank must be a positive integer, got ${c.rank}`);
  if (!(c.alpha > 0)) throw new Error(`LoRA alpha must be positive, got ${c.alpha}`);
  if (!(c.dropout >= 0 && c.dropout < 1)) throw new Error(`LoRA dropout must be in [0, 1), got ${c.dropout}`);
  return c;
}

/** Input and output widths of a target for residual width d. */
export function targetDims(t: LoraTarget, d: number): [number, number] {
  switch (t) {
    case 'q': case 'k': case 'v': case 'proj': return [d, d];
    case 'fc': return [d, 4 * d];
    case 'mlp-proj': return [4 * d, d];
  }
}

export interface AdapterView {
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

  constructor(readonly config: LoraConfig, readonly nLayer: number, readonly d: number) {
    validateLora(config);
    const r = config.rank;
    let total = 0;
    for (let l = 0; l < nLayer; l++) for (const t of config.targets) {
      const [din, dout] = targetDims(t, d);
      total += din * r + r * dout;
    }
    this.params = new Float32Array(total);
    this.grads = new Float32Array(total);
    let off = 0;
    for (let l = 0; l < nLayer; l++) for (const t of config.targets) {
      const [din, dout] = targetDims(t, d);
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

  /** A ~ N(0, 1/din) (Kaiming-like), B = 0, so the adapted model starts equal to the base model. */
  init(rng: RandomSource): void {
    for (const v of this.views) {
      rng.fillNormal(v.A, 1 / Math.sqrt(v.din));
      v.B.fill(0);
    }
  }
}

/** Per-call saved state of one adapter application (for backward). */
export interface LoraSaved {
  /** dropout(x) if dropout > 0, else x (not copied) */
  xin: Float32Array;
  /** keep mask (1/(1-p) or 0) when dropout > 0 */
  mask: Float32Array | null;
  /** u = xin A [n, r] */
  u: Float32Array;
}

// forward: out[n, dout] (+)= scale * dropout(x[n, din]) A B ; returns what backward needs
export function loraForward(out: Float32Array, x: Float32Array, v: AdapterView, n: number, scale: number, dropout: number, rng: RandomSource | null, accumulate: boolean): LoraSaved {
  const r = v.A.length / v.din;
  let xin = x;
  let mask: Float32Array | null = null;
  if (dropout > 0 && rng) {
    mask = new Float32Array(n * v.din);
    xin = new Float32Array(n * v.din);
    const keep = 1 / (1 - dropout);
    for (let i = 0; i < mask.length; i++) {
      mask[i] = rng.uniform() < dropout ? 0 : keep;
      xin[i] = x[i] * mask[i];
    }
  }
  const u = new Float32Array(n * r);
  sgemm(false, false, n, r, v.din, 1, xin, v.din, v.A, r, 0, u, r);
  sgemm(false, false, n, v.dout, r, scale, u, r, v.B, v.dout, accumulate ? 1 : 0, out, v.dout);
  return { xin, mask, u };
}

// backward: gB += scale u^T dy ; gA += scale xin^T (dy B^T) ; dx[n, din] += scale (dy B^T A^T) * mask
export function loraBackward(dx: Float32Array | null, dy: Float32Array, v: AdapterView, s: LoraSaved, n: number, scale: number): void {
  const r = v.A.length / v.din;
  sgemm(true, false, r, v.dout, n, scale, s.u, r, dy, v.dout, 1, v.gB, v.dout);
  const du = new Float32Array(n * r);
  sgemm(false, true, n, r, v.dout, scale, dy, v.dout, v.B, v.dout, 0, du, r);
  sgemm(true, false, v.din, r, n, 1, s.xin, v.din, du, r, 1, v.gA, r);
  if (dx) {
    if (s.mask) {
      const t = new Float32Array(n * v.din);
      sgemm(false, true, n, v.din, r, 1, du, r, v.A, r, 0, t, v.din);
      for (let i = 0; i < t.length; i++) dx[i] += t[i] * s.mask[i];
    } else {
      sgemm(false, true, n, v.din, r, 1, du, r, v.A, r, 1, dx, v.din);
    }
  }
}
