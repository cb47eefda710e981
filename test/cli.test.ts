import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');

function run(args: string[], env: Record<string, string> = {}) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1', ...env }, cwd: ROOT });
}

test('--help works for every command', () => {
  const top = run(['--help']);
  assert.equal(top.status, 0, top.stderr);
  const cmds = ['info', 'init', 'train', 'generate', 'eval', 'bench', 'start'];
  for (const c of cmds) assert.match(top.stdout, new RegExp(`\\b${c}\\b`), `top-level help lists ${c}`);
  for (const c of [...cmds.map((c) => [c]), ['bench', 'gemm'], ['bench', 'train-step']]) {
    const r = run([...c, '--help']);
    assert.equal(r.status, 0, `${c.join(' ')} --help: ${r.stderr}`);
    assert.match(r.stdout, /Usage: obfuscatune/);
  }
});

test('init, generate and a clear error for a bad model path', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-'));
  try {
    const out = path.join(dir, 'm');
    const i = run(['init', '--preset', 'gpt2-micro', '--out', out, '--dtype', 'BF16']);
    assert.equal(i.status, 0, i.stderr);
    assert.ok(existsSync(path.join(out, 'model.safetensors')) && existsSync(path.join(out, 'config.json')));
    const g = run(['generate', '--model', path.join(ROOT, 'test/fixtures/vocab50257'), '--prompt', 'Hello', '--max-tokens', '4', '--json']);
    assert.equal(g.status, 0, g.stderr);
    const j = JSON.parse(g.stdout);
    assert.equal(j.tokens.length, 4);
    const bad = run(['generate', '--model', path.join(dir, 'nope'), '--prompt', 'x']);
    assert.notEqual(bad.status, 0);
    assert.match(bad.stderr, /not found/);
    const preset = run(['generate', '--model', 'gpt2', '--prompt', 'x']);
    assert.match(preset.stderr, /--random-init/);
    const badInt = run(['bench', 'train-step', '--batch', 'four']);
    assert.notEqual(badInt.status, 0);
    assert.match(badInt.stderr, /--batch must be an integer/);
    // the embedding adapter is for classification: refused before any work
    const wte = run(['finetune', '--model', path.join(ROOT, 'test/fixtures/vocab50257'), '--train', path.join(ROOT, 'data/austen/train.jsonl'), '--task', 'lm', '--targets', 'wte,q', '--max-len', '8', '--out', path.join(dir, 'run')]);
    assert.notEqual(wte.status, 0);
    assert.match(wte.stderr, /wte LoRA target .* classification/);
    assert.ok(!existsSync(path.join(dir, 'run')), 'nothing was written');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('bench train-step --json follows its contract', () => {
  const r = run(['bench', 'train-step', '--json', '--model', 'gpt2-micro', '--batch', '2', '--seq', '8', '--steps', '2']);
  assert.equal(r.status, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  for (const k of ['model', 'params', 'batch', 'seq', 'steps', 'step_ms_median', 'peak_rss_mb']) assert.ok(k in j, `field ${k}`);
  assert.equal(j.model, 'gpt2-micro');
  assert.equal(j.batch, 2);
  assert.match(j.machine, /, (native (avx512|avx2|generic) kernels, \d+ threads|TypeScript kernels)$/);
  assert.ok(j.step_ms_median > 0 && j.peak_rss_mb > 0);
});

test('JSON contracts: share, fidelity and bench finetune', () => {
  const share = JSON.parse(run(['share', '--json', '--seq', '512']).stdout);
  assert.equal(share.seq, 512);
  for (const m of ['gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl']) for (const mode of ['sealed', 'paper']) {
    const r = share.rows.find((x: { model: string; mode: string }) => x.model === m && x.mode === mode);
    for (const k of ['enclave_param_share', 'enclave_state_bytes', 'enclave_flop_share', 'boundary_bytes_per_token', 'round_trips_per_layer']) assert.equal(typeof r[k], 'number', `${m} ${mode} ${k}`);
  }
  const f = run(['fidelity', '--model', 'gpt2-micro', '--random-init', '--seed', '1', '--tokens', '16', '--mode', 'paper', '--kappas', '1,10,naive', '--json']);
  assert.equal(f.status, 0, f.stderr);
  const fj = JSON.parse(f.stdout);
  assert.equal(fj.model, 'gpt2-micro');
  assert.deepEqual(fj.rows.map((r: { kappa: string }) => r.kappa), ['1', '10', 'naive']);
  for (const r of fj.rows) for (const k of ['max_abs_logit_err', 'mean_abs_logit_err', 'top1_agreement']) assert.equal(typeof r[k], 'number');
  const b = run(['bench', 'finetune', '--json', '--model', 'gpt2-micro', '--batch', '2', '--seq', '8', '--method', 'lora', '--steps', '1']);
  assert.equal(b.status, 0, b.stderr);
  const bj = JSON.parse(b.stdout);
  assert.equal(bj.model, 'gpt2-micro');
  assert.equal(bj.method, 'lora');
  assert.deepEqual(bj.rows.map((r: { mode: string }) => r.mode), ['local', 'sealed', 'paper']);
  assert.equal(bj.rows[2].kappa, '1');
  for (const r of bj.rows) assert.ok(r.step_ms_median > 0 && r.peak_rss_mb > 0);
  // token mixing: fidelity within 1e-3 with the same top-1; sealed without and with mixing, paired
  const fm = run(['fidelity', '--model', 'gpt2-tiny', '--random-init', '--seed', '2', '--tokens', '64', '--mode', 'sealed', '--kappas', '10', '--token-mixing', 'on', '--json']);
  assert.equal(fm.status, 0, fm.stderr);
  const fmj = JSON.parse(fm.stdout);
  assert.deepEqual(fmj.token_mixing, { scheme: 'butterfly', kappa: 10, block: 0, rounds: 0, shields: 'first-layer' });
  assert.ok(fmj.rows[0].max_abs_logit_err <= 1e-3 && fmj.rows[0].top1_agreement === 1, `fidelity with mixing: ${JSON.stringify(fmj.rows[0])}`);
  const bm = run(['bench', 'finetune', '--json', '--model', 'gpt2-micro', '--batch', '2', '--seq', '8', '--steps', '1', '--token-mixing', 'on', '--mixing-block', '4']);
  assert.equal(bm.status, 0, bm.stderr);
  const bmj = JSON.parse(bm.stdout);
  assert.deepEqual(bmj.rows.map((r: { token_mixing: string }) => r.token_mixing), ['off', 'on']);
  assert.ok(bmj.rows[1].vs_unmixed > 0 && bmj.rows[1].mixing_share > 0 && bmj.rows[0].mixing_share === 0);
  assert.match(run(['bench', 'finetune', '--token-mixing', 'maybe']).stderr, /token_mixing: must be one of off, on/);
  // over the network: each split mode beside its in-process twin, steps interleaved
  const g = run(['bench', 'finetune', '--json', '--transport', 'grpc', '--model', 'gpt2-micro', '--batch', '2', '--seq', '8', '--method', 'lora', '--steps', '2']);
  assert.equal(g.status, 0, g.stderr);
  const gj = JSON.parse(g.stdout);
  assert.equal(gj.transport, 'grpc');
  assert.equal(gj.tensor_channel, true);
  assert.deepEqual(gj.rows.map((r: { mode: string; transport: string }) => `${r.mode}/${r.transport}`), ['local/in-process', 'sealed/in-process', 'sealed/grpc', 'paper/in-process', 'paper/grpc']);
  for (const r of gj.rows.filter((x: { transport: string }) => x.transport === 'grpc')) {
    assert.equal(r.data_path, 'tensor-channel');
    assert.equal(r.paired, true);
    assert.ok(r.vs_in_process > 0 && r.boundary_messages_per_step > 0 && r.integrity_share > 0);
  }
});

test('obfuscate, then generate through the split: the same tokens as the plain model; deobfuscate round trip', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-'));
  try {
    const model = path.join(ROOT, 'test/fixtures/vocab50257');
    const o = run(['obfuscate', '--model', model, '--mode', 'sealed', '--seed', '4', '--out', path.join(dir, 'b')]);
    assert.equal(o.status, 0, o.stderr);
    const split = run(['generate', '--enclave', path.join(dir, 'b', 'enclave'), '--accelerator', path.join(dir, 'b', 'accelerator'), '--prompt', 'Hello there', '--max-tokens', '6', '--json']);
    assert.equal(split.status, 0, split.stderr);
    const plain = run(['generate', '--model', model, '--prompt', 'Hello there', '--max-tokens', '6', '--json']);
    assert.deepEqual(JSON.parse(split.stdout).tokens, JSON.parse(plain.stdout).tokens);
    const d = run(['deobfuscate', '--base', model, '--bundles', path.join(dir, 'b'), '--out', path.join(dir, 'plain')]);
    assert.equal(d.status, 0, d.stderr);
    const again = run(['generate', '--model', path.join(dir, 'plain'), '--prompt', 'Hello there', '--max-tokens', '6', '--json']);
    assert.deepEqual(JSON.parse(again.stdout).tokens, JSON.parse(plain.stdout).tokens);
    const mixing = run(['generate', '--enclave', path.join(dir, 'b', 'enclave'), '--accelerator', path.join(dir, 'b', 'accelerator'), '--prompt', 'Hello there', '--max-tokens', '6', '--json', '--token-mixing', 'on', '--mixing-kappa', '4']);
    assert.equal(mixing.status, 0, mixing.stderr);
    assert.deepEqual(JSON.parse(mixing.stdout).tokens, JSON.parse(plain.stdout).tokens, 'token mixing keeps generation exact');
    const mixed = run(['generate', '--enclave', path.join(dir, 'b', 'enclave'), '--prompt', 'x']);
    assert.match(mixed.stderr, /needs both --enclave and --accelerator/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('progress off a terminal: piped stderr gets timed progress lines and a last one at 100%; stdout stays JSON', () => {
  const r = run(['bench', 'train-step', '--json', '--model', 'gpt2-tiny', '--steps', '30'], { OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' });
  assert.equal(r.status, 0, r.stderr);
  // --json: the progress lines are JSON too
  const lines = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  assert.ok(lines.length >= 2, r.stderr);
  for (const l of lines) assert.deepEqual([l.event, l.task, l.total], ['progress', 'bench train-step', 31]);
  assert.equal(lines[lines.length - 1].done, 31);
  assert.equal(JSON.parse(r.stdout).model, 'gpt2-tiny');
  const text = run(['bench', 'train-step', '--model', 'gpt2-tiny', '--steps', '3'], { OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' });
  const tl = text.stderr.split('\n').filter((l) => l.startsWith('bench train-step: '));
  assert.ok(tl.length >= 2, text.stderr);
  for (const l of tl) assert.match(l, /^bench train-step: \d+\/4 \(\d+%\) +elapsed \d+s, ETA /);
  assert.match(tl[tl.length - 1], /4\/4 \(100%\)/);
});

test('datasets: numeric labels sort by value (2 before 10); a labelled file trained as lm is warned about', async () => {
  const { labelSet } = await import('../src/io/jsonl.js');
  assert.deepEqual(labelSet([{ label: '10' }, { label: '2' }, { label: '1' }, { label: '-3' }], 't'), ['-3', '1', '2', '10']);
  assert.deepEqual(labelSet([{ label: 'b' }, { label: 'a10' }, { label: 'a2' }], 't'), ['a10', 'a2', 'b']);
  assert.deepEqual(labelSet([{ label: '2' }, { label: 'x' }, { label: '10' }], 't'), ['10', '2', 'x']);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-lm-'));
  try {
    const r = run(['finetune', '--model', path.join(ROOT, 'test/fixtures/vocab50257'), '--train', path.join(ROOT, 'data/food-reviews/train.jsonl'), '--task', 'lm', '--max-len', '8', '--steps', '1', '--batch', '2', '--out', path.join(dir, 'run')]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /warning: .*train\.jsonl has labelled records, and the task is lm: the labels are ignored/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('key material and runs are protected: a non-empty --out is refused without --force; a key from another obfuscation is refused by deobfuscate, nothing written', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-keys-'));
  const model = path.join(ROOT, 'test/fixtures/vocab50257');
  try {
    const a = path.join(dir, 'a'), b = path.join(dir, 'b');
    assert.equal(run(['obfuscate', '--model', model, '--out', a]).status, 0);
    const secret = readFileSync(path.join(a, 'provider', 'secret.json'), 'utf8');
    const again = run(['obfuscate', '--model', model, '--out', a]);
    assert.notEqual(again.status, 0);
    assert.match(again.stderr, /obfuscate: --out .* is not empty .*--force/);
    assert.equal(readFileSync(path.join(a, 'provider', 'secret.json'), 'utf8'), secret, 'the secret key is untouched');
    assert.equal(run(['obfuscate', '--model', model, '--out', b]).status, 0);
    // b's key with a's bundles: refused before anything is written
    const out = path.join(dir, 'plain');
    const wrong = run(['deobfuscate', '--base', model, '--bundles', a, '--key', path.join(b, 'provider'), '--out', out]);
    assert.notEqual(wrong.status, 0);
    assert.match(wrong.stderr, /the mask key in .*secret\.json did not make the accelerator bundle .*key fingerprint/);
    assert.ok(!existsSync(out), 'nothing written');
    assert.equal(run(['deobfuscate', '--base', model, '--bundles', a, '--out', out]).status, 0);
    assert.match(run(['deobfuscate', '--base', model, '--bundles', a, '--out', out]).stderr, /deobfuscate: --out .* is not empty/);
    // a fresh run into an old run's directory
    const runDir = path.join(dir, 'run');
    const args = ['finetune', '--model', model, '--train', path.join(ROOT, 'data/austen/train.jsonl'), '--task', 'lm', '--max-len', '8', '--steps', '2', '--batch', '2', '--checkpoint-every', '1', '--out', runDir];
    assert.equal(run(args).status, 0);
    const fresh = run(args);
    assert.notEqual(fresh.status, 0);
    assert.match(fresh.stderr, /finetune \(a fresh run; --resume continues the run there\): --out .* is not empty/);
    writeFileSync(path.join(runDir, 'checkpoints', 'step-0000099'), 'stale');
    const forced = run([...args.slice(0, -2), '--steps', '1', '--out', runDir, '--force']);
    assert.equal(forced.status, 0, forced.stderr);
    assert.ok(!existsSync(path.join(runDir, 'checkpoints', 'step-0000099')), 'the old run\'s checkpoints are gone');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the four-terminal walkthrough of docs/deployment.md runs end to end (scripts/walkthrough.sh), with progress lines off a terminal', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-walk-'));
  try {
    const lines = Array.from({ length: 32 }, (_, i) => JSON.stringify({ text: i % 2 ? `this was good really good ${i}` : `this was awful really awful ${i}`, label: i % 2 ? 'pos' : 'neg' }));
    writeFileSync(path.join(dir, 'train.jsonl'), lines.join('\n') + '\n');
    const base = 20000 + (process.pid % 20000);
    const r = spawnSync('bash', [path.join(ROOT, 'scripts', 'walkthrough.sh'), path.join(dir, 'w')], {
      encoding: 'utf8', cwd: ROOT, timeout: 240_000,
      env: { ...process.env, MODEL: path.join(ROOT, 'test/fixtures/vocab50257'), TRAIN: path.join(dir, 'train.jsonl'), STEPS: '4', MAX_LEN: '16', ACC_PORT: String(base), ENC_PORT: String(base + 1), OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' },
    });
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /provider [A-Za-z0-9+/]{43}=: signed/);
    assert.match(r.stdout, /the endless job: .*"state":"cancelled"/);
    assert.ok(existsSync(path.join(dir, 'w', 'merged', 'model.safetensors')));
    // provider deploy --json: one JSON document on stdout, its progress as JSON lines on stderr
    const deployed = readFileSync(path.join(dir, 'w', 'deploy.json'), 'utf8').trim().split('\n');
    assert.equal(deployed.length, 1, deployed.join('\n'));
    assert.match(JSON.parse(deployed[0]).accelerator.manifest_sha256, /^[0-9a-f]{64}$/);
    const events = r.stderr.split('\n').filter((l) => l.startsWith('{"event":"progress","task":"provider deploy"')).map((l) => JSON.parse(l));
    assert.ok(events.some((e) => e.done === 0 && /^accelerator bundle: sending/.test(e.label)), r.stderr);
    assert.ok(events.some((e) => e.done === 1 && /^enclave bundle: /.test(e.label)), r.stderr);
    assert.deepEqual([events[events.length - 1].done, events[events.length - 1].total], [2, 2]);
    // owner upload (text): a unit per record encrypted, one per record the enclave opens
    const up = r.stderr.split('\n').filter((l) => l.startsWith('owner upload: '));
    assert.ok(up.some((l) => /^owner upload: \d+\/64 \(\d+%\) train: encrypting piece \d+\/32 to the enclave elapsed /.test(l)), r.stderr);
    assert.match(up[up.length - 1], /^owner upload: 64\/64 \(100%\) train: stored elapsed /);
    // provider obfuscate: per layer
    assert.match(r.stderr, /^provider obfuscate: 2\/2 \(100%\) weights elapsed /m);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('Llama family on the plain commands: init, train (its own tokenizer.json, kept with the output), generate; obfuscate takes it too', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-llama-'));
  try {
    const i = run(['init', '--preset', 'llama-micro', '--out', path.join(dir, 'init')]);
    assert.equal(i.status, 0, i.stderr);
    assert.equal(JSON.parse(readFileSync(path.join(dir, 'init', 'config.json'), 'utf8')).model_type, 'llama');
    const text = path.join(dir, 't.txt');
    writeFileSync(text, 'the water is hot and the day is long they had some water in the hot sound of the day '.repeat(6));
    const out = path.join(dir, 'trained');
    const t = run(['train', '--model', path.join(ROOT, 'test/fixtures/llama'), '--text', text, '--eval-text', text, '--steps', '30', '--batch', '4', '--seq', '8', '--lr', '1e-2', '--out', out, '--json']);
    assert.equal(t.status, 0, t.stderr);
    const tr = JSON.parse(t.stdout) as { eval_before: { loss: number }; eval_after: { loss: number } };
    const [before, after] = [tr.eval_before.loss, tr.eval_after.loss];
    assert.ok(after < before / 2, `training lowers the loss: ${before} -> ${after}`);
    assert.ok(existsSync(path.join(out, 'tokenizer.json')));
    const g = run(['generate', '--model', out, '--prompt', 'the water', '--max-tokens', '5', '--json']);
    assert.equal(g.status, 0, g.stderr);
    const j = JSON.parse(g.stdout);
    assert.equal(j.tokens.length, 5);
    assert.match(j.completion, /^(\w+ ?)+/);
    const f = run(['obfuscate', '--model', out, '--out', path.join(dir, 'b'), '--json']);
    assert.equal(f.status, 0, f.stderr);
    assert.equal(JSON.parse(f.stdout).family, 'llama');
    assert.ok(existsSync(path.join(dir, 'b', 'enclave', 'tokenizer.json')), 'the enclave bundle carries the model\'s tokenizer');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('pretrain a Llama-family preset: refuses held-out splits, progress off a terminal, a LlamaForCausalLM directory with its tokenizer.json and pretraining.json', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-pretrain-'));
  try {
    const take = (f: string, n: number, to: string) => writeFileSync(path.join(dir, to), readFileSync(path.join(ROOT, f), 'utf8').split('\n').slice(0, n).join('\n') + '\n');
    take('data/austen/train.jsonl', 40, 'train.jsonl');
    take('data/austen/validation.jsonl', 10, 'validation.jsonl');
    const args = ['pretrain', '--preset', 'llama-small', '--steps', '2', '--batch', '2', '--seq', '16', '--warmup', '1', '--eval-every', '1'];
    const refused = run([...args, '--corpus', path.join(dir, 'validation.jsonl'), '--out', path.join(dir, 'no')]);
    assert.notEqual(refused.status, 0);
    assert.match(refused.stderr, /refusing .*validation\.jsonl: pretraining may only use training splits/);
    assert.ok(!existsSync(path.join(dir, 'no')));
    const out = path.join(dir, 'm');
    const r = run([...args, '--corpus', path.join(dir, 'train.jsonl'), '--valid', path.join(dir, 'validation.jsonl'), '--out', out], { OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' });
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stderr.split('\n').filter((l) => l.startsWith('pretrain: '));
    assert.match(lines[lines.length - 1], /^pretrain: 2\/2 \(100%\) loss [\d.]+ \| val [\d.]+ /);
    const cfg = JSON.parse(readFileSync(path.join(out, 'config.json'), 'utf8'));
    assert.deepEqual([cfg.architectures[0], cfg.num_key_value_heads, cfg.torch_dtype], ['LlamaForCausalLM', 2, 'float16']);
    const info = JSON.parse(readFileSync(path.join(out, 'pretraining.json'), 'utf8'));
    assert.equal(info.preset, 'llama-small');
    assert.equal(info.log.length, 2);
    assert.ok(info.valid_loss > 0 && info.unigram_valid_loss > 0);
    assert.equal(JSON.parse(readFileSync(path.join(out, 'tokenizer_config.json'), 'utf8')).eos_token, '<|endoftext|>');
    const g = run(['generate', '--model', out, '--prompt', 'It is a truth', '--max-tokens', '3', '--json']);
    assert.equal(g.status, 0, g.stderr);
    const n = JSON.parse(g.stdout).tokens.length;
    assert.ok(n >= 1 && n <= 3, `${n} tokens`);
    writeFileSync(path.join(dir, 'valid.txt'), 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.');
    const e = run(['eval', '--model', out, '--text', path.join(dir, 'valid.txt'), '--seq', '8', '--batch', '2', '--json']);
    assert.equal(e.status, 0, e.stderr);
    const ev = JSON.parse(e.stdout);
    assert.ok(ev.loss > 0 && Number.isFinite(ev.perplexity) && ev.tokens > 16, e.stdout);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('obfuscate --public-base: the split generates as the derived model does (exact rank), deobfuscate checks the pin, bad flags are refused', async () => {
  const { derivedFromFixture } = await import('./world.js');
  const { saveCheckpoint } = await import('../src/model/checkpoint.js');
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-cli-'));
  try {
    const base = path.join(ROOT, 'test/fixtures/vocab50257'), model = path.join(dir, 'derived');
    saveCheckpoint(model, derivedFromFixture());
    const o = run(['obfuscate', '--model', model, '--public-base', base, '--delta-rank', '1', '--seed', '4', '--out', path.join(dir, 'b')]);
    assert.equal(o.status, 0, o.stderr);
    assert.match(o.stdout, /public base .* keeps the delta at rank 1, ranks 1-1/);
    const split = run(['generate', '--enclave', path.join(dir, 'b', 'enclave'), '--accelerator', path.join(dir, 'b', 'accelerator'), '--prompt', 'Hello there', '--max-tokens', '6', '--json']);
    const plain = run(['generate', '--model', model, '--prompt', 'Hello there', '--max-tokens', '6', '--json']);
    assert.equal(split.status, 0, split.stderr);
    assert.deepEqual(JSON.parse(split.stdout).tokens, JSON.parse(plain.stdout).tokens);
    const wrong = run(['deobfuscate', '--base', model, '--bundles', path.join(dir, 'b'), '--public-base', model, '--out', path.join(dir, 'p1')]);
    assert.equal(wrong.status, 3);
    assert.match(wrong.stderr, /the bundles pin/);
    assert.equal(run(['deobfuscate', '--base', model, '--bundles', path.join(dir, 'b'), '--public-base', base, '--out', path.join(dir, 'p2')]).status, 0);
    const lone = run(['obfuscate', '--model', model, '--delta-rank', '2', '--out', path.join(dir, 'c')]);
    assert.equal(lone.status, 2);
    assert.match(lone.stderr, /need --public-base/);
    const both = run(['obfuscate', '--model', model, '--public-base', base, '--delta-rank', '2', '--delta-energy', '0.9', '--out', path.join(dir, 'd')]);
    assert.match(both.stderr, /not both/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
