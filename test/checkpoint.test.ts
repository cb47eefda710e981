import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { GPT2Config } from '../src/model/config.js';
import { ParamLayout, hfTensorList } from '../src/model/params.js';
import type { GPT2Weights } from '../src/model/weights.js';
import { hfConfigJson, loadCheckpoint, readHFConfig, saveCheckpoint } from '../src/model/checkpoint.js';
import {
  bf16ToFloat,
  floatToBf16,
  floatToHalf,
  halfToFloat,
  openSafetensors,
  readSafetensorsHeader,
  writeSafetensors,
  type TensorToWrite,
} from '../src/io/safetensors.js';

const CFG: GPT2Config = { n_layer: 2, n_head: 2, n_embd: 16, n_ctx: 16, vocab_size: 64, layer_norm_epsilon: 1e-5 };

let tmp: string;
let counter = 0;
before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ckpt-test-'));
});
after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});
const newDir = (tag: string) => {
  const d = path.join(tmp, `${tag}-${counter++}`);
  fs.mkdirSync(d);
  return d;
};

function randomWeights(config: GPT2Config = CFG, seed = 1, cls?: { numLabels: number; labels?: string[] }): GPT2Weights {
  let s = seed >>> 0;
  const r = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296 - 0.5;
  };
  const layout = new ParamLayout(config);
  const params = new Float32Array(layout.total);
  for (let i = 0; i < params.length; i++) params[i] = r() * 0.2;
  const w: GPT2Weights = { config, layout, params };
  if (cls) {
    const weight = new Float32Array(cls.numLabels * config.n_embd);
    for (let i = 0; i < weight.length; i++) weight[i] = r() * 0.2;
    w.cls = { numLabels: cls.numLabels, weight, ...(cls.labels ? { labels: cls.labels } : {}) };
  }
  return w;
}

/** Tensors of a model as HF would store them, for hand-made (possibly broken) checkpoints. */
function hfTensors(w: GPT2Weights, prefix = 'transformer.'): TensorToWrite[] {
  return hfTensorList(w.layout).map((t) => ({
    name: prefix + t.name,
    dtype: 'F32' as const,
    shape: t.shape,
    data: t.layer >= 0 ? w.layout.layer(w.params, t.kind, t.layer) : w.layout.view(w.params, t.kind),
  }));
}

function hfConfig(extra: Record<string, unknown> = {}): Record<string, unknown> {
  // As written by transformers for GPT2LMHeadModel (abridged), without n_ctx or layer_norm_epsilon.
  return {
    activation_function: 'gelu_new',
    architectures: ['GPT2LMHeadModel'],
    attn_pdrop: 0.1,
    bos_token_id: 50256,
    embd_pdrop: 0.1,
    eos_token_id: 50256,
    initializer_range: 0.02,
    model_type: 'gpt2',
    n_embd: CFG.n_embd,
    n_head: CFG.n_head,
    n_inner: null,
    n_layer: CFG.n_layer,
    n_positions: CFG.n_ctx,
    reorder_and_upcast_attn: false,
    resid_pdrop: 0.1,
    scale_attn_by_inverse_layer_idx: false,
    scale_attn_weights: true,
    summary_type: 'cls_index',
    task_specific_params: { 'text-generation': { do_sample: true, max_length: 50 } },
    torch_dtype: 'float32',
    transformers_version: '4.44.0',
    use_cache: true,
    vocab_size: CFG.vocab_size,
    ...extra,
  };
}

/** Writes config.json + model.safetensors from a tensor list. */
function handMade(tag: string, tensors: TensorToWrite[], config: Record<string, unknown> = hfConfig()): string {
  const dir = newDir(tag);
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  return dir;
}

function throwsWith(fn: () => unknown, ...parts: string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof Error, 'expected an Error');
    for (const p of parts) assert.ok(e.message.includes(p), `message ${JSON.stringify(e.message)} lacks ${JSON.stringify(p)}`);
    return true;
  });
}

