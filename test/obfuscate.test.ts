// The provider transform, masks and split inference (sealed and paper modes).
import type { ObfuscatedTensors } from '../src/obfuscate/enclave_tensors.js';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { GPT2 } from '../src/model/gpt2.js';
import { getPreset } from '../src/model/config.js';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint.js';
import { generate } from '../src/model/transformer.js';
import { Rng, KeyedRng } from '../src/tensor/rng.js';
import { matmul, transpose, inverseLU, haarOrthogonal, identity, type Mat64 } from '../src/linalg/mat64.js';
import { kappaMask, naiveMask, oneStream, parseMaskSpec, randomPermutation, invertPermutation } from '../src/linalg/masks.js';
import { deriveMasks } from '../src/obfuscate/masks.js';
import { deobfuscate } from '../src/obfuscate/transform.js';
import { obfuscateWeights, writeObfuscation, deobfuscateDirs } from '../src/obfuscate/provider.js';
import { loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair, withUpdate } from '../src/obfuscate/bundle.js';
import { compareLogits } from '../src/experiments/fidelity.js';
import { shareTable, shareRow } from '../src/obfuscate/share.js';
import { llamaShareTable, llamaShareRow, llamaParamCount } from '../src/obfuscate/share_llama.js';
import { LLAMA_PRESETS as LLAMA_SHAPES } from '../src/model/config.js';
import { Enclave, inProcessSplit } from '../src/enclave/enclave.js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { InProcessLink, type CrossingEvent } from '../src/protocol/link.js';
import { encodeMessage, decodeMessage, asObfuscated } from '../src/protocol/messages.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../src/io/safetensors.js';
import { BundleError } from '../src/errors.js';
import { maxAbsDiff } from './helpers.js';

/** Largest singular value by power iteration on A^T A. */
function spectralNorm(a: Mat64, iters = 60, seed = 12345): number {
  const rng = new Rng(seed);
  let x = new Float64Array(a.cols);
  rng.fillNormal(x);
  let sigma = 0;
  for (let it = 0; it < iters; it++) {
    // y = A x ; x = A^T y
    const y = new Float64Array(a.rows);
    for (let i = 0; i < a.rows; i++) {
      let s = 0;
      for (let j = 0; j < a.cols; j++) s += a.data[i * a.cols + j] * x[j];
      y[i] = s;
    }
    const z = new Float64Array(a.cols);
    for (let i = 0; i < a.rows; i++) {
      const yi = y[i];
      for (let j = 0; j < a.cols; j++) z[j] += a.data[i * a.cols + j] * yi;
    }
    let nz = 0;
    for (let j = 0; j < z.length; j++) nz += z[j] * z[j];
    nz = Math.sqrt(nz);
    if (nz === 0) return 0;
    sigma = Math.sqrt(nz);
    for (let j = 0; j < z.length; j++) z[j] /= nz;
    x = z;
  }
  return sigma;
}

/** Condition number estimate ||A|| ||A^-1|| (spectral norms by power iteration). */
function conditionNumber(a: Mat64, inv: Mat64): number {
  return spectralNorm(a) * spectralNorm(inv);
}

/** max |A B - I| (checks an inverse pair). */
function inverseResidual(a: Mat64, b: Mat64): number {
  const p = matmul(a, b);
  let m = 0;
  for (let i = 0; i < p.rows; i++) for (let j = 0; j < p.cols; j++) m = Math.max(m, Math.abs(p.data[i * p.cols + j] - (i === j ? 1 : 0)));
  return m;
}

const FIX = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');

/** A random model whose layer norms and biases are not at their trivial init. */
function perturbedModel(preset: string, seed: number): GPT2 {
  const m = GPT2.random(getPreset(preset), seed);
  const rng = new Rng(seed + 100);
  for (const k of ['ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb', 'qkvb', 'attprojb', 'fcb', 'fcprojb'] as const) {
    const v = m.layout.view(m.params, k);
    for (let i = 0; i < v.length; i++) v[i] += 0.1 * rng.normal();
  }
  return m;
}

/** Rewrites an enclave bundle's tensor file through `edit`, pinning the new file's SHA-256 in the manifest. */
function rewriteEnclave(dir: string, edit: (ts: TensorToWrite[]) => TensorToWrite[]): void {
  const file = path.join(dir, 'tensors.safetensors');
  const st = openSafetensors(file);
  const ts = st.names().map((name): TensorToWrite => {
    const { dtype, shape } = st.info(name);
    return dtype === 'I32' ? { name, dtype: 'I32', shape, data: st.getInt(name) } : { name, dtype: 'F32', shape, data: st.get(name) };
  });
  writeSafetensors(file, edit(ts), st.metadata);
  const mfile = path.join(dir, 'manifest.json');
  const m = JSON.parse(readFileSync(mfile, 'utf8'));
  m.tensors.sha256 = createHash('sha256').update(readFileSync(file)).digest('hex');
  writeFileSync(mfile, JSON.stringify(m));
}

