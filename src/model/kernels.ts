/**
 * GPT-2 kernels, each forward beside its backward, llm.c style. Shapes are given in the
 * one-line comment above each function; every buffer is a row-major Float32Array.
 * B = batch, T = time, C = channels, V = vocabulary, NH = heads, hs = C / NH.
 * Backward functions ACCUMULATE (+=) into parameter gradients; input gradients are
 * accumulated too unless a function says it overwrites.
 */
import { sgemm, sgemmBatched } from '../tensor/gemm.js';
import { causalSoftmaxNative, normBackwardNative, normForwardNative } from '../tensor/parallel.js';
import type { RopeScaling } from './config.js';

// ---------------------------------------------------------------------------------------
// encoder: out[B,T,C] = wte[tokens[b,t]] + wpe[t] (no wpe: the token rows alone)
export function encoderForward(out: Float32Array, tokens: Int32Array, wte: Float32Array, wpe: Float32Array | null, B: number, T: number, C: number): void {
  for (let i = 0; i < B * T; i++) {
    const o = i * C;
    out.set(wte.subarray(tokens[i] * C, (tokens[i] + 1) * C), o);
    if (wpe) for (let j = 0, p = (i % T) * C; j < C; j++) out[o + j] += wpe[p + j];
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
  if (!normForwardNative(out, mean, rstd, inp, null, weight, bias, N, C, eps)) normForward(out, mean, rstd, inp, null, weight, bias, N, C, eps);
}

// dinp[N,C] += ; dweight[C] += ; dbias[C] += (from dout[N,C], inp, weight, mean, rstd)
export function layernormBackward(dinp: Float32Array, dweight: Float32Array | null, dbias: Float32Array | null, dout: Float32Array, inp: Float32Array, weight: Float32Array, mean: Float32Array, rstd: Float32Array, N: number, C: number): void {
  if (!normBackwardNative(dinp, dweight, dbias, dout, inp, mean, rstd, null, weight, N, C)) normBackward(dinp, dweight, dbias, dout, inp, mean, rstd, null, weight, N, C);
}

// layer norm of rows along u (null: the ones vector), the TypeScript twin of the addon's (see
// tensor/parallel.ts normForwardNative): out[N,C] = (inp - mean u) rstd (* w + b), mean = inp.u / C
function normForward(out: Float32Array, mean: Float32Array, rstd: Float32Array, inp: Float32Array, u: Float32Array | null, w: Float32Array | null, b: Float32Array | null, N: number, C: number, eps: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    let m = 0;
    for (let i = 0; i < C; i++) m += u ? inp[o + i] * u[i] : inp[o + i];
    m /= C;
    let v = 0;
    for (let i = 0; i < C; i++) {
      const d = inp[o + i] - (u ? m * u[i] : m);
      v += d * d;
    }
    v /= C;
    const s = 1 / Math.sqrt(v + eps);
    for (let i = 0; i < C; i++) {
      const z = (inp[o + i] - (u ? m * u[i] : m)) * s;
      out[o + i] = w && b ? z * w[i] + b[i] : z;
    }
    mean[n] = m;
    rstd[n] = s;
  }
}

// its backward: dinp[N,C] += (g - (g.u / C) u - z (g.z / C)) rstd, g = dout (* w), z the normalised
// row (along u, inp is z itself; otherwise z = (inp - mean) rstd) ; dw[C] += z dout ; db[C] += dout
function normBackward(dinp: Float32Array, dw: Float32Array | null, db: Float32Array | null, dout: Float32Array, inp: Float32Array, mean: Float32Array | null, rstd: Float32Array, u: Float32Array | null, w: Float32Array | null, N: number, C: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    const m = mean ? mean[n] : 0;
    const s = rstd[n];
    const z = (i: number) => (u ? inp[o + i] : (inp[o + i] - m) * s);
    let gu = 0;
    let gz = 0;
    for (let i = 0; i < C; i++) {
      const g = w ? w[i] * dout[o + i] : dout[o + i];
      gu += u ? g * u[i] : g;
      gz += g * z(i);
    }
    gu /= C;
    gz /= C;
    for (let i = 0; i < C; i++) {
      const zi = z(i);
      const g = dout[o + i];
      if (db) db[i] += g;
      if (dw) dw[i] += zi * g;
      dinp[o + i] += ((w ? w[i] * g : g) - (u ? gu * u[i] : gu) - zi * gz) * s;
    }
  }
}

