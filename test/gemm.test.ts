// GEMM core: every case on every available backend (native and TypeScript), every native
// kernel this CPU supports, argument checking, threading and backend selection.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import {
  availableBackends, backendName, nativeInfo,
  setBackend, setNativeIsa, setThreads, sgemm, sgemmBatched, type BackendName,
  butterfly, FLY_GATHER, FLY_SCATTER, FLY_STAGE, FLY_STAGE_T,
} from '../src/tensor/gemm.js';
import { native } from '../src/tensor/native.js';
import { rng } from './helpers.js';

// ------------------------------------------------------------------ helpers

const gemmModule = new URL('../src/tensor/gemm.js', import.meta.url).href;


function rand(n: number, r: () => number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = r() * 2 - 1;
  return a;
}

interface Case {
  ta: boolean; tb: boolean; m: number; n: number; k: number; alpha: number; beta: number;
  A: Float32Array; lda: number; B: Float32Array; ldb: number; C: Float32Array; ldc: number; bias: Float32Array | null;
}

/** Random operands with the given padding of every leading dimension. */
function makeCase(ta: boolean, tb: boolean, m: number, n: number, k: number, seed: number,
  o: { pad?: number; alpha?: number; beta?: number; bias?: boolean } = {}): Case {
  const r = rng(seed);
  const pad = o.pad ?? 0;
  const lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
  return {
    ta, tb, m, n, k, alpha: o.alpha ?? 1, beta: o.beta ?? 0,
    A: rand(Math.max(1, (ta ? k : m) * lda), r), lda,
    B: rand(Math.max(1, (tb ? n : k) * ldb), r), ldb,
    C: rand(Math.max(1, m * ldc), r), ldc,
    bias: o.bias ? rand(n, r) : null,
  };
}

/** Float64 reference of C and, per entry, the scale of the terms summed (for the tolerance). */
function reference(c: Case): { val: Float64Array; scale: Float64Array } {
  const { ta, tb, m, n, k, alpha, beta, A, lda, B, ldb, C, ldc, bias } = c;
  const val = new Float64Array(m * n), scale = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0, a = 0;
      for (let p = 0; p < k; p++) {
        const x = ta ? A[p * lda + i] : A[i * lda + p];
        const y = tb ? B[j * ldb + p] : B[p * ldb + j];
        s += x * y;
        a += Math.abs(x * y);
      }
      let v = k === 0 || alpha === 0 ? 0 : alpha * s;
      let sc = Math.abs(alpha) * a;
      if (beta !== 0) { v += beta * C[i * ldc + j]; sc += Math.abs(beta * C[i * ldc + j]); }
      if (bias) { v += bias[j]; sc += Math.abs(bias[j]); }
      val[i * n + j] = v;
      scale[i * n + j] = sc;
    }
  }
  return { val, scale };
}

const TOL = 5e-5; // relative to the sum of |terms|: float32 accumulation over k <= ~1000

function assertClose(got: Float32Array, ldc: number, ref: { val: Float64Array; scale: Float64Array }, m: number, n: number, what: string): void {
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      const g = got[i * ldc + j], e = ref.val[i * n + j];
      const err = Math.abs(g - e);
      if (!(err <= TOL * ref.scale[i * n + j] + 1e-6)) {
        assert.fail(`${what}: C[${i},${j}] = ${g}, expected ${e} (|err| ${err.toExponential(2)}, scale ${ref.scale[i * n + j].toExponential(2)})`);
      }
    }
  }
}

/** Runs a case and checks C, including that the padding beyond column n is untouched. */
function runCase(c: Case, what: string): void {
  const ref = reference(c);
  const before = c.C.slice();
  sgemm(c.ta, c.tb, c.m, c.n, c.k, c.alpha, c.A, c.lda, c.B, c.ldb, c.beta, c.C, c.ldc, c.bias);
  assertClose(c.C, c.ldc, ref, c.m, c.n, what);
  for (let i = 0; i < c.m; i++) {
    for (let j = c.n; j < c.ldc && i * c.ldc + j < c.C.length; j++) {
      assert.equal(c.C[i * c.ldc + j], before[i * c.ldc + j], `${what}: padding C[${i},${j}] was written`);
    }
  }
}

/** Runs `fn` once per available backend, restoring the original backend afterwards. */
function forEachBackend(fn: (b: BackendName) => void): void {
  const prev = backendName();
  try {
    for (const b of availableBackends()) {
      setBackend(b);
      fn(b);
    }
  } finally {
    setBackend(prev);
  }
}

