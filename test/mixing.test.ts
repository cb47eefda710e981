// Defence 1, per-call token mixing: exact through the split (inference, generation, LoRA and
// full fine-tuning), what crosses is mixed and shielded, a lying accelerator is still caught.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync } from 'node:fs';
import { GPT2 } from '../src/model/gpt2.js';
import { getPreset } from '../src/model/config.js';
import { generate } from '../src/model/transformer.js';
import { KeyedRng, Rng } from '../src/tensor/rng.js';
import { obfuscateWeights } from '../src/obfuscate/provider.js';
import { Enclave, inProcessSplit } from '../src/enclave/enclave.js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { InProcessLink, type CrossingEvent } from '../src/protocol/link.js';
import { MixedLinears, MIXING_DEFAULTS, shieldRows, butterflyShape, type MixingConfig } from '../src/enclave/mixing.js';
import { buildSession } from '../src/train/session.js';
import { runFinetune } from '../src/train/finetune.js';
import { parseRunSpec, toFinetuneConfig, mixingOf, parseMixingSettings, RunSpecError } from '../src/train/run_spec.js';
import type { EncodedSet } from '../src/io/jsonl.js';
import { recordEnclave } from '../src/attacks/record.js';
import { loadView } from '../src/protocol/view.js';
import { IntegrityError } from '../src/errors.js';
import { linearDims, type LinearName } from '../src/model/block.js';
import { sgemm } from '../src/tensor/gemm.js';
import { asObfuscated, type Obfuscated } from '../src/protocol/messages.js';
import { maxAbsDiff, relErr, patternData } from './helpers.js';

const MIX = MIXING_DEFAULTS;
const DENSE: MixingConfig = { ...MIXING_DEFAULTS, scheme: 'dense', shields: 'all' };


test('inference and generation with token mixing equal the plain model (sealed and paper); the accelerator gets n + s mixed rows', async () => {
  const m = GPT2.random(getPreset('gpt2-micro'), 3);
  const toks = Int32Array.from({ length: 24 }, (_, i) => (i * 5 + 1) % 64);
  const plain = Float32Array.from((await m.forward(toks, 2, 12)).logits);
  for (const mode of ['sealed', 'paper'] as const) {
    const r = obfuscateWeights(m.weights(), { mode, spec: { kind: 'kappa', kappa: 10 }, seed: 4 });
    // the rows of layer 0's four calls: 24 real rows, widths 16 (qkv, attproj, fc) and 64 (fcproj)
    const cases: [MixingConfig, number[]][] = [
      [MIX, [32, 32, 32, 32]], // 24 >= the width of layer 0's qkv: no shields needed, 8 rows fill the radices (16, 2)
      [{ ...MIX, block: 4, rounds: 2, shields: 'all' }, [24, 24, 24, 64]],
      [{ ...MIX, kappa: 1, shields: 'none' }, [32, 32, 32, 32]],
      [DENSE, [24, 24, 24, 64]],
      [{ ...DENSE, kappa: 100, block: 8 }, [48, 48, 48, 192]], // blocks of 8 real rows, each padded to the width
    ];
    for (const [mix, want] of cases) {
      const { enclave, link } = inProcessSplit(r, { mixing: mix, mixingRng: KeyedRng.fromSeed(5) });
      const seen: CrossingEvent[] = [];
      link.observers.push((e) => { if (e.direction === 'to_accelerator') seen.push(e); });
      const y = await enclave.forward(toks, 2, 12);
      assert.ok(maxAbsDiff(y, plain) < 1e-3, `${mode} ${JSON.stringify(mix)}: max logit error ${maxAbsDiff(y, plain)}`);
      assert.deepEqual(seen.map((e) => e.rows).slice(0, 4), want, JSON.stringify(mix));
      // the first sent rows are not the obfuscated rows: mixed
      const direct = inProcessSplit(r);
      const first: Float32Array[] = [];
      direct.link.observers.push((e) => { if (e.direction === 'to_accelerator' && first.length === 0) first.push(Float32Array.from(e.data)); });
      await direct.enclave.forward(toks, 2, 12);
      assert.ok(relErr(seen[0].data.subarray(0, 24 * 16), first[0]) > 0.3, 'the sent rows are mixtures');
    }
    const { enclave, link } = inProcessSplit(r, { mixing: MIX });
    const rows: number[] = [];
    link.observers.push((e) => { if (e.direction === 'to_accelerator' && e.op === 'linear_forward') rows.push(e.rows); });
    const prompt = [1, 2, 3, 4];
    assert.deepEqual(await enclave.generate(prompt, { maxNewTokens: 6 }), await generate(m, prompt, { maxNewTokens: 6 }), `${mode}: generation with mixing gives the plain tokens`);
    // a generated token is one row per call: shields take layer 0's qkv input to its width, the others to one block
    assert.ok(rows.length > 8 && rows.slice(8).every((x) => x === 16), `generation's calls: ${rows.slice(8, 16)}`);
  }
});

