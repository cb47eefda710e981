// Llama-family checkpoints: HF layout round trips (F32, BF16, sharded), and configs refused by field.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { LLAMA_PRESETS } from '../src/model/config.js';
import { Llama } from '../src/model/llama.js';
import { loadLlamaCheckpoint, saveLlamaCheckpoint, llamaConfigFromHF } from '../src/model/llama_checkpoint.js';
import { openSafetensors } from '../src/io/safetensors.js';
import { BundleError } from '../src/errors.js';
import { maxAbsDiff } from './helpers.js';

const micro = LLAMA_PRESETS['llama-micro'];
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'llama-ckpt-'));

test('llama checkpoint: nn.Linear layout on disk, F32 round trip exact, BF16 and shards close, Qwen2 biases', async () => {
  const m = Llama.random(micro, 1, 3);
  m.padTokenId = 0;
  const dir = tmp();
  saveLlamaCheckpoint(dir, m.weights());
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
  assert.equal(cfg.architectures[0], 'LlamaForSequenceClassification');
  assert.equal(cfg.num_key_value_heads, 2);
  const st = openSafetensors(path.join(dir, 'model.safetensors'));
  assert.deepEqual(st.info('model.layers.0.self_attn.k_proj.weight').shape, [8, 16]); // [KV, C]
  assert.deepEqual(st.info('model.layers.1.mlp.down_proj.weight').shape, [16, 24]); // [C, I]
  assert.deepEqual(st.info('lm_head.weight').shape, [64, 16]);
  // the stored q_proj is the transpose of the fused weight's q columns
  const q = st.get('model.layers.0.self_attn.q_proj.weight');
  const qkvw = m.layout.layer(m.params, 'qkvw', 0);
  assert.equal(q[3 * 16 + 5], qkvw[5 * 32 + 3]);
  const back = loadLlamaCheckpoint(dir);
  assert.equal(back.arch, 'llama');
  assert.deepEqual(back.params, m.params);
  assert.deepEqual(back.cls!.weight, m.cls!.weight);
  assert.equal(back.padTokenId, 0);
  const tokens = new Int32Array([1, 5, 9, 2]);
  const ref = Float32Array.from((await m.forward(tokens, 1, 4)).logits);
  const d2 = tmp();
  saveLlamaCheckpoint(d2, m.weights(), { dtype: 'BF16', shardBytes: 4000 });
  assert.ok(fs.existsSync(path.join(d2, 'model.safetensors.index.json')) && !fs.existsSync(path.join(d2, 'model.safetensors')));
  const bf = new Llama(loadLlamaCheckpoint(d2));
  assert.ok(maxAbsDiff((await bf.forward(tokens, 1, 4)).logits, ref) < 2e-2);
  // Qwen2: q/k/v biases, tied head
  const qw = Llama.random({ ...micro, qkv_bias: true, tie_word_embeddings: true }, 2);
  qw.layout.view(qw.params, 'qkvb').fill(0.25);
  const d3 = tmp();
  saveLlamaCheckpoint(d3, qw.weights());
  const qc = JSON.parse(fs.readFileSync(path.join(d3, 'config.json'), 'utf8'));
  assert.equal(qc.model_type, 'qwen2');
  assert.ok(!openSafetensors(path.join(d3, 'model.safetensors')).names().includes('lm_head.weight'));
  assert.deepEqual(loadLlamaCheckpoint(d3).params, qw.params);
  // Mistral's layout is Llama's: F16, model_type kept
  const d4 = tmp();
  saveLlamaCheckpoint(d4, Llama.random(micro, 4).weights(), { arch: 'mistral', dtype: 'F16' });
  const mc = JSON.parse(fs.readFileSync(path.join(d4, 'config.json'), 'utf8'));
  assert.deepEqual([mc.model_type, mc.architectures[0], mc.sliding_window, mc.torch_dtype], ['mistral', 'MistralForCausalLM', null, 'float16']);
  const mw = loadLlamaCheckpoint(d4);
  assert.equal(mw.arch, 'mistral');
  assert.ok(maxAbsDiff(mw.params, Llama.random(micro, 4).params) < 1e-3);
  assert.throws(() => saveLlamaCheckpoint(tmp(), qw.weights(), { arch: 'llama' }), /q\/k\/v biases cannot be saved as model_type llama/);
});

test('llama checkpoint: unsupported or wrong configs and tensors are refused naming the field', () => {
  const base = {
    model_type: 'llama', hidden_size: 16, intermediate_size: 24, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
    max_position_embeddings: 16, vocab_size: 64, rms_norm_eps: 1e-5, hidden_act: 'silu',
  };
  const f = 'x/config.json';
  const { config } = llamaConfigFromHF(base, f);
  assert.equal(config.n_kv_head, 2);
  assert.equal(config.tie_word_embeddings, false);
  assert.deepEqual(llamaConfigFromHF({ ...base, rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8 } }, f).config.rope_scaling?.type, 'llama3');
  assert.equal(llamaConfigFromHF({ ...base, rope_scaling: { type: 'linear', factor: 2 } }, f).config.rope_scaling?.type, 'linear');
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ rope_scaling: { rope_type: 'yarn', factor: 4 } }, /rope_scaling type "yarn" is not supported/],
    [{ rope_scaling: { type: 'linear' } }, /rope_scaling.factor must be a positive number/],
    [{ hidden_act: 'gelu' }, /hidden_act "gelu" is not supported/],
    [{ model_type: 'mistral', sliding_window: 8 }, /sliding_window=8 is not supported/],
    [{ model_type: 'qwen2', use_sliding_window: true }, /use_sliding_window=true/],
    [{ num_key_value_heads: 3 }, /not a multiple of num_key_value_heads/],
    [{ attention_bias: true }, /attention_bias=true/],
    [{ hidden_size: undefined }, /"hidden_size" must be a positive integer/],
    [{ head_dim: 8 }, /head_dim=8/],
  ];
  for (const [patch, re] of bad) assert.throws(() => llamaConfigFromHF({ ...base, ...patch }, f), (e: Error) => e instanceof BundleError && re.test(e.message), JSON.stringify(patch));
  assert.equal(llamaConfigFromHF({ ...base, model_type: 'mistral', sliding_window: null }, f).config.n_ctx, 16);
  // a missing tensor, and a transposed one
  const m = Llama.random(micro, 3);
  const dir = tmp();
  saveLlamaCheckpoint(dir, m.weights(), { shardBytes: 3000 });
  const index = JSON.parse(fs.readFileSync(path.join(dir, 'model.safetensors.index.json'), 'utf8'));
  delete index.weight_map['model.layers.1.mlp.up_proj.weight'];
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
  assert.throws(() => loadLlamaCheckpoint(dir), /missing 1 tensor\(s\) for a 2-layer Llama model: "layers.1.mlp.up_proj.weight"/);
});

test('a sequence-classification checkpoint (no lm_head) loads and is written back without one', () => {
  const fix = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../test/fixtures/llama-cls');
  const w = loadLlamaCheckpoint(fix);
  assert.equal(w.cls!.numLabels, 3);
  const dir = tmp();
  saveLlamaCheckpoint(dir, w);
  const names = openSafetensors(path.join(dir, 'model.safetensors')).names();
  assert.ok(names.includes('score.weight') && !names.includes('lm_head.weight'));
  assert.equal(JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')).architectures[0], 'LlamaForSequenceClassification');
  assert.deepEqual(loadLlamaCheckpoint(dir).params, w.params);
});
