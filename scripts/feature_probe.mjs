#!/usr/bin/env node
// Linear probe of a frozen base model's features on a bundled classification dataset: how
// well do the features, unchanged, separate the classes? Writes the mean-pooled final states,
// the last token's final state and the mean token embedding of every train/test record to
// a temporary directory, then fits a logistic regression on each (scripts/feature_probe.py,
// numpy) and prints the test accuracies next to the majority class. Needs `npm run build`.
//
//   node scripts/feature_probe.mjs models/base-small food-reviews 64
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { loadCheckpoint } = await import(path.join(root, 'dist/src/model/checkpoint.js'));
const { GPT2 } = await import(path.join(root, 'dist/src/model/gpt2.js'));
const { gpt2Tokenizer } = await import(path.join(root, 'dist/src/model/tokenizer.js'));

const [model, dataset, maxLenArg] = process.argv.slice(2);
if (!model || !dataset) {
  console.error('usage: node scripts/feature_probe.mjs <model dir> <dataset> [max tokens, default 64]');
  process.exit(2);
}
const maxLen = Number(maxLenArg ?? 64);
const g = new GPT2(loadCheckpoint(model));
const C = g.config.n_embd;
const wte = g.layout.view(g.params, 'wte');
const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-probe-'));
try {
  const labels = JSON.parse(readFileSync(path.join(root, 'data', dataset, 'meta.json'), 'utf8')).labels;
  for (const split of ['train', 'test']) {
    const recs = readFileSync(path.join(root, 'data', dataset, `${split}.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const feats = new Float32Array(recs.length * 3 * C); // [mean final, last final, mean embedding]
    const y = new Int32Array(recs.length);
    for (const [i, r] of recs.entries()) {
      const ids = gpt2Tokenizer.encode(r.text).slice(0, maxLen);
      const T = ids.length;
      const toks = Int32Array.from(ids);
      await g.forward(toks, 1, T, null);
      const h = g.lastActivations().hf;
      const o = feats.subarray(i * 3 * C, (i + 1) * 3 * C);
      for (let t = 0; t < T; t++) {
        for (let c = 0; c < C; c++) {
          o[c] += h[t * C + c] / T;
          o[2 * C + c] += wte[toks[t] * C + c] / T;
        }
      }
      o.set(h.subarray((T - 1) * C, T * C), C);
      y[i] = labels.indexOf(r.label);
    }
    writeFileSync(path.join(dir, `${split}.f32`), Buffer.from(feats.buffer));
    writeFileSync(path.join(dir, `${split}.y`), Buffer.from(y.buffer));
  }
  const r = spawnSync('python3', [path.join(root, 'scripts/feature_probe.py'), dir, String(C)], { stdio: 'inherit' });
  process.exitCode = r.status ?? 1;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
