import { test } from 'node:test';
import assert from 'node:assert/strict';
import { getPreset } from '../src/model/config.js';
import { GPT2 } from '../src/model/gpt2.js';
import { KVCache, generate, sampleToken } from '../src/model/transformer.js';
import { AdamW, SGD, clipScale, cosineSchedule, gpt2DecayMask, sumSquares } from '../src/train/optim.js';
import { trainLM } from '../src/train/lm.js';
import { Rng } from '../src/tensor/rng.js';
import { gpt2Tokenizer, tokenizerFor } from '../src/model/tokenizer.js';
import { LoraAdapters } from '../src/model/lora.js';
import { mergeAdaptersPlain } from '../src/train/session.js';
import { relErr, numericGradAsync, assertGradClose } from './helpers.js';

const micro = getPreset('gpt2-micro');

function randomTokens(n: number, V: number, seed: number): Int32Array {
  const r = new Rng(seed);
  return Int32Array.from({ length: n }, () => r.int(V));
}

test('KV-cache incremental forward equals the full forward at every position', async () => {
  const model = GPT2.random(getPreset('gpt2-tiny'), 3);
  const T = 12;
  const V = model.config.vocab_size;
  const tokens = randomTokens(T, V, 4);
  const full = Float32Array.from((await model.forward(tokens, 1, T)).logits);
  const cache = new KVCache(model.config.n_layer, model.config.n_ctx, model.config.n_embd);
  // prefill 5 tokens, then one at a time
  let logits = await model.forwardCached(cache, Array.from(tokens.subarray(0, 5)));
  assert.ok(relErr(logits, full.subarray(4 * V, 5 * V)) < 1e-5, 'prefill logits');
  for (let t = 5; t < T; t++) {
    logits = await model.forwardCached(cache, [tokens[t]]);
    assert.ok(relErr(logits, full.subarray(t * V, (t + 1) * V)) < 1e-5, `logits at position ${t}`);
  }
  assert.equal(cache.pos, T);
});

test('generation: greedy is deterministic and stops at the context length', async () => {
  const model = GPT2.random(micro, 5);
  const a = await generate(model, [1, 2, 3], { maxNewTokens: 50 });
  const b = await generate(model, [1, 2, 3], { maxNewTokens: 50 });
  assert.deepEqual(a, b);
  // the last token is predicted from position n_ctx-1, so n_ctx - prompt + 1 new tokens fit
  assert.equal(a.length, micro.n_ctx - 3 + 1);
  const c = await generate(model, [1, 2, 3], { maxNewTokens: 8, temperature: 1.0, topK: 5, seed: 9 });
  const d = await generate(model, [1, 2, 3], { maxNewTokens: 8, temperature: 1.0, topK: 5, seed: 9 });
  assert.deepEqual(c, d, 'seeded sampling is reproducible');
  await assert.rejects(generate(model, [], { maxNewTokens: 1 }), /non-empty prompt/);
  await assert.rejects(generate(model, [micro.vocab_size], { maxNewTokens: 1 }), /out of range/);
});

test('sampling: greedy, top-k 1 and temperature', async () => {
  const logits = new Float32Array([0.1, 3, -1, 2.9]);
  const rng = new Rng(1);
  assert.equal(sampleToken(logits, rng), 1);
  assert.equal(sampleToken(logits, rng, { temperature: 1, topK: 1 }), 1);
  const counts = [0, 0, 0, 0];
  for (let i = 0; i < 2000; i++) counts[sampleToken(logits, rng, { temperature: 1, topK: 2 })]++;
  assert.equal(counts[0] + counts[2], 0, 'top-2 never picks others');
  assert.ok(counts[1] > 900 && counts[3] > 800, `both top tokens sampled: ${counts}`);
});

