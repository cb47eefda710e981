// The unmix attack against token mixing, and the other data attacks on mixed views: without
// shields the dictionary attack recovers the batch's tokens; with them nothing beyond the prior.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { forwardRecords } from './helpers.js';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import type { GPT2Weights } from '../src/model/weights.js';
import { tokenizerFor } from '../src/model/tokenizer.js';
import { readJsonl } from '../src/io/jsonl.js';
import { obfuscateWeights } from '../src/obfuscate/provider.js';
import { inProcessSplit } from '../src/enclave/enclave.js';
import { recordEnclave } from '../src/attacks/record.js';
import { loadView, loadTruth, type LoadedView, type ViewTruth } from '../src/protocol/view.js';
import { unmixAttack, fastIca, rowBasis, priorBag } from '../src/attacks/unmix.js';
import { decodePublicBaseAttack } from '../src/attacks/decode.js';
import { frequencyAttack } from '../src/attacks/frequency.js';
import { knownPlaintextAttack } from '../src/attacks/known_plaintext.js';
import { MIXING_DEFAULTS, type MixingConfig } from '../src/enclave/mixing.js';
import { KeyedRng, Rng } from '../src/tensor/rng.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const PUBLIC = path.join(ROOT, 'models/base-small');
const OWNER = path.join(ROOT, 'data/food-reviews/test.jsonl');
const CORPUS = path.join(ROOT, 'data/food-reviews/train.jsonl');

let dir: string;
let pub: GPT2Weights;
const views: Record<string, { view: LoadedView; truth: ViewTruth }> = {};

let obf: ReturnType<typeof obfuscateWeights>;

async function record(name: string, mixing: MixingConfig | null, batches = 2, B = 2, T = 16) {
  const r = obf;
  const { enclave } = inProcessSplit(r, { mixing, mixingRng: KeyedRng.fromSeed(name) });
  const rec = recordEnclave(enclave, r.accelerator, { modelId: name, modelPath: PUBLIC, padTokenId: 50256, keep: (e) => e.layer === 0 && e.name === 'qkv' && e.direction === 'to_accelerator' && e.op === 'linear_forward' });
  const tok = tokenizerFor(pub.config.vocab_size);
  await forwardRecords(enclave, tok, readJsonl(OWNER).map((r) => r.text!), batches, B, T);
  const file = path.join(dir, `${name}.view.safetensors`);
  rec.save(file);
  const view = loadView(file);
  views[name] = { view, truth: loadTruth(`${file}.truth.json`, view) };
}

before(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'obf-unmix-'));
  pub = loadCheckpoint(PUBLIC);
  obf = obfuscateWeights(pub, { mode: 'sealed', spec: { kind: 'kappa', kappa: 1 }, seed: 5 });
  await record('off', null);
  await record('noshields', { ...MIXING_DEFAULTS, shields: 'none' });
  await record('shields', MIXING_DEFAULTS); // the butterfly, shields on layer 0's qkv input
  await record('dense', { ...MIXING_DEFAULTS, scheme: 'dense', shields: 'all' });
});

after(() => rmSync(dir, { recursive: true, force: true }));

test('unmix numerics: FastICA separates a mixture of independent sources; row bases are orthonormal; the prior bag follows the counts', () => {
  const rng = new Rng(3);
  const k = 3, m = 4000;
  const S = new Float64Array(k * m);
  for (let j = 0; j < m; j++) { S[j] = Math.sign(Math.sin(j * 0.37)); S[m + j] = rng.uniform() * 2 - 1; S[2 * m + j] = ((j * 0.013) % 1) * 2 - 1; }
  const A = [[1, 0.6, 0.3], [0.2, 1, 0.5], [0.4, 0.1, 1]];
  const X = new Float32Array(k * m);
  for (let i = 0; i < k; i++) for (let j = 0; j < m; j++) for (let p = 0; p < k; p++) X[i * m + j] += A[i][p] * S[p * m + j];
  for (let i = 0; i < k; i++) { let mu = 0; for (let j = 0; j < m; j++) mu += X[i * m + j] / m; for (let j = 0; j < m; j++) X[i * m + j] -= mu; }
  const U = rowBasis(X, k, m);
  assert.equal(U.length, 3);
  for (let a = 0; a < 3; a++) for (let b = 0; b < 3; b++) assert.ok(Math.abs(U[a].reduce((s, v, j) => s + v * U[b][j], 0) - (a === b ? 1 : 0)) < 1e-9);
  const z = new Float64Array(k * m);
  for (let i = 0; i < k; i++) for (let j = 0; j < m; j++) z[i * m + j] = U[i][j] * Math.sqrt(m);
  const Y = fastIca(z, k, m, 1);
  for (let p = 0; p < k; p++) {
    let best = 0;
    for (let i = 0; i < k; i++) {
      let dot = 0, ny = 0, ns = 0;
      for (let j = 0; j < m; j++) { dot += Y[i * m + j] * S[p * m + j]; ny += Y[i * m + j] ** 2; ns += S[p * m + j] ** 2; }
      best = Math.max(best, Math.abs(dot) / Math.sqrt(ny * ns));
    }
    assert.ok(best > 0.95, `source ${p} recovered (|corr| ${best.toFixed(3)})`);
  }
  assert.deepEqual(priorBag(new Map([[7, 6], [8, 3], [9, 1]]), 10).sort(), [7, 7, 7, 7, 7, 7, 8, 8, 8, 9]);
});

test('without token mixing, and with mixing but no shields, the dictionary attack recovers the batches\' tokens', () => {
  for (const name of ['off', 'noshields']) {
    const { view, truth } = views[name];
    const r = unmixAttack(view, pub, truth, { corpus: CORPUS, positions: 16, vocab: 'corpus' });
    assert.equal(r.defence, name === 'off' ? 'none' : 'token-mixing');
    assert.ok(r.value > 0.9 && r.value > r.baseline + 0.5, `${name}: recovered ${r.value} (baseline ${r.baseline})`);
    assert.ok((r.details!.rows_rank_mean as number) < 128, 'the rows span a proper subspace');
  }
});

test('with shields the mixed rows span the whole space: unmix and the other data attacks recover no more than the prior (butterfly and dense)', () => {
  for (const name of ['shields', 'dense']) {
    const { view, truth } = views[name];
    assert.equal(view.events[0].rows, 128, '32 real rows + 96 shields');
    const u = unmixAttack(view, pub, truth, { corpus: CORPUS, positions: 16, vocab: 'corpus' });
    assert.ok((u.details!.rows_rank_mean as number) >= 127, `the rows span (nearly) everything: rank ${u.details!.rows_rank_mean}`);
    assert.ok(u.value <= u.baseline + 0.01, `unmix ${u.value} vs baseline ${u.baseline}`);
    const dec = decodePublicBaseAttack(view, pub, truth, { corpus: CORPUS });
    assert.ok(dec.value <= dec.baseline + 0.02, `decode-public-base on mixed rows: ${dec.value} vs ${dec.baseline}`);
    const off = decodePublicBaseAttack(views.off.view, pub, views.off.truth, { corpus: CORPUS });
    assert.ok(off.value > 0.9, `the same attack without mixing: ${off.value}`);
    const f = frequencyAttack(view, truth, { corpus: CORPUS, counts: [1] });
    assert.ok(Number.isFinite(f.value) && f.details!.distinct_rows === f.details!.rows, 'no row repeats under mixing');
    const k = knownPlaintextAttack(view, truth, { knownFraction: 0.3, seed: 2 });
    assert.ok(k.value <= k.baseline + 0.05, `known plaintext on mixed rows: ${k.value} vs ${k.baseline}`);
  }
});
