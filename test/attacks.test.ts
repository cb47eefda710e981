import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { forwardRecords } from './helpers.js';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, readFileSync, writeFileSync, copyFileSync } from 'node:fs';
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
import { loadView, loadTruth, checkView, type LoadedView, type ViewTruth } from '../src/protocol/view.js';
import { makeProviderModel } from '../src/experiments/security.js';
import { weightAlignmentAttack } from '../src/attacks/weight_alignment.js';
import { decodePublicBaseAttack } from '../src/attacks/decode.js';
import { frequencyAttack } from '../src/attacks/frequency.js';
import { knownPlaintextAttack } from '../src/attacks/known_plaintext.js';
import { mlpPermutationAttack } from '../src/attacks/mlp_permutation.js';
import { ViewError, BundleError } from '../src/errors.js';
import { hungarian, polar, mat, matmul, transpose } from '../src/attacks/linalg.js';
import { haarOrthogonal } from '../src/linalg/mat64.js';
import { Rng } from '../src/tensor/rng.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');
const PUBLIC = path.join(ROOT, 'models/base-small');
const OWNER = path.join(ROOT, 'data/food-reviews/test.jsonl');
const CORPUS = path.join(ROOT, 'data/food-reviews/train.jsonl');

let dir: string;
let pub: GPT2Weights;
let prov: GPT2Weights;
let provDir: string;
const views: Record<string, { view: LoadedView; truth: ViewTruth; file: string }> = {};

/** The owner's records as [B, T] batches (padded with end-of-text), through the enclave, with the view recorded. */
async function recordInference(mode: 'sealed' | 'paper', kappa: number, batches: number, B: number, T: number, publicBase = false) {
  const r = obfuscateWeights(prov, { mode, spec: { kind: 'kappa', kappa }, seed: 11, publicBase: publicBase ? { weights: pub, choice: { energy: 0.9 } } : undefined });
  const { enclave } = inProcessSplit(r);
  // layer 0's qkv inputs and every layer's MLP hidden: what the attacks read
  const rec = recordEnclave(enclave, r.accelerator, {
    modelId: `test-${mode}`, modelPath: provDir, padTokenId: 50256,
    keep: (e) => (e.layer === 0 && e.name === 'qkv' && e.direction === 'to_accelerator') || (e.name === 'fc' && e.direction === 'to_enclave'),
  });
  const tok = tokenizerFor(prov.config.vocab_size);
  await forwardRecords(enclave, tok, readJsonl(OWNER).map((r) => r.text!), batches, B, T);
  const file = path.join(dir, `${mode}-k${kappa}${publicBase ? '-pb' : ''}.view.safetensors`);
  rec.save(file);
  const view = loadView(file);
  return { view, truth: loadTruth(`${file}.truth.json`, view), file };
}

before(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'obf-attacks-'));
  pub = loadCheckpoint(PUBLIC);
  provDir = await makeProviderModel(PUBLIC, path.join(ROOT, 'data/austen/train.jsonl'), 10, 3e-4, path.join(dir, 'provider'));
  prov = loadCheckpoint(provDir);
  views.sealed = await recordInference('sealed', 1, 12, 8, 32);
  views.paper = await recordInference('paper', 1, 3, 8, 32);
  views.sealedPb = await recordInference('sealed', 1, 2, 8, 32, true);
});

after(() => rmSync(dir, { recursive: true, force: true }));