const TRANS: [boolean, boolean][] = [[false, false], [false, true], [true, false], [true, true]];
const SIZES = [1, 3, 17, 33, 65, 100, 129];

/** (m, n, k) triples that put every size in every position, plus a few mixed ones. */
function oddShapes(): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (const s of SIZES) out.push([s, 17, 33], [33, s, 17], [17, 33, s]);
  out.push([100, 129, 65], [129, 100, 3], [65, 1, 129], [1, 129, 100], [15, 31, 47], [29, 65, 257]);
  out.push([600, 8, 300], [257, 16, 129]); // few columns of C (the transposed small-row path), split across threads
  return out;
}

function oddSuite(tag: string): void {
  let seed = 1;
  for (const [ta, tb] of TRANS) {
    for (const [m, n, k] of oddShapes()) {
      const name = `${tag} ta=${ta} tb=${tb} ${m}x${n}x${k}`;
      runCase(makeCase(ta, tb, m, n, k, seed++), name);
      runCase(makeCase(ta, tb, m, n, k, seed++, { pad: 3, alpha: 0.75, beta: -1.25, bias: true }), `${name} padded alpha beta bias`);
    }
  }
}

// ------------------------------------------------------------------ correctness

test('all transposes, odd sizes, padded leading dimensions, alpha, beta, bias', () => {
  forEachBackend((b) => oddSuite(b));
});

test('every native kernel (avx512 / avx2 / generic) this CPU supports', (t) => {
  if (!native) { t.skip('native addon not available'); return; }
  const prevBackend = backendName();
  const original = nativeInfo()!.isa as 'avx512' | 'avx2' | 'generic';
  setBackend('native');
  try {
    for (const isa of ['avx512', 'avx2', 'generic'] as const) {
      if (!setNativeIsa(isa)) continue;
      assert.equal(nativeInfo()!.isa, isa);
      oddSuite(`native/${isa}`);
      runCase(makeCase(false, true, 300, 200, 700, 99, { beta: 0.5, bias: true }), `native/${isa} threaded 300x200x700`);
    }
  } finally {
    setNativeIsa(original);
    setBackend(prevBackend);
  }
  assert.equal(nativeInfo()!.isa, original);
});

/** A butterfly program run in float64, row by row (the reference for `butterfly`). */
function butterflyRef(ops: Int32Array, mats: Float32Array, perms: Int32Array, rows: Float64Array[], orows: number): Float64Array[] {
  let cur = rows;
  for (let o = 0; o < ops.length; o += 4) {
    const [kind, m, t, off] = ops.subarray(o, o + 4);
    const next = cur.map((r) => new Float64Array(r.length));
    for (let i = 0; i < cur.length; i++) {
      if (kind === FLY_GATHER) next[i].set(cur[perms[off + i]]);
      else if (kind === FLY_SCATTER) next[perms[off + i]].set(cur[i]);
      else {
        const h = Math.floor(i / (m * t)), q = Math.floor((i % (m * t)) / t), u = i % t;
        for (let p = 0; p < m; p++) {
          const a = kind === FLY_STAGE ? mats[off + q * m + p] : mats[off + p * m + q];
          const src = cur[h * m * t + p * t + u];
          for (let j = 0; j < src.length; j++) next[i][j] += a * src[j];
        }
      }
    }
    cur = next;
  }
  return cur.slice(0, orows);
}

