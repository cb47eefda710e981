// A model derived from a public base: the accelerator holds the masked base, the enclave the
// truncated delta; inference, fine-tuning and the merge are those of the factored model.
import type { ObfuscatedTensors } from '../src/obfuscate/enclave_tensors.js';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import { GPT2 } from '../src/model/gpt2.js';
import { getPreset } from '../src/model/config.js';
import type { GPT2Weights } from '../src/model/weights.js';
import { Rng } from '../src/tensor/rng.js';
import { truncatedSvd } from '../src/linalg/svd.js';
import { obfuscateWeights, writeObfuscation, deobfuscateDirs, factoredModel, publicBaseSha256 } from '../src/obfuscate/provider.js';
import { loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair } from '../src/obfuscate/bundle.js';
import { inProcessSplit, Enclave } from '../src/enclave/enclave.js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { InProcessLink } from '../src/protocol/link.js';
import { foldLayerNorms } from '../src/enclave/split_model.js';
import { buildSession, mergedPlainModel, type SessionOptions } from '../src/train/session.js';
import { runFinetune } from '../src/train/finetune.js';
import { parseRunSpec, toFinetuneConfig } from '../src/train/run_spec.js';
import type { EncodedSet } from '../src/io/jsonl.js';
import { BundleError, InputError } from '../src/errors.js';
import { maxAbsDiff, relErr, patternData } from './helpers.js';

/** A public base and a model derived from it: every block linear moved by a rank-2 update (plus `dense` noise), norms and biases nudged. */
function derived(seed: number, dense = 0): { base: GPT2Weights; model: GPT2Weights } {
  const b = GPT2.random(getPreset('gpt2-micro'), seed);
  const rng = new Rng(seed + 1);
  for (const k of ['ln1w', 'ln1b', 'ln2w', 'ln2b', 'qkvb', 'fcb'] as const) {
    const v = b.layout.view(b.params, k);
    for (let i = 0; i < v.length; i++) v[i] += 0.1 * rng.normal();
  }
  const base = b.weights();
  const p = Float32Array.from(base.params);
  const d = base.config.n_embd;
  for (let l = 0; l < base.config.n_layer; l++) {
    for (const [k, din, dout] of [['qkvw', d, 3 * d], ['attprojw', d, d], ['fcw', d, 4 * d], ['fcprojw', 4 * d, d]] as const) {
      const W = base.layout.layer(p, k, l);
      for (let r = 0; r < 2; r++) {
        const u = Float32Array.from({ length: din }, () => rng.normal()), v = Float32Array.from({ length: dout }, () => 0.05 * rng.normal());
        for (let i = 0; i < din; i++) for (let j = 0; j < dout; j++) W[i * dout + j] += u[i] * v[j] + dense * rng.normal();
      }
    }
    for (const k of ['ln1b', 'ln2b', 'attprojb'] as const) { const v = base.layout.layer(p, k, l); for (let i = 0; i < v.length; i++) v[i] += 0.02 * rng.normal(); }
  }
  const wte = base.layout.view(p, 'wte');
  for (let i = 0; i < wte.length; i++) wte[i] += 0.01 * rng.normal();
  return { base, model: { ...base, params: p } };
}


const tokens = (n: number, V: number, seed: number) => { const r = new Rng(seed); return Int32Array.from({ length: n }, () => r.int(V)); };

test('truncated SVD: exact on a low-rank matrix, energy thresholds, the rank cap', () => {
  const rng = new Rng(3), m = 24, n = 40;
  const A = new Float64Array(m * n);
  const s = [5, 2, 1, 0.1];
  for (const sv of s) {
    const u = Float64Array.from({ length: m }, () => rng.normal()), v = Float64Array.from({ length: n }, () => rng.normal());
    for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) A[i * n + j] += sv * u[i] * v[j];
  }
  const full = truncatedSvd(A, m, n, { energy: 1 });
  assert.equal(full.rank, 4, 'energy 1 keeps exactly the rank of the matrix');
  assert.ok(full.residualEnergy < 1e-20, `rank-4 reconstruction is exact (${full.residualEnergy})`);
  const two = truncatedSvd(A, m, n, { rank: 2 });
  assert.equal(two.rank, 2);
  assert.ok(Math.abs(two.residualEnergy - (full.s[2] ** 2 + full.s[3] ** 2) / full.s.slice(0, 4).reduce((a, x) => a + x * x, 0)) < 1e-9, 'the residual of rank 2 is the energy of the two smallest directions (Eckart-Young)');
  const e = truncatedSvd(A, m, n, { energy: 0.999 });
  assert.ok(e.rank >= 2 && e.rank <= 4 && 1 - e.residualEnergy >= 0.999);
  assert.equal(truncatedSvd(A, m, n, { rank: 100 }).rank, 4, 'zero directions are dropped');
  assert.throws(() => truncatedSvd(A, m, n, { energy: 1.5 }), /energy/);
});

