// Finite-difference checks of every TypeScript kernel: each backward against its forward.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import { availableBackends, setBackend, backendName } from '../src/tensor/gemm.js';
import {
  encoderForward, encoderBackward, layernormForward, layernormBackward,
  residualForward, residualBackward, attentionForward, attentionBackward,
} from '../src/model/kernels.js';
import { geluForward, geluBackward, crossEntropyForward, crossEntropyBackward } from '../src/tensor/kernels_ew.js';
import { randn, numericGrad, someIndices, dot, assertGradClose, relErr } from './helpers.js';

const TOL = 2e-2; // float32 central differences

test('layernorm backward matches finite differences', () => {
  const rng = new Rng(1);
  const N = 5, C = 12;
  const x = randn(N * C, rng), w = randn(C, rng), b = randn(C, rng), R = randn(N * C, rng);
  const out = new Float32Array(N * C), mean = new Float32Array(N), rstd = new Float32Array(N);
  const loss = () => { layernormForward(out, mean, rstd, x, w, b, N, C, 1e-5); return dot(out, R); };
  loss();
  const dx = new Float32Array(N * C), dw = new Float32Array(C), db = new Float32Array(C);
  layernormBackward(dx, dw, db, R, x, w, mean, rstd, N, C);
  const ix = someIndices(N * C, 12, rng);
  assertGradClose(dx, ix, numericGrad(loss, x, ix), TOL, 'layernorm dx');
  const iw = someIndices(C, 6, rng);
  assertGradClose(dw, iw, numericGrad(loss, w, iw), TOL, 'layernorm dweight');
  assertGradClose(db, iw, numericGrad(loss, b, iw), TOL, 'layernorm dbias');
  // backward accumulates
  const dx2 = new Float32Array(N * C).fill(1);
  layernormBackward(dx2, null, null, R, x, w, mean, rstd, N, C);
  assert.ok(Math.abs(dx2[0] - 1 - dx[0]) < 1e-6);
});

test('gelu (tanh) forward values and backward', () => {
  const x = new Float32Array([-3, -1, 0, 0.5, 2]);
  const out = new Float32Array(5);
  geluForward(out, x, 5);
  // reference values of 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))
  const ref = [-0.0036373920817729, -0.1588080094, 0, 0.3457140, 1.9545977];
  for (let i = 0; i < 5; i++) assert.ok(Math.abs(out[i] - ref[i]) < 1e-5, `gelu(${x[i]}) = ${out[i]}, expected ${ref[i]}`);
  const rng = new Rng(2);
  const N = 40;
  const xs = randn(N, rng, 2), R = randn(N, rng), o = new Float32Array(N);
  const loss = () => { geluForward(o, xs, N); return dot(o, R); };
  const dx = new Float32Array(N);
  geluBackward(dx, xs, R, N);
  const ix = someIndices(N, 20, rng);
  assertGradClose(dx, ix, numericGrad(loss, xs, ix), TOL, 'gelu dx');
});

test('encoder and residual backward', () => {
  const rng = new Rng(3);
  const B = 2, T = 3, C = 4, V = 7;
  const tokens = new Int32Array([1, 5, 1, 0, 6, 5]);
  const wte = randn(V * C, rng), wpe = randn(T * C, rng), R = randn(B * T * C, rng);
  const out = new Float32Array(B * T * C);
  const loss = () => { encoderForward(out, tokens, wte, wpe, B, T, C); return dot(out, R); };
  const dwte = new Float32Array(V * C), dwpe = new Float32Array(T * C);
  encoderBackward(dwte, dwpe, R, tokens, B, T, C);
  const iw = someIndices(V * C, 10, rng);
  assertGradClose(dwte, iw.concat([4, 5, 20, 21]), numericGrad(loss, wte, iw.concat([4, 5, 20, 21])), TOL, 'encoder dwte');
  const ip = someIndices(T * C, 6, rng);
  assertGradClose(dwpe, ip, numericGrad(loss, wpe, ip), TOL, 'encoder dwpe');
  const a = randn(6, rng), b = randn(6, rng), o = new Float32Array(6);
  residualForward(o, a, b, 6);
  assert.ok(Math.abs(o[3] - (a[3] + b[3])) < 1e-7);
  const da = new Float32Array(6), db = new Float32Array(6);
  residualBackward(da, db, R.subarray(0, 6), 6);
  assert.deepEqual(Array.from(da), Array.from(R.subarray(0, 6)));
  assert.deepEqual(Array.from(db), Array.from(R.subarray(0, 6)));
});

