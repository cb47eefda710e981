// Finite-difference checks of the Llama-family kernels, each backward against its forward.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import {
  rmsnormForward, rmsnormBackward, swigluForward, swigluBackward, ropeTable, ropeFrequencies, ropeForward, ropeBackward,
  gqaAttentionForward, gqaAttentionBackward, gqaCachedAttention, attentionForward,
} from '../src/model/kernels.js';
import { randn, numericGrad, someIndices, dot, assertGradClose, relErr, maxAbsDiff } from './helpers.js';

const TOL = 2e-2;

test('rmsnorm backward matches finite differences, with and without a gain', () => {
  const rng = new Rng(11);
  const N = 4, C = 10;
  const x = randn(N * C, rng), w = randn(C, rng), R = randn(N * C, rng);
  const out = new Float32Array(N * C), rstd = new Float32Array(N);
  for (const gain of [w, null]) {
    const loss = () => { rmsnormForward(out, rstd, x, gain, N, C, 1e-6); return dot(out, R); };
    loss();
    const dx = new Float32Array(N * C), dw = new Float32Array(C);
    rmsnormBackward(dx, gain ? dw : null, R, x, gain, rstd, N, C);
    const ix = someIndices(N * C, 12, rng);
    assertGradClose(dx, ix, numericGrad(loss, x, ix), TOL, 'rmsnorm dx');
    if (gain) { const iw = [0, 3, 9]; assertGradClose(dw, iw, numericGrad(loss, w, iw), TOL, 'rmsnorm dweight'); }
  }
  // the normalised rows have unit mean square
  rmsnormForward(out, rstd, x, null, N, C, 0);
  let ms = 0;
  for (let i = 0; i < C; i++) ms += out[i] * out[i];
  assert.ok(Math.abs(ms / C - 1) < 1e-5);
});

test('swiglu forward values and backward', () => {
  const gu = new Float32Array([1, -2, 3, 0.5]); // one row, I = 2: gate [1, -2], up [3, 0.5]
  const out = new Float32Array(2);
  swigluForward(out, gu, 1, 2);
  const silu = (x: number) => x / (1 + Math.exp(-x));
  assert.ok(Math.abs(out[0] - silu(1) * 3) < 1e-6 && Math.abs(out[1] - silu(-2) * 0.5) < 1e-6);
  const rng = new Rng(12);
  const N = 3, I = 7;
  const x = randn(N * 2 * I, rng, 2), R = randn(N * I, rng), o = new Float32Array(N * I);
  const loss = () => { swigluForward(o, x, N, I); return dot(o, R); };
  const dx = new Float32Array(N * 2 * I).fill(9); // overwritten
  swigluBackward(dx, R, x, N, I);
  const ix = someIndices(N * 2 * I, 20, rng);
  assertGradClose(dx, ix, numericGrad(loss, x, ix), TOL, 'swiglu dgu');
});