// ---------------------------------------------------------------------------------------
// causal self-attention on one packed qkv tensor:
// out[B,T,C] = concat_h softmax(q_h k_h^T / sqrt(hs) + causal) v_h ; att[B,NH,T,T] keeps P
// qkv[B,T,3C] holds q | k | v along the last dim; head h uses columns h*hs..(h+1)*hs of each.
export function attentionForward(out: Float32Array, att: Float32Array, qkv: Float32Array, B: number, T: number, C: number, NH: number): void {
  gqaAttentionForward(out, att, qkv, B, T, NH, NH, C / NH);
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
    causalSoftmaxBackward(da, a, NH, T, scale);
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
  if (!normForwardNative(out, mean, rstd, inp, u, null, null, N, C, eps)) normForward(out, mean, rstd, inp, u, null, null, N, C, eps);
}

// dinp[N,C] += (dout - (dout.u / C) u^T - out (dout.out / C)) * rstd   (out = normalised rows)
export function maskedNormBackward(dinp: Float32Array, dout: Float32Array, out: Float32Array, u: Float32Array, rstd: Float32Array, N: number, C: number): void {
  if (!normBackwardNative(dinp, null, null, dout, out, null, rstd, u, null, N, C)) normBackward(dinp, null, null, dout, out, null, rstd, u, null, N, C);
}

// =======================================================================================
// Llama-family kernels. NKV = key/value heads, hd = head width, W = (NH + 2 NKV) hd is the
// width of a packed q | k | v row, I = MLP width.

// ---------------------------------------------------------------------------------------
// RMSNorm: out[N,C] = inp * rstd * weight (weight null: no gain) ; rstd[N] = 1/sqrt(mean(inp^2) + eps)
export function rmsnormForward(out: Float32Array, rstd: Float32Array, inp: Float32Array, weight: Float32Array | null, N: number, C: number, eps: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    let ss = 0;
    for (let i = 0; i < C; i++) ss += inp[o + i] * inp[o + i];
    const s = 1 / Math.sqrt(ss / C + eps);
    rstd[n] = s;
    if (weight) for (let i = 0; i < C; i++) out[o + i] = inp[o + i] * s * weight[i];
    else for (let i = 0; i < C; i++) out[o + i] = inp[o + i] * s;
  }
}

// dinp[N,C] += rstd (w dout - xhat mean(w dout xhat)) ; dweight[C] += sum_n dout xhat   (xhat = inp rstd)
export function rmsnormBackward(dinp: Float32Array, dweight: Float32Array | null, dout: Float32Array, inp: Float32Array, weight: Float32Array | null, rstd: Float32Array, N: number, C: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * C;
    const s = rstd[n];
    let dot = 0;
    for (let i = 0; i < C; i++) dot += (weight ? weight[i] : 1) * dout[o + i] * inp[o + i] * s;
    dot /= C;
    for (let i = 0; i < C; i++) {
      const xhat = inp[o + i] * s;
      if (dweight) dweight[i] += dout[o + i] * xhat;
      dinp[o + i] += s * ((weight ? weight[i] : 1) * dout[o + i] - xhat * dot);
    }
  }
}

// ---------------------------------------------------------------------------------------
// SwiGLU: out[N,I] = silu(gate) * up, gu[N,2I] = gate | up per row ; silu(x) = x sigmoid(x)
export function swigluForward(out: Float32Array, gu: Float32Array, N: number, I: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * I, g = 2 * n * I;
    for (let i = 0; i < I; i++) {
      const x = gu[g + i];
      out[o + i] = (x / (1 + Math.exp(-x))) * gu[g + I + i];
    }
  }
}

// dgu[N,2I] (overwritten) from dout[N,I], gu: dgate = dout up sig (1 + x (1 - sig)), dup = dout silu(x)
export function swigluBackward(dgu: Float32Array, dout: Float32Array, gu: Float32Array, N: number, I: number): void {
  for (let n = 0; n < N; n++) {
    const o = n * I, g = 2 * n * I;
    for (let i = 0; i < I; i++) {
      const x = gu[g + i], sig = 1 / (1 + Math.exp(-x)), d = dout[o + i];
      dgu[g + i] = d * gu[g + I + i] * sig * (1 + x * (1 - sig));
      dgu[g + I + i] = d * x * sig;
    }
  }
}

// ---------------------------------------------------------------------------------------
// rotary tables: cos, sin [maxT, hd/2] of t * w_p, w_p = theta^(-2p/hd), with rope_scaling
export interface RopeTable { cos: Float32Array; sin: Float32Array; half: number; maxT: number }