test('attack numerics: the polar factor is the orthogonal Procrustes solution; the Hungarian assignment is optimal', () => {
  const rng = new Rng(3);
  const n = 12;
  const U = haarOrthogonal(n, rng);
  // M = U S with S symmetric positive definite: polar(M) = U
  const G = mat(n, n);
  rng.fillNormal(G.data);
  const S = matmul(transpose(G), G);
  for (let i = 0; i < n; i++) S.data[i * n + i] += n;
  const P = polar(matmul(U, S));
  let e = 0;
  for (let i = 0; i < n * n; i++) e = Math.max(e, Math.abs(P.data[i] - U.data[i]));
  assert.ok(e < 1e-9, `polar factor error ${e}`);
  // brute force over all permutations of 6
  const k = 6;
  const cost = new Float64Array(k * k);
  for (let i = 0; i < cost.length; i++) cost[i] = Math.round(rng.uniform() * 100);
  let best = Infinity;
  const perm = (a: number[], used: boolean[], c: number): void => {
    if (a.length === k) { best = Math.min(best, c); return; }
    for (let j = 0; j < k; j++) if (!used[j]) { used[j] = true; a.push(j); perm(a, used, c + cost[(a.length - 1) * k + j]); a.pop(); used[j] = false; }
  };
  perm([], new Array(k).fill(false), 0);
  const h = hungarian(cost, k);
  assert.equal(new Set(h).size, k);
  assert.equal(Array.from(h).reduce((s, j, i) => s + cost[i * k + j], 0), best);
});

test('public base, sealed mode: weight alignment recovers Q, the permutations and the delta; every token decodes', async () => {
  const { view, truth } = views.sealed;
  const w = weightAlignmentAttack(view, pub, truth, prov);
  const d = w.details!;
  assert.ok((d.mlp_permutation_accuracy as number) > 0.95, `MLP permutation recovered: ${d.mlp_permutation_accuracy}`);
  assert.equal(d.head_permutation_accuracy, 1);
  assert.ok((d.relative_error as number) < 0.7 * (d.relative_error_public_guess as number), `recovered weights beat the public guess: ${d.relative_error} vs ${d.relative_error_public_guess}`);
  assert.ok(w.value > 0.5 && (d.delta_cosine as number) > 0.7, `delta recovered: energy ${w.value}, cosine ${d.delta_cosine}`);
  const dec = decodePublicBaseAttack(view, pub, truth, { corpus: CORPUS, maxBatches: 3 });
  assert.ok(dec.value > 0.95, `decoded ${dec.value} of the tokens`);
  assert.ok(dec.baseline < 0.2);
  assert.equal(dec.observed_batches, 3);
});

test('Defence 2 (public base kept in the enclave): weight alignment recovers the public base and at most 10% of the delta; the tokens still decode', () => {
  const { view, truth } = views.sealedPb;
  const w = weightAlignmentAttack(view, pub, truth, prov);
  const d = w.details!;
  assert.equal(w.defence, 'public-base');
  assert.ok(w.value <= 0.1 && (d.delta_cosine as number) <= 0.3, `delta energy recovered ${w.value}, cosine ${d.delta_cosine}`);
  assert.ok((d.mlp_permutation_accuracy as number) > 0.95, 'the masks themselves still come out (the accelerator holds the masked public base)');
  const dec = decodePublicBaseAttack(view, pub, truth, { corpus: CORPUS, maxBatches: 1 });
  assert.ok(dec.value > 0.9, `data protection rests on token mixing: ${dec.value} of the tokens decode`);
});

test('public base, paper mode: R1 comes out of W*v W*o and the first-layer rows decode', () => {
  const { view, truth } = views.paper;
  const dec = decodePublicBaseAttack(view, pub, truth, { corpus: CORPUS });
  assert.ok(dec.value > 0.9, `decoded ${dec.value}`);
});

test('secret model: first-layer rows repeat across batches; frequency and known plaintext beat their baselines', () => {
  const { view, truth } = views.sealed;
  const f = frequencyAttack(view, truth, { corpus: CORPUS, counts: [1] });
  const d = f.details!;
  assert.ok((d.distinct_rows as number) < (d.rows as number), 'repeated (token, position) rows are identical');
  assert.equal(f.observed_batches, 12);
  assert.ok(f.value >= f.baseline, `frequency ${f.value} vs baseline ${f.baseline}`);
  const k = knownPlaintextAttack(view, truth, { knownFraction: 0.3, seed: 2 });
  assert.ok(k.value > k.baseline + 0.1, `known plaintext ${k.value} vs baseline ${k.baseline}`);
  assert.equal(k.setting, 'known-plaintext');
  for (const r of [f, k]) for (const key of ['attack', 'mode', 'kappa', 'defence', 'setting', 'metric', 'value', 'baseline', 'observed_batches']) assert.ok(key in r, key);
});