test('bad inputs: token ids out of range, sequence too long, wrong label', async () => {
  const model = GPT2.random(micro, 1, 3);
  await assert.rejects(model.forward(new Int32Array([0, 64]), 1, 2), /token id 64 at position 1 is out of range/);
  await assert.rejects(model.forward(new Int32Array([0, -1]), 1, 2), /out of range/);
  await assert.rejects(model.forward(new Int32Array(17), 1, 17), /exceeds the model's context of 16/);
  await assert.rejects(model.forwardCls(new Int32Array(4), 2, 2, new Int32Array([0, 3])), /label 3 of example 1/);
  await assert.rejects(model.backward(), /needs a preceding forward/);
});

test('whole-model gradient spot checks against finite differences (LM and classification)', async () => {
  const model = GPT2.random(micro, 7, 3);
  const B = 2, T = 6;
  const tokens = randomTokens(B * T, micro.vocab_size, 8);
  const targets = randomTokens(B * T, micro.vocab_size, 9);
  model.ensureGrads();
  model.zeroGrad();
  await model.forward(tokens, B, T, targets);
  await model.backward();
  const g = Float32Array.from(model.grads!);
  const rng = new Rng(10);
  const idx = Array.from({ length: 24 }, () => rng.int(model.layout.total));
  const f = async () => (await model.forward(tokens, B, T, targets)).loss!;
  assertGradClose(g, idx, await numericGradAsync(f, model.params, idx, 1e-2), 5e-2, 'LM loss gradient');
  // classification head: padded rows
  const toks = Int32Array.from(tokens);
  toks.fill(0, 3, 6);
  const labels = new Int32Array([2, 0]);
  model.padTokenId = 0;
  model.zeroGrad();
  await model.forwardCls(toks, B, T, labels);
  await model.backward();
  const gc = Float32Array.from(model.clsGrad!);
  const fc = async () => (await model.forwardCls(toks, B, T, labels)).loss!;
  const ic = [0, 5, 17, 33, 47];
  assertGradClose(gc, ic, await numericGradAsync(fc, model.cls!.weight, ic, 1e-2), 5e-2, 'classifier weight gradient');
});

test('mean-pooled classification: every gradient against finite differences, and padding is ignored', async () => {
  const model = GPT2.random(micro, 17, 3);
  const B = 2, T = 6;
  const toks = randomTokens(B * T, micro.vocab_size, 18);
  for (let i = 0; i < toks.length; i++) if (toks[i] === 0) toks[i] = 1;
  toks.fill(0, 4, 6); // row 0: 4 tokens, then padding
  const labels = new Int32Array([1, 2]);
  model.padTokenId = 0;
  model.cls!.pooling = 'mean';
  model.ensureGrads();
  model.zeroGrad();
  await model.forwardCls(toks, B, T, labels);
  await model.backward();
  const g = Float32Array.from(model.grads!);
  const gc = Float32Array.from(model.clsGrad!);
  const rng = new Rng(19);
  const idx = Array.from({ length: 24 }, () => rng.int(model.layout.total));
  const f = async () => (await model.forwardCls(toks, B, T, labels)).loss!;
  assertGradClose(g, idx, await numericGradAsync(f, model.params, idx, 1e-2), 5e-2, 'mean-pooled transformer gradient');
  const ic = [0, 5, 17, 33, 47];
  assertGradClose(gc, ic, await numericGradAsync(f, model.cls!.weight, ic, 1e-2), 5e-2, 'mean-pooled classifier gradient');
  // padding does not count: row 0 equals itself without its padding
  const alone = (await model.forwardCls(toks.slice(0, 4), 1, 4)).logits.slice();
  const both = (await model.forwardCls(toks, B, T)).logits;
  assert.ok(relErr(both.subarray(0, 3), alone) < 1e-5, 'row 0 pooled over its 4 tokens only');
  model.cls!.pooling = 'last';
  const last = (await model.forwardCls(toks, B, T)).logits;
  assert.ok(relErr(last.subarray(0, 3), alone) > 1e-3, 'last and mean pooling differ');
});

test('gradients accumulate across backward calls', async () => {
  const model = GPT2.random(micro, 2);
  const tokens = randomTokens(8, micro.vocab_size, 1);
  const targets = randomTokens(8, micro.vocab_size, 2);
  model.ensureGrads();
  model.zeroGrad();
  await model.forward(tokens, 1, 8, targets);
  await model.backward();
  const once = Float32Array.from(model.grads!);
  await model.forward(tokens, 1, 8, targets);
  await model.backward();
  const twice = model.grads!;
  const doubled = once.map((x) => 2 * x);
  assert.ok(relErr(twice, doubled) < 1e-6);
});

test('AdamW and SGD-momentum steps match their formulas; clipping; schedule', async () => {
  const p = new Float32Array([1, -2]);
  const g = new Float32Array([0.5, -0.1]);
  const adam = new AdamW(2, { weightDecay: 0.1 });
  adam.step(p, g, 0.01);
  // first step: m^ = g, v^ = g^2 -> update = sign(g) (up to eps) + wd p
  assert.ok(Math.abs(p[0] - (1 - 0.01 * (1 + 0.1 * 1))) < 1e-6);
  assert.ok(Math.abs(p[1] - (-2 - 0.01 * (-1 + 0.1 * -2))) < 1e-6);
  const q = new Float32Array([1]);
  const sgd = new SGD(1, { momentum: 0.9 });
  sgd.step(q, new Float32Array([1]), 0.1); // b = 1
  sgd.step(q, new Float32Array([1]), 0.1); // b = 1.9
  assert.ok(Math.abs(q[0] - (1 - 0.1 - 0.19)) < 1e-6);
  const st = sgd.state();
  const sgd2 = new SGD(1, { momentum: 0.9 });
  sgd2.load(st);
  const q2 = Float32Array.from(q);
  sgd.step(q, new Float32Array([0.5]), 0.1);
  sgd2.step(q2, new Float32Array([0.5]), 0.1);
  assert.equal(q[0], q2[0], 'optimizer state round-trips');
  const a = new Float32Array([3, 0]);
  const b = new Float32Array([4]);
  const norm = Math.sqrt(sumSquares(a, b));
  assert.ok(Math.abs(norm - 5) < 1e-6);
  assert.ok(Math.abs(clipScale(norm, 1) * norm - 1) < 1e-5);
  assert.equal(clipScale(norm, 10), 1);
  assert.equal(clipScale(norm, 0), 1);
  assert.ok(!Number.isFinite(Math.sqrt(sumSquares(new Float32Array([NaN])))));
  assert.equal(cosineSchedule(0, 100, 1, 10), 0.1);
  assert.ok(Math.abs(cosineSchedule(10, 100, 1, 10) - 1) < 1e-12);
  assert.ok(Math.abs(cosineSchedule(100, 100, 1, 10) - 0.1) < 1e-12);
  const mask = gpt2DecayMask(GPT2.random(micro, 1).layout);
  const lay = GPT2.random(micro, 1).layout;
  assert.equal(mask[lay.entries.qkvw.offset], 1);
  assert.equal(mask[lay.entries.qkvb.offset], 0);
  assert.equal(mask[lay.entries.lnfw.offset], 0);
});

test('training drives the loss down on a repeated sequence', async () => {
  const model = GPT2.random(micro, 11);
  const pattern = [5, 9, 2, 7, 1, 3, 8, 4];
  const stream = Int32Array.from({ length: 400 }, (_, i) => pattern[i % pattern.length]);
  const losses = await trainLM(model, stream, { steps: 60, batch: 4, seq: 8, lr: 1e-2, warmup: 5, seed: 1 });
  assert.ok(losses[0] > 3, `initial loss ${losses[0]}`);
  assert.ok(losses[losses.length - 1] < 0.5, `final loss ${losses[losses.length - 1]}`);
});

test('GPT-2 tokenizer round-trips text and knows <|endoftext|>', async () => {
  const text = 'It is a truth universally acknowledged, that a single man...';
  const ids = gpt2Tokenizer.encode(text);
  assert.equal(gpt2Tokenizer.decode(ids), text);
  assert.deepEqual(gpt2Tokenizer.encode('Hello world'), [15496, 995]);
  assert.deepEqual(gpt2Tokenizer.encode('<|endoftext|>'), [50256]);
  assert.throws(() => tokenizerFor(512), /needs a vocabulary of 50257/);
});

test('the plain GPT-2 takes LoRA adapters: logits equal the merged weights, adapter gradients match finite differences', async () => {
  const model = GPT2.random(micro, 21);
  for (const k of ['qkvw', 'attprojw', 'fcw', 'fcprojw'] as const) new Rng(k.length).fillNormal(model.layout.view(model.params, k), 0.3); // finite differences need a signal
  const base = new GPT2({ ...model.weights(), params: Float32Array.from(model.params) });
  const ad = new LoraAdapters({ rank: 2, alpha: 4, dropout: 0, targets: ['q', 'v', 'proj', 'fc', 'mlp-proj'] }, micro.n_layer, micro.n_embd, micro.vocab_size);
  ad.init(new Rng(22));
  for (const v of ad.views) new Rng(v.layer * 7 + v.din).fillNormal(v.B, 0.3); // non-zero B: every adapter has an effect
  model.adapters = ad;
  const B = 2, T = 6, V = micro.vocab_size;
  const tokens = randomTokens(B * T, V, 23), targets = randomTokens(B * T, V, 24);
  const adapted = Float32Array.from((await model.forward(tokens, B, T)).logits);
  const merged = (await new GPT2(mergeAdaptersPlain(base.weights(), ad)).forward(tokens, B, T)).logits;
  assert.ok(relErr(adapted, merged) < 1e-4, `adapted vs merged logits: ${relErr(adapted, merged)}`);
  assert.ok(relErr(adapted, (await base.forward(tokens, B, T)).logits) > 1e-2, 'the adapters change the logits');
  model.zeroGrad();
  await model.forward(tokens, B, T, targets);
  await model.backward();
  const ga = Float32Array.from(ad.grads);
  const f = async () => (await model.forward(tokens, B, T, targets)).loss!;
  const rng = new Rng(25);
  for (const v of ad.views) {
    const off = v.A.byteOffset / 4 - ad.params.byteOffset / 4;
    const idx = [off + rng.int(v.A.length), off + v.A.length + rng.int(v.B.length), off + rng.int(v.A.length)];
    assertGradClose(ga, idx, await numericGradAsync(f, ad.params, idx, 1e-2), 5e-2, `LoRA ${v.target} layer ${v.layer}`);
  }
});