export function ropeFrequencies(hd: number, theta: number, scaling: RopeScaling | null): Float64Array {
  const half = hd / 2;
  const w = new Float64Array(half);
  for (let p = 0; p < half; p++) w[p] = 1 / Math.pow(theta, (2 * p) / hd);
  if (scaling?.type === 'linear') for (let p = 0; p < half; p++) w[p] /= scaling.factor;
  else if (scaling?.type === 'llama3') {
    const { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: old } = scaling;
    for (let p = 0; p < half; p++) {
      const wavelen = (2 * Math.PI) / w[p];
      if (wavelen > old / lo) w[p] /= factor;
      else if (wavelen >= old / hi) {
        const smooth = (old / wavelen - lo) / (hi - lo);
        w[p] = (1 - smooth) * (w[p] / factor) + smooth * w[p];
      }
    }
  }
  return w;
}

export function ropeTable(hd: number, maxT: number, theta: number, scaling: RopeScaling | null): RopeTable {
  const half = hd / 2;
  const w = ropeFrequencies(hd, theta, scaling);
  const cos = new Float32Array(maxT * half), sin = new Float32Array(maxT * half);
  for (let t = 0; t < maxT; t++) {
    for (let p = 0; p < half; p++) {
      const a = Math.fround(t * Math.fround(w[p])); // float32 angles, as the reference computes them
      cos[t * half + p] = Math.cos(a);
      sin[t * half + p] = Math.sin(a);
    }
  }
  return { cos, sin, half, maxT };
}

// rotary, in place on `heads` heads of width hd starting at column off of x[B*T, ld] (rotate_half
// pairs p, p + hd/2), row (b, t) at position pos0 + t: x_p' = x_p c - x_{p+h} s, x_{p+h}' = x_{p+h} c + x_p s
export function ropeForward(x: Float32Array, ld: number, off: number, heads: number, tab: RopeTable, B: number, T: number, pos0: number): void {
  rotate(x, ld, off, heads, tab, B, T, pos0, 1);
}

// backward: the transpose of the rotation (angle -t w_p), in place on dx[B*T, ld]
export function ropeBackward(dx: Float32Array, ld: number, off: number, heads: number, tab: RopeTable, B: number, T: number, pos0: number): void {
  rotate(dx, ld, off, heads, tab, B, T, pos0, -1);
}