test('cross-entropy: loss value, ignore index, backward', () => {
  const rng = new Rng(4);
  const N = 4, V = 9;
  const logits = randn(N * V, rng, 3);
  const targets = new Int32Array([2, -1, 8, 0]);
  const probs = new Float32Array(N * V);
  const losses = new Float32Array(N);
  const f = () => { probs.set(logits); return crossEntropyForward(probs, targets, losses, N, V).loss; };
  const l = f();
  // direct float64 reference
  let ref = 0;
  for (const n of [0, 2, 3]) {
    const row = Array.from(logits.subarray(n * V, (n + 1) * V));
    const mx = Math.max(...row);
    const lse = mx + Math.log(row.reduce((s, z) => s + Math.exp(z - mx), 0));
    ref += lse - row[targets[n]];
  }
  ref /= 3;
  assert.ok(Math.abs(l - ref) < 1e-5, `loss ${l} vs ${ref}`);
  assert.equal(losses[1], 0);
  const d = new Float32Array(N * V);
  crossEntropyBackward(d, probs, targets, N, V, 3);
  for (let i = V; i < 2 * V; i++) assert.equal(d[i], 0, 'ignored row has zero gradient');
  const ix = someIndices(N * V, 16, rng);
  assertGradClose(d, ix, numericGrad(f, logits, ix), TOL, 'cross-entropy dlogits');
  assert.throws(() => crossEntropyForward(new Float32Array(V), new Int32Array([V]), new Float32Array(1), 1, V), /out of range/);
});

for (const backend of availableBackends()) {
  test(`causal attention forward/backward (${backend} GEMM)`, () => {
    setBackend(backend);
    assert.equal(backendName(), backend);
    const rng = new Rng(5);
    const B = 2, T = 5, C = 8, NH = 2, hs = 4;
    const qkv = randn(B * T * 3 * C, rng), R = randn(B * T * C, rng);
    const out = new Float32Array(B * T * C), att = new Float32Array(B * NH * T * T);
    const loss = () => { attentionForward(out, att, qkv, B, T, C, NH); return dot(out, R); };
    loss();
    // naive float64 reference of the forward
    const ref = new Float64Array(B * T * C);
    for (let b = 0; b < B; b++) for (let h = 0; h < NH; h++) for (let t = 0; t < T; t++) {
      const s: number[] = [];
      for (let u = 0; u <= t; u++) {
        let d = 0;
        for (let j = 0; j < hs; j++) d += qkv[(b * T + t) * 3 * C + h * hs + j] * qkv[(b * T + u) * 3 * C + C + h * hs + j];
        s.push(d / Math.sqrt(hs));
      }
      const mx = Math.max(...s);
      const e = s.map((z) => Math.exp(z - mx));
      const z = e.reduce((x, y) => x + y, 0);
      for (let j = 0; j < hs; j++) {
        let o = 0;
        for (let u = 0; u <= t; u++) o += (e[u] / z) * qkv[(b * T + u) * 3 * C + 2 * C + h * hs + j];
        ref[(b * T + t) * C + h * hs + j] = o;
      }
    }
    assert.ok(relErr(out, ref) < 1e-5, `attention forward rel err ${relErr(out, ref)}`);
    // probabilities are causal
    for (let t = 0; t < T; t++) for (let u = t + 1; u < T; u++) assert.equal(att[t * T + u], 0);
    const dqkv = new Float32Array(B * T * 3 * C), datt = new Float32Array(B * NH * T * T);
    attentionBackward(dqkv, datt, R, att, qkv, B, T, C, NH);
    const ix = someIndices(B * T * 3 * C, 30, rng);
    assertGradClose(dqkv, ix, numericGrad(loss, qkv, ix), TOL, `attention dqkv (${backend})`);
  });
}