function randomTokens(n: number, V: number, seed: number): Int32Array {
  const r = new Rng(seed);
  return Int32Array.from({ length: n }, () => r.int(V));
}

test('masks: Haar orthogonal, kappa-controlled condition number, naive LU inverse, permutations', () => {
  const rng = KeyedRng.fromSeed(1);
  const Q = haarOrthogonal(40, rng);
  assert.ok(inverseResidual(Q, transpose(Q)) < 1e-13, 'Q Q^T = I');
  for (const kappa of [1, 10, 1000]) {
    const { m, inv } = kappaMask(48, kappa, oneStream(rng));
    assert.ok(inverseResidual(m, inv) < 1e-10 * kappa, `inverse of the kappa=${kappa} mask`);
    const c = conditionNumber(m, inv);
    assert.ok(Math.abs(c - kappa) / kappa < 0.02, `condition number ${c} for kappa ${kappa}`);
  }
  const naive = naiveMask(48, oneStream(rng));
  assert.ok(inverseResidual(naive.m, naive.inv) < 1e-9);
  assert.ok(conditionNumber(naive.m, naive.inv) > 10, 'a Gaussian matrix is badly conditioned');
  const p = randomPermutation(50, rng);
  assert.deepEqual([...p].sort((a, b) => a - b), Array.from({ length: 50 }, (_, i) => i));
  const ip = invertPermutation(p);
  for (let i = 0; i < 50; i++) assert.equal(ip[p[i]], i);
  const singular: Mat64 = { rows: 3, cols: 3, data: new Float64Array([1, 2, 3, 2, 4, 6, 0, 1, 1]) };
  assert.throws(() => inverseLU(singular), /singular/);
  assert.throws(() => inverseLU({ rows: 2, cols: 2, data: new Float64Array([1, NaN, 0, 1]) }), /non-finite/);
  assert.throws(() => parseMaskSpec('0.5'), /kappa must be/);
  // same key, same masks; a different key, different masks
  const c = getPreset('gpt2-micro');
  const par = { mode: 'paper' as const, spec: { kind: 'kappa' as const, kappa: 10 }, twoSided: false, headPermutation: true };
  const a = deriveMasks(c, KeyedRng.fromSeed(5).key, par);
  const b = deriveMasks(c, KeyedRng.fromSeed(5).key, par);
  const d = deriveMasks(c, KeyedRng.fromSeed(6).key, par);
  assert.deepEqual(a.layers[1].R2!.m.data, b.layers[1].R2!.m.data);
  assert.notDeepEqual(a.layers[1].R2!.m.data, d.layers[1].R2!.m.data);
  // a Haar cache does not change the masks
  const cached = deriveMasks(c, KeyedRng.fromSeed(5).key, par, undefined, new Map());
  assert.deepEqual(a.layers[0].R1!.m.data, cached.layers[0].R1!.m.data);
});