test('butterfly programs: every backend and native kernel against a float64 reference; bad programs refused', () => {
  const r = rng(41);
  const perm = (n: number) => { const a = Int32Array.from({ length: n }, (_, i) => i); for (let i = n - 1; i > 0; i--) { const j = Math.floor(r() * (i + 1)); [a[i], a[j]] = [a[j], a[i]]; } return a; };
  // (sent, radices, width, real rows, output rows): odd widths cross the kernels' vector tails
  const shapes: [number, number[], number, number, number][] = [[48, [4, 12], 37, 40, 48], [256, [16, 16], 96, 200, 200], [24, [3, 8], 1, 24, 5], [17, [17], 65, 9, 9]];
  const runAll = (tag: string) => {
    for (const [sent, radices, w, xrows, orows] of shapes) {
      const mats = rand(radices.reduce((a, m) => a + m * m, 0), r), perms = Int32Array.from([...perm(sent), ...perm(sent)]);
      const ops: number[] = [FLY_GATHER, 0, 0, 0];
      let t = 1, off = 0;
      radices.forEach((m, i) => { ops.push(i % 2 ? FLY_STAGE_T : FLY_STAGE, m, t, off); t *= m; off += m * m; });
      ops.push(FLY_SCATTER, 0, 0, sent, FLY_GATHER, 0, 0, 0);
      const X = rand(xrows * w, r), S = xrows < sent ? rand((sent - xrows) * w, r) : null;
      for (const shields of S ? [S, null] : [null]) {
        const rows = Array.from({ length: sent }, (_, i) => Float64Array.from(i < xrows ? X.subarray(i * w, (i + 1) * w) : shields ? shields.subarray((i - xrows) * w, (i - xrows + 1) * w) : new Float64Array(w)));
        const want = butterflyRef(Int32Array.from(ops), mats, perms, rows, orows);
        const out = new Float32Array(orows * w).fill(NaN);
        butterfly(Int32Array.from(ops), mats, perms, X, xrows, shields, sent, w, out, orows);
        let err = 0, scale = 0;
        want.forEach((row, i) => row.forEach((v, j) => { err = Math.max(err, Math.abs(v - out[i * w + j])); scale = Math.max(scale, Math.abs(v)); }));
        assert.ok(err <= 1e-5 * scale, `${tag} sent ${sent} w ${w}: max error ${err} (scale ${scale})`);
      }
    }
  };
  forEachBackend((b) => runAll(b));
  if (native) {
    const prev = backendName(), original = nativeInfo()!.isa as 'avx512' | 'avx2' | 'generic';
    setBackend('native');
    try {
      for (const isa of ['avx512', 'avx2', 'generic'] as const) if (setNativeIsa(isa)) runAll(`native/${isa}`);
      const X = new Float32Array(32), out = new Float32Array(32), mats = new Float32Array(16);
      const bad: [number[], Int32Array, RegExp][] = [
        [[FLY_GATHER, 0, 0, 0], Int32Array.of(0, 1, 2, 9, 4, 5, 6, 7), /row index is out of range/],
        [[FLY_STAGE, 4, 4, 0], new Int32Array(8), /block does not fit/],
        [[FLY_STAGE, 4, 1, 4], new Int32Array(8), /block does not fit/],
        [[7, 1, 1, 0], new Int32Array(8), /unknown kind 7/],
        [[FLY_SCATTER, 0, 0, 4], new Int32Array(8), /permutation lies outside perms/],
      ];
      for (const [ops, perms, re] of bad) assert.throws(() => butterfly(Int32Array.from(ops), mats, perms, X, 8, null, 8, 4, out, 8), re);
    } finally {
      setNativeIsa(original);
      setBackend(prev);
    }
  }
  assert.throws(() => butterfly(new Int32Array(0), new Float32Array(0), new Int32Array(0), new Float32Array(4), 4, null, 2, 2, new Float32Array(4), 2), /xrows \(4\) and orows \(2\) must be at most sent/);
});

test('subarray views with non-zero byteOffset; memory around the views is untouched', () => {
  forEachBackend((b) => {
    for (const [ta, tb] of TRANS) {
      const m = 37, n = 45, k = 29;
      const c = makeCase(ta, tb, m, n, k, 7, { pad: 2, beta: 1, bias: true });
      // Embed every operand in a larger buffer at an odd offset, surrounded by sentinels.
      const embed = (x: Float32Array, off: number) => {
        const big = new Float32Array(x.length + off + 19).fill(12345);
        big.set(x, off);
        return { big, view: big.subarray(off, off + x.length) };
      };
      const A = embed(c.A, 5), B = embed(c.B, 13), C = embed(c.C, 3), bias = embed(c.bias!, 7);
      const ref = reference(c);
      sgemm(ta, tb, m, n, k, c.alpha, A.view, c.lda, B.view, c.ldb, c.beta, C.view, c.ldc, bias.view);
      assert.ok(A.view.byteOffset > 0 && C.view.byteOffset > 0);
      assertClose(C.view, c.ldc, ref, m, n, `${b} views ta=${ta} tb=${tb}`);
      for (const [name, e, off, len] of [['A', A, 5, c.A.length], ['B', B, 13, c.B.length], ['C', C, 3, c.C.length], ['bias', bias, 7, n]] as const) {
        for (let i = 0; i < off; i++) assert.equal(e.big[i], 12345, `${b}: ${name} sentinel before the view`);
        for (let i = off + len; i < e.big.length; i++) assert.equal(e.big[i], 12345, `${b}: ${name} sentinel after the view`);
      }
    }
  });
});