test('mlp-permutation matches hidden units by activation statistics far above chance', async () => {
  const { view, truth } = views.sealed;
  const m = await mlpPermutationAttack(view, pub, truth, { corpus: CORPUS, publicTokens: 2048 });
  assert.ok(m.value > 20 * m.baseline, `matched ${m.value} (chance ${m.baseline})`);
});

test('the view holds every crossing, both directions, with op, layer, linear and shape, and the bundle as handed over', async () => {
  const r = obfuscateWeights(prov, { mode: 'sealed', seed: 12 });
  const { enclave } = inProcessSplit(r);
  const rec = recordEnclave(enclave, r.accelerator, { modelId: 'all', modelPath: null, padTokenId: null });
  const B = 2, T = 5;
  await enclave.forward(Int32Array.from({ length: B * T }, (_, i) => 100 + i), B, T);
  const file = path.join(dir, 'all.view.safetensors');
  rec.save(file);
  const v = loadView(file);
  const L = prov.config.n_layer, C = prov.config.n_embd;
  assert.equal(v.events.length, 2 * 4 * L, 'a request and a reply per linear per layer');
  assert.equal(v.header.dropped_events, 0);
  const dims: Record<string, [number, number]> = { qkv: [C, 3 * C], attproj: [C, C], fc: [C, 4 * C], fcproj: [4 * C, C] };
  for (const e of v.events) {
    assert.equal(e.rows, B * T);
    assert.equal(e.cols, dims[e.name][e.direction === 'to_accelerator' ? 0 : 1], `${e.name} ${e.direction}`);
  }
  const bundle = v.bundle();
  assert.deepEqual(Array.from(bundle.layers[1].fc!.w.subarray(0, 8)), Array.from(r.accelerator.layers[1].fc!.w.subarray(0, 8)));
  const t = loadTruth(`${file}.truth.json`, v);
  assert.deepEqual(t.batches[0].tokens.slice(0, 3), [100, 101, 102]);
  assert.deepEqual(t.batches[0].pos.slice(3, 7), [3, 4, 0, 1]);
});

test('a truncated view, one of another mode and one of another model are refused with a ViewError', () => {
  const { file, view } = views.sealed;
  const cut = path.join(dir, 'cut.view.safetensors');
  const bytes = readFileSync(file);
  writeFileSync(cut, bytes.subarray(0, bytes.length - 100));
  assert.throws(() => loadView(cut), (e: unknown) => e instanceof ViewError && e instanceof BundleError && /truncated/.test((e as Error).message));
  writeFileSync(cut, bytes.subarray(0, 20));
  assert.throws(() => loadView(cut), ViewError);
  assert.throws(() => checkView(view, { mode: 'paper' }), /recorded in sealed mode/);
  const other = { ...pub.config, n_layer: pub.config.n_layer + 1 };
  assert.throws(() => checkView(view, { config: other, what: 'the public model' }), (e: unknown) => e instanceof ViewError && /another model: its n_layer/.test((e as Error).message));
  const wrongTruth = path.join(dir, 'wrong.truth.json');
  copyFileSync(`${views.paper.file}.truth.json`, wrongTruth);
  assert.throws(() => loadTruth(wrongTruth, view), /belongs to another view/);
});

