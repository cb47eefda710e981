import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
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
  assert.ok(j.step_ms_median > 0 && j.peak_rss_mb > 0);
});
