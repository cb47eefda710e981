// PEFT adapter interop: adapters exported here give, under PEFT's loading rules (re-implemented
// in torch by scripts/peft_check.py), the logits of the merged model here; adapters written
// under those rules load here with the same logits; malformed adapters are refused by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { GPT2 } from '../src/model/gpt2.js';
import { getPreset, type GPT2Config } from '../src/model/config.js';
import type { GPT2Weights } from '../src/model/weights.js';
import { loadCheckpoint, saveCheckpoint } from '../src/model/checkpoint.js';
import { LoraAdapters, type LoraTarget } from '../src/model/lora.js';
import { parseTargetModules, readPeftAdapter, writePeftAdapter, PEFT_CONFIG_FILE } from '../src/model/peft.js';
import { mergeAdapter, readAdapter } from '../src/train/session.js';
import { Rng } from '../src/tensor/rng.js';
import { BundleError, InputError } from '../src/errors.js';
import { maxAbsDiff } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SCRIPT = path.join(ROOT, 'scripts', 'peft_check.py');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');
const PY = '/usr/bin/python3';
const TORCH = spawnSync(PY, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
const needsTorch = { skip: TORCH ? false : `${PY} cannot import torch (apt-get install python3-torch): the PEFT-rule script cannot run` };

const CFG = getPreset('gpt2-tiny');
const B = 3, T = 10, K = 3;
const TOKENS = Int32Array.from({ length: B * T }, (_, i) => (i * 97 + 13) % CFG.vocab_size);

function py(args: string[]): void {
  const r = spawnSync(PY, [SCRIPT, ...args], { encoding: 'utf8' });
  assert.equal(r.status, 0, `peft_check.py ${args[0]}: ${r.stderr}`);
}

/** The script's logits of a model with an adapter (PEFT's rules, adapter in the forward). */
function torchLogits(dir: string, model: string, adapter: string, task: 'lm' | 'cls'): { logits: number[]; merged_max_diff: number; adapter_effect: number; adapted_modules: string[] } {
  writeFileSync(path.join(dir, 'tokens.json'), JSON.stringify({ tokens: Array.from({ length: B }, (_, b) => Array.from(TOKENS.subarray(b * T, (b + 1) * T))) }));
  const out = path.join(dir, 'logits.json');
  py(['logits', '--model', model, '--adapter', adapter, '--tokens', path.join(dir, 'tokens.json'), '--out', out, '--task', task]);
  return JSON.parse(readFileSync(out, 'utf8'));
}

async function ourLogits(w: GPT2Weights, task: 'lm' | 'cls'): Promise<Float32Array> {
  const m = new GPT2(w);
  return Float32Array.from(task === 'cls' ? (await m.forwardCls(TOKENS, B, T, null, -1)).logits : (await m.forward(TOKENS, B, T)).logits);
}

function baseModel(seed: number, cls: boolean): GPT2Weights {
  const w = GPT2.random(CFG, seed).weights();
  if (!cls) return w;
  const weight = new Float32Array(K * CFG.n_embd);
  new Rng(seed + 5).fillNormal(weight, 0.3);
  return { ...w, cls: { numLabels: K, weight, pooling: 'last' } };
}

function randomAdapters(targets: LoraTarget[], seed: number, rank = 3, alpha = 6, cfg: GPT2Config = CFG): LoraAdapters {
  const ad = new LoraAdapters({ rank, alpha, dropout: 0, targets }, cfg.n_layer, cfg.n_embd, cfg.vocab_size);
  new Rng(seed).fillNormal(ad.params, 0.15);
  return ad;
}

const tmp = () => mkdtempSync(path.join(os.tmpdir(), 'obf-peft-'));

for (const [task, targets] of [['cls', ['q', 'v', 'proj', 'fc', 'mlp-proj', 'wte']], ['lm', ['q', 'k', 'v', 'fc']]] as const) {
  test(`export (${task}, ${targets.join(',')}): PEFT's rules in torch give the merged model's logits`, needsTorch, async (ctx) => {
    const dir = tmp();
    try {
      const base = baseModel(1, task === 'cls');
      saveCheckpoint(path.join(dir, 'base'), base);
      const ad = randomAdapters([...targets], 2);
      const score = task === 'cls' ? Float32Array.from({ length: K * CFG.n_embd }, (_, i) => Math.sin(i)) : undefined;
      writePeftAdapter(path.join(dir, 'peft'), ad, { task, baseModel: path.join(dir, 'base'), score });
      const merged = mergeAdapter(base, { adapters: ad, score, numLabels: score ? K : undefined });
      const ours = await ourLogits(merged, task);
      const t = torchLogits(dir, path.join(dir, 'base'), path.join(dir, 'peft'), task);
      assert.equal(t.adapted_modules.length, (task === 'cls' ? 1 : 0) + CFG.n_layer * new Set(targets.filter((x) => x !== 'wte').map((x) => ('qkv'.includes(x) ? 'c_attn' : x))).size);
      const diff = maxAbsDiff(ours, t.logits);
      ctx.diagnostic(`max abs logit difference ${diff.toExponential(2)}`);
      assert.ok(diff <= 1e-4, `max abs difference ${diff}`);
      assert.ok(t.merged_max_diff <= 1e-4, `the script's merged vs unmerged: ${t.merged_max_diff}`);
      assert.ok(t.adapter_effect > 1e-2, `the adapter changes the logits (by ${t.adapter_effect})`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

for (const c of [
  { task: 'SEQ_CLS', extra: ['--target-modules', 'c_attn,c_proj,c_fc,wte', '--rank-pattern', '{"c_fc": 2}', '--alpha-pattern', '{"attn.c_proj": 3}'] },
  { task: 'CAUSAL_LM', extra: ['--target-modules', 'all-linear', '--rslora', '--layers', '1', '--r', '5'] },
]) {
  test(`import (${c.task} ${c.extra.join(' ')}): an adapter written under PEFT's rules gives the same logits here`, needsTorch, async (ctx) => {
    const dir = tmp();
    try {
      const task = c.task === 'SEQ_CLS' ? 'cls' : 'lm';
      const base = baseModel(3, false);
      saveCheckpoint(path.join(dir, 'base'), base);
      py(['write', '--model', path.join(dir, 'base'), '--out', path.join(dir, 'peft'), '--seed', '4', '--num-labels', String(K), '--task', c.task, ...c.extra]);
      const a = readAdapter(path.join(dir, 'peft'), CFG);
      assert.equal(a.task, task);
      assert.equal(a.numLabels, task === 'cls' ? K : undefined);
      const ours = await ourLogits(mergeAdapter(base, a), task);
      const t = torchLogits(dir, path.join(dir, 'base'), path.join(dir, 'peft'), task);
      const diff = maxAbsDiff(ours, t.logits);
      ctx.diagnostic(`max abs logit difference ${diff.toExponential(2)}`);
      assert.ok(diff <= 1e-4, `max abs difference ${diff}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('export then import restores the adapters (c_attn unstacked into q and v) and the classifier', () => {
  const dir = tmp();
  try {
    const ad = randomAdapters(['q', 'v', 'mlp-proj', 'wte'], 7, 2, 5);
    const score = Float32Array.from({ length: K * CFG.n_embd }, (_, i) => Math.cos(i));
    writePeftAdapter(dir, ad, { task: 'cls', baseModel: 'gpt2-tiny', score });
    const cfg = JSON.parse(readFileSync(path.join(dir, PEFT_CONFIG_FILE), 'utf8'));
    assert.deepEqual([cfg.peft_type, cfg.task_type, cfg.r, cfg.lora_alpha, cfg.fan_in_fan_out, cfg.bias], ['LORA', 'SEQ_CLS', 2, 5, true, 'none']);
    assert.deepEqual(cfg.target_modules, ['c_attn', 'mlp.c_proj', 'wte']);
    assert.deepEqual([cfg.rank_pattern, cfg.alpha_pattern, cfg.modules_to_save], [{ c_attn: 4 }, { c_attn: 10 }, ['score']]);
    const back = readPeftAdapter(dir, CFG);
    assert.deepEqual(back.adapters.config, ad.config);
    assert.equal(maxAbsDiff(back.adapters.params, ad.params), 0);
    assert.equal(maxAbsDiff(back.score!, score), 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PEFT target module names map to targets; unknown ones are refused by name', () => {
  assert.deepEqual(parseTargetModules('c_attn,c_proj'), ['q', 'k', 'v', 'proj', 'mlp-proj']);
  assert.deepEqual(parseTargetModules('mlp.c_proj, c_fc'), ['fc', 'mlp-proj']);
  assert.throws(() => parseTargetModules('c_attn,q_proj'), (e: Error) => e instanceof InputError && /"q_proj"/.test(e.message) && /c_attn/.test(e.message));
});

test('malformed adapters are refused with the reason: config, target modules, shapes, tensors', () => {
  const dir = tmp();
  try {
    writePeftAdapter(dir, randomAdapters(['q', 'v', 'fc'], 9, 2, 4), { task: 'lm', baseModel: 'x' });
    const file = path.join(dir, PEFT_CONFIG_FILE);
    const good = JSON.parse(readFileSync(file, 'utf8'));
    const refused = (edit: Record<string, unknown> | string, re: RegExp, cfg: GPT2Config = CFG) => {
      writeFileSync(file, typeof edit === 'string' ? edit : JSON.stringify({ ...good, ...edit }));
      assert.throws(() => readPeftAdapter(dir, cfg), (e: Error) => e instanceof BundleError && re.test(e.message), `expected ${re}`);
    };
    refused('{"peft_type": "LORA", ', /invalid JSON/);
    refused({ peft_type: 'IA3' }, /"peft_type" must be "LORA"/);
    refused({ r: 'eight' }, /"r"/);
    refused({ use_dora: true }, /use_dora/);
    refused({ bias: 'all' }, /"bias"/);
    refused({ target_modules: ['c_attn', 'q_proj'] }, /"q_proj"/);
    refused({ target_modules: ['c_attn'] }, /mlp\.c_fc, which target_modules .* does not select/);
    refused({ rank_pattern: {} }, /shape mismatch: .*c_attn\.lora_A\.weight is \[4, 64\], expected \[2, 64\]/);
    refused({ r: 3, rank_pattern: { c_attn: 4 } }, /shape mismatch: .*mlp\.c_fc\.lora_A\.weight/);
    refused({ modules_to_save: ['ln_f'] }, /modules_to_save "ln_f"/);
    refused({}, /shape mismatch/, { ...CFG, n_embd: 32, n_head: 2 });
    writeFileSync(file, JSON.stringify(good));
    assert.equal(readPeftAdapter(dir, CFG).adapters.config.rank, 2, 'the untouched adapter loads');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

function cli(args: string[]) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' }, cwd: ROOT });
}

test('CLI: finetune writes final/peft; adapter merge reproduces merged/; --init-adapter starts from it; PEFT flag names', () => {
  const dir = tmp();
  try {
    const model = path.join(ROOT, 'test/fixtures/vocab50257');
    const train = path.join(dir, 'train.jsonl');
    writeFileSync(train, Array.from({ length: 8 }, (_, i) => JSON.stringify({ text: `record ${i} says ${'abc'[i % 3]}`, label: 'abc'[i % 3] })).join('\n') + '\n');
    const common = ['--model', model, '--train', train, '--task', 'cls', '--max-len', '8', '--batch', '2', '--mode', 'sealed', '--seed', '3'];
    const r1 = cli(['finetune', ...common, '--steps', '2', '--lr', '0.05', '--lora-r', '2', '--lora-alpha', '4', '--target-modules', 'c_attn,mlp.c_proj', '--out', path.join(dir, 'run1')]);
    assert.equal(r1.status, 0, r1.stderr);
    const peft = path.join(dir, 'run1', 'final', 'peft');
    const cfg = JSON.parse(readFileSync(path.join(peft, PEFT_CONFIG_FILE), 'utf8'));
    assert.deepEqual([cfg.task_type, cfg.r, cfg.rank_pattern, cfg.target_modules, cfg.modules_to_save], ['SEQ_CLS', 2, { c_attn: 6 }, ['c_attn', 'mlp.c_proj'], ['score']]);
    assert.equal(cfg.base_model_name_or_path, model);

    const m = cli(['adapter', 'merge', '--base', model, '--adapter', peft, '--out', path.join(dir, 'm')]);
    assert.equal(m.status, 0, m.stderr);
    const want = loadCheckpoint(path.join(dir, 'run1', 'merged'));
    const got = loadCheckpoint(path.join(dir, 'm'));
    assert.ok(maxAbsDiff(got.params, want.params) < 1e-6 && maxAbsDiff(got.cls!.weight, want.cls!.weight) < 1e-6, 'merging the PEFT adapter gives the run\'s merged model');
    assert.ok(maxAbsDiff(want.params, loadCheckpoint(model).params) > 1e-4, 'the run changed the model');
    // the provider's merge: deobfuscated bundles plus the adapter
    assert.equal(cli(['obfuscate', '--model', model, '--mode', 'sealed', '--seed', '4', '--out', path.join(dir, 'b')]).status, 0);
    const d = cli(['deobfuscate', '--base', model, '--bundles', path.join(dir, 'b'), '--adapter', peft, '--out', path.join(dir, 'd')]);
    assert.equal(d.status, 0, d.stderr);
    const dm = loadCheckpoint(path.join(dir, 'd'));
    assert.ok(maxAbsDiff(dm.params, want.params) < 1e-4 && maxAbsDiff(dm.cls!.weight, want.cls!.weight) < 1e-6, 'deobfuscate --adapter merges the PEFT adapter');
    // export of a run (as for runs without final/peft)
    const e = cli(['adapter', 'export', path.join(dir, 'run1'), '--out', path.join(dir, 'e')]);
    assert.equal(e.status, 0, e.stderr);
    assert.deepEqual(readFileSync(path.join(dir, 'e', 'adapter_model.safetensors')), readFileSync(path.join(peft, 'adapter_model.safetensors')));

    // a tiny learning rate: the run ends where its adapter started
    const r2 = cli(['finetune', ...common, '--steps', '1', '--lr', '1e-12', '--init-adapter', peft, '--out', path.join(dir, 'run2')]);
    assert.equal(r2.status, 0, r2.stderr);
    const spec = JSON.parse(readFileSync(path.join(dir, 'run2', 'run_spec.json'), 'utf8'));
    assert.deepEqual([spec.lora.rank, spec.lora.targets], [2, ['q', 'k', 'v', 'mlp-proj']]);
    const m2 = loadCheckpoint(path.join(dir, 'run2', 'merged'));
    assert.ok(maxAbsDiff(m2.params, want.params) < 1e-5 && maxAbsDiff(m2.cls!.weight, want.cls!.weight) < 1e-5, 'the run started from the adapter and its classifier');

    const bad = cli(['finetune', ...common, '--steps', '1', '--init-adapter', peft, '--rank', '4', '--out', path.join(dir, 'run3')]);
    assert.notEqual(bad.status, 0);
    assert.match(bad.stderr, /lora\.rank.*the adapter has rank 2, not 4/);
    const unknown = cli(['finetune', ...common, '--steps', '1', '--target-modules', 'c_attn,q_proj', '--out', path.join(dir, 'run4')]);
    assert.notEqual(unknown.status, 0);
    assert.match(unknown.stderr, /unknown PEFT target module "q_proj"/);
    const clash = cli(['finetune', ...common, '--steps', '1', '--rank', '4', '--lora-r', '2', '--out', path.join(dir, 'run5')]);
    assert.notEqual(clash.status, 0);
    assert.match(clash.stderr, /--rank 4 and --lora-r "2" disagree|--rank.*--lora-r.*disagree/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
