/** Element-wise optimiser kernels over index ranges (shared by the main thread and workers). */

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