test('P 1 = 1 (the bias passes), P is fresh per call and not orthogonal; shields match the real rows\' norms', async () => {
  const m = GPT2.random(getPreset('gpt2-micro'), 7);
  const r = obfuscateWeights(m.weights(), { mode: 'sealed', spec: { kind: 'kappa', kappa: 1 }, seed: 8 });
  const sent: Float32Array[] = [];
  const acc = new Accelerator(r.accelerator);
  const link = new InProcessLink(acc);
  link.observers.push((e) => { if (e.direction === 'to_accelerator' && e.name === 'qkv' && e.layer === 0) sent.push(Float32Array.from(e.data)); });
  const enc = new Enclave(r.enclave, link, { mixing: { ...MIX, shields: 'none' }, mixingRng: KeyedRng.fromSeed(1) });
  // identical rows: X = 1 x^T, so P X = (P 1) x^T = X exactly when P 1 = 1
  const toks = new Int32Array(8).fill(5);
  const pos0 = Int32Array.from([5]);
  await enc.forward(toks.subarray(0, 1), 1, 1);
  const one = sent.pop()!;
  sent.length = 0;
  // a batch of the same (token, position) four times: rows equal before mixing
  await enc.forward(Int32Array.from([5, 5, 5, 5]), 4, 1);
  const x = sent.pop()!;
  for (let i = 0; i < 4; i++) assert.ok(maxAbsDiff(x.subarray(i * 16, (i + 1) * 16), one) < 1e-4, 'P 1 = 1 keeps a constant column constant');
  assert.ok(pos0.length === 1);
  // two calls on the same batch send different mixtures (fresh P), of different row Gram spectra
  await enc.forward(Int32Array.from([1, 2, 3, 4, 5, 6, 7, 8]), 1, 8);
  const a = sent.pop()!;
  await enc.forward(Int32Array.from([1, 2, 3, 4, 5, 6, 7, 8]), 1, 8);
  const b = sent.pop()!;
  assert.ok(relErr(a, b) > 0.3, 'a fresh P per call');
  const norms = (t: Float32Array) => Array.from({ length: 8 }, (_, i) => Math.hypot(...t.subarray(i * 16, (i + 1) * 16))).sort((p, q) => p - q);
  assert.ok(maxAbsDiff(norms(a), norms(b)) > 1e-2, 'not orthogonal: row norms change from call to call');
  // shields: norms drawn from the real rows', mean matched
  const rng = new Rng(2);
  const X = new Float32Array(6 * 32);
  for (let i = 0; i < 6; i++) for (let j = 0; j < 32; j++) X[i * 32 + j] = (i + 1) * 0.3 + Math.sin(i * j) + 0.1 * rng.normal();
  const S = shieldRows(X, 6, 32, 26, new Rng(3));
  const realNorms = Array.from({ length: 6 }, (_, i) => Math.hypot(...X.subarray(i * 32, (i + 1) * 32)));
  for (let i = 0; i < 26; i++) {
    const nrm = Math.hypot(...S.subarray(i * 32, (i + 1) * 32));
    assert.ok(realNorms.some((q) => Math.abs(q - nrm) < 1e-3 * q), `shield ${i} has a real row's norm`);
  }
});