test('CLI: finetune --record-view, then the attacks print the JSON contract (their progress on stderr); labels leak through the last gradient', () => {
  const run = (args: string[], env: Record<string, string> = {}) => spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1', ...env }, cwd: ROOT });
  const progress = { OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' };
  const viewFile = path.join(dir, 'ft.view.safetensors');
  const last = String(pub.config.n_layer - 1);
  const ft = run(['finetune', '--model', provDir, '--train', OWNER, '--task', 'cls', '--method', 'lora', '--mode', 'sealed', '--token-mixing', 'off', '--steps', '4', '--batch', '8', '--max-len', '16',
    '--checkpoint-every', '0', '--out', path.join(dir, 'run'), '--record-view', viewFile, '--record-view-layers', `0,${last}`]);
  assert.equal(ft.status, 0, ft.stderr);
  const lr = run(['attack', 'label-recovery', '--view', viewFile, '--corpus', CORPUS, '--json'], progress);
  assert.equal(lr.status, 0, lr.stderr);
  const lj = JSON.parse(lr.stdout);
  assert.equal(lj.observed_batches, 4);
  assert.ok(lj.value > 0.9 && lj.value > lj.baseline, `labels recovered: ${lr.stdout}`);
  const events = (stderr: string) => stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  const le = events(lr.stderr);
  assert.ok(le.length >= 2 && le.every((e) => e.event === 'progress' && e.task === 'attack label-recovery'), lr.stderr);
  assert.deepEqual([le[le.length - 1].done, le[le.length - 1].total], [1, 1]);
  const a = run(['attack', 'frequency', '--view', viewFile, '--corpus', CORPUS, '--json'], progress);
  assert.equal(a.status, 0, a.stderr);
  assert.equal(a.stdout.trim().split('\n').length, 1, 'stdout: the result alone');
  const fe = events(a.stderr);
  assert.ok(fe.every((e) => e.task === 'attack frequency') && fe.some((e) => /^decoding the first 4 batches$/.test(e.label)), a.stderr);
  assert.deepEqual([fe[fe.length - 1].done, fe[fe.length - 1].total], [5, 5], 'batches decoded: 1 then all 4');
  const j = JSON.parse(a.stdout);
  assert.equal(j.attack, 'frequency');
  assert.equal(j.mode, 'sealed');
  assert.equal(j.defence, 'none');
  assert.equal(j.setting, 'secret-model');
  assert.equal(j.observed_batches, 4);
  assert.ok(typeof j.value === 'number' && typeof j.baseline === 'number');
  const wrong = run(['attack', 'frequency', '--view', viewFile, '--corpus', CORPUS, '--mode', 'paper']);
  assert.equal(wrong.status, 3, wrong.stderr);
  assert.match(wrong.stderr, /recorded in sealed mode/);
  // inference: split generation through a KV cache; the prompt and every generated token cross
  const bundles = path.join(dir, 'bundles');
  const ob = run(['obfuscate', '--model', provDir, '--mode', 'sealed', '--seed', '5', '--out', bundles]);
  assert.equal(ob.status, 0, ob.stderr);
  const genView = path.join(dir, 'gen.view.safetensors');
  const g = run(['generate', '--enclave', path.join(bundles, 'enclave'), '--accelerator', path.join(bundles, 'accelerator'), '--prompt', 'The soup was cold and the bread', '--max-tokens', '6', '--token-mixing', 'off', '--record-view', genView]);
  assert.equal(g.status, 0, g.stderr);
  const dec = run(['attack', 'decode-public-base', '--view', genView, '--public', PUBLIC, '--corpus', CORPUS, '--json'], progress);
  assert.equal(dec.status, 0, dec.stderr);
  const de = events(dec.stderr);
  assert.ok(de.some((e) => /^alignment: refinement round 1, \d+ anchors$/.test(e.label)) && de.some((e) => /^decoding batch 1\//.test(e.label)), dec.stderr);
  // without --json: text lines
  const wa = run(['attack', 'weight-alignment', '--view', genView, '--public', PUBLIC], progress);
  assert.equal(wa.status, 0, wa.stderr);
  assert.match(wa.stderr, /^attack weight-alignment: \d+\/\d+ \(\d+%\) invariants, layer 0 elapsed \d+s, ETA /m);
  assert.match(wa.stderr.trimEnd().split('\n').pop()!, /^attack weight-alignment: (\d+)\/\1 \(100%\) done elapsed /);
  assert.match(wa.stdout, /^weight-alignment \(public-base, sealed mode/);
  const dj = JSON.parse(dec.stdout);
  assert.ok(dj.value > 0.9, `generation decoded: ${dec.stdout}`);
  assert.ok(dj.observed_batches >= 2);
});