test('beta = 0 never reads C (NaN garbage), alpha = 0 never reads A or B, k = 0, m or n = 0', () => {
  forEachBackend((b) => {
    for (const [ta, tb] of TRANS) {
      // beta = 0 over NaN-filled C, big enough to take the threaded path on native.
      for (const [m, n, k] of [[5, 7, 3], [200, 300, 100]]) {
        const c = makeCase(ta, tb, m, n, k, 21, { pad: 1, bias: true });
        const ref = reference(c);
        c.C.fill(NaN);
        sgemm(ta, tb, m, n, k, 1, c.A, c.lda, c.B, c.ldb, 0, c.C, c.ldc, c.bias);
        assertClose(c.C, c.ldc, ref, m, n, `${b} beta=0 NaN C ${m}x${n}x${k}`);
      }
      // alpha = 0: C = beta C + bias, even with NaN in A and B.
      const z = makeCase(ta, tb, 9, 11, 13, 22, { beta: 2, bias: true });
      const expect = reference({ ...z, alpha: 0 });
      z.A.fill(NaN);
      z.B.fill(NaN);
      sgemm(ta, tb, 9, 11, 13, 0, z.A, z.lda, z.B, z.ldb, 2, z.C, z.ldc, z.bias);
      assertClose(z.C, z.ldc, expect, 9, 11, `${b} alpha=0`);
    }
    // k = 0: C = beta C (+ bias); A and B may be empty.
    const c = makeCase(false, false, 6, 5, 0, 23, { beta: 3, bias: true });
    const ref = reference(c);
    sgemm(false, false, 6, 5, 0, 1, new Float32Array(0), 0, new Float32Array(0), 5, 3, c.C, 5, c.bias);
    assertClose(c.C, 5, ref, 6, 5, `${b} k=0`);
    const c0 = new Float32Array(12).fill(NaN);
    sgemm(true, true, 3, 4, 0, 1, new Float32Array(0), 3, new Float32Array(0), 0, 0, c0, 4);
    assert.deepEqual([...c0], new Array(12).fill(0), `${b} k=0 beta=0 zeroes C`);
    // m = 0 or n = 0: nothing is touched, even with empty buffers.
    const keep = new Float32Array([1, 2, 3]);
    sgemm(false, false, 0, 3, 4, 1, new Float32Array(0), 4, new Float32Array(12), 3, 0, keep, 3);
    sgemm(false, false, 1, 0, 4, 1, new Float32Array(4), 4, new Float32Array(0), 0, 0, keep, 0);
    sgemmBatched(false, false, 2, 2, 2, 1, new Float32Array(0), 2, 4, new Float32Array(0), 2, 4, 0, keep, 2, 4, 0);
    assert.deepEqual([...keep], [1, 2, 3]);
  });
});