async function finetune(mode: 'sealed' | 'paper', method: 'lora' | 'full', mixing: boolean, dir: string) {
  // sealed LoRA: the defaults; sealed full: the butterfly with shields on every call; paper full: the dense scheme
  const how = method === 'lora' ? {} : { mixing_shields: 'all', mixing_scheme: mode === 'paper' ? 'dense' : 'butterfly' };
  const spec = parseRunSpec({ mode, method, task: 'lm', steps: 6, batch: 4, lr: method === 'full' ? 0.05 : 1e-2, warmup: 1, seed: 3, checkpoint_every: 0, enclave_optimizer: method === 'full' ? 'sgd' : 'adamw', kappa: '10', token_mixing: mixing ? 'on' : 'off', ...how, ...(method === 'lora' ? { lora: { rank: 4, alpha: 8, targets: ['q', 'v', 'fc'] } } : {}) }, 'test');
  const w = GPT2.random(getPreset('gpt2-micro'), 9).weights();
  const sess = buildSession(w, { mode, method, task: 'lm', padTokenId: 0, seed: 11, maskSeed: 12, kappa: '10', lora: spec.lora ?? undefined, mixing: mixingOf(spec), mixingSeed: 13, acceleratorStateDir: path.join(dir, 'acc') });
  const s = await runFinetune(sess.model, patternData(32, 64, 12, 2), null, toFinetuneConfig(spec, 't'), dir, 0, { rng: sess.rng });
  return { sess, s };
}