describe('saveCheckpoint / loadCheckpoint round trips', () => {
  test('F32 default layout round-trips exactly', () => {
    const dir = newDir('f32');
    const w = randomWeights();
    saveCheckpoint(dir, w);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['config.json', 'model.safetensors']);
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    assert.equal(cfg.model_type, 'gpt2');
    assert.deepEqual(cfg.architectures, ['GPT2LMHeadModel']);
    assert.equal(cfg.n_positions, 16);
    assert.equal(cfg.n_ctx, 16);
    assert.equal(cfg.activation_function, 'gelu_new');
    assert.equal(cfg.torch_dtype, 'float32');
    assert.equal(cfg.num_labels, undefined);
    const f = openSafetensors(path.join(dir, 'model.safetensors'));
    assert.deepEqual(f.metadata, { format: 'pt' });
    assert.ok(f.names().every((n) => n.startsWith('transformer.')));
    assert.equal(f.names().length, hfTensorList(w.layout).length);
    assert.deepEqual(f.info('transformer.h.1.attn.c_attn.weight').shape, [16, 48]);

    const back = loadCheckpoint(dir);
    assert.deepEqual(back.config, CFG);
    assert.deepEqual(back.params, w.params);
    assert.equal(back.cls, undefined);
    assert.equal(back.padTokenId, undefined);
    // also through the file path
    assert.deepEqual(loadCheckpoint(path.join(dir, 'model.safetensors')).params, w.params);
    assert.deepEqual(loadCheckpoint(path.join(dir, 'config.json')).params, w.params);
  });

  test('without prefix, with lm_head and legacy attn buffers', () => {
    const dir = newDir('variants');
    const w = randomWeights(CFG, 2);
    saveCheckpoint(dir, w, { prefix: false, lmHead: true, attnBias: true });
    const h = readSafetensorsHeader(path.join(dir, 'model.safetensors'));
    const names = [...h.tensors.keys()];
    assert.ok(names.includes('wte.weight'));
    assert.ok(!names.some((n) => n.startsWith('transformer.')));
    assert.ok(names.includes('lm_head.weight'));
    assert.deepEqual(h.tensors.get('h.1.attn.bias')!.shape, [1, 1, 16, 16]);
    assert.deepEqual(h.tensors.get('h.0.attn.masked_bias')!.shape, []);
    const f = openSafetensors(path.join(dir, 'model.safetensors'));
    const tril = f.get('h.0.attn.bias');
    assert.equal(tril[0 * 16 + 0], 1);
    assert.equal(tril[0 * 16 + 1], 0);
    assert.equal(tril[5 * 16 + 3], 1);
    assert.deepEqual(loadCheckpoint(dir).params, w.params);

    const dir2 = newDir('variants2');
    saveCheckpoint(dir2, w, { prefix: true, lmHead: true, attnBias: true });
    const names2 = [...readSafetensorsHeader(path.join(dir2, 'model.safetensors')).tensors.keys()];
    assert.ok(names2.includes('transformer.h.0.attn.bias'));
    assert.ok(names2.includes('lm_head.weight'));
    assert.deepEqual(loadCheckpoint(dir2).params, w.params);
  });

  test('F16 and BF16 round-trip within rounding', () => {
    const w = randomWeights(CFG, 3);
    for (const dtype of ['F16', 'BF16'] as const) {
      const dir = newDir(dtype);
      saveCheckpoint(dir, w, { dtype, lmHead: true });
      const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
      assert.equal(cfg.torch_dtype, dtype === 'F16' ? 'float16' : 'bfloat16');
      assert.equal(openSafetensors(path.join(dir, 'model.safetensors')).info('transformer.wte.weight').dtype, dtype);
      const back = loadCheckpoint(dir);
      const round = dtype === 'F16' ? (v: number) => halfToFloat(floatToHalf(v)) : (v: number) => bf16ToFloat(floatToBf16(v));
      for (let i = 0; i < w.params.length; i++) assert.equal(back.params[i], Math.fround(round(w.params[i]!)));
    }
  });

  test('F16 save refuses values that overflow, any save refuses NaN', () => {
    const w = randomWeights(CFG, 4);
    w.params[w.layout.entries.wpe.offset + 3] = 1e5;
    throwsWith(() => saveCheckpoint(newDir('ovf'), w, { dtype: 'F16' }), 'wpe.weight', 'overflows F16');
    saveCheckpoint(newDir('ovf-bf16'), w, { dtype: 'BF16' });
    w.params[w.layout.entries.wpe.offset + 3] = NaN;
    throwsWith(() => saveCheckpoint(newDir('nan'), w), 'transformer.wpe.weight', 'not finite');
  });

  test('sharded into 3 shards with an index', () => {
    const dir = newDir('sharded');
    const w = randomWeights(CFG, 5);
    saveCheckpoint(dir, w, { shardBytes: 12000 });
    const files = fs.readdirSync(dir).sort();
    assert.deepEqual(files, [
      'config.json',
      'model-00001-of-00003.safetensors',
      'model-00002-of-00003.safetensors',
      'model-00003-of-00003.safetensors',
      'model.safetensors.index.json',
    ]);
    const index = JSON.parse(fs.readFileSync(path.join(dir, 'model.safetensors.index.json'), 'utf8'));
    assert.equal(index.metadata.total_size, w.layout.total * 4);
    assert.equal(Object.keys(index.weight_map).length, hfTensorList(w.layout).length);
    assert.equal(index.weight_map['transformer.wte.weight'], 'model-00001-of-00003.safetensors');
    for (const f of files.filter((x) => x.startsWith('model-'))) {
      assert.ok(fs.statSync(path.join(dir, f)).size <= 12000 + 4096);
    }
    assert.deepEqual(loadCheckpoint(dir).params, w.params);
    assert.deepEqual(loadCheckpoint(path.join(dir, 'model.safetensors.index.json')).params, w.params);

    // Re-saving unsharded into the same directory removes the shards and the index.
    saveCheckpoint(dir, w);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['config.json', 'model.safetensors']);
    // ...and sharded again removes model.safetensors.
    saveCheckpoint(dir, w, { shardBytes: 1 << 20 });
    assert.deepEqual(fs.readdirSync(dir).sort(), ['config.json', 'model-00001-of-00001.safetensors', 'model.safetensors.index.json']);
    assert.deepEqual(loadCheckpoint(dir).params, w.params);
  });

  test('classification head with labels and pad token', () => {
    const dir = newDir('cls');
    const w = randomWeights(CFG, 6, { numLabels: 3, labels: ['neg', 'neu', 'pos'] });
    w.padTokenId = 7;
    saveCheckpoint(dir, w);
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    assert.deepEqual(cfg.architectures, ['GPT2ForSequenceClassification']);
    assert.equal(cfg.num_labels, 3);
    assert.deepEqual(cfg.id2label, { '0': 'neg', '1': 'neu', '2': 'pos' });
    assert.deepEqual(cfg.label2id, { neg: 0, neu: 1, pos: 2 });
    assert.equal(cfg.pad_token_id, 7);
    assert.deepEqual(openSafetensors(path.join(dir, 'model.safetensors')).info('score.weight').shape, [3, 16]);
    const back = loadCheckpoint(dir, { expectLabels: true });
    assert.deepEqual(back.params, w.params);
    assert.equal(back.cls!.numLabels, 3);
    assert.deepEqual(back.cls!.weight, w.cls!.weight);
    assert.deepEqual(back.cls!.labels, ['neg', 'neu', 'pos']);
    assert.equal(back.padTokenId, 7);
    assert.equal(loadCheckpoint(dir, { expectLabels: false }).cls, undefined);

    // id2label given out of order in config.json is sorted by index
    const raw = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    raw.id2label = { '2': 'c', '0': 'a', '1': 'b' };
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(raw));
    assert.deepEqual(loadCheckpoint(dir).cls!.labels, ['a', 'b', 'c']);
    raw.id2label = { '0': 'a', '1': 'b' };
    delete raw.num_labels;
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(raw));
    throwsWith(() => loadCheckpoint(dir), 'config.json', 'id2label', 'score.weight');

    // default labels when none are known
    const dir2 = newDir('cls2');
    saveCheckpoint(dir2, randomWeights(CFG, 7, { numLabels: 2 }), { shardBytes: 8000, dtype: 'BF16' });
    const back2 = loadCheckpoint(dir2);
    assert.deepEqual(back2.cls!.labels, ['LABEL_0', 'LABEL_1']);

    // an LM checkpoint has no head
    const dir3 = newDir('lm');
    saveCheckpoint(dir3, randomWeights());
    throwsWith(() => loadCheckpoint(dir3, { expectLabels: true }), 'model.safetensors', 'score.weight');
  });

  test('hfConfigJson merges extra keys but refuses contradictions', () => {
    const w = randomWeights();
    const c = hfConfigJson(w, { tokenizer_class: 'GPT2Tokenizer', n_layer: 2 });
    assert.equal(c['tokenizer_class'], 'GPT2Tokenizer');
    assert.equal(c['n_layer'], 2);
    throwsWith(() => hfConfigJson(w, { n_layer: 3 }), 'n_layer');
    const dir = newDir('extra');
    saveCheckpoint(dir, w, { extraConfig: { task: 'x' } });
    assert.equal(readHFConfig(dir).raw['task'], 'x');
  });
});

