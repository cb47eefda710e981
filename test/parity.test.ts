// Parity with PyTorch: the fixtures under test/fixtures were produced by
// scripts/make_fixtures.py (a GPT-2 written in plain torch, HF semantics). The TypeScript
// model loads the same checkpoints and must reproduce logits, loss and every gradient.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openSafetensors } from '../src/io/safetensors.js';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import { GPT2 } from '../src/model/gpt2.js';
import { hfTensorList } from '../src/model/params.js';
import { availableBackends, setBackend } from '../src/tensor/gemm.js';
import { relErr } from './helpers.js';

const FIX = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');
const TOL = 1e-4;

function gradOf(model: GPT2, kind: Parameters<GPT2['layout']['layer']>[1], layer: number): Float32Array {
  const g = model.grads!;
  return layer >= 0 ? model.layout.layer(g, kind, layer) : model.layout.view(g, kind);
}

for (const backend of availableBackends()) {
  test(`tiny GPT-2 LM: logits, loss and all gradients match PyTorch (${backend})`, async () => {
    setBackend(backend);
    const model = new GPT2(loadCheckpoint(path.join(FIX, 'tiny')));
    const ref = openSafetensors(path.join(FIX, 'tiny', 'reference.safetensors'));
    const [B, T] = ref.info('tokens').shape;
    const tokens = ref.getInt('tokens');
    const targets = ref.getInt('targets');
    // logits without targets (forward only), then loss with targets
    const { logits } = await model.forward(tokens, B, T);
    const e = relErr(logits, ref.get('logits'));
    assert.ok(e < TOL, `logits relative error ${e}`);
    model.ensureGrads();
    model.zeroGrad();
    const { loss } = await model.forward(tokens, B, T, targets);
    const refLoss = ref.get('loss')[0];
    assert.ok(Math.abs(loss! - refLoss) / Math.abs(refLoss) < TOL, `loss ${loss} vs ${refLoss}`);
    await model.backward();
    let checked = 0;
    for (const t of hfTensorList(model.layout)) {
      const g = gradOf(model, t.kind, t.layer);
      const r = ref.get(`grad.${t.name}`);
      const err = relErr(g, r);
      assert.ok(err < TOL, `gradient of ${t.name}: relative error ${err.toExponential(2)}`);
      checked++;
    }
    assert.equal(checked, 2 + 12 * 2 + 2);
  });

  test(`tiny GPT-2 sequence classification matches PyTorch (${backend})`, async () => {
    setBackend(backend);
    const w = loadCheckpoint(path.join(FIX, 'tiny-cls'));
    assert.ok(w.cls, 'classification head loaded');
    const model = new GPT2(w);
    const ref = openSafetensors(path.join(FIX, 'tiny', 'reference.safetensors'));
    const [B, T] = ref.info('cls.tokens').shape;
    const pad = ref.getInt('cls.pad_token_id')[0];
    assert.equal(model.padTokenId, pad);
    const tokens = ref.getInt('cls.tokens');
    const labels = ref.getInt('cls.labels');
    const { logits } = await model.forwardCls(tokens, B, T);
    assert.ok(relErr(logits, ref.get('cls.logits')) < TOL, 'cls logits');
    model.ensureGrads();
    model.zeroGrad();
    const { loss } = await model.forwardCls(tokens, B, T, labels);
    const refLoss = ref.get('cls.loss')[0];
    assert.ok(Math.abs(loss! - refLoss) / refLoss < TOL, `cls loss ${loss} vs ${refLoss}`);
    await model.backward();
    for (const t of hfTensorList(model.layout)) {
      const err = relErr(gradOf(model, t.kind, t.layer), ref.get(`cls.grad.${t.name}`));
      assert.ok(err < TOL, `cls gradient of ${t.name}: relative error ${err.toExponential(2)}`);
    }
    const es = relErr(model.clsGrad!, ref.get('cls.grad.score.weight'));
    assert.ok(es < TOL, `score.weight gradient: ${es}`);
  });
}

test('real GPT-2 vocabulary (50257), fp16 checkpoint without prefix: logits, loss, gradients', async () => {
  const model = new GPT2(loadCheckpoint(path.join(FIX, 'vocab50257')));
  assert.equal(model.config.vocab_size, 50257);
  const ref = openSafetensors(path.join(FIX, 'vocab50257', 'reference.safetensors'));
  const [B, T] = ref.info('tokens').shape;
  const tokens = ref.getInt('tokens');
  const targets = ref.getInt('targets');
  const V = 50257;
  const { logits } = await model.forward(tokens, B, T);
  assert.ok(relErr(logits.subarray((T - 1) * V, T * V), ref.get('logits_last')) < TOL, 'last-position logits');
  const rowsum = ref.get('logits_rowsum');
  for (let t = 0; t < T; t++) {
    let s = 0;
    for (let i = 0; i < V; i++) s += logits[t * V + i];
    assert.ok(Math.abs(s - rowsum[t]) <= 1e-4 * Math.max(1, Math.abs(rowsum[t])) + 2e-3, `row ${t} logit sum ${s} vs ${rowsum[t]}`);
  }
  model.ensureGrads();
  model.zeroGrad();
  const { loss } = await model.forward(tokens, B, T, targets);
  const refLoss = ref.get('loss')[0];
  assert.ok(Math.abs(loss! - refLoss) / refLoss < TOL, `loss ${loss} vs ${refLoss}`);
  await model.backward();
  for (const t of hfTensorList(model.layout)) {
    if (t.name === 'wte.weight') continue;
    const err = relErr(gradOf(model, t.kind, t.layer), ref.get(`grad.${t.name}`));
    assert.ok(err < TOL, `gradient of ${t.name}: relative error ${err.toExponential(2)}`);
  }
  const rows = ref.getInt('grad.wte.weight.rows');
  const C = model.config.n_embd;
  const gw = model.layout.view(model.grads!, 'wte');
  const mine = new Float32Array(rows.length * C);
  rows.forEach((r, i) => mine.set(gw.subarray(r * C, (r + 1) * C), i * C));
  assert.ok(relErr(mine, ref.get('grad.wte.weight')) < TOL, 'selected wte gradient rows');
  let sq = 0;
  for (let i = 0; i < gw.length; i++) sq += gw[i] * gw[i];
  const refNorm = ref.get('grad.wte.weight.norm')[0];
  assert.ok(Math.abs(Math.sqrt(sq) - refNorm) / refNorm < TOL, `wte gradient norm ${Math.sqrt(sq)} vs ${refNorm}`);
});