test('float64 check of one sealed block against the plain block (~1e-14)', () => {
  // one GPT-2 block in float64, plain and sealed (rotated residual, LN stats in the masked
  // basis, LN affine folded, per-head masks, hidden permutation), from the same weights
  const d = 16, H = 2, dh = 8, n = 5, eps = 1e-5;
  const rng = new Rng(3);
  const R = (r: number, c: number, s = 0.3): Mat64 => { const m: Mat64 = { rows: r, cols: c, data: new Float64Array(r * c) }; rng.fillNormal(m.data, s); return m; };
  const h = R(n, d, 1), Wqkv = R(d, 3 * d), bqkv = R(1, 3 * d), Wo = R(d, d), bo = R(1, d), Wfc = R(d, 4 * d), bfc = R(1, 4 * d), Wp = R(4 * d, d), bp = R(1, d);
  const g1 = R(1, d, 0.2), be1 = R(1, d), g2 = R(1, d, 0.2), be2 = R(1, d);
  for (const g of [g1, g2]) for (let i = 0; i < d; i++) g.data[i] += 1;
  const addRow = (X: Mat64, b: Mat64) => { for (let i = 0; i < X.rows; i++) for (let j = 0; j < X.cols; j++) X.data[i * X.cols + j] += b.data[j]; return X; };
  const ln = (X: Mat64, g: Mat64 | null, b: Mat64 | null, u: Float64Array | null): Mat64 => {
    const out: Mat64 = { rows: X.rows, cols: d, data: new Float64Array(X.rows * d) };
    for (let i = 0; i < X.rows; i++) {
      const row = X.data.subarray(i * d, (i + 1) * d);
      let mean = 0; for (let j = 0; j < d; j++) mean += row[j] * (u ? u[j] : 1); mean /= d;
      let v = 0; for (let j = 0; j < d; j++) { const c = row[j] - mean * (u ? u[j] : 1); v += c * c; } v /= d;
      for (let j = 0; j < d; j++) out.data[i * d + j] = ((row[j] - mean * (u ? u[j] : 1)) / Math.sqrt(v + eps)) * (g ? g.data[j] : 1) + (b ? b.data[j] : 0);
    }
    return out;
  };
  const attn = (qkv: Mat64): Mat64 => {
    const o: Mat64 = { rows: n, cols: d, data: new Float64Array(n * d) };
    for (let hh = 0; hh < H; hh++) for (let t = 0; t < n; t++) {
      const s: number[] = [];
      for (let u = 0; u <= t; u++) { let x = 0; for (let j = 0; j < dh; j++) x += qkv.data[t * 3 * d + hh * dh + j] * qkv.data[u * 3 * d + d + hh * dh + j]; s.push(x / Math.sqrt(dh)); }
      const mx = Math.max(...s); const e = s.map((x) => Math.exp(x - mx)); const z = e.reduce((a, b) => a + b, 0);
      for (let j = 0; j < dh; j++) { let x = 0; for (let u = 0; u <= t; u++) x += (e[u] / z) * qkv.data[u * 3 * d + 2 * d + hh * dh + j]; o.data[t * d + hh * dh + j] = x; }
    }
    return o;
  };
  const gelu = (X: Mat64) => { const Y = { ...X, data: X.data.map((x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)))) }; return Y; };
  const add = (X: Mat64, Y: Mat64) => ({ ...X, data: X.data.map((x, i) => x + Y.data[i]) });
  // plain block
  const h2 = add(h, addRow(matmul(attn(addRow(matmul(ln(h, g1, be1, null), Wqkv), bqkv)), Wo), bo));
  const plainOut = add(h2, addRow(matmul(gelu(addRow(matmul(ln(h2, g2, be2, null), Wfc), bfc)), Wp), bp));
  // masks
  const key = KeyedRng.fromSeed(9);
  const Q = haarOrthogonal(d, key);
  const A = [0, 1].map(() => kappaMask(dh, 3, oneStream(key)));
  const B = [0, 1].map(() => kappaMask(dh, 3, oneStream(key)));
  const blockdiag = (ms: Mat64[]) => { const M = { rows: d, cols: d, data: new Float64Array(d * d) }; ms.forEach((m, k) => { for (let i = 0; i < dh; i++) for (let j = 0; j < dh; j++) M.data[(k * dh + i) * d + k * dh + j] = m.data[i * dh + j]; }); return M; };
  const MA = blockdiag(A.map((x) => x.m)), MK = blockdiag(A.map((x) => transpose(x.inv))), MB = blockdiag(B.map((x) => x.m)), MBinv = blockdiag(B.map((x) => x.inv));
  const Mqkv = { rows: 3 * d, cols: 3 * d, data: new Float64Array(9 * d * d) };
  [MA, MK, MB].forEach((M, s) => { for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) Mqkv.data[(s * d + i) * 3 * d + s * d + j] = M.data[i * d + j]; });
  const pi = randomPermutation(4 * d, key);
  const Pi = { rows: 4 * d, cols: 4 * d, data: new Float64Array(16 * d * d) };
  for (let j = 0; j < 4 * d; j++) Pi.data[pi[j] * 4 * d + j] = 1; // f Pi: column j = f column pi[j]
  const diag = (g: Mat64) => { const D = identity(d); for (let i = 0; i < d; i++) D.data[i * d + i] = g.data[i]; return D; };
  const QT = transpose(Q);
  const Wqkv_s = matmul(matmul(matmul(QT, diag(g1)), Wqkv), Mqkv), bqkv_s = matmul(add(matmul(be1, Wqkv), bqkv), Mqkv);
  const Wo_s = matmul(matmul(MBinv, Wo), Q), bo_s = matmul(bo, Q);
  const Wfc_s = matmul(matmul(matmul(QT, diag(g2)), Wfc), Pi), bfc_s = matmul(add(matmul(be2, Wfc), bfc), Pi);
  const Wp_s = matmul(matmul(transpose(Pi), Wp), Q), bp_s = matmul(bp, Q);
  const u = new Float64Array(d); for (let i = 0; i < d; i++) for (let k = 0; k < d; k++) u[i] += Q.data[k * d + i];
  // sealed block on h* = h Q
  const hs = matmul(h, Q);
  const h2s = add(hs, addRow(matmul(attn(addRow(matmul(ln(hs, null, null, u), Wqkv_s), bqkv_s)), Wo_s), bo_s));
  const outS = add(h2s, addRow(matmul(gelu(addRow(matmul(ln(h2s, null, null, u), Wfc_s), bfc_s)), Wp_s), bp_s));
  const back = matmul(outS, QT);
  const err = maxAbsDiff(back.data, plainOut.data);
  assert.ok(err < 1e-12, `float64 sealed block differs from the plain block by ${err}`);
});

