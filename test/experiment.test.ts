// `experiment paper --quick`: the contract of report/results.json, the HTML report, and the
// checks that run before any training.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync, readFileSync, mkdirSync, writeFileSync, cpSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { runPaperExperiments, recipeTable } from '../src/experiments/paper.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MODEL = path.join(ROOT, 'test/fixtures/vocab50257');

test('experiment paper --quick writes results.json (contract) and index.html with SVG charts; a rerun resumes', async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'obf-exp-'));
  try {
    const res = await runPaperExperiments({ models: [MODEL], datasets: ['food-reviews', 'austen'], dataDir: path.join(ROOT, 'data'), out, quick: true, steps: 3, methods: ['lora'] });
    const j = JSON.parse(readFileSync(path.join(out, 'results.json'), 'utf8'));
    for (const k of ['rows', 'fidelity', 'share', 'overhead']) assert.ok(Array.isArray(j[k]), k);
    assert.equal(j.rows.length, 2 * 4);
    for (const r of j.rows) {
      for (const k of ['dataset', 'model', 'method', 'mode', 'kappa', 'metric', 'value', 'steps', 'seconds']) assert.ok(k in r, `row field ${k}`);
      assert.ok(['local', 'sealed', 'paper'].includes(r.mode));
      assert.ok(r.kappa === null || r.kappa === '1' || r.kappa === 'naive');
      assert.equal(r.metric, r.dataset === 'austen' ? 'perplexity' : 'accuracy');
    }
    const paper1 = j.rows.find((r: { mode: string; kappa: string; dataset: string }) => r.mode === 'paper' && r.kappa === '1' && r.dataset === 'food-reviews');
    const local = j.rows.find((r: { mode: string; dataset: string }) => r.mode === 'local' && r.dataset === 'food-reviews');
    assert.equal(paper1.value, local.value, 'paper kappa 1 LoRA reproduces local');
    assert.ok(j.fidelity.some((f: { kappa: string }) => f.kappa === 'naive'));
    assert.ok(res.baselines.length === 2);
    // the metric before any step, per dataset and model, in the main table
    assert.deepEqual(res.before!.map((b) => [b.dataset, b.metric]), [['food-reviews', 'accuracy'], ['austen', 'perplexity']]);
    assert.ok(res.before!.every((b) => Number.isFinite(b.value) && Number.isFinite(b.loss)));
    const html = readFileSync(path.join(out, 'index.html'), 'utf8');
    assert.match(html, /<svg/);
    assert.match(html, /food-reviews/);
    const md = readFileSync(path.join(out, 'results.md'), 'utf8');
    assert.match(md, /## Gap to local fine-tuning/);
    assert.match(md, /\| metric \| before training \| local \|/);
    // food-reviews runs its own recipe (the token-embedding adapter), recorded in its rows and the report
    assert.deepEqual(local.recipe.lora.lora.targets, ['wte', 'q', 'v']);
    assert.deepEqual(local.spec.lora.targets, ['q', 'v', 'wte'], 'each row records its whole run spec');
    assert.equal(local.spec.pooling, 'mean');
    assert.match(md, /\| food-reviews \(own recipe\) \| mean \| wte,q,v \|/);
    assert.match(md, /\| austen \| last \| q,v \|/);
    assert.match(md, /\| food-reviews \| [^|]+ \| lora \| accuracy points \| [+-]\d/);
    // sealed and paper kappa 1 LoRA are local LoRA up to float error
    assert.match(md, /\| food-reviews \| [^|]+ \| lora \| accuracy points \| [+-]0\.00 \| [+-]0\.00 \|/);
    // a stored row made with another recipe is run again (here: a food row without its own)
    const stored = JSON.parse(readFileSync(path.join(out, 'results.json'), 'utf8'));
    const victim = stored.rows.find((r: { dataset: string; mode: string }) => r.dataset === 'food-reviews' && r.mode === 'sealed');
    delete victim.recipe;
    victim.seconds = -1;
    writeFileSync(path.join(out, 'results.json'), JSON.stringify(stored));
    const again = await runPaperExperiments({ models: [MODEL], datasets: ['food-reviews', 'austen'], dataDir: path.join(ROOT, 'data'), out, quick: true, steps: 3, methods: ['lora'] });
    assert.equal(again.rows.length, 8, 'finished rows are not run again');
    const rerun = again.rows.filter((r) => r.dataset === 'food-reviews' && r.mode === 'sealed');
    assert.equal(rerun.length, 1);
    assert.ok(rerun[0].seconds >= 0 && rerun[0].recipe, 'the row with the other recipe was replaced');
    assert.equal(again.rows.filter((r) => r.seconds >= 0).length, 8);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('bad inputs are refused before any training', async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'obf-exp-'));
  try {
    const base = { models: [MODEL], dataDir: path.join(ROOT, 'data'), out, quick: true, steps: 1, methods: ['lora' as const] };
    await assert.rejects(runPaperExperiments({ ...base, datasets: ['no-such-dataset'] }), /no-such-dataset.*not found/);
    await assert.rejects(runPaperExperiments({ ...base, models: [path.join(ROOT, 'test/fixtures/tiny')], datasets: ['food-reviews'] }), /does not match the GPT-2 tokenizer/);
    // labels differ between splits
    const dd = path.join(out, 'data', 'bad');
    mkdirSync(dd, { recursive: true });
    cpSync(path.join(ROOT, 'data/food-reviews/meta.json'), path.join(dd, 'meta.json'));
    writeFileSync(path.join(dd, 'train.jsonl'), '{"text":"a","label":"x"}\n{"text":"b","label":"y"}\n');
    writeFileSync(path.join(dd, 'test.jsonl'), '{"text":"a","label":"x"}\n{"text":"b","label":"z"}\n');
    await assert.rejects(runPaperExperiments({ ...base, dataDir: path.join(out, 'data'), datasets: ['bad'] }), /label sets of train and test differ/);
    writeFileSync(path.join(dd, 'train.jsonl'), '{"text": broken\n');
    await assert.rejects(runPaperExperiments({ ...base, dataDir: path.join(out, 'data'), datasets: ['bad'] }), /train.jsonl:1: not valid JSON/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('rows stored by an earlier version (recipe as {pooling, loraTargets, lr, fullEnclaveOptimizer}) count as made with today\'s recipe', async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'obf-exp-'));
  try {
    const legacy = { pooling: 'mean', loraTargets: ['wte', 'q', 'v'], lr: { lora: 3e-3, full: 3e-3 }, fullEnclaveOptimizer: 'adamw' };
    const rows = [['local', null], ['sealed', '1'], ['paper', '1'], ['paper', 'naive']].map(([mode, kappa]) => ({
      dataset: 'food-reviews', model: 'vocab50257', method: 'lora', mode, kappa, metric: 'accuracy', value: 0.5, loss: 1, steps: 1, seconds: -1, losses: [], recipe: legacy,
    }));
    writeFileSync(path.join(out, 'results.json'), JSON.stringify({ rows, fidelity: [], share: [], overhead: [], baselines: [], meta: {} }));
    const res = await runPaperExperiments({ models: [MODEL], datasets: ['food-reviews'], dataDir: path.join(ROOT, 'data'), out, quick: true, steps: 1, methods: ['lora'], rowsOnly: true });
    assert.deepEqual(res.rows.map((r) => r.seconds), [-1, -1, -1, -1], 'no row was run again');
    const t = recipeTable(res);
    assert.deepEqual(t.rows, [['food-reviews (own recipe)', 'mean', 'wte,q,v', '0.003', '0.003', 'adamw']]);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('--quick on a dataset whose quick training slice lacks some labels (wordnet-supersense): the quick test set keeps only known labels, and a Llama-family model runs the rows', async () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'obf-exp-'));
  try {
    const res = await runPaperExperiments({ models: [path.join(ROOT, 'models', 'llama-small')], datasets: ['wordnet-supersense'], dataDir: path.join(ROOT, 'data'), out, quick: true, steps: 1, methods: ['lora'], rowsOnly: true });
    assert.equal(res.rows.length, 4, 'local, sealed, paper k1 and paper naive');
    const local = res.rows.find((r) => r.mode === 'local')!, sealed = res.rows.find((r) => r.mode === 'sealed')!;
    assert.ok(Math.abs(local.loss - sealed.loss) < 1e-4 * local.loss, `sealed ${sealed.loss} vs local ${local.loss}`);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