describe('loading real Hugging Face layouts', () => {
  test('HF config.json (n_positions only, no epsilon) with HF tensor names', () => {
    const w = randomWeights(CFG, 8);
    // transformers' GPT2Model layout: no prefix, BOOL attn.bias buffers.
    const tensors = hfTensors(w, '');
    const dir = newDir('hf');
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(hfConfig()));
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
    // add BOOL attn.bias by hand: rewrite with an extra raw tensor
    const st = openSafetensors(path.join(dir, 'model.safetensors'));
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
    const chunks: Buffer[] = [];
    let off = 0;
    for (const n of st.names()) {
      const b = Buffer.from(st.getBytes(n));
      header[n] = { dtype: 'F32', shape: st.info(n).shape, data_offsets: [off, off + b.length] };
      chunks.push(b);
      off += b.length;
    }
    const tri = Buffer.alloc(16 * 16, 1);
    header['h.0.attn.bias'] = { dtype: 'BOOL', shape: [1, 1, 16, 16], data_offsets: [off, off + tri.length] };
    chunks.push(tri);
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeFileSync(path.join(dir, 'model.safetensors'), Buffer.concat([len, json, ...chunks]));
    const back = loadCheckpoint(dir);
    assert.deepEqual(back.config, CFG);
    assert.deepEqual(back.params, w.params);
  });

  test('config.json: n_ctx fallback, epsilon, ignored keys, gelu_pytorch_tanh', () => {
    const dir = newDir('cfg');
    const raw = hfConfig({ activation_function: 'gelu_pytorch_tanh', layer_norm_epsilon: 1e-6, n_ctx: 16 });
    delete raw['n_positions'];
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(raw));
    const { config } = readHFConfig(dir);
    assert.deepEqual(config, { ...CFG, layer_norm_epsilon: 1e-6 });
  });

  test('config.json errors', () => {
    const cases: [Record<string, unknown>, string[]][] = [
      [hfConfig({ activation_function: 'relu' }), ['activation_function', 'relu']],
      [hfConfig({ model_type: 'llama' }), ['model_type', 'llama']],
      [hfConfig({ n_head: 3 }), ['n_embd (16) is not divisible by n_head (3)']],
      [hfConfig({ n_layer: 0 }), ['n_layer']],
      [hfConfig({ vocab_size: '64' }), ['vocab_size']],
      [hfConfig({ n_inner: 32 }), ['n_inner']],
      [hfConfig({ scale_attn_by_inverse_layer_idx: true }), ['scale_attn_by_inverse_layer_idx']],
      [{ ...hfConfig(), n_positions: undefined }, ['n_positions']],
      [hfConfig({ pad_token_id: 64 }), ['pad_token_id']],
    ];
    const w = randomWeights();
    for (const [cfg, parts] of cases) {
      const dir = handMade('badcfg', hfTensors(w), cfg);
      throwsWith(() => loadCheckpoint(dir), path.join(dir, 'config.json'), ...parts);
    }
    const dir = newDir('nocfg');
    writeSafetensors(path.join(dir, 'model.safetensors'), hfTensors(w));
    throwsWith(() => loadCheckpoint(dir), path.join(dir, 'config.json'), 'missing');
    fs.writeFileSync(path.join(dir, 'config.json'), '{"n_layer": 2,');
    throwsWith(() => loadCheckpoint(dir), path.join(dir, 'config.json'), 'invalid JSON');
    throwsWith(() => loadCheckpoint(path.join(tmp, 'no-such-dir')), 'no-such-dir', 'does not exist');
  });

  test('pytorch_model.bin only', () => {
    const dir = newDir('bin');
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(hfConfig()));
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), 'not really');
    throwsWith(() => loadCheckpoint(dir), 'pytorch_model.bin', 'only safetensors', 'safe_serialization');
    fs.rmSync(path.join(dir, 'pytorch_model.bin'));
    throwsWith(() => loadCheckpoint(dir), 'model.safetensors', 'not found');
  });
});