test('public base: the accelerator holds the masked base, split inference equals the factored model (exact at full rank)', async () => {
  const { base, model } = derived(5);
  const V = base.config.vocab_size, T = 12;
  const tok = tokens(2 * T, V, 9);
  for (const mode of ['sealed', 'paper'] as const) {
    const pb = obfuscateWeights(model, { mode, seed: 7, publicBase: { weights: base, choice: { energy: 1 } } });
    const plainBase = obfuscateWeights(base, { mode, seed: 7 });
    for (let l = 0; l < base.config.n_layer; l++) {
      for (const n of ['qkv', 'attproj', 'fc', 'fcproj'] as const) {
        assert.ok(maxAbsDiff(pb.accelerator.layers[l][n]!.w, plainBase.accelerator.layers[l][n]!.w) < 1e-6, `${mode}: ${l}.${n} on the accelerator is the masked public base`);
        assert.equal(pb.enclave.tensors.delta![l][n].rank, 2, `${mode}: the rank-2 delta of ${l}.${n} is found`);
      }
    }
    assert.ok(pb.delta!.residual / pb.delta!.total < 1e-10);
    const want = (await new GPT2(model).forward(tok, 2, T)).logits;
    const got = await inProcessSplit(pb).enclave.forward(tok, 2, T);
    assert.ok(maxAbsDiff(got, want) < 2e-4, `${mode}: split logits equal the provider's model (${maxAbsDiff(got, want)})`);
    const without = await new Enclave(pb.enclave, new InProcessLink(new Accelerator(pb.accelerator))).forward(tok, 2, T);
    assert.ok(maxAbsDiff(without, await new GPT2(base).forward(tok, 2, T).then((r) => r.logits)) > 1e-2, 'the delta matters');
    // truncated: the split is the factored model, not the provider's
    const cut = obfuscateWeights(model, { mode, seed: 7, publicBase: { weights: base, choice: { rank: 1 } } });
    const fm = factoredModel(model, { weights: base, choice: { rank: 1 } }, mode);
    const gotCut = await inProcessSplit(cut).enclave.forward(tok, 2, T);
    assert.ok(maxAbsDiff(gotCut, (await new GPT2(fm).forward(tok, 2, T)).logits) < 2e-4, `${mode}: rank-1 split equals its factored model`);
    assert.ok(maxAbsDiff(gotCut, want) > 1e-3, `${mode}: and rank 1 is not the provider's model`);
  }
});