function rotate(x: Float32Array, ld: number, off: number, heads: number, tab: RopeTable, B: number, T: number, pos0: number, sign: 1 | -1): void {
  const h = tab.half;
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const c = (pos0 + t) * h, r = (b * T + t) * ld + off;
      for (let hh = 0; hh < heads; hh++) {
        const o = r + hh * 2 * h;
        for (let p = 0; p < h; p++) {
          const cs = tab.cos[c + p], sn = sign * tab.sin[c + p];
          const x1 = x[o + p], x2 = x[o + h + p];
          x[o + p] = x1 * cs - x2 * sn;
          x[o + h + p] = x2 * cs + x1 * sn;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// grouped-query causal attention on packed qkv[B,T,W] (q: NH heads, then k, v: NKV heads each);
// query head h reads key/value head h / (NH/NKV):
// out[B,T,NH*hd] = concat_h softmax(q_h k_g^T / sqrt(hd) + causal) v_g ; att[B,NH,T,T] keeps P
export function gqaAttentionForward(out: Float32Array, att: Float32Array, qkv: Float32Array, B: number, T: number, NH: number, NKV: number, hd: number): void {
  const W = (NH + 2 * NKV) * hd, C = NH * hd, r = NH / NKV;
  const scale = 1 / Math.sqrt(hd);
  // products per group of `per` query heads sharing a key/value head (stride 0), or one for all
  const [G, per, kvStride] = r === 1 ? [1, NH, hd] : [NKV, r, 0];
  for (let b = 0; b < B; b++) {
    const base = b * T * W;
    const a = att.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    // S_h = scale q_h k_g^T for the r query heads of each group g (no grouping: all heads in one call)
    for (let g = 0; g < G; g++) {
      sgemmBatched(false, true, T, T, hd, scale, qkv.subarray(base + g * per * hd), W, hd, qkv.subarray(base + C + g * hd), W, kvStride, 0, a.subarray(g * per * T * T), T, T * T, per);
    }
    causalSoftmax(a, NH, T);
    // o_h = P_h v_g, written into the head's columns of out
    for (let g = 0; g < G; g++) {
      sgemmBatched(false, false, T, hd, T, 1, a.subarray(g * per * T * T), T, T * T, qkv.subarray(base + C + NKV * hd + g * hd), W, kvStride, 0, out.subarray(b * T * C + g * per * hd), C, hd, per);
    }
  }
}

/** a[NH, T, T] scores -> causal softmax probabilities, row by row (the future zeroed). */
function causalSoftmax(a: Float32Array, NH: number, T: number): void {
  if (causalSoftmaxNative(a, NH, T)) return;
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
}

/** dP[NH, T, T] -> dS = P (dP - rowsum(dP P)) scale in place, causal entries only (the future zeroed). */
function causalSoftmaxBackward(dP: Float32Array, P: Float32Array, NH: number, T: number, scale: number): void {
  for (let h = 0; h < NH; h++) {
    for (let t = 0; t < T; t++) {
      const r = h * T * T + t * T;
      let dot = 0;
      for (let s = 0; s <= t; s++) dot += P[r + s] * dP[r + s];
      for (let s = 0; s <= t; s++) dP[r + s] = P[r + s] * (dP[r + s] - dot) * scale;
      for (let s = t + 1; s < T; s++) dP[r + s] = 0;
    }
  }
}

// dqkv[B,T,W] (overwritten) from dout[B,T,NH*hd], att, qkv ; datt[B,NH,T,T] is scratch.
// dk_g, dv_g sum over the group's query heads.
export function gqaAttentionBackward(dqkv: Float32Array, datt: Float32Array, dout: Float32Array, att: Float32Array, qkv: Float32Array, B: number, T: number, NH: number, NKV: number, hd: number): void {
  const W = (NH + 2 * NKV) * hd, C = NH * hd, r = NH / NKV;
  const scale = 1 / Math.sqrt(hd);
  for (let b = 0; b < B; b++) {
    const base = b * T * W;
    const a = att.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    const da = datt.subarray(b * NH * T * T, (b + 1) * NH * T * T);
    const dO = dout.subarray(b * T * C);
    for (let t = 0; t < T; t++) dqkv.fill(0, base + t * W + C, base + (t + 1) * W);
    for (let h = 0; h < NH; h++) {
      const g = Math.floor(h / r);
      const P = a.subarray(h * T * T), dP = da.subarray(h * T * T);
      const k = qkv.subarray(base + C + g * hd), v = qkv.subarray(base + C + NKV * hd + g * hd);
      // dP_h = dO_h v_g^T ; dv_g += P_h^T dO_h
      sgemm(false, true, T, T, hd, 1, dO.subarray(h * hd), C, v, W, 0, dP, T);
      sgemm(true, false, T, hd, T, 1, P, T, dO.subarray(h * hd), C, 1, dqkv.subarray(base + C + NKV * hd + g * hd), W);
      causalSoftmaxBackward(dP, P, 1, T, scale);
      // dq_h = dS_h k_g ; dk_g += dS_h^T q_h
      sgemm(false, false, T, hd, T, 1, dP, T, k, W, 0, dqkv.subarray(base + h * hd), W);
      sgemm(true, false, T, hd, T, 1, dP, T, qkv.subarray(base + h * hd), W, 1, dqkv.subarray(base + C + g * hd), W);
    }
  }
}

// KV-cache attention of n new rows (positions pos0..) against the cache, which first receives
// their keys and values: qkv[n, W] ; out[n, NH*hd] ; kc, vc [maxT, NKV*hd]
export function gqaCachedAttention(out: Float32Array, qkv: Float32Array, kc: Float32Array, vc: Float32Array, pos0: number, n: number, NH: number, NKV: number, hd: number): void {
  const KV = NKV * hd, C = NH * hd, W = C + 2 * KV, r = NH / NKV;
  const scale = 1 / Math.sqrt(hd);
  for (let i = 0; i < n; i++) {
    kc.set(qkv.subarray(i * W + C, i * W + C + KV), (pos0 + i) * KV);
    vc.set(qkv.subarray(i * W + C + KV, i * W + W), (pos0 + i) * KV);
  }
  const scores = new Float32Array(pos0 + n);
  out.fill(0, 0, n * C);
  for (let i = 0; i < n; i++) {
    const p = pos0 + i;
    for (let h = 0; h < NH; h++) {
      const qo = i * W + h * hd, g = Math.floor(h / r);
      let mx = -Infinity;
      for (let s = 0; s <= p; s++) {
        const ko = s * KV + g * hd;
        let d = 0;
        for (let j = 0; j < hd; j++) d += qkv[qo + j] * kc[ko + j];
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
      const oo = i * C + h * hd;
      for (let s = 0; s <= p; s++) {
        const w = scores[s] * inv;
        const vo = s * KV + g * hd;
        for (let j = 0; j < hd; j++) out[oo + j] += w * vc[vo + j];
      }
    }
  }
}
