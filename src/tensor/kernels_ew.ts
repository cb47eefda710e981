/**
 * Element-wise and row-wise kernels the thread pool runs over index ranges (shared by the
 * main thread and the workers): GELU, softmax + cross-entropy, AdamW, sums of squares.
 */

export interface AdamWArgs {
  params: Float32Array;
  grads: Float32Array;
  m: Float32Array;
  v: Float32Array;
  /** 1 where weight decay applies; null = everywhere */
  mask: Uint8Array | null;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** bias corrections 1/(1-beta1^t), 1/(1-beta2^t) */
  c1: number;
  c2: number;
  /** gradients are multiplied by this first (clipping) */
  gradScale: number;
}

// params[lo,hi) -= lr * (m^ / (sqrt(v^) + eps) + wd * params)
export function adamwRange(a: AdamWArgs, lo: number, hi: number): void {
  const { params, grads, m, v, mask, lr, beta1: b1, beta2: b2, eps, weightDecay: wd, c1, c2, gradScale: s } = a;
  const ob1 = 1 - b1, ob2 = 1 - b2;
  for (let i = lo; i < hi; i++) {
    const g = grads[i] * s;
    const mi = b1 * m[i] + ob1 * g;
    const vi = b2 * v[i] + ob2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const p = params[i];
    const decay = wd !== 0 && (mask === null || mask[i] !== 0) ? wd * p : 0;
    params[i] = p - lr * ((mi * c1) / (Math.sqrt(vi * c2) + eps) + decay);
  }
}

export function sumSquaresRange(g: Float32Array, lo: number, hi: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = lo;
  for (; i + 3 < hi; i += 4) {
    const a = g[i], b = g[i + 1], c = g[i + 2], d = g[i + 3];
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += d * d;
  }
  for (; i < hi; i++) s0 += g[i] * g[i];
  return s0 + s1 + s2 + s3;
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation, HF "gelu_new"): out[N] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// (optionally keeps tanh(u) in `th` so the backward pass need not recompute it)
const GELU_S = Math.sqrt(2 / Math.PI);
export function geluForward(out: Float32Array, inp: Float32Array, N: number, th: Float32Array | null = null): void {
  for (let i = 0; i < N; i++) {
    const x = inp[i];
    const u = GELU_S * (x + 0.044715 * x * x * x);
    const t = Math.tanh(u);
    if (th) th[i] = t;
    out[i] = 0.5 * x * (1 + t);
  }
}

// dinp[N] += dout * GELU'(inp)   (th: the tanh values saved by the forward pass, if any)
export function geluBackward(dinp: Float32Array, inp: Float32Array, dout: Float32Array, N: number, thSaved: Float32Array | null = null): void {
  for (let i = 0; i < N; i++) {
    const x = inp[i];
    const x2 = x * x;
    const th = thSaved ? thSaved[i] : Math.tanh(GELU_S * (x + 0.044715 * x2 * x));
    const sech2 = 1 - th * th;
    const local = 0.5 * (1 + th) + 0.5 * x * sech2 * GELU_S * (1 + 3 * 0.044715 * x2);
    dinp[i] += local * dout[i];
  }
}

// ---------------------------------------------------------------------------------------
// softmax + cross-entropy, fused: logits[N,V] are replaced by probabilities in place;
// returns mean loss over rows whose target >= 0 (target -1 = ignored) and the count.
// losses[N] receives each row's loss (0 for ignored rows).
export function crossEntropyForward(logits: Float32Array, targets: Int32Array, losses: Float32Array, N: number, V: number): { loss: number; count: number } {
  let total = 0;
  let count = 0;
  for (let n = 0; n < N; n++) {
    const o = n * V;
    let mx = -Infinity;
    for (let i = 0; i < V; i++) if (logits[o + i] > mx) mx = logits[o + i];
    const y = targets[n];
    if (y >= V) throw new Error(`target ${y} at row ${n} is out of range [0, ${V})`);
    const zy = y >= 0 ? logits[o + y] : 0;
    let sum = 0;
    for (let i = 0; i < V; i++) {
      const e = Math.exp(logits[o + i] - mx);
      logits[o + i] = e;
      sum += e;
    }
    const inv = 1 / sum;
    for (let i = 0; i < V; i++) logits[o + i] *= inv;
    if (y >= 0) {
      // -log p[y] in log-sum-exp form: exact even when p[y] underflows in float32
      const l = Math.log(sum) - (zy - mx);
      losses[n] = l;
      total += l;
      count++;
    } else {
      losses[n] = 0;
    }
  }
  return { loss: count > 0 ? total / count : 0, count };
}

// dlogits[N,V] (overwritten; may alias probs) = (probs - onehot(target)) * dloss / count
// (in place with a scale of 1, only the targets' entries and the ignored rows are written)
export function crossEntropyBackward(dlogits: Float32Array, probs: Float32Array, targets: Int32Array, N: number, V: number, count: number, dloss = 1): void {
  const s = count > 0 ? dloss / count : 0;
  for (let n = 0; n < N; n++) {
    const o = n * V;
    const y = targets[n];
    if (y < 0) {
      dlogits.fill(0, o, o + V);
      continue;
    }
    if (s !== 1 || dlogits !== probs) for (let i = 0; i < V; i++) dlogits[o + i] = probs[o + i] * s;
    dlogits[o + y] -= s;
  }
}


// ---------------------------------------------------------------------------------------
// The kernels the thread pool splits, by name: each runs elements (rows for ce_fwd) [lo, hi)
// of its arguments and returns its part of the result (a sum; 0 when there is none).
export interface RangeArgs {
  adamw: AdamWArgs;
  sumsq: { g: Float32Array };
  gelu_fwd: { out: Float32Array; inp: Float32Array; th: Float32Array | null };
  gelu_bwd: { dinp: Float32Array; inp: Float32Array; dout: Float32Array; th: Float32Array | null };
  ce_fwd: { logits: Float32Array; targets: Int32Array; losses: Float32Array; V: number };
}
export type RangeOp = keyof RangeArgs;

const part = (x: Float32Array | null, lo: number, hi: number) => (x ? x.subarray(lo, hi) : null);
export const RANGE_KERNELS: { [K in RangeOp]: (a: RangeArgs[K], lo: number, hi: number) => number } = {
  adamw: (a, lo, hi) => (adamwRange(a, lo, hi), 0),
  sumsq: (a, lo, hi) => sumSquaresRange(a.g, lo, hi),
  gelu_fwd: (a, lo, hi) => (geluForward(a.out.subarray(lo, hi), a.inp.subarray(lo, hi), hi - lo, part(a.th, lo, hi)), 0),
  gelu_bwd: (a, lo, hi) =>
    (geluBackward(a.dinp.subarray(lo, hi), a.inp.subarray(lo, hi), a.dout.subarray(lo, hi), hi - lo, part(a.th, lo, hi)), 0),
  ce_fwd: (a, lo, hi) => {
    const { V } = a;
    const r = crossEntropyForward(a.logits.subarray(lo * V, hi * V), a.targets.subarray(lo, hi), a.losses.subarray(lo, hi), hi - lo, V);
    return r.loss * r.count;
  },
};