test('rotary: rotate_half convention, scaling, and backward is the transpose', () => {
  const hd = 8, T = 5;
  const tab = ropeTable(hd, T, 10000, null);
  // position 2, pair p = 1: angle 2 * 10000^(-2/8)
  const x = new Float32Array(T * hd);
  x[2 * hd + 1] = 1; // x_p = 1 at t = 2
  ropeForward(x, hd, 0, 1, tab, 1, T, 0);
  const a = 2 * Math.pow(10000, -2 / 8);
  assert.ok(Math.abs(x[2 * hd + 1] - Math.cos(a)) < 1e-6 && Math.abs(x[2 * hd + 5] - Math.sin(a)) < 1e-6, 'x_{p+h} gets x_p sin');
  // linear scaling divides every frequency; llama3 keeps high, divides low frequencies
  const base = ropeFrequencies(64, 500000, null);
  const lin = ropeFrequencies(64, 500000, { type: 'linear', factor: 4 });
  assert.ok(Math.abs(lin[5] - base[5] / 4) < 1e-15);
  const l3 = ropeFrequencies(64, 500000, { type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 });
  assert.equal(l3[0], base[0]);
  assert.ok(Math.abs(l3[31] - base[31] / 8) < 1e-18);
  assert.ok(l3.some((w, p) => w < base[p] && w > base[p] / 8), 'some frequencies are interpolated');
  // <rope(x), y> = <x, rope^T(y)> on two heads at an offset, batch 2, from position 3
  const rng = new Rng(13);
  const B = 2, TT = 3, ld = 3 * hd + 2;
  const t2 = ropeTable(hd, 8, 100, null);
  const u = randn(B * TT * ld, rng), v = randn(B * TT * ld, rng);
  const ru = Float32Array.from(u), rv = Float32Array.from(v);
  ropeForward(ru, ld, 2, 2, t2, B, TT, 3);
  ropeBackward(rv, ld, 2, 2, t2, B, TT, 3);
  assert.ok(Math.abs(dot(ru, v) - dot(u, rv)) < 1e-4);
  assert.ok(relErr(ru, u) > 0.1, 'rotary changed the heads');
  for (let r = 0; r < B * TT; r++) for (const j of [0, 1, ld - 1]) if (j < 2 || j >= 2 + 2 * hd) assert.equal(ru[r * ld + j], u[r * ld + j], 'columns outside the heads untouched');
});

test('grouped-query attention: forward equals repeated-kv attention, backward matches finite differences, cache agrees', () => {
  const rng = new Rng(14);
  const B = 2, T = 4, NH = 4, NKV = 2, hd = 3, C = NH * hd, W = (NH + 2 * NKV) * hd;
  const qkv = randn(B * T * W, rng);
  const out = new Float32Array(B * T * C), att = new Float32Array(B * NH * T * T);
  gqaAttentionForward(out, att, qkv, B, T, NH, NKV, hd);
  // reference: repeat each kv head for its two query heads, then GPT-2's attention
  const full = new Float32Array(B * T * 3 * C);
  for (let i = 0; i < B * T; i++) {
    for (let h = 0; h < NH; h++) {
      const g = Math.floor(h / 2);
      for (let j = 0; j < hd; j++) {
        full[i * 3 * C + h * hd + j] = qkv[i * W + h * hd + j];
        full[i * 3 * C + C + h * hd + j] = qkv[i * W + C + g * hd + j];
        full[i * 3 * C + 2 * C + h * hd + j] = qkv[i * W + C + NKV * hd + g * hd + j];
      }
    }
  }
  const ref = new Float32Array(B * T * C);
  attentionForward(ref, new Float32Array(B * NH * T * T), full, B, T, C, NH);
  assert.ok(maxAbsDiff(out, ref) < 1e-5);
  const R = randn(B * T * C, rng);
  const loss = () => { gqaAttentionForward(out, att, qkv, B, T, NH, NKV, hd); return dot(out, R); };
  loss();
  const dqkv = new Float32Array(B * T * W).fill(5);
  gqaAttentionBackward(dqkv, new Float32Array(B * NH * T * T), R, att, qkv, B, T, NH, NKV, hd);
  const ix = someIndices(B * T * W, 40, rng);
  assertGradClose(dqkv, ix, numericGrad(loss, qkv, ix), TOL, 'gqa dqkv');
  // the KV cache: batch row 0 in two calls (3 rows, then 1) equals the full forward
  const kc = new Float32Array(T * NKV * hd), vc = new Float32Array(T * NKV * hd), o1 = new Float32Array(3 * C), o2 = new Float32Array(C);
  gqaCachedAttention(o1, qkv.subarray(0, 3 * W), kc, vc, 0, 3, NH, NKV, hd);
  gqaCachedAttention(o2, qkv.subarray(3 * W, 4 * W), kc, vc, 3, 1, NH, NKV, hd);
  gqaAttentionForward(out, att, qkv, B, T, NH, NKV, hd);
  assert.ok(maxAbsDiff(o1, out.subarray(0, 3 * C)) < 1e-5 && maxAbsDiff(o2, out.subarray(3 * C, 4 * C)) < 1e-5);
});