test('batched: strides, interleaved heads, shared operands, sequential reuse of one C', () => {
  forEachBackend((b) => {
    for (const [ta, tb] of TRANS) {
      // Separate matrices with gaps between them.
      const m = 19, n = 23, k = 17, batch = 5;
      const r = rng(31);
      const lda = (ta ? m : k) + 2, ldb = (tb ? k : n) + 1, ldc = n + 3;
      const sizeA = (ta ? k : m) * lda, sizeB = (tb ? n : k) * ldb, sizeC = m * ldc;
      const sA = sizeA + 7, sB = sizeB + 3, sC = sizeC + 5;
      const A = rand(sA * batch, r), B = rand(sB * batch, r), C = rand(sC * batch, r);
      const refs = [];
      for (let i = 0; i < batch; i++) {
        refs.push(reference({ ta, tb, m, n, k, alpha: 0.5, beta: 0.25, A: A.subarray(i * sA), lda, B: B.subarray(i * sB), ldb, C: C.subarray(i * sC), ldc, bias: null }));
      }
      sgemmBatched(ta, tb, m, n, k, 0.5, A, lda, sA, B, ldb, sB, 0.25, C, ldc, sC, batch);
      for (let i = 0; i < batch; i++) assertClose(C.subarray(i * sC), ldc, refs[i], m, n, `${b} batched ta=${ta} tb=${tb} item ${i}`);
    }
    // Attention layout: heads interleaved in the columns (stride = head size < leading dimension),
    // big enough for the parallel-over-batch path.
    const T = 64, hs = 16, NH = 12, C3 = 3 * NH * hs, Cd = NH * hs;
    const r = rng(41);
    const qkv = rand(T * C3, r);
    const q = qkv.subarray(0), kk = qkv.subarray(Cd);
    const att = new Float32Array(NH * T * T);
    sgemmBatched(false, true, T, T, hs, 0.25, q, C3, hs, kk, C3, hs, 0, att, T, T * T, NH);
    const v = rand(T * Cd, r), out = new Float32Array(T * Cd).fill(NaN);
    sgemmBatched(false, false, T, hs, T, 1, att, T, T * T, v, Cd, hs, 0, out, Cd, hs, NH);
    for (let h = 0; h < NH; h++) {
      const refAtt = reference({ ta: false, tb: true, m: T, n: T, k: hs, alpha: 0.25, beta: 0, A: q.subarray(h * hs), lda: C3, B: kk.subarray(h * hs), ldb: C3, C: att, ldc: T, bias: null });
      assertClose(att.subarray(h * T * T), T, refAtt, T, T, `${b} heads scores ${h}`);
      const refOut = reference({ ta: false, tb: false, m: T, n: hs, k: T, alpha: 1, beta: 0, A: att.subarray(h * T * T), lda: T, B: v.subarray(h * hs), ldb: Cd, C: out, ldc: Cd, bias: null });
      assertClose(out.subarray(h * hs), Cd, refOut, T, hs, `${b} heads out ${h}`);
    }
    // strideA = 0 (one A for every item) and strideC = 0 (items applied to one C in order).
    const A1 = rand(4 * 6, r), Bs = rand(3 * 6 * 5, r);
    const Cs = new Float32Array(3 * 4 * 5);
    sgemmBatched(false, false, 4, 5, 6, 1, A1, 6, 0, Bs, 5, 30, 0, Cs, 5, 20, 3);
    const Cacc = new Float32Array(20);
    sgemmBatched(false, false, 4, 5, 6, 1, A1, 6, 0, Bs, 5, 30, 1, Cacc, 5, 0, 3);
    for (let i = 0; i < 20; i++) {
      const want = Cs[i] + Cs[20 + i] + Cs[40 + i];
      assert.ok(Math.abs(Cacc[i] - want) <= 1e-5 * (1 + Math.abs(want)), `${b} strideC=0 accumulates in order`);
    }
  });
});

test('300x700x500 against a float64 reference, and multi-thread == 1-thread', () => {
  const m = 300, n = 500, k = 700;
  forEachBackend((b) => {
    for (const [ta, tb] of [[false, false], [false, true], [true, false]] as [boolean, boolean][]) {
      const c = makeCase(ta, tb, m, n, k, 51, { pad: 4, beta: 0.5, bias: true });
      const ref = reference(c);
      const C0 = c.C.slice();
      sgemm(c.ta, c.tb, m, n, k, c.alpha, c.A, c.lda, c.B, c.ldb, c.beta, c.C, c.ldc, c.bias);
      // Whole-matrix relative error, as a second, global measure.
      let num = 0, den = 0;
      for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
        const d = c.C[i * c.ldc + j] - ref.val[i * n + j];
        num += d * d;
        den += ref.val[i * n + j] ** 2;
      }
      assert.ok(Math.sqrt(num / den) < 1e-6, `${b} ta=${ta} tb=${tb}: relative error ${Math.sqrt(num / den)}`);
      assertClose(c.C, c.ldc, ref, m, n, `${b} large ta=${ta} tb=${tb}`);
      if (b === 'native') {
        const prev = nativeInfo()!.threads;
        const results: Float32Array[] = [];
        try {
          for (const th of [1, 2, 3, 4]) {
            setThreads(th);
            assert.equal(nativeInfo()!.threads, th);
            const Cx = C0.slice();
            sgemm(c.ta, c.tb, m, n, k, c.alpha, c.A, c.lda, c.B, c.ldb, c.beta, Cx, c.ldc, c.bias);
            results.push(Cx);
          }
        } finally {
          setThreads(prev);
        }
        for (let t = 1; t < results.length; t++) {
          for (let i = 0; i < results[0].length; i++) {
            const x = results[0][i], y = results[t][i];
            assert.ok(Math.abs(x - y) <= 1e-5 * (1 + Math.abs(x)), `threads ${t + 1} vs 1 differ at ${i}: ${y} vs ${x}`);
          }
        }
        // Batched across threads, too.
        const items = 6, sz = 40 * 50;
        const r = rng(61), A = rand(items * 40 * 60, r), B = rand(items * 60 * 50, r);
        const outs: Float32Array[] = [];
        try {
          for (const th of [1, 2]) {
            setThreads(th);
            const Cb = new Float32Array(items * sz);
            sgemmBatched(false, false, 40, 50, 60, 1, A, 60, 2400, B, 50, 3000, 0, Cb, 50, sz, items);
            outs.push(Cb);
          }
        } finally {
          setThreads(prev);
        }
        for (let i = 0; i < outs[0].length; i++) assert.ok(Math.abs(outs[0][i] - outs[1][i]) <= 1e-5 * (1 + Math.abs(outs[0][i])), 'batched threads differ');
      }
    }
  });
});

