/**
 * GPT-2 kernels, each forward beside its backward, llm.c style. Shapes are given in the
 * one-line comment above each function; every buffer is a row-major Float32Array.
 * B = batch, T = time, C = channels, V = vocabulary, NH = heads, hs = C / NH.
 * Backward functions ACCUMULATE (+=) into parameter gradients; input gradients are
 * accumulated too unless a function says it overwrites.
 */
import { sgemmBatched } from '../tensor/gemm.js';

// ---------------------------------------------------------------------------------------
// encoder: out[B,T,C] = wte[tokens[b,t]] + wpe[t]
export function encoderForward(out: Float32Array, tokens: Int32Array, wte: Float32Array, wpe: Float32Array, B: number, T: number, C: number): void {
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const o = (b * T + t) * C;
      const ix = tokens[b * T + t] * C;
      const p = t * C;
      for (let i = 0; i < C; i++) out[o + i] = wte[ix + i] + wpe[p + i];
    }
  }
}

// dwte[V,C] += scatter(dout[B,T,C]) ; dwpe[T,C] += sum_b dout
export function encoderBackward(dwte: Float32Array | null, dwpe: Float32Array | null, dout: Float32Array, tokens: Int32Array, B: number, T: number, C: number): void {
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const o = (b * T + t) * C;
      if (dwte) {
        const ix = tokens[b * T + t] * C;
        for (let i = 0; i < C; i++) dwte[ix + i] += dout[o + i];
      }
      if (dwpe) {
        const p = t * C;
        for (let i = 0; i < C; i++) dwpe[p + i] += dout[o + i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// layernorm: out[N,C] = (inp - mean) * rstd * weight + bias ; mean[N], rstd[N] saved
export function layernormForward(out: Float32Array, mean: Float32Array, rstd: Float32Array, inp: Float32Array, weight: Float32Array, bias: Float32Array, N: number, C: number, eps: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    let m = 0;
    for (let i = 0; i < C; i++) m += inp[o + i];
    m /= C;
    let v = 0;
    for (let i = 0; i < C; i++) {
      const d = inp[o + i] - m;
      v += d * d;
    }
    v /= C;
    const s = 1 / Math.sqrt(v + eps);
    for (let i = 0; i < C; i++) out[o + i] = (inp[o + i] - m) * s * weight[i] + bias[i];
    mean[n] = m;
    rstd[n] = s;
  }
}

// dinp[N,C] += ; dweight[C] += ; dbias[C] += (from dout[N,C], inp, weight, mean, rstd)
export function layernormBackward(dinp: Float32Array, dweight: Float32Array | null, dbias: Float32Array | null, dout: Float32Array, inp: Float32Array, weight: Float32Array, mean: Float32Array, rstd: Float32Array, N: number, C: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    const m = mean[n];
    const s = rstd[n];
    let dnormMean = 0;
    let dnormNormMean = 0;
    for (let i = 0; i < C; i++) {
      const norm = (inp[o + i] - m) * s;
      const dnorm = weight[i] * dout[o + i];
      dnormMean += dnorm;
      dnormNormMean += dnorm * norm;
    }
    dnormMean /= C;
    dnormNormMean /= C;
    for (let i = 0; i < C; i++) {
      const norm = (inp[o + i] - m) * s;
      const g = dout[o + i];
      if (dbias) dbias[i] += g;
      if (dweight) dweight[i] += norm * g;
      const dnorm = weight[i] * g;
      dinp[o + i] += (dnorm - dnormMean - norm * dnormNormMean) * s;
    }
  }
}

// ---------------------------------------------------------------------------------------
// residual: out[N] = a + b
export function residualForward(out: Float32Array, a: Float32Array, b: Float32Array, N: number): void {
  for (let i = 0; i < N; i++) out[i] = a[i] + b[i];
}

// da[N] += dout ; db[N] += dout
export function residualBackward(da: Float32Array, db: Float32Array, dout: Float32Array, N: number): void {
  for (let i = 0; i < N; i++) {
    da[i] += dout[i];
    db[i] += dout[i];
  }
}

// ---------------------------------------------------------------------------------------
// causal self-attention on one packed qkv tensor:
// out[B,T,C] = concat_h softmax(q_h k_h^T / sqrt(hs) + causal) v_h ; att[B,NH,T,T] keeps P
// qkv[B,T,3C] holds q | k | v along the last dim; head h uses columns h*hs..(h+1)*hs of each.
export function attentionForward(out: Float32Array, att: Float32Array, qkv: Float32Array, B: number, T: number, C: number, NH: number): void {
  const hs = C / NH;
  const C3 = 3 * C;
  const scale = 1 / Math.sqrt(hs);
  for (let b = 0; b < B; b++) {
    const base = b * T * C3;
    const q = qkv.subarray(base);
    const k = qkv.subarray(base + C);
    const v = qkv.subarray(base + 2 * C);
    const a = att.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    // S_h = scale * q_h k_h^T  (all heads at once)
    sgemmBatched(false, true, T, T, hs, scale, q, C3, hs, k, C3, hs, 0, a, T, T * T, NH);
    // causal softmax row by row
    for (let h = 0; h < NH; h++) {
      for (let t = 0; t < T; t++) {
        const r = h * T * T + t * T;
        let mx = -Infinity;
        for (let s = 0; s <= t; s++) if (a[r + s] > mx) mx = a[r + s];
        let sum = 0;
        for (let s = 0; s <= t; s++) {
          const e = Math.exp(a[r + s] - mx);
          a[r + s] = e;
          sum += e;
        }
        const inv = 1 / sum;
        for (let s = 0; s <= t; s++) a[r + s] *= inv;
        for (let s = t + 1; s < T; s++) a[r + s] = 0;
      }
    }
    // o_h = P_h v_h, written into the head's columns of out
    sgemmBatched(false, false, T, hs, T, 1, a, T, T * T, v, C3, hs, 0, out.subarray(b * T * C), C, hs, NH);
  }
}

// dqkv[B,T,3C] (overwritten) from dout[B,T,C], att[B,NH,T,T], qkv ; datt[B,NH,T,T] is scratch
export function attentionBackward(dqkv: Float32Array, datt: Float32Array, dout: Float32Array, att: Float32Array, qkv: Float32Array, B: number, T: number, C: number, NH: number): void {
  const hs = C / NH;
  const C3 = 3 * C;
  const scale = 1 / Math.sqrt(hs);
  for (let b = 0; b < B; b++) {
    const base = b * T * C3;
    const q = qkv.subarray(base);
    const k = qkv.subarray(base + C);
    const v = qkv.subarray(base + 2 * C);
    const dq = dqkv.subarray(base);
    const dk = dqkv.subarray(base + C);
    const dv = dqkv.subarray(base + 2 * C);
    const a = att.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    const da = datt.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    const dO = dout.subarray(b * T * C);
    // dP_h = dO_h v_h^T ; dv_h = P_h^T dO_h
    sgemmBatched(false, true, T, T, hs, 1, dO, C, hs, v, C3, hs, 0, da, T, T * T, NH);
    sgemmBatched(true, false, T, hs, T, 1, a, T, T * T, dO, C, hs, 0, dv, C3, hs, NH);
    // softmax backward: dS = P * (dP - sum_s dP P) * scale, causal entries only
    for (let h = 0; h < NH; h++) {
      for (let t = 0; t < T; t++) {
        const r = h * T * T + t * T;
        let dot = 0;
        for (let s = 0; s <= t; s++) dot += a[r + s] * da[r + s];
        for (let s = 0; s <= t; s++) da[r + s] = a[r + s] * (da[r + s] - dot) * scale;
        for (let s = t + 1; s < T; s++) da[r + s] = 0;
      }
    }
    // dq_h = dS_h k_h ; dk_h = dS_h^T q_h
    sgemmBatched(false, false, T, hs, T, 1, da, T, T * T, k, C3, hs, 0, dq, C3, hs, NH);
    sgemmBatched(true, false, T, hs, T, 1, da, T, T * T, q, C3, hs, 0, dk, C3, hs, NH);
  }
}

// ---------------------------------------------------------------------------------------
// classification pooling: out[B,C] <- h[B,T,C]. Row b's length n_b is one past its last
// token that is not padId (right padding). 'last' takes h[b, n_b-1]; 'mean' averages
// h[b, 0..n_b-1]. Returns n_b per row (the backward pass needs it).
export type Pooling = 'last' | 'mean';
export const POOLINGS: readonly Pooling[] = ['last', 'mean'];

export function poolForward(out: Float32Array, h: Float32Array, tokens: Int32Array, B: number, T: number, C: number, padId: number, pooling: Pooling): Int32Array {
  const lens = new Int32Array(B);
  out.fill(0, 0, B * C);
  for (let b = 0; b < B; b++) {
    let n = 1;
    for (let t = 0; t < T; t++) if (tokens[b * T + t] !== padId) n = t + 1;
    lens[b] = n;
    const o = b * C;
    if (pooling === 'last') {
      out.set(h.subarray((b * T + n - 1) * C, (b * T + n) * C), o);
    } else {
      for (let t = 0; t < n; t++) {
        const r = (b * T + t) * C;
        for (let i = 0; i < C; i++) out[o + i] += h[r + i];
      }
      const s = 1 / n;
      for (let i = 0; i < C; i++) out[o + i] *= s;
    }
  }
  return lens;
}

// dh[B,T,C] += d(pooled)[B,C] spread back over the pooled positions
export function poolBackward(dh: Float32Array, dout: Float32Array, lens: Int32Array, B: number, T: number, C: number, pooling: Pooling): void {
  for (let b = 0; b < B; b++) {
    const n = lens[b];
    const o = b * C;
    if (pooling === 'last') {
      const r = (b * T + n - 1) * C;
      for (let i = 0; i < C; i++) dh[r + i] += dout[o + i];
    } else {
      const s = 1 / n;
      for (let t = 0; t < n; t++) {
        const r = (b * T + t) * C;
        for (let i = 0; i < C; i++) dh[r + i] += dout[o + i] * s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// layer-norm statistics in a rotated basis (sealed mode): inp = h Q, u = Q^T 1.
// out[N,C] = (inp - mean u^T) * rstd = n Q, with mean = inp.u / C, var = |inp - mean u^T|^2 / C
export function maskedNormForward(out: Float32Array, mean: Float32Array, rstd: Float32Array, inp: Float32Array, u: Float32Array, N: number, C: number, eps: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    let m = 0;
    for (let i = 0; i < C; i++) m += inp[o + i] * u[i];
    m /= C;
    let v = 0;
    for (let i = 0; i < C; i++) {
      const d = inp[o + i] - m * u[i];
      v += d * d;
    }
    v /= C;
    const s = 1 / Math.sqrt(v + eps);
    for (let i = 0; i < C; i++) out[o + i] = (inp[o + i] - m * u[i]) * s;
    mean[n] = m;
    rstd[n] = s;
  }
}

// dinp[N,C] += (dout - (dout.u / C) u^T - out (dout.out / C)) * rstd   (out = normalised rows)
export function maskedNormBackward(dinp: Float32Array, dout: Float32Array, out: Float32Array, u: Float32Array, rstd: Float32Array, N: number, C: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    let du = 0;
    let dn = 0;
    for (let i = 0; i < C; i++) {
      du += dout[o + i] * u[i];
      dn += dout[o + i] * out[o + i];
    }
    du /= C;
    dn /= C;
    const s = rstd[n];
    for (let i = 0; i < C; i++) dinp[o + i] += (dout[o + i] - du * u[i] - out[o + i] * dn) * s;
  }
}
