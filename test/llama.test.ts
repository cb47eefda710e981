// The plain Llama-family model: gradients of every parameter kind against finite differences,
// the KV cache, the classifier, LoRA and generation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LLAMA_PRESETS, type LlamaConfig } from '../src/model/config.js';
import { Llama, LLAMA_KINDS, llamaAdapters } from '../src/model/llama.js';
import { KVCache, generate } from '../src/model/transformer.js';
import { parseLoraTargets } from '../src/model/lora.js';
import { kvWidth } from '../src/model/config.js';
import { Rng } from '../src/tensor/rng.js';
import { numericGradAsync, assertGradClose, maxAbsDiff } from './helpers.js';

const micro = LLAMA_PRESETS['llama-micro'];
const tokensOf = (n: number, V: number, seed: number) => { const r = new Rng(seed); return Int32Array.from({ length: n }, () => r.int(V)); };

/** a random micro model with larger weights (finite differences need a signal) */
function model(c: LlamaConfig, seed: number, numLabels?: number): Llama {
  const m = Llama.random(c, seed, numLabels);
  for (const k of ['qkvw', 'ow', 'guw', 'downw', 'head', 'qkvb'] as const) {
    const v = m.layout.view(m.params, k);
    new Rng(seed + 1).fillNormal(v, 0.3);
  }
  const r = new Rng(seed + 2);
  for (const k of ['ln1w', 'ln2w', 'lnfw'] as const) for (const v of [m.layout.view(m.params, k)]) for (let i = 0; i < v.length; i++) v[i] = 1 + 0.3 * (r.uniform() - 0.5);
  return m;
}

for (const [name, c] of [
  ['untied, grouped queries', micro],
  ['tied, q/k/v bias, llama3 rope scaling', { ...micro, tie_word_embeddings: true, qkv_bias: true, rope_scaling: { type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8 } }],
] as [string, LlamaConfig][]) {
  test(`llama (${name}): every parameter kind's gradient matches finite differences`, async () => {
    const m = model(c, 3);
    const B = 2, T = 5;
    const tokens = tokensOf(B * T, c.vocab_size, 4), targets = tokensOf(B * T, c.vocab_size, 5);
    m.ensureGrads();
    m.zeroGrad();
    const { loss } = await m.forward(tokens, B, T, targets);
    assert.ok(loss! > 0 && Number.isFinite(loss!));
    await m.backward();
    const g = Float32Array.from(m.grads!);
    const f = async () => (await m.forward(tokens, B, T, targets)).loss!;
    const rng = new Rng(6);
    for (const k of LLAMA_KINDS) {
      const e = m.layout.entries[k];
      if (e.size === 0) continue;
      const idx = Array.from({ length: 6 }, () => e.offset + rng.int(e.size));
      assertGradClose(g, idx, await numericGradAsync(f, m.params, idx, 1e-2), 5e-2, `${name}: ${k}`);
    }
  });
}

test('llama: the KV cache (n_kv_head heads) gives the full forward\'s logits at every position; generation runs', async () => {
  const m = model(micro, 8);
  const T = 7;
  const tokens = tokensOf(T, micro.vocab_size, 9);
  const full = Float32Array.from((await m.forward(tokens, 1, T)).logits);
  const cache = new KVCache(micro.n_layer, micro.n_ctx, kvWidth(micro));
  assert.equal(kvWidth(micro), 8); // 2 kv heads of width 4
  let last = await m.forwardCached(cache, Array.from(tokens.subarray(0, 4)));
  const V = micro.vocab_size;
  assert.ok(maxAbsDiff(last, full.subarray(3 * V, 4 * V)) < 1e-4);
  for (let t = 4; t < T; t++) {
    last = await m.forwardCached(cache, [tokens[t]]);
    assert.ok(maxAbsDiff(last, full.subarray(t * V, (t + 1) * V)) < 1e-4, `position ${t}`);
  }
  const out = await generate(m, [1, 2, 3], { maxNewTokens: 30 });
  assert.equal(out.length, micro.n_ctx - 3 + 1, 'stops at the context length (the last token comes from the last position)');
  assert.deepEqual(await generate(m, [1, 2, 3], { maxNewTokens: 5 }), out.slice(0, 5), 'greedy is deterministic');
});

test('llama: classifier on the last non-pad token and LoRA on all seven projections match finite differences', async () => {
  const m = model(micro, 11, 3);
  m.padTokenId = 0;
  const B = 2, T = 5;
  const toks = tokensOf(B * T, micro.vocab_size, 12).map((t) => t || 1);
  toks.fill(0, 3, 5); // row 0 padded after 3 tokens
  const labels = new Int32Array([2, 1]);
  const targets = parseLoraTargets('q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj', 'llama');
  assert.deepEqual(targets, ['q', 'k', 'v', 'proj', 'gate', 'up', 'mlp-proj']);
  assert.throws(() => parseLoraTargets('fc', 'llama'), /unknown LoRA target "fc" for a Llama-family model/);
  const ad = llamaAdapters({ rank: 2, alpha: 4, dropout: 0, targets }, micro);
  ad.init(new Rng(13));
  for (const v of ad.views) new Rng(v.layer * 7 + v.din).fillNormal(v.B, 0.3); // non-zero B: every path carries a gradient
  m.adapters = ad;
  const r0 = await m.forwardCls(toks, B, T);
  // padding is ignored: other pad-position tokens change nothing
  const toks2 = Int32Array.from(toks);
  m.padTokenId = 0;
  toks2[4] = 0;
  assert.ok(maxAbsDiff(Float32Array.from(r0.logits), (await m.forwardCls(toks2, B, T)).logits) === 0);
  m.zeroGrad();
  await m.forwardCls(toks, B, T, labels);
  await m.backward();
  const gc = Float32Array.from(m.clsGrad!), ga = Float32Array.from(ad.grads);
  const f = async () => (await m.forwardCls(toks, B, T, labels)).loss!;
  assertGradClose(gc, [0, 7, 20, 47], await numericGradAsync(f, m.cls!.weight, [0, 7, 20, 47], 1e-2), 5e-2, 'classifier');
  const rng = new Rng(14);
  for (const v of ad.views) {
    const off = v.A.byteOffset / 4 - ad.params.byteOffset / 4;
    const idx = [off + rng.int(v.A.length), off + v.A.length + rng.int(v.B.length), off + rng.int(v.A.length)];
    assertGradClose(ga, idx, await numericGradAsync(f, ad.params, idx, 1e-2), 5e-2, `LoRA ${v.target} layer ${v.layer}`);
  }
});