test('threaded special paths: few rows, long reductions (several k steps), big batched items', () => {
  forEachBackend((b) => {
    let seed = 300;
    for (const [ta, tb] of TRANS) {
      // m <= 8 takes the unpacked path; big enough to be split across threads.
      runCase(makeCase(ta, tb, 5, 3000, 700, seed++, { pad: 1, beta: 0.5, bias: true }), `${b} few rows ta=${ta} tb=${tb}`);
      runCase(makeCase(ta, tb, 1, 2000, 1100, seed++, { bias: true }), `${b} one row ta=${ta} tb=${tb}`);
      // k > 1024: several reduction steps (beta and bias only on the first).
      runCase(makeCase(ta, tb, 40, 70, 1500, seed++, { pad: 2, alpha: -0.5, beta: 0.5, bias: true }), `${b} long k ta=${ta} tb=${tb}`);
    }
    // Batched items big enough to split: 3 items on 2 threads (2 in parallel, 1 split).
    const r = rng(81);
    const m = 150, n = 160, k = 170, items = 3;
    const A = rand(items * m * k, r), B = rand(items * k * n, r), C = rand(items * m * n, r);
    const refs = [];
    for (let i = 0; i < items; i++) {
      refs.push(reference({ ta: false, tb: true, m, n, k, alpha: 1, beta: 1, A: A.subarray(i * m * k), lda: k, B: B.subarray(i * k * n), ldb: k, C: C.subarray(i * m * n), ldc: n, bias: null }));
    }
    sgemmBatched(false, true, m, n, k, 1, A, k, m * k, B, k, k * n, 1, C, n, m * n, items);
    for (let i = 0; i < items; i++) assertClose(C.subarray(i * m * n), n, refs[i], m, n, `${b} big batched item ${i}`);
  });
});

// ------------------------------------------------------------------ argument checking