test('fine-tuning with token mixing equals fine-tuning without it (LoRA and full, sealed and paper), integrity checks on', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-mix-'));
  try {
    for (const [mode, method] of [['sealed', 'lora'], ['sealed', 'full'], ['paper', 'full']] as const) {
      const plain = await finetune(mode, method, false, path.join(dir, `${mode}-${method}-off`));
      const mixed = await finetune(mode, method, true, path.join(dir, `${mode}-${method}-on`));
      assert.ok(mixed.sess.model.integrity && mixed.sess.model.integrity.checks > 0, 'replies were checked');
      const st = mixed.sess.model.mixingStats!;
      if (method === 'full') assert.ok(st.rowsSent > st.rowsReal && st.flopsSent > st.flopsReal, 'shields were sent');
      assert.ok(st.calls > 0 && st.mixFlops > 0);
      for (let i = 0; i < 6; i++) {
        const e = Math.abs(mixed.s.losses[i] - plain.s.losses[i]) / plain.s.losses[i];
        assert.ok(e < 1e-4, `${mode} ${method}: step ${i + 1} loss ${mixed.s.losses[i]} vs ${plain.s.losses[i]}`);
      }
      if (method === 'lora') assert.ok(relErr(mixed.sess.model.adapters!.params, plain.sess.model.adapters!.params) < 1e-3);
      else {
        const wa = mixed.sess.accelerator!.weights.layers[1].fcproj!.w, wb = plain.sess.accelerator!.weights.layers[1].fcproj!.w;
        assert.ok(relErr(wa, wb) < 1e-4, `${mode} full: the accelerator's trained weights agree (${relErr(wa, wb)})`);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('with token mixing a tampered accelerator reply is still caught, forward and backward', async () => {
  const m = GPT2.random(getPreset('gpt2-micro'), 5);
  const r = obfuscateWeights(m.weights(), { mode: 'sealed', spec: { kind: 'kappa', kappa: 10 }, seed: 6 });
  for (const op of ['linear_forward', 'linear_backward'] as const) {
    const acc = new Accelerator(r.accelerator);
    let tampered = 0;
    const evil = { handle: (q: Parameters<typeof acc.handle>[0]) => {
      const rep = acc.handle(q);
      if (q.op === op && rep.op === 'tensor' && q.layer === 1 && q.name === 'fc') { rep.data[7] += 0.05; tampered++; }
      return rep;
    } };
    const { SplitModel } = await import('../src/enclave/split_model.js');
    const model = new SplitModel({ mode: 'sealed', method: 'lora', task: 'lm', config: m.config, tensors: r.enclave.tensors, link: new InProcessLink(evil), rng: new Rng(1), lora: { rank: 2, alpha: 4, dropout: 0, targets: ['q', 'v'] }, mixing: MIX });
    const toks = Int32Array.from({ length: 16 }, (_, i) => 1 + i);
    const step = async () => { await model.forward(toks, 2, 8, toks, true); await model.backward(); };
    await assert.rejects(step(), IntegrityError, `${op}: the lie is caught`);
    assert.equal(tampered, 1);
  }
});

test('a view recorded with token mixing says so, and holds only the mixed rows', async () => {
  const m = GPT2.random(getPreset('gpt2-micro'), 2);
  const r = obfuscateWeights(m.weights(), { mode: 'sealed', spec: { kind: 'kappa', kappa: 1 }, seed: 3 });
  const { enclave } = inProcessSplit(r, { mixing: MIX });
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-mixv-'));
  try {
    const rec = recordEnclave(enclave, r.accelerator, { modelId: 'm', modelPath: null, padTokenId: null });
    await enclave.forward(Int32Array.from({ length: 8 }, (_, i) => i + 1), 1, 8);
    rec.save(path.join(dir, 'v.safetensors'));
    const v = loadView(path.join(dir, 'v.safetensors'));
    assert.equal(v.header.token_mixing, 'on');
    assert.deepEqual(v.header.mixing, MIX);
    assert.equal(v.events[0].rows, 16, '8 real rows + 8 shields');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('token-mixing settings are validated with the run spec', () => {
  assert.equal(mixingOf(parseRunSpec({ mode: 'local' }, 't')), null, 'off for mode local');
  assert.deepEqual(mixingOf(parseRunSpec({ token_mixing: 'on' }, 't')), MIX);
  assert.equal(mixingOf(parseRunSpec({ token_mixing: 'on', mixing_shields: true }, 't'))!.shields, 'all', 'an earlier run\'s true: shields everywhere');
  assert.equal(mixingOf(parseRunSpec({ token_mixing: 'on', mixing_shields: false }, 't'))!.shields, 'none');
  assert.throws(() => parseRunSpec({ mixing_shields: 'some' }, 't'), /mixing_shields: must be one of first-layer, all, none/);
  assert.throws(() => parseRunSpec({ mixing_scheme: 'fft' }, 't'), /mixing_scheme: must be one of butterfly, dense/);
  assert.throws(() => parseRunSpec({ mixing_block: 1 }, 't'), /mixing_block: must be an integer >= 0 other than 1/);
  assert.throws(() => new MixedLinears({ forward: async (_l, _n, x) => x, backward: async () => null }, getPreset('gpt2-micro'), { ...DENSE, rounds: 3, trainWeights: false }), /rounds are the butterfly scheme's/);
  assert.throws(() => parseRunSpec({ mode: 'local', token_mixing: 'on' }, 't'), (e: RunSpecError) => e.field === 'token_mixing');
  assert.throws(() => parseRunSpec({ token_mixing: 'yes' }, 't'), /token_mixing: must be one of off, on/);
  assert.throws(() => parseMixingSettings({ mixing_kappa: 0.5 }, 't', 'on'), /mixing_kappa: must be a finite number >= 1/);
  assert.throws(() => parseMixingSettings({ mixing_block: -1 }, 't', 'on'), /mixing_block/);
  // on by default in the split modes, off for local; an explicit setting wins
  assert.deepEqual([parseRunSpec({}, 't').token_mixing, parseRunSpec({ mode: 'paper' }, 't').token_mixing, parseRunSpec({ mode: 'local' }, 't').token_mixing, parseRunSpec({ token_mixing: 'off' }, 't').token_mixing], ['on', 'on', 'off', 'off']);
  assert.deepEqual([parseMixingSettings({}, 't', 'on').token_mixing, parseMixingSettings({}, 't', 'off').token_mixing, parseMixingSettings({ token_mixing: 'on' }, 't', 'off').token_mixing], ['on', 'off', 'on']);
  assert.throws(() => new MixedLinears({ forward: async (_l, _n, x) => x, backward: async () => null }, getPreset('gpt2-micro'), { ...MIX, kappa: 0, trainWeights: false }), /kappa must be a finite number >= 1/);
});

/** A linear the test can see through: y = x W + 1 b, dX = dY W^T, and the weight gradient X~^T dY~ of what was sent. */
function glassLinears(d: number, seed: number) {
  const rng = new Rng(seed);
  const w = new Map<string, { W: Float32Array; b: Float32Array }>();
  const sent = new Map<string, Float32Array>();
  const log: { name: string; rows: number }[] = [];
  const gradW = new Map<string, Float32Array>();
  const weights = (name: LinearName) => {
    if (!w.has(name)) {
      const [din, dout] = linearDims(name, d);
      w.set(name, { W: Float32Array.from({ length: din * dout }, () => rng.normal() / Math.sqrt(din)), b: Float32Array.from({ length: dout }, () => rng.normal()) });
    }
    return w.get(name)!;
  };
  const inner = {
    forward: async (l: number, name: LinearName, x: Obfuscated, rows: number) => {
      const [din, dout] = linearDims(name, d);
      const { W, b } = weights(name);
      const y = new Float32Array(rows * dout);
      for (let i = 0; i < rows; i++) y.set(b, i * dout);
      sgemm(false, false, rows, dout, din, 1, x, din, W, dout, 1, y, dout);
      sent.set(`${l}.${name}`, Float32Array.from(x));
      log.push({ name: `${l}.${name}`, rows });
      return asObfuscated(y);
    },
    backward: async (l: number, name: LinearName, dy: Obfuscated, rows: number, input: boolean) => {
      const [din, dout] = linearDims(name, d);
      const x = sent.get(`${l}.${name}`)!;
      if (x.length === rows * din) { // weights training: the gradient of what was sent
        const g = new Float32Array(din * dout);
        sgemm(true, false, din, dout, rows, 1, x, din, dy, dout, 0, g, dout);
        gradW.set(`${l}.${name}`, g);
      }
      if (!input) return null;
      const dx = new Float32Array(rows * din);
      sgemm(false, true, rows, din, dout, 1, dy, dout, weights(name).W, dout, 0, dx, din);
      return asObfuscated(dx);
    },
  };
  return { inner, weights, gradW, log };
}

test('both schemes are exact around any linear: the forward with its bias, the input gradient, and full fine-tuning\'s weight gradient', async () => {
  const config = getPreset('gpt2-micro');
  const d = config.n_embd;
  const rng = new Rng(5);
  const calls: [number, LinearName, number][] = [[0, 'qkv', 40], [0, 'qkv', 5], [1, 'fcproj', 300], [1, 'qkv', 5], [2, 'fc', 1]];
  const cases: [MixingConfig, number[]][] = [
    // first-layer: layer 0's qkv input up to its width, a call under one block up to one block
    [MIX, [48, 16, 304, 16, 16]], // padded to the butterfly's size (16 x 3, 16 x 19)
    [{ ...MIX, shields: 'all', block: 4, rounds: 3 }, [48, 16, 320, 16, 16]], // radices (4, 4, 3) and (4, 4, 4, 5)
    [{ ...MIX, shields: 'none', kappa: 1 }, [48, 5, 304, 5, 1]], // the butterfly's size: 16 x 3, 16 x 19
    [DENSE, [40, 16, 300, 16, 16]],
    [{ ...DENSE, block: 8 }, []], // blocks of 8 real rows, each padded: rows not compared
  ];
  for (const [mix, want] of cases) for (const trainWeights of [false, true]) {
    const g = glassLinears(d, 1);
    const ml = new MixedLinears(g.inner, config, { ...mix, trainWeights, rng: KeyedRng.fromSeed(3) });
    for (const [l, name, rows] of calls) {
      const [din, dout] = linearDims(name, d);
      const x = asObfuscated(Float32Array.from({ length: rows * din }, () => rng.normal()));
      const y = await ml.forward(l, name, x, rows, true);
      const { W, b } = g.weights(name);
      const want = new Float32Array(rows * dout);
      for (let i = 0; i < rows; i++) want.set(b, i * dout);
      sgemm(false, false, rows, dout, din, 1, x, din, W, dout, 1, want, dout);
      assert.ok(relErr(y, want) < 1e-4, `${JSON.stringify(mix)} h.${l}.${name} x ${rows}: forward ${relErr(y, want)}`);
      const dy = asObfuscated(Float32Array.from({ length: rows * dout }, () => rng.normal()));
      const dx = (await ml.backward(l, name, dy, rows, true))!;
      const dxWant = new Float32Array(rows * din);
      sgemm(false, true, rows, din, dout, 1, dy, dout, W, dout, 0, dxWant, din);
      assert.ok(relErr(dx, dxWant) < 1e-4, `${JSON.stringify(mix)} h.${l}.${name}: input gradient ${relErr(dx, dxWant)}`);
      if (trainWeights) {
        const gw = new Float32Array(din * dout);
        sgemm(true, false, din, dout, rows, 1, x, din, dy, dout, 0, gw, dout);
        assert.ok(relErr(g.gradW.get(`${l}.${name}`)!, gw) < 1e-4, `${JSON.stringify(mix)} h.${l}.${name}: weight gradient`);
      }
    }
    if (want.length) assert.deepEqual(g.log.map((e) => e.rows), want, `${JSON.stringify(mix)}: rows sent`);
    const s = ml.stats;
    assert.equal(s.rowsReal, 2 * calls.reduce((a, c) => a + c[2], 0));
    assert.ok(s.flopsSent >= s.flopsReal && s.mixFlops > 0);
  }
});

test('the butterfly mixes densely: every sent row depends on every real row; its shape follows the rows', async () => {
  assert.deepEqual(butterflyShape(16, 16, false), { radices: [16], sent: 16, rounds: 1 });
  assert.deepEqual(butterflyShape(256, 16, false), { radices: [16, 16], sent: 256, rounds: 1 });
  assert.deepEqual(butterflyShape(257, 16, false), { radices: [16, 17], sent: 272, rounds: 1 });
  assert.deepEqual(butterflyShape(768, 16, true), { radices: [16, 16, 3], sent: 768, rounds: 2 });
  assert.deepEqual(butterflyShape(3072, 16, false, 3), { radices: [16, 16, 12], sent: 3072, rounds: 3 });
  const config = getPreset('gpt2-micro');
  const d = config.n_embd, rows = 256;
  const rng = new Rng(2);
  const x = Float32Array.from({ length: rows * d }, () => rng.normal());
  const sentOf = async (xs: Float32Array) => {
    const g = glassLinears(d, 1);
    let got: Float32Array | null = null;
    const ml = new MixedLinears({ ...g.inner, forward: async (l, n, v, r, t) => { got = Float32Array.from(v); return g.inner.forward(l, n as LinearName, v, r); } }, config, { ...MIX, trainWeights: false, rng: KeyedRng.fromSeed(9) });
    await ml.forward(1, 'attproj', asObfuscated(xs), rows, false);
    return got!;
  };
  const a = await sentOf(x);
  const x2 = Float32Array.from(x);
  for (let j = 0; j < d; j++) x2[7 * d + j] += 1; // real row 7 changes
  const b = await sentOf(x2);
  let touched = 0;
  for (let i = 0; i < rows; i++) if (Math.max(...Array.from({ length: d }, (_, j) => Math.abs(a[i * d + j] - b[i * d + j]))) > 1e-6) touched++;
  assert.equal(touched, rows, `row 7 reaches ${touched} of ${rows} sent rows`);
  assert.ok(maxAbsDiff(a, x) > 0.5, 'the sent rows are not the real ones');
});
