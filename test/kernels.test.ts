// Finite-difference checks of every TypeScript kernel: each backward against its forward.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import { availableBackends, setBackend, backendName, nativeInfo, setNativeIsa, setThreads } from '../src/tensor/gemm.js';
import { native } from '../src/tensor/native.js';
import { firstNonFinite, freivaldsRows } from '../src/tensor/parallel.js';
import {
  encoderForward, encoderBackward, layernormForward, layernormBackward, maskedNormForward, maskedNormBackward,
  attentionForward, attentionBackward,
} from '../src/model/kernels.js';
import { geluForward, geluBackward, crossEntropyForward, crossEntropyBackward, adamwRange, sumSquaresRange } from '../src/tensor/kernels_ew.js';
import { haarOrthogonal } from '../src/linalg/mat64.js';
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

test('encoder backward', () => {
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
  // in place with count 1 (the LM head's: its 1/count goes into the products' alpha)
  const p1 = Float32Array.from(probs);
  crossEntropyBackward(p1, p1, targets, N, V, 1);
  p1.forEach((v, i) => assert.ok(Math.abs(v - 3 * d[i]) < 1e-6, `in place, index ${i}: ${v} vs ${3 * d[i]}`));
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

test('native element-wise kernels (every ISA this CPU has) agree with the TypeScript ones; the gradient norm is the same on 1 and 2 threads; bad arguments throw', { skip: !native }, () => {
  const nat = native!;
  const rng = new Rng(11);
  const original = nativeInfo()!.isa as 'avx512' | 'avx2' | 'generic';
  const prevThreads = nativeInfo()!.threads;
  const n = 100_003; // not a multiple of any vector width or chunk
  const x = randn(n, rng, 3);
  x[5] = 40; x[6] = -40; x[7] = 0; // tails of tanh and exp
  const dout = randn(n, rng, 1);
  const maxAbs = (a: Float32Array, b: Float32Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
  try {
    for (const isa of ['avx512', 'avx2', 'generic'] as const) {
      if (!setNativeIsa(isa)) continue;
      // GELU forward (with and without the saved tanh) and backward
      const o1 = new Float32Array(n), o2 = new Float32Array(n), th1 = new Float32Array(n), th2 = new Float32Array(n), o3 = new Float32Array(n);
      nat.geluForward(o1, x, th1, n);
      geluForward(o2, x, n, th2);
      nat.geluForward(o3, x, null, n);
      assert.ok(maxAbs(o1, o2) < 1e-5, `${isa} gelu forward: ${maxAbs(o1, o2)}`);
      assert.ok(maxAbs(th1, th2) < 1e-6, `${isa} gelu tanh: ${maxAbs(th1, th2)}`);
      assert.deepEqual(o3, o1);
      const d1 = new Float32Array(n).fill(0.5), d2 = new Float32Array(n).fill(0.5), d3 = new Float32Array(n).fill(0.5);
      nat.geluBackward(d1, x, dout, th1, n);
      geluBackward(d2, x, dout, n, th2);
      nat.geluBackward(d3, x, dout, null, n);
      assert.ok(maxAbs(d1, d2) < 1e-5, `${isa} gelu backward: ${maxAbs(d1, d2)}`);
      assert.ok(maxAbs(d3, d2) < 1e-5, `${isa} gelu backward (tanh recomputed): ${maxAbs(d3, d2)}`);
      // softmax + cross-entropy over rows wider than a vector, an ignored row
      const R = 7, V = 1037;
      const l1 = randn(R * V, rng, 6), l2 = Float32Array.from(l1);
      const t = Int32Array.from({ length: R }, (_, i) => (i * 131) % V);
      t[2] = -1;
      const ls1 = new Float32Array(R), ls2 = new Float32Array(R);
      nat.softmaxXent(l1, t, ls1, R, V);
      crossEntropyForward(l2, t, ls2, R, V);
      assert.ok(maxAbs(l1, l2) < 1e-6, `${isa} softmax: ${maxAbs(l1, l2)}`);
      assert.ok(maxAbs(ls1, ls2) < 1e-5, `${isa} cross-entropy: ${maxAbs(ls1, ls2)}`);
      assert.equal(ls1[2], 0);
      // AdamW with a decay mask and clipping scale, against the float64 TypeScript step
      const p1 = randn(n, rng, 1), g = randn(n, rng, 0.1), m1 = randn(n, rng, 0.01), v1 = Float32Array.from(randn(n, rng, 0.01), (a) => a * a);
      const p0 = Float32Array.from(p1), p2 = Float32Array.from(p1), m2 = Float32Array.from(m1), v2 = Float32Array.from(v1);
      const mask = Uint8Array.from({ length: n }, (_, i) => i % 3 === 0 ? 0 : 1);
      const hp = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, c1: 1 / (1 - 0.9 ** 3), c2: 1 / (1 - 0.999 ** 3), gradScale: 0.5 };
      nat.adamw(p1, g, m1, v1, mask, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weightDecay, hp.c1, hp.c2, hp.gradScale);
      adamwRange({ params: p2, grads: g, m: m2, v: v2, mask, ...hp }, 0, n);
      // float32 arithmetic (as PyTorch's) against float64: each update to within 1e-4 of itself
      const worst = p1.reduce((w, v, i) => Math.max(w, Math.abs(v - p2[i]) - 1e-4 * Math.abs(p2[i] - p0[i]) - 2.4e-7 * Math.max(1, Math.abs(p2[i]))), 0);
      assert.ok(worst <= 0, `${isa} adamw params: ${worst}`);
      assert.ok(maxAbs(m1, m2) < 1e-7 && maxAbs(v1, v2) < 1e-8, `${isa} adamw moments`);
      // sum of squares: float64, independent of the thread count
      const big = randn((1 << 20) + 5, rng, 1);
      setThreads(1);
      const s1 = nat.sumSquares(big);
      setThreads(2);
      const s2 = nat.sumSquares(big);
      assert.equal(s1, s2, `${isa} sum of squares on 1 and 2 threads`);
      assert.ok(Math.abs(s1 - sumSquaresRange(big, 0, big.length)) / s1 < 1e-12);
      const z = randn(n, rng, 1);
      nat.zero(z);
      assert.ok(z.every((v) => v === 0));
    }
  } finally {
    setNativeIsa(original);
    setThreads(prevThreads);
  }
  assert.throws(() => nat.geluForward(new Float32Array(4), new Float32Array(3), null, 4), /geluForward: inp has 3 elements, needs 4/);
  assert.throws(() => nat.softmaxXent(new Float32Array(6), Int32Array.of(0, 3), new Float32Array(2), 2, 3), /target 3 at row 1 is out of range/);
  assert.throws(() => nat.adamw(new Float32Array(4), new Float32Array(4), new Float32Array(4), new Float32Array(4), new Uint8Array(2), 1, 0.9, 0.999, 1e-8, 0, 1, 1, 1), /mask has 2 elements, needs 4/);
  assert.throws(() => nat.sumSquares(new Float64Array(4) as unknown as Float32Array), /x must be a Float32Array/);
});

test('causal softmax: the native rows (every ISA) are the softmax of columns 0..t, the future zeroed; a short buffer throws', { skip: !native }, () => {
  const nat = native!, rng = new Rng(12), original = nativeInfo()!.isa as 'avx512' | 'avx2' | 'generic';
  try {
    for (const isa of ['avx512', 'avx2', 'generic'] as const) {
      if (!setNativeIsa(isa)) continue;
      for (const [mats, T] of [[1, 1], [3, 17], [2, 70]]) {
        const a = randn(mats * T * T, rng, 4), ref = Float64Array.from(a);
        a[T] = 60; ref[T] = 60; // a large score (row 1)
        nat.causalSoftmax(a, mats, T);
        for (let r = 0; r < mats * T; r++) {
          const t = r % T, row = ref.subarray(r * T, (r + 1) * T), mx = Math.max(...row.subarray(0, t + 1));
          const e = Array.from(row, (v, s) => (s <= t ? Math.exp(v - mx) : 0)), sum = e.reduce((x, y) => x + y, 0);
          for (let s = 0; s < T; s++) assert.ok(Math.abs(a[r * T + s] - e[s] / sum) <= 1e-6, `${isa} ${mats}x${T}: row ${r} column ${s}: ${a[r * T + s]} vs ${e[s] / sum}`);
        }
      }
    }
  } finally {
    setNativeIsa(original);
  }
  assert.throws(() => nat.causalSoftmax(new Float32Array(8), 1, 3), /causalSoftmax: a has 8 elements, needs 9/);
});

test('layer norms (GPT-2\'s and along u) agree between the TypeScript kernels and the native ones, every ISA; bad arguments throw', { skip: !native }, () => {
  const rng = new Rng(12);
  const N = 13, C = 771; // not multiples of a vector width or of a task's rows or columns
  const x = randn(N * C, rng, 2), w = randn(C, rng), b = randn(C, rng), dout = randn(N * C, rng), u = randn(C, rng);
  for (let i = 0; i < C; i++) x[3 * C + i] += 50; // a row far from zero mean
  const run = () => {
    const out = new Float32Array(N * C), mean = new Float32Array(N), rstd = new Float32Array(N);
    layernormForward(out, mean, rstd, x, w, b, N, C, 1e-5);
    const dx = new Float32Array(N * C).fill(0.25), dw = new Float32Array(C).fill(1), db = new Float32Array(C);
    layernormBackward(dx, dw, db, dout, x, w, mean, rstd, N, C);
    const z = new Float32Array(N * C), zm = new Float32Array(N), zr = new Float32Array(N);
    maskedNormForward(z, zm, zr, x, u, N, C, 1e-5);
    const dz = new Float32Array(N * C).fill(-0.5);
    maskedNormBackward(dz, dout, z, u, zr, N, C);
    return { out, mean, rstd, dx, dw, db, z, zm, zr, dz };
  };
  const prev = backendName();
  const original = nativeInfo()!.isa as 'avx512' | 'avx2' | 'generic';
  try {
    setBackend('js');
    const ref = run();
    setBackend('native');
    for (const isa of ['avx512', 'avx2', 'generic'] as const) {
      if (!setNativeIsa(isa)) continue;
      const got = run();
      for (const k of Object.keys(ref) as (keyof typeof ref)[]) {
        const e = relErr(got[k], ref[k]);
        assert.ok(e < 2e-5, `${isa} ${k}: relative error ${e}`);
      }
    }
  } finally {
    setNativeIsa(original);
    setBackend(prev);
  }
  const f = (k: number) => new Float32Array(k);
  assert.throws(() => native!.normForward(f(6), f(2), f(2), f(5), null, null, null, 2, 3, 1e-5), /normForward: x has 5 elements, needs 6/);
  assert.throws(() => native!.normForward(f(6), f(2), f(2), f(6), null, null, f(3), 2, 3, 1e-5), /a bias needs a weight/);
  assert.throws(() => native!.normBackward(f(6), f(3), null, f(6), f(6), null, f(2), f(3), null, 2, 3), /a norm along u has no affine part/);
  assert.throws(() => native!.normBackward(f(6), null, null, f(6), f(6), null, f(2), null, null, 2, 3), /mean is needed without u/);
});

test('boundary checks: the first non-finite value is found wherever it is; Freivalds row residuals agree between the native and TypeScript backends (to 1e-6 of the absolute sum)', () => {
  const rng = new Rng(5);
  const prev = backendName();
  try {
    for (const b of availableBackends()) {
      setBackend(b);
      const x = randn(70_001, rng, 1);
      assert.equal(firstNonFinite(x), -1, b);
      for (const [i, v] of [[0, NaN], [33_333, Infinity], [70_000, -Infinity]] as const) {
        const y = Float32Array.from(x);
        y[i] = v;
        y[Math.min(i + 5, 70_000)] = NaN; // a later one does not hide the first
        assert.equal(firstNonFinite(y), i, `${b}: ${v} at ${i}`);
      }
    }
    const rows = 5, a = 601, bb = 19; // a: more than two of the native kernel's 256-term blocks, and a tail
    const lhs = randn(rows * a, rng, 1), rhs = randn(rows * bb, rng, 1);
    const p = Float64Array.from(randn(2 * a, rng, 1)), q = Float64Array.from(randn(2 * bb, rng, 1)), c = Float64Array.of(0.25, -0.5);
    const got: Float64Array[] = [];
    for (const b of availableBackends()) {
      setBackend(b);
      got.push(freivaldsRows(lhs, a, p, rhs, bb, q, c, rows));
    }
    // direct: row 3, vector 1
    let s = -c[1], m = Math.abs(c[1]);
    for (let j = 0; j < a; j++) { s += lhs[3 * a + j] * p[2 * j + 1]; m += Math.abs(lhs[3 * a + j] * p[2 * j + 1]); }
    for (let j = 0; j < bb; j++) { s -= rhs[3 * bb + j] * q[2 * j + 1]; m += Math.abs(rhs[3 * bb + j] * q[2 * j + 1]); }
    // the native kernel sums in float32 lanes: within 1e-6 of the absolute sum, 20x inside the check's tolerance (2e-5)
    for (const g of got) {
      assert.ok(Math.abs(g[4 * 3 + 1] - s) < 1e-6 * m && Math.abs(g[4 * 3 + 3] - m) < 1e-6 * m, `residual ${g[4 * 3 + 1]} vs ${s}`);
      for (let i = 0; i < g.length; i += 4) {
        for (const k of [0, 1, 2, 3]) assert.ok(Math.abs(g[i + k] - got[0][i + k]) < 1e-6 * got[0][i + 2 + (k % 2)]);
      }
    }
  } finally {
    setBackend(prev);
  }
});

test('Haar-orthogonal QR: the native float64 Householder QR (every ISA, 1 and 2 threads) gives the TypeScript Q to 1e-12, orthogonal to 1e-13', () => {
  const prev = backendName();
  const n = 203; // odd: not a multiple of the reflection's 8 lanes or 16-column tasks
  const qs: { label: string; q: Float64Array }[] = [];
  const original = nativeInfo()?.isa as 'avx512' | 'avx2' | 'generic' | undefined;
  const prevThreads = nativeInfo()?.threads;
  try {
    setBackend('js');
    qs.push({ label: 'js', q: haarOrthogonal(n, new Rng(9)).data });
    if (native) {
      setBackend('native');
      for (const isa of ['avx512', 'avx2', 'generic'] as const) {
        if (!setNativeIsa(isa)) continue;
        for (const t of [1, 2]) {
          setThreads(t);
          qs.push({ label: `${isa} x${t}`, q: haarOrthogonal(n, new Rng(9)).data });
        }
      }
    }
  } finally {
    if (original) setNativeIsa(original);
    if (prevThreads) setThreads(prevThreads);
    setBackend(prev);
  }
  const q0 = qs[0].q;
  for (const { label, q } of qs) {
    let d = 0;
    for (let i = 0; i < q.length; i++) d = Math.max(d, Math.abs(q[i] - q0[i]));
    assert.ok(d < 1e-12, `${label}: differs from the TypeScript Q by ${d}`);
    let e = 0;
    for (let i = 0; i < n; i++) for (let j = i; j < n; j++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += q[k * n + i] * q[k * n + j];
      e = Math.max(e, Math.abs(s - (i === j ? 1 : 0)));
    }
    assert.ok(e < 1e-13, `${label}: Q^T Q - I = ${e}`);
  }
  assert.ok(qs.length >= (native ? 3 : 1));
});