test('bad arguments throw an Error naming the problem, before any kernel runs', () => {
  const A = new Float32Array(12), B = new Float32Array(20), C = new Float32Array(15), bias = new Float32Array(5);
  // A is 3x4 (lda 4), B is 4x5 (ldb 5), C is 3x5 (ldc 5)
  const ok = () => sgemm(false, false, 3, 5, 4, 1, A, 4, B, 5, 0, C, 5, bias);
  type Args = Parameters<typeof sgemm>;
  const base: Args = [false, false, 3, 5, 4, 1, A, 4, B, 5, 0, C, 5, bias];
  const bad: [number, unknown, RegExp][] = [
    [0, 1, /transA must be a boolean/],
    [1, 'no', /transB must be a boolean/],
    [2, -1, /m must be a non-negative integer/],
    [3, 2.5, /n must be a non-negative integer/],
    [4, NaN, /k must be a non-negative integer/],
    [4, Infinity, /k must be a non-negative integer/],
    [2, '3', /m must be a non-negative integer/],
    [5, NaN, /alpha must be a finite number/],
    [10, Infinity, /beta must be a finite number/],
    [6, new Float64Array(12), /A must be a Float32Array, got Float64Array/],
    [8, [1, 2, 3], /B must be a Float32Array, got Array/],
    [11, null, /C must be a Float32Array, got null/],
    [6, new Float32Array(11), /A is too short: a 3x4 matrix with lda=4 needs 12 elements, A has 11/],
    [8, new Float32Array(19), /B is too short/],
    [11, new Float32Array(14), /C is too short/],
    [7, 3, /lda \(3\) must be >= 4/],
    [9, 4, /ldb \(4\) must be >= 5/],
    [12, 4, /ldc \(4\) must be >= 5/],
    [7, -4, /lda must be a non-negative integer/],
    [13, new Float32Array(4), /bias must have n = 5 elements, has 4/],
    [13, new Float32Array(6), /bias must have n = 5 elements, has 6/],
    [13, new Float64Array(5), /bias must be a Float32Array/],
  ];
  forEachBackend((b) => {
    for (const [i, v, re] of bad) {
      const args = [...base] as unknown[];
      args[i] = v;
      const before = C.slice();
      assert.throws(() => (sgemm as (...a: unknown[]) => void)(...args), (e: unknown) => e instanceof Error && /^sgemm: /.test(e.message) && re.test(e.message),
        `${b}: argument ${i} = ${String(v)} should fail with ${re}`);
      assert.deepEqual(C, before, `${b}: a rejected call must not write C`);
    }
    // Transposed layouts are measured against their own shapes: A^T stored 4x3 needs lda >= 3.
    assert.throws(() => sgemm(true, false, 3, 5, 4, 1, A, 2, B, 5, 0, C, 5), /lda \(2\) must be >= 3.*transA/);
    sgemm(false, true, 3, 5, 4, 1, A, 4, B, 4, 0, C, 5); // B^T stored 5x4 with ldb 4: 20 elements fit
    assert.throws(() => sgemm(false, true, 3, 5, 4, 1, A, 4, B.subarray(1), 4, 0, C, 5), /B is too short: a 5x4 matrix with ldb=4 needs 20 elements, B has 19/);
    ok();
    // Batched: strides are checked over the whole batch.
    assert.throws(() => sgemmBatched(false, false, 2, 2, 2, 1, new Float32Array(8), 2, 4, new Float32Array(8), 2, 4, 0, new Float32Array(7), 2, 4, 2), /sgemmBatched: C is too short.*batch 2 with strideC=4/);
    assert.throws(() => sgemmBatched(false, false, 2, 2, 2, 1, new Float32Array(8), 2, -4, new Float32Array(8), 2, 4, 0, new Float32Array(8), 2, 4, 2), /strideA must be a non-negative integer/);
    assert.throws(() => sgemmBatched(false, false, 2, 2, 2, 1, new Float32Array(8), 2, 4, new Float32Array(8), 2, 4, 0, new Float32Array(8), 2, 4, 1.5), /batch must be a non-negative integer/);
    assert.throws(() => sgemmBatched(false, false, 2, 2, 2, 1, new Float32Array(8), 2, 5, new Float32Array(8), 2, 4, 0, new Float32Array(8), 2, 4, 2), /A is too short/);
    assert.throws(() => setThreads(0), /setThreads/);
    assert.throws(() => setBackend('cuda' as BackendName), /unknown backend/);
  });
});

test('the addon checks its arguments too when called directly (throws, never crashes)', (t) => {
  if (!native) { t.skip('native addon not available'); return; }
  const f = new Float32Array(16);
  const call = (...a: unknown[]) => (native!.sgemm as (...x: unknown[]) => void)(...a);
  assert.throws(() => call(false, false, 4, 4, 4, 1, f.subarray(1), 4, f, 4, 0, f, 4), /A is too short/);
  assert.throws(() => call(false, false, 4, 4, 4, 1, f, 3, f, 4, 0, f, 4), /leading dimension of A/);
  assert.throws(() => call(false, false, -1, 4, 4, 1, f, 4, f, 4, 0, f, 4), /m must be a non-negative integer/);
  assert.throws(() => call(false, false, 4, 4, 4, 1, new Float64Array(16), 4, f, 4, 0, f, 4), /A must be a Float32Array/);
  assert.throws(() => call(false, false, 4, 4, 4, 1, f, 4, f, 4, 0, f, 4, new Float32Array(3)), /bias length/);
  assert.throws(() => call(false, false, 4, 4), /expected 13 arguments/);
  assert.throws(() => (native!.sgemmBatched as (...x: unknown[]) => void)(false, false, 2, 2, 2, 1, f, 2, 4, f, 2, 4, 0, f, 2, 4, 5), /too short/);
  assert.throws(() => native!.setThreads(0), /setThreads/);
  // Still alive and correct.
  const A = new Float32Array([1, 2, 3, 4]), B = new Float32Array([5, 6, 7, 8]), C = new Float32Array(4);
  native.sgemm(false, false, 2, 2, 2, 1, A, 2, B, 2, 0, C, 2);
  assert.deepEqual([...C], [19, 22, 43, 50]);
});