describe('loadCheckpoint rejects bad checkpoints', () => {
  const w = randomWeights(CFG, 9);

  test('missing tensors are listed', () => {
    const tensors = hfTensors(w).filter((t) => !t.name.includes('h.1.mlp') && !t.name.includes('h.1.ln_2') && t.name !== 'transformer.ln_f.bias');
    const dir = handMade('missing', tensors);
    throwsWith(() => loadCheckpoint(dir), 'model.safetensors', 'missing 7', '"h.1.ln_2.weight"', '"h.1.mlp.c_fc.weight"', '(7 in all)');
  });

  test('an extra layer is rejected', () => {
    const tensors = hfTensors(w);
    tensors.push({ name: 'transformer.h.2.ln_1.weight', dtype: 'F32', shape: [16], data: new Float32Array(16) });
    const dir = handMade('extra', tensors);
    throwsWith(() => loadCheckpoint(dir), 'model.safetensors', '"transformer.h.2.ln_1.weight"', 'n_layer=2');
    const t2 = hfTensors(w);
    t2.push({ name: 'score.bias', dtype: 'F32', shape: [2], data: new Float32Array(2) });
    const dir2 = handMade('extra2', t2);
    throwsWith(() => loadCheckpoint(dir2), 'model.safetensors', '"score.bias"', 'unexpected');
  });

  test('shape mismatch names expected and actual shapes', () => {
    const tensors = hfTensors(w);
    const i = tensors.findIndex((t) => t.name === 'transformer.h.0.attn.c_proj.weight');
    tensors[i] = { ...tensors[i]!, shape: [8, 32] };
    const dir = handMade('shape', tensors);
    throwsWith(() => loadCheckpoint(dir), 'model.safetensors', '"transformer.h.0.attn.c_proj.weight"', '[8, 32]', '[16, 16]');
    const t2 = hfTensors(w);
    const j = t2.findIndex((t) => t.name === 'transformer.h.1.mlp.c_fc.weight');
    t2[j] = { ...t2[j]!, shape: [64, 16] };
    throwsWith(() => loadCheckpoint(handMade('transposed', t2)), '"transformer.h.1.mlp.c_fc.weight"', 'transposed');
    // a config that disagrees with the weights
    throwsWith(
      () => loadCheckpoint(handMade('cfgmismatch', hfTensors(w), hfConfig({ vocab_size: 65 }))),
      'model.safetensors',
      '"transformer.wte.weight"',
      '[64, 16]',
      '[65, 16]',
    );
  });

  test('NaN or Inf in weights', () => {
    const tensors = hfTensors(w);
    const i = tensors.findIndex((t) => t.name === 'transformer.h.1.ln_2.bias');
    const bad = Float32Array.from(tensors[i]!.data);
    bad[5] = NaN;
    tensors[i] = { ...tensors[i]!, data: bad };
    throwsWith(() => loadCheckpoint(handMade('nan', tensors)), 'model.safetensors', '"transformer.h.1.ln_2.bias"', 'NaN');
    const t2 = hfTensors(w);
    t2[0] = { ...t2[0]!, dtype: 'F16', data: Float32Array.from(t2[0]!.data).fill(1e6, 3, 4) };
    throwsWith(() => loadCheckpoint(handMade('inf', t2)), 'model.safetensors', '"transformer.wte.weight"', 'Infinity');
  });

  test('untied lm_head', () => {
    const tensors = hfTensors(w);
    const head = Float32Array.from(w.layout.view(w.params, 'wte'));
    head[10] += 0.5;
    tensors.push({ name: 'lm_head.weight', dtype: 'F32', shape: [64, 16], data: head });
    throwsWith(() => loadCheckpoint(handMade('untied', tensors)), 'model.safetensors', '"lm_head.weight"', 'untied lm_head is not supported');
    // a tied head stored in a lower precision is accepted
    const t2 = hfTensors(w);
    t2.push({ name: 'lm_head.weight', dtype: 'BF16', shape: [64, 16], data: w.layout.view(w.params, 'wte') });
    assert.deepEqual(loadCheckpoint(handMade('tied-bf16', t2)).params, w.params);
  });

  test('unknown and unsupported dtypes', () => {
    const dir = handMade('q4', hfTensors(w));
    const file = path.join(dir, 'model.safetensors');
    const buf = fs.readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    const header = buf.subarray(8, 8 + n).toString('utf8');
    // Rewrite one entry's dtype (1 byte per element, so 16 bytes of the original 64 are used).
    for (const [dtype, parts] of [
      ['Q4', ['unknown dtype "Q4"']],
      ['F8_E4M3', ['F8_E4M3']],
    ] as const) {
      const h = JSON.parse(header);
      const name = 'transformer.h.0.ln_1.weight';
      const [b] = h[name].data_offsets;
      h[name] = { dtype, shape: [16], data_offsets: [b, b + 16] };
      const json = Buffer.from(JSON.stringify(h));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length));
      const d = newDir(`dt-${dtype}`);
      fs.copyFileSync(path.join(dir, 'config.json'), path.join(d, 'config.json'));
      fs.writeFileSync(path.join(d, 'model.safetensors'), Buffer.concat([len, json, buf.subarray(8 + n)]));
      throwsWith(() => loadCheckpoint(d), path.join(d, 'model.safetensors'), `"${name}"`, ...parts);
    }
  });

  test('sharded checkpoint errors: missing shard, duplicates, index lies', () => {
    const base = newDir('shard-base');
    saveCheckpoint(base, w, { shardBytes: 12000 });
    const copy = (tag: string) => {
      const d = newDir(tag);
      for (const f of fs.readdirSync(base)) fs.copyFileSync(path.join(base, f), path.join(d, f));
      return d;
    };
    const indexOf = (d: string) => JSON.parse(fs.readFileSync(path.join(d, 'model.safetensors.index.json'), 'utf8'));

    const d1 = copy('shard-missing');
    fs.rmSync(path.join(d1, 'model-00002-of-00003.safetensors'));
    const idx = indexOf(d1);
    const inShard2 = Object.keys(idx.weight_map).find((k) => idx.weight_map[k] === 'model-00002-of-00003.safetensors')!;
    throwsWith(
      () => loadCheckpoint(d1),
      'model.safetensors.index.json',
      'model-00002-of-00003.safetensors',
      `"${inShard2}"`,
      'missing',
    );

    const d2 = copy('shard-dup');
    writeSafetensors(path.join(d2, 'model-00003-of-00003.safetensors'), [
      ...hfTensors(w).filter((t) => indexOf(d2).weight_map[t.name] === 'model-00003-of-00003.safetensors'),
      { name: 'transformer.wte.weight', dtype: 'F32', shape: [64, 16], data: w.layout.view(w.params, 'wte') },
    ]);
    throwsWith(() => loadCheckpoint(d2), 'model-00003-of-00003.safetensors', 'model-00001-of-00003.safetensors', '"transformer.wte.weight"', 'duplicate');

    const d3 = copy('shard-lie');
    const idx3 = indexOf(d3);
    idx3.weight_map['transformer.wte.weight'] = 'model-00002-of-00003.safetensors';
    fs.writeFileSync(path.join(d3, 'model.safetensors.index.json'), JSON.stringify(idx3));
    throwsWith(() => loadCheckpoint(d3), 'model.safetensors.index.json', '"transformer.wte.weight"', 'model-00002-of-00003.safetensors');

    const d4 = copy('shard-escape');
    const idx4 = indexOf(d4);
    idx4.weight_map['transformer.wte.weight'] = '../elsewhere.safetensors';
    fs.writeFileSync(path.join(d4, 'model.safetensors.index.json'), JSON.stringify(idx4));
    throwsWith(() => loadCheckpoint(d4), 'model.safetensors.index.json', '"transformer.wte.weight"', 'outside');
  });

  test('the same tensor with and without the prefix', () => {
    const tensors = [...hfTensors(w), { ...hfTensors(w, '')[0]! }];
    throwsWith(() => loadCheckpoint(handMade('dupprefix', tensors)), 'model.safetensors', '"wte.weight"', '"transformer.wte.weight"');
  });

  test('corrupt safetensors file inside a checkpoint', () => {
    const dir = handMade('corrupt', hfTensors(w));
    const file = path.join(dir, 'model.safetensors');
    fs.truncateSync(file, fs.statSync(file).size - 10); // cuts into the last tensor only
    throwsWith(() => loadCheckpoint(dir), file, '"transformer.ln_f.bias"', 'past the end');
  });
});