for (const [mode, spec, twoSided] of [['sealed', '1', false], ['paper', '1', false], ['paper', '1', true], ['sealed', '10', false]] as const) {
  test(`split logits equal plain logits: ${mode} mode, kappa ${spec}${twoSided ? ', two-sided' : ''} (tiny fixture and a random model)`, async () => {
    for (const model of [new GPT2(loadCheckpoint(path.join(FIX, 'tiny'))), perturbedModel('gpt2-tiny', 4)]) {
      const T = 24;
      const tokens = randomTokens(2 * T, model.config.vocab_size, 5);
      const plain = Float32Array.from((await model.forward(tokens, 2, T)).logits);
      const r = obfuscateWeights(model.weights(), { mode, spec: parseMaskSpec(spec), twoSided, seed: 7 });
      const { enclave } = inProcessSplit(r, { serialize: true });
      const split = await enclave.forward(tokens, 2, T);
      const c = compareLogits(plain, split, 2 * T, model.config.vocab_size);
      assert.ok(c.max_abs_logit_err <= 1e-3, `max |logit error| ${c.max_abs_logit_err}`);
      assert.equal(c.top1_agreement, 1);
      // the provider's inverse recovers the plain weights
      const back = deobfuscate(model.weights(), r.accelerator, r.enclave.tensors, deriveMasks(model.config, r.key, r.params));
      const e = maxAbsDiff(back.params, model.params);
      assert.ok(e < 1e-5, `deobfuscate round trip error ${e}`);
    }
  });
}

test('paper mode: logit error grows with the condition number; naive masks are worst', async () => {
  const model = perturbedModel('gpt2-mini', 2);
  const T = 32;
  const tokens = randomTokens(T, model.config.vocab_size, 6);
  const plain = Float32Array.from((await model.forward(tokens, 1, T)).logits);
  const errs: number[] = [];
  for (const spec of ['1', '100', '10000', 'naive']) {
    const r = obfuscateWeights(model.weights(), { mode: 'paper', spec: parseMaskSpec(spec), seed: 8 });
    const split = await inProcessSplit(r).enclave.forward(tokens, 1, T);
    errs.push(compareLogits(plain, split, T, model.config.vocab_size).mean_abs_logit_err);
  }
  assert.ok(errs[0] < errs[1] && errs[1] < errs[2], `error increases with kappa: ${errs}`);
  assert.ok(errs[3] > errs[0] * 10, `naive masks are much worse than orthogonal ones: ${errs}`);
});