test('public base: LoRA and full fine-tuning through the split equal local training of the factored model; the merge gives it back', async () => {
  const { base, model } = derived(11, 0.01);
  const data = patternData(32, base.config.vocab_size, 12, 4, 5);
  const publicBase = { weights: base, choice: { rank: 2 } };
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-pb-'));
  try {
    const run = async (s: Pick<SessionOptions, 'mode' | 'method'> & Partial<SessionOptions> & { factorMode?: 'sealed' | 'paper' }, tag: string) => {
      const { factorMode: _f, ...opts } = s;
      const sess = buildSession(s.mode === 'local' ? factoredModel(model, publicBase, s.factorMode!) : model, { task: 'lm', padTokenId: 0, seed: 3, maskSeed: 4, publicBase: s.mode === 'local' ? undefined : publicBase, lora: { rank: 2, alpha: 4, dropout: 0, targets: ['q', 'v', 'fc'] }, acceleratorStateDir: path.join(dir, tag), ...opts });
      const cfg = toFinetuneConfig(parseRunSpec({ mode: s.mode, method: s.method, task: 'lm', steps: 8, batch: 4, lr: s.method === 'full' ? 0.05 : 1e-2, warmup: 2, seed: 3, checkpoint_every: 0, ...(s.method === 'full' ? { enclave_optimizer: 'sgd' } : {}) }, 'test'), 'test');
      const summary = await runFinetune(sess.model, data, null, cfg, path.join(dir, `${tag}-run`), 0, { rng: sess.rng });
      return { sess, losses: summary.losses };
    };
    for (const [mode, method] of [['sealed', 'lora'], ['paper', 'lora'], ['sealed', 'full'], ['paper', 'full']] as const) {
      const folded = mode === 'sealed' && method === 'full';
      const local = await run({ mode: 'local', method, foldedBaseline: folded, factorMode: mode }, `l-${mode}-${method}`);
      const split = await run({ mode, method }, `${mode}-${method}`);
      for (let i = 0; i < 8; i++) assert.ok(Math.abs(split.losses[i] - local.losses[i]) <= 2e-4 * Math.abs(local.losses[i]), `${mode}/${method} step ${i + 1}: ${split.losses[i]} vs ${local.losses[i]}`);
      assert.ok(local.losses[7] < local.losses[0], `${mode}/${method}: training makes progress`);
      if (method === 'lora') assert.ok(relErr(split.sess.model.adapters!.params, local.sess.model.adapters!.params) < 1e-3, `${mode}: adapters equal`);
      const a = folded ? foldLayerNorms(mergedPlainModel(split.sess)) : mergedPlainModel(split.sess), b = mergedPlainModel(local.sess);
      const lay = a.layout;
      for (const k of ['qkvw', 'fcprojw', 'attprojb'] as const) assert.ok(relErr(lay.view(a.params, k), lay.view(b.params, k)) < 1e-3, `${mode}/${method}: merged ${k} is the factored model's plus the update`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('public-base bundles: the pin in both manifests, the delta on disk, refusals of another base, another pair or another key', async () => {
  const { base, model } = derived(21);
  const other = derived(22).base;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-pbb-'));
  try {
    const r = obfuscateWeights(model, { mode: 'sealed', seed: 1, publicBase: { weights: base, choice: { energy: 0.9 } } });
    writeObfuscation(dir, r);
    const acc = loadAcceleratorBundle(path.join(dir, 'accelerator'));
    const enc = loadEnclaveBundle(path.join(dir, 'enclave'));
    assert.equal(acc.manifest.public_base_sha256, publicBaseSha256(base));
    assert.equal(enc.publicBase!.sha256, publicBaseSha256(base));
    assert.deepEqual(enc.publicBase!.ranks, r.delta!.ranks);
    checkBundlePair(enc, acc);
    const d0 = r.enclave.tensors.delta![1].fc, d1 = (enc.tensors as ObfuscatedTensors).delta![1].fc;
    assert.ok(d1.rank >= 1 && maxAbsDiff(d0.U, d1.U) === 0 && maxAbsDiff(d0.V, d1.V) === 0 && maxAbsDiff(d0.b, d1.b) === 0, 'the delta round-trips');
    // the factored model back, checked against the pinned base
    const w = deobfuscateDirs(model, path.join(dir, 'accelerator'), path.join(dir, 'enclave'), path.join(dir, 'provider'), { weights: base, dir: 'base' });
    const fm = factoredModel(model, { weights: base, choice: { energy: 0.9 } }, 'sealed');
    assert.ok(relErr(w.params, fm.params) < 1e-5, 'deobfuscate gives the factored model');
    assert.throws(() => deobfuscateDirs(model, path.join(dir, 'accelerator'), path.join(dir, 'enclave'), path.join(dir, 'provider'), { weights: other, dir: 'other' }), (e) => e instanceof BundleError && /public base other has SHA-256 .* the bundles pin/.test(e.message));
    // an accelerator bundle of a plain obfuscation with the same key is not this enclave's pair
    const plainDir = path.join(dir, 'plain');
    writeObfuscation(plainDir, obfuscateWeights(model, { mode: 'sealed', seed: 2 }));
    const encMan = JSON.parse(readFileSync(path.join(dir, 'enclave', 'manifest.json'), 'utf8'));
    encMan.accelerator_manifest_sha256 = loadAcceleratorBundle(path.join(plainDir, 'accelerator')).manifestSha256;
    writeFileSync(path.join(dir, 'enclave', 'manifest.json'), JSON.stringify(encMan));
    assert.throws(() => checkBundlePair(loadEnclaveBundle(path.join(dir, 'enclave')), loadAcceleratorBundle(path.join(plainDir, 'accelerator'))), /pins public base .* accelerator bundle no public base/);
    // another key is refused before anything is merged
    assert.throws(() => deobfuscateDirs(model, path.join(dir, 'accelerator'), path.join(dir, 'enclave'), path.join(plainDir, 'provider')), BundleError);
    const small = GPT2.random(getPreset('gpt2-tiny'), 1).weights();
    assert.throws(() => obfuscateWeights(model, { mode: 'sealed', seed: 1, publicBase: { weights: small, choice: { rank: 1 } } }), (e) => e instanceof InputError && /n_layer|n_head|n_embd/.test(e.message));
    encMan.public_base.ranks[0].qkv = 999;
    writeFileSync(path.join(dir, 'enclave', 'manifest.json'), JSON.stringify(encMan));
    assert.throws(() => loadEnclaveBundle(path.join(dir, 'enclave')), /malformed public_base \(rank of qkv/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