test('worker threads can use the native backend at the same time', async (t) => {
  if (!native) { t.skip('native addon not available'); return; }
  // The same deterministic products in the main thread and in 3 workers at once. `job` is
  // shipped to the workers as source text, so it only uses its arguments.
  function job(g: { sgemm: typeof sgemm }, seed: number): number {
    const m = 120, n = 150, k = 130, A = new Float32Array(m * k), B = new Float32Array(k * n), C = new Float32Array(m * n);
    for (let i = 0; i < A.length; i++) A[i] = ((i * seed) % 13) / 13 - 0.5;
    for (let i = 0; i < B.length; i++) B[i] = ((i + seed) % 7) / 7 - 0.5;
    let sum = 0;
    for (let rep = 0; rep < 40; rep++) {
      const tb = rep % 2 === 1;
      g.sgemm(false, tb, m, n, k, 1, A, k, B, tb ? k : n, 0, C, n);
      for (let i = 0; i < C.length; i += 97) sum += C[i];
    }
    return sum;
  }
  const g = await import('../src/tensor/gemm.js');
  const prev = backendName();
  setBackend('native');
  try {
    const expected = [1, 2, 3].map((seed) => job(g, seed));
    const code = `const { parentPort, workerData } = require('node:worker_threads');
      import(workerData.url).then((g) => { g.setBackend('native'); parentPort.postMessage((${job.toString()})(g, workerData.seed)); });`;
    const got = await Promise.all([1, 2, 3].map((seed) => new Promise<number>((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { url: gemmModule, seed } });
      w.once('message', resolve);
      w.once('error', reject);
    })));
    assert.deepEqual(got, expected);
  } finally {
    setBackend(prev);
  }
});

// ------------------------------------------------------------------ backend selection

function probe(env: Record<string, string | undefined>): { status: number | null; out: string; err: string } {
  const code = `import('${gemmModule}').then((g) => console.log(JSON.stringify({ b: g.backendName(), all: g.availableBackends(), info: g.nativeInfo() })))`;
  const e: NodeJS.ProcessEnv = { ...process.env };
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete e[k];
    else e[k] = v;
  }
  const r = spawnSync(process.execPath, ['-e', code], { env: e, encoding: 'utf8', cwd: fileURLToPath(new URL('.', import.meta.url)) });
  return { status: r.status, out: r.stdout.trim(), err: r.stderr };
}

test('OBFUSCATUNE_BACKEND and OBFUSCATUNE_THREADS', () => {
  const js = probe({ OBFUSCATUNE_BACKEND: 'js' });
  assert.equal(js.status, 0, js.err);
  assert.deepEqual(JSON.parse(js.out), { b: 'js', all: ['js'], info: null });
  const bogus = probe({ OBFUSCATUNE_BACKEND: 'gpu' });
  assert.notEqual(bogus.status, 0);
  assert.match(bogus.err, /OBFUSCATUNE_BACKEND must be 'native' or 'js'/);
  // Whether the addon loads is decided by a child with neither variable set (this process may
  // itself run with OBFUSCATUNE_BACKEND=js).
  const dflt = probe({ OBFUSCATUNE_BACKEND: undefined, OBFUSCATUNE_THREADS: undefined });
  assert.equal(dflt.status, 0, dflt.err);
  const d = JSON.parse(dflt.out);
  if (d.all.includes('native')) {
    assert.equal(d.b, 'native');
    assert.equal(dflt.err, '', 'no warning when the addon loads');
    const nat = probe({ OBFUSCATUNE_BACKEND: 'native', OBFUSCATUNE_THREADS: '3' });
    assert.equal(nat.status, 0, nat.err);
    const v = JSON.parse(nat.out);
    assert.equal(v.b, 'native');
    assert.deepEqual(v.all, ['native', 'js']);
    assert.equal(v.info.threads, 3);
    const badThreads = probe({ OBFUSCATUNE_BACKEND: undefined, OBFUSCATUNE_THREADS: 'many' });
    assert.notEqual(badThreads.status, 0);
    assert.match(badThreads.err, /OBFUSCATUNE_THREADS must be an integer/);
  } else {
    assert.equal(d.b, 'js');
    assert.match(dflt.err, /native GEMM addon unavailable/);
    const forced = probe({ OBFUSCATUNE_BACKEND: 'native' });
    assert.notEqual(forced.status, 0);
    assert.match(forced.err, /OBFUSCATUNE_BACKEND=native but the native GEMM addon is unavailable/);
  }
});