test('classification head and generation through the split match the plain model', async () => {
  const w = loadCheckpoint(path.join(FIX, 'tiny-cls'));
  const model = new GPT2(w);
  const tokens = randomTokens(3 * 10, 512, 9);
  tokens.fill(0, 25, 30);
  const plain = Float32Array.from((await model.forwardCls(tokens, 3, 10)).logits);
  for (const mode of ['sealed', 'paper'] as const) {
    const r = obfuscateWeights(w, { mode, seed: 10 });
    const split = await inProcessSplit(r).enclave.forwardCls(tokens, 3, 10);
    assert.ok(maxAbsDiff(split, plain) < 1e-4, `${mode} classification logits`);
    const prompt = [5, 17, 300, 2];
    const want = await generate(model, prompt, { maxNewTokens: 12 });
    const got = await inProcessSplit(r).enclave.generate(prompt, { maxNewTokens: 12 });
    assert.deepEqual(got, want, `${mode}: greedy generation with the enclave's KV cache`);
  }
  // a mean-pooled head: the enclave bundle on disk and a saved checkpoint keep the pooling
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-pool-'));
  try {
    const wm = { ...w, cls: { ...w.cls!, pooling: 'mean' as const } };
    const meanPlain = Float32Array.from((await new GPT2(wm).forwardCls(tokens, 3, 10)).logits);
    assert.ok(maxAbsDiff(meanPlain, plain) > 1e-3, 'mean and last pooling differ');
    const r = obfuscateWeights(wm, { mode: 'sealed', seed: 11 });
    writeObfuscation(path.join(dir, 'b'), r);
    const enc = loadEnclaveBundle(path.join(dir, 'b', 'enclave'));
    assert.equal(enc.cls?.pooling, 'mean');
    const split = await new Enclave(enc, new InProcessLink(new Accelerator(r.accelerator))).forwardCls(tokens, 3, 10);
    assert.ok(maxAbsDiff(split, meanPlain) < 1e-4, 'mean-pooled classification through the split');
    saveCheckpoint(path.join(dir, 'ckpt'), wm);
    const back = loadCheckpoint(path.join(dir, 'ckpt'));
    assert.equal(back.cls?.pooling, 'mean');
    assert.ok(maxAbsDiff((await new GPT2(back).forwardCls(tokens, 3, 10)).logits, meanPlain) < 1e-6);
    const cfgFile = path.join(dir, 'ckpt', 'config.json');
    writeFileSync(cfgFile, readFileSync(cfgFile, 'utf8').replace('"obfuscatune_pooling": "mean"', '"obfuscatune_pooling": "max"'));
    assert.throws(() => loadCheckpoint(path.join(dir, 'ckpt')), /obfuscatune_pooling="max" is not one of last, mean/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('sealed mode: the accelerator sees no row close to its plaintext (|cosine| <= 0.5), except the permuted MLP hidden', async () => {
  const model = perturbedModel('gpt2-mini', 12);
  const { n_embd: d, n_layer: L } = model.config;
  const B = 2, T = 32, n = B * T;
  const tokens = randomTokens(n, model.config.vocab_size, 13);
  // a training forward keeps every layer's activations
  await model.forward(tokens, B, T, new Int32Array(n));
  const a = model.lastActivations()!;
  const r = obfuscateWeights(model.weights(), { mode: 'sealed', seed: 14 });
  const { enclave, link } = inProcessSplit(r);
  const seen: CrossingEvent[] = [];
  link.observers.push((e) => seen.push({ ...e, data: Float32Array.from(e.data) }));
  await enclave.forward(tokens, B, T);
  assert.equal(seen.length, L * 8, 'four requests and four replies per layer');
  const slice = (buf: Float32Array, l: number, w: number) => buf.subarray(l * n * w, (l + 1) * n * w);
  const diff = (x: Float32Array, y: Float32Array) => x.map((v, i) => v - y[i]);
  const cos = (x: Float32Array, y: Float32Array) => {
    let s = 0, nx = 0, ny = 0;
    for (let i = 0; i < x.length; i++) { s += x[i] * y[i]; nx += x[i] * x[i]; ny += y[i] * y[i]; }
    return s / Math.sqrt(nx * ny + 1e-30);
  };
  let checked = 0;
  let worst = 0;
  for (const e of seen) {
    const l = e.layer!;
    const la = a.layers[l];
    const next = l + 1 < L ? a.layers[l + 1].hIn : a.hL;
    let plain: Float32Array | null = null;
    const key = `${e.name}:${e.direction}`;
    switch (key) {
      case 'qkv:to_accelerator': plain = la.n1.out; break;
      case 'qkv:to_enclave': plain = la.qkv; break;
      case 'attproj:to_accelerator': plain = la.o; break;
      case 'attproj:to_enclave': plain = diff(la.h2, la.hIn); break;
      case 'fc:to_accelerator': plain = la.n2.out; break;
      case 'fcproj:to_enclave': plain = diff(next, la.h2); break;
      case 'fc:to_enclave': case 'fcproj:to_accelerator': {
        // the MLP hidden is only permuted: each row is a permutation of the plaintext row
        const p = key === 'fc:to_enclave' ? la.f : la.g;
        const row = (x: Float32Array, i: number) => Array.from(x.subarray(i * 4 * d, (i + 1) * 4 * d)).sort((u, v) => u - v);
        assert.ok(maxAbsDiff(row(e.data, 3), row(p, 3)) < 1e-4, 'MLP hidden rows are permutations of the plaintext (a documented weak point)');
        continue;
      }
    }
    assert.ok(plain, `unexpected crossing ${key}`);
    const w = e.cols;
    for (let i = 0; i < e.rows; i++) {
      const c = Math.abs(cos(e.data.subarray(i * w, (i + 1) * w), plain!.subarray(i * w, (i + 1) * w)));
      worst = Math.max(worst, c);
      assert.ok(c <= 0.5, `${key} layer ${l} row ${i}: |cosine| with the plaintext is ${c.toFixed(3)}`);
      checked++;
    }
  }
  assert.ok(checked >= L * 6 * n, `checked ${checked} rows`);
  assert.ok(worst < 0.5, `worst |cosine| ${worst}`);
});

test('bundles on disk: round trip, hash pinning, mode and shape errors, deobfuscate', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-bundle-'));
  try {
    const model = perturbedModel('gpt2-micro', 20);
    const r = obfuscateWeights(model.weights(), { mode: 'sealed', seed: 21 });
    writeObfuscation(path.join(dir, 'a'), r);
    const enc = loadEnclaveBundle(path.join(dir, 'a', 'enclave'));
    const acc = loadAcceleratorBundle(path.join(dir, 'a', 'accelerator'));
    checkBundlePair(enc, acc);
    const keyText = readFileSync(path.join(dir, 'a', 'provider', 'secret.json'), 'utf8');
    assert.ok(!readFileSync(path.join(dir, 'a', 'accelerator', 'manifest.json'), 'utf8').includes(JSON.parse(keyText).key_hex), 'no key in the accelerator bundle');
    const back = deobfuscateDirs(model.weights(), path.join(dir, 'a', 'accelerator'), path.join(dir, 'a', 'enclave'), path.join(dir, 'a', 'provider'));
    assert.ok(maxAbsDiff(back.params, model.params) < 1e-5);
    // a second obfuscation (other key, other mode) does not pair with the first
    const r2 = obfuscateWeights(model.weights(), { mode: 'paper', seed: 22 });
    writeObfuscation(path.join(dir, 'b'), r2);
    const acc2 = loadAcceleratorBundle(path.join(dir, 'b', 'accelerator'));
    assert.throws(() => checkBundlePair(enc, acc2), /bundle mismatch/);
    // tampered weights are detected by the manifest hash
    const wfile = path.join(dir, 'a', 'accelerator', 'weights.safetensors');
    const bytes = readFileSync(wfile);
    bytes[bytes.length - 3] ^= 0xff;
    writeFileSync(wfile, bytes);
    assert.throws(() => loadAcceleratorBundle(path.join(dir, 'a', 'accelerator')), /does not match the SHA-256/);
    // an enclave bundle with a non-finite or a missing tensor does not load
    const encDir = path.join(dir, 'a', 'enclave');
    rewriteEnclave(encDir, (ts) => ts.map((t) => t.name === 'u' ? { ...t, data: Float32Array.from(t.data, (v, i) => i === 2 ? NaN : v) } : t));
    assert.throws(() => loadEnclaveBundle(encDir), (e: Error) => e instanceof BundleError && /tensor "u" contains a non-finite value at 2/.test(e.message));
    writeObfuscation(path.join(dir, 'a'), r);
    rewriteEnclave(encDir, (ts) => ts.filter((t) => t.name !== 'G'));
    assert.throws(() => loadEnclaveBundle(encDir), (e: Error) => e instanceof BundleError && /lacks tensor "G"/.test(e.message));
    // a paper-mode enclave bundle presented as sealed, on disk and in memory
    const paperDir = path.join(dir, 'b', 'enclave');
    const mfile = path.join(paperDir, 'manifest.json');
    writeFileSync(mfile, readFileSync(mfile, 'utf8').replace('"mode": "paper"', '"mode": "sealed"'));
    assert.throws(() => loadEnclaveBundle(paperDir), /lacks tensor/);
    assert.throws(() => new Enclave({ ...r2.enclave, mode: 'sealed' }, new InProcessLink(new Accelerator(r2.accelerator))), /tensors are paper mode/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('loading an enclave bundle checks each tensor and names it; int32 permutations on disk, float32 ones of older bundles load', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-load-'));
  try {
    const model = perturbedModel('gpt2-micro', 23);
    const { n_embd: d, n_ctx: T, vocab_size: V } = model.config;
    const r = obfuscateWeights(model.weights(), { mode: 'paper', twoSided: true, seed: 24 });
    const encDir = path.join(dir, 'enclave');
    const sameTensors = (got: object) => {
      for (const [k, v] of Object.entries(r.enclave.tensors)) assert.deepEqual((got as Record<string, unknown>)[k], v, k);
    };
    writeObfuscation(dir, r);
    const st = openSafetensors(path.join(encDir, 'tensors.safetensors'));
    assert.equal(st.info('pi').dtype, 'I32');
    assert.deepEqual(st.info('wte').shape, [V, d]);
    sameTensors(loadEnclaveBundle(encDir).tensors);
    const refused = (edit: (t: TensorToWrite) => TensorToWrite | null, re: RegExp) => {
      writeObfuscation(dir, r);
      rewriteEnclave(encDir, (ts) => ts.map(edit).filter((t): t is TensorToWrite => t !== null));
      assert.throws(() => loadEnclaveBundle(encDir), (e: Error) => e instanceof BundleError && re.test(e.message));
    };
    const change = (name: string, f: (t: TensorToWrite) => Partial<TensorToWrite>) => (t: TensorToWrite) => t.name === name ? { ...t, ...f(t) } : t;
    // a permutation row that is not a permutation: a repeated entry, one out of range
    refused(change('pi', (t) => ({ data: Int32Array.from(t.data, (v, i) => i === 4 * d + 1 ? t.data[4 * d] : v) })), /tensor "pi" row 1 is not a permutation of 0\.\.63/);
    refused(change('headPerm', (t) => ({ data: Int32Array.from(t.data, (v, i) => i === 0 ? 2 : v) })), /tensor "headPerm" row 0 is not a permutation of 0\.\.1/);
    // wrong shapes: a row short, and as many values in another shape
    refused(change('wpe', (t) => ({ shape: [T - 1, d], data: t.data.subarray(0, (T - 1) * d) })), /tensor "wpe" has shape \[15, 16\], expected \[16, 16\]/);
    refused(change('R1', (t) => ({ shape: [t.shape[0], d * d] })), /tensor "R1" has shape \[2, 256\], expected \[2, 16, 16\]/);
    // missing tensors, and integrity vectors that are missing, short or not finite
    refused((t) => t.name === 'RpInv' ? null : t, /lacks tensor "RpInv"/);
    refused((t) => t.name === 'chk.1.fc.v' ? null : t, /lacks tensor "chk\.1\.fc\.v"/);
    refused(change('chk.0.qkv.r', (t) => ({ shape: [t.data.length - 1], data: t.data.subarray(1) })), /tensor "chk\.0\.qkv\.r" has shape \[95\], expected \[48, 2\]/);
    refused(change('chk.0.qkv.w', (t) => ({ data: Float32Array.from(t.data, (v, i) => i === 3 ? Infinity : v) })), /tensor "chk\.0\.qkv\.w" contains a non-finite value at 3/);
    // an older bundle: every tensor flat float32, the permutations too; it loads as the same tensors and runs
    const flat = (t: TensorToWrite): TensorToWrite => ({ name: t.name, dtype: 'F32', shape: [t.data.length], data: Float32Array.from(t.data) });
    writeObfuscation(dir, r);
    rewriteEnclave(encDir, (ts) => ts.map(flat));
    const old = loadEnclaveBundle(encDir);
    sameTensors(old.tensors);
    const tokens = randomTokens(8, V, 25);
    const want = await inProcessSplit(r).enclave.forward(tokens, 1, 8);
    assert.deepEqual(await new Enclave(old, new InProcessLink(new Accelerator(r.accelerator))).forward(tokens, 1, 8), want);
    refused((t) => t.name === 'pi' ? { ...flat(t), data: Float32Array.from(t.data, (v, i) => i === 5 ? v + 0.5 : v) } : flat(t), /tensor "pi" row 0 is not a permutation/);
    // a trained update merged in place of the bundle's tensors (the provider's merge) is checked the same way
    writeObfuscation(dir, r);
    const b = loadEnclaveBundle(encDir), file = path.join(dir, 'update.safetensors');
    const update = (ts: TensorToWrite[]) => { writeSafetensors(file, ts); return withUpdate(b, openSafetensors(file), 'enclave.'); };
    const wte = Float32Array.from(b.tensors.wte, (v) => v + 1), score = new Float32Array(3 * d).fill(0.5);
    const merged = update([{ name: 'enclave.wte', dtype: 'F32', shape: [wte.length], data: wte }, { name: 'enclave.score', dtype: 'F32', shape: [score.length], data: score }, { name: 'other', dtype: 'F32', shape: [1], data: new Float32Array(1) }]);
    assert.deepEqual([merged.wte, merged.score, (merged as ObfuscatedTensors).wpe], [wte, score, (b.tensors as ObfuscatedTensors).wpe]);
    assert.throws(() => update([{ name: 'enclave.wte', dtype: 'F32', shape: [3], data: new Float32Array(3) }]), /tensor "enclave\.wte" has shape \[3\], expected \[64, 16\]/);
    assert.throws(() => update([{ name: 'enclave.pi', dtype: 'I32', shape: [2], data: new Int32Array(2) }]), /unexpected tensor "enclave\.pi"/);
    assert.throws(() => update([{ name: 'enclave.lnfb', dtype: 'F32', shape: [d], data: new Float32Array(d).fill(NaN) }]), /tensor "enclave\.lnfb" contains a non-finite value at 0/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the boundary: wrong shapes, non-finite values, unknown layers and malformed frames are refused', async () => {
  const model = perturbedModel('gpt2-micro', 30);
  const r = obfuscateWeights(model.weights(), { mode: 'sealed', seed: 31 });
  const acc = new Accelerator(r.accelerator);
  const d = model.config.n_embd;
  const bad1 = acc.handle({ op: 'linear_forward', layer: 0, name: 'qkv', rows: 2, x: asObfuscated(new Float32Array(2 * d + 1)) });
  assert.equal(bad1.op, 'error');
  assert.match((bad1 as { message: string }).message, /expected 2 x 16/);
  const nan = new Float32Array(2 * d); nan[3] = NaN;
  const bad2 = acc.handle({ op: 'linear_forward', layer: 0, name: 'qkv', rows: 2, x: asObfuscated(nan) });
  assert.match((bad2 as { message: string }).message, /non-finite/);
  const bad3 = acc.handle({ op: 'linear_forward', layer: 9, name: 'qkv', rows: 2, x: asObfuscated(new Float32Array(2 * d)) });
  assert.match((bad3 as { message: string }).message, /no layer 9/);
  // codec round trip and malformed frames
  const req = { op: 'linear_forward' as const, layer: 1, name: 'fc' as const, rows: 2, x: asObfuscated(Float32Array.from({ length: 2 * d }, (_, i) => i / 7)) };
  const back = decodeMessage(encodeMessage(req)) as typeof req;
  assert.deepEqual(Array.from(back.x), Array.from(req.x));
  assert.equal(back.name, 'fc');
  const frame = encodeMessage(req);
  assert.throws(() => decodeMessage(frame.subarray(0, frame.length - 4)), /truncated/);
  assert.throws(() => decodeMessage(Buffer.concat([frame, Buffer.alloc(4)])), /trailing/);
  assert.throws(() => decodeMessage(frame, 16), /exceeds/);
  const evil = Buffer.from(frame);
  evil.write('{"op":"steal_tokens"', 4);
  assert.throws(() => decodeMessage(evil), /JSON|unknown message op/);
  assert.throws(() => decodeMessage(encodeMessage({ ...req, name: 'wte' as never })), /unknown linear "wte"/);
  // the enclave rejects a reply of the wrong shape or with NaN from a lying accelerator
  for (const lie of ['shape', 'nan'] as const) {
    const link = {
      async call(q: Parameters<InProcessLink['call']>[0]) {
        const rep = acc.handle(q);
        if (rep.op !== 'tensor') return rep;
        if (lie === 'shape') return { ...rep, cols: rep.cols - 1, data: rep.data.subarray(0, rep.rows * (rep.cols - 1)) };
        const data = Float32Array.from(rep.data); data[0] = NaN;
        return { ...rep, data };
      },
    };
    const enclave = new Enclave(r.enclave, link);
    await assert.rejects(enclave.forward(new Int32Array([1, 2, 3]), 1, 3), lie === 'shape' ? /has shape/ : /non-finite/);
  }
});

test('share: sealed-mode enclave share of gpt2-xl is about 5% of parameters and under 10% of FLOPs at T=512', () => {
  const rows = shareTable(512);
  assert.equal(rows.filter((r) => r.mode === 'sealed').length, 4);
  const xl = rows.find((r) => r.model === 'gpt2-xl' && r.mode === 'sealed')!;
  assert.ok(xl.enclave_param_share <= 0.055, `param share ${xl.enclave_param_share}`);
  assert.ok(xl.enclave_flop_share <= 0.1, `FLOP share ${xl.enclave_flop_share}`);
  assert.equal(xl.enclave_mask_bytes, 0, 'sealed mode needs no per-layer mask at run time');
  const paper = rows.find((r) => r.model === 'gpt2-xl' && r.mode === 'paper' && !r.two_sided)!;
  assert.ok(paper.enclave_param_share > xl.enclave_param_share && paper.enclave_flop_share > xl.enclave_flop_share);
  // the parameter counts agree with a real obfuscation
  const c = getPreset('gpt2-micro');
  const m = GPT2.random(c, 1);
  const r = obfuscateWeights(m.weights(), { mode: 'sealed', seed: 1 });
  let encParams = 0;
  let chk = 0;
  let extra = 0;
  const loraExtras = new Set(['Q', 'ln1w', 'ln1b', 'ln2w', 'ln2b', 'hA', 'hAinvT', 'hB', 'hBinv', 'headPerm', 'pi']);
  const { chk: vectors, ...fields } = r.enclave.tensors;
  for (const layer of vectors!) for (const v of Object.values(layer)) for (const t of Object.values(v)) chk += t.length;
  for (const [k, t] of Object.entries(fields)) {
    if (!(t instanceof Float32Array || t instanceof Int32Array)) continue;
    if (loraExtras.has(k)) extra += t.length; else encParams += t.length;
  }
  let accParams = 0;
  for (const l of r.accelerator.layers) for (const x of Object.values(l)) accParams += x.w.length + x.b.length;
  const row = shareRow('gpt2-micro', c, 'sealed', 16);
  assert.equal(row.enclave_params, encParams);
  assert.equal(row.enclave_integrity_bytes, 4 * chk);
  assert.equal(row.enclave_lora_extra_bytes, 4 * extra);
  assert.equal(row.accelerator_params, accParams);
});

test('share --family llama: the parameter counts of the published configs; Llama-2-7B sealed with full q/k masks keeps <= 5% of parameters and <= 12% of FLOPs at T=512; rotation blocks cost less', () => {
  // published totals: TinyLlama 1.100B, Llama-3.2-1B 1.236B (tied head), Llama-2-7B 6.738B
  const published: Record<string, number> = { 'tinyllama-1.1b': 1.1001e9, 'llama-3.2-1b': 1.2358e9, 'llama-2-7b': 6.7385e9 };
  for (const [name, n] of Object.entries(published)) {
    const got = llamaParamCount(LLAMA_SHAPES[name]);
    assert.ok(Math.abs(got - n) / n < 1e-3, `${name}: ${got} parameters, published ${n}`);
  }
  const rows = llamaShareTable(512);
  const full = rows.find((r) => r.model === 'llama-2-7b' && r.mode === 'sealed' && r.rotary === 'full-masks')!;
  const blocks = rows.find((r) => r.model === 'llama-2-7b' && r.mode === 'sealed' && r.rotary === 'rotation-blocks')!;
  assert.ok(full.enclave_param_share <= 0.05, `param share ${full.enclave_param_share}`);
  assert.ok(full.enclave_flop_share <= 0.12, `FLOP share ${full.enclave_flop_share}`);
  assert.ok(blocks.enclave_param_share < full.enclave_param_share && blocks.enclave_flop_share < full.enclave_flop_share);
  assert.equal(full.accelerator_params + full.enclave_params - full.enclave_mask_bytes / 4 - 4096 * 4096, llamaParamCount(LLAMA_SHAPES['llama-2-7b']) - 32 * 2 * 4096 - 4096);
  const paper = rows.find((r) => r.model === 'llama-2-7b' && r.mode === 'paper')!;
  assert.ok(paper.enclave_param_share > full.enclave_param_share);
  // grouped-query attention: TinyLlama's qkv call returns d + 2 kvh hd = 2048 + 512 values per token
  const t = llamaShareRow('t', LLAMA_SHAPES['tinyllama-1.1b'], 'sealed', 1);
  assert.equal(t.accelerator_params, 22 * (2048 * 2560 + 2048 * 2048 + 3 * 2048 * 5632));
  assert.throws(() => llamaShareTable(512, ['llama-9']), /unknown Llama preset "llama-9"/);
});