describe('PyTorch-generated fixtures', () => {
  const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');
  const present = (name: string) => fs.existsSync(path.join(fixtures, name, 'model.safetensors'));

  test('tiny: transformer. prefix, attn.bias, lm_head.weight, F32', (t) => {
    if (!present('tiny')) return t.skip('test/fixtures/tiny not generated');
    const dir = path.join(fixtures, 'tiny');
    const st = openSafetensors(path.join(dir, 'model.safetensors'));
    const names = st.names();
    assert.ok(names.includes('transformer.wte.weight'));
    assert.ok(names.includes('transformer.h.0.attn.bias'));
    assert.ok(names.includes('lm_head.weight'));
    assert.equal(st.info('transformer.wte.weight').dtype, 'F32');

    const w = loadCheckpoint(dir);
    assert.deepEqual(w.config, { n_layer: 2, n_head: 4, n_embd: 32, n_ctx: 64, vocab_size: 512, layer_norm_epsilon: 1e-5 });
    assert.equal(w.params.length, w.layout.total);
    assert.equal(w.cls, undefined);
    assert.deepEqual(st.info('transformer.wte.weight').shape, [512, 32]);
    assert.deepEqual(st.info('transformer.h.0.attn.c_attn.weight').shape, [32, 96]);
    assert.deepEqual(st.info('transformer.h.1.mlp.c_proj.weight').shape, [128, 32]);
    assert.deepEqual(w.layout.view(w.params, 'wte'), st.get('transformer.wte.weight'));
    assert.deepEqual(w.layout.layer(w.params, 'fcw', 1), st.get('transformer.h.1.mlp.c_fc.weight'));
    assert.deepEqual(w.layout.view(w.params, 'lnfb'), st.get('transformer.ln_f.bias'));

    // Saving and reloading reproduces the fixture's parameters exactly.
    const out = newDir('tiny-resave');
    saveCheckpoint(out, w, { lmHead: true, attnBias: true });
    assert.deepEqual(loadCheckpoint(out).params, w.params);
  });

  test('tiny-cls: score.weight with 3 labels', (t) => {
    if (!present('tiny-cls')) return t.skip('test/fixtures/tiny-cls not generated');
    const dir = path.join(fixtures, 'tiny-cls');
    const w = loadCheckpoint(dir, { expectLabels: true });
    assert.equal(w.config.n_embd, 32);
    assert.equal(w.cls!.numLabels, 3);
    assert.deepEqual(w.cls!.labels, ['a', 'b', 'c']);
    assert.equal(w.padTokenId, 0);
    const st = openSafetensors(path.join(dir, 'model.safetensors'));
    assert.deepEqual(st.info('score.weight').shape, [3, 32]);
    assert.deepEqual(w.cls!.weight, st.get('score.weight'));
    if (present('tiny')) assert.deepEqual(w.params, loadCheckpoint(path.join(fixtures, 'tiny')).params);
  });

  test('vocab50257: F16 without prefix', (t) => {
    if (!present('vocab50257')) return t.skip('test/fixtures/vocab50257 not generated');
    const dir = path.join(fixtures, 'vocab50257');
    const st = openSafetensors(path.join(dir, 'model.safetensors'));
    assert.equal(st.info('wte.weight').dtype, 'F16');
    assert.ok(!st.names().some((n) => n.startsWith('transformer.')));
    assert.ok(!st.names().includes('lm_head.weight'));
    const w = loadCheckpoint(dir);
    assert.deepEqual(w.config, { n_layer: 1, n_head: 2, n_embd: 4, n_ctx: 16, vocab_size: 50257, layer_norm_epsilon: 1e-5 });
    assert.deepEqual(st.info('wte.weight').shape, [50257, 4]);
    assert.deepEqual(st.info('h.0.attn.c_attn.weight').shape, [4, 12]);
    const wte = w.layout.view(w.params, 'wte');
    const raw = st.getBytes('wte.weight');
    const bits = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
    for (let i = 0; i < bits.length; i += 997) assert.equal(wte[i], halfToFloat(bits[i]!));
    // F16 -> F32 -> F16 is lossless.
    const out = newDir('v50257-resave');
    saveCheckpoint(out, w, { dtype: 'F16', prefix: false });
    assert.deepEqual(openSafetensors(path.join(out, 'model.safetensors')).getBytes('wte.weight'), raw);
  });
});
