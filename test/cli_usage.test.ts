// The command line as a user meets it: version, usage errors, --json, progress off a
// terminal, recipes, the owner's flags, and outputs that are never overwritten by accident.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { InputError } from '../src/errors.js';
import { buildProgram } from '../src/cli/main.js';
import { readRecipe } from '../src/cli/run_spec_args.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');
const MODEL = path.join(ROOT, 'test/fixtures/vocab50257');
/** a small training file (a few records keep each run short) */
function trainFile(dir: string): string {
  const f = path.join(dir, 'train.jsonl');
  writeFileSync(f, Array.from({ length: 16 }, (_, i) => JSON.stringify({ text: `It is a truth universally acknowledged, number ${i}.` })).join('\n') + '\n');
  return f;
}

function run(args: string[], env: Record<string, string> = {}) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1', ...env }, cwd: ROOT });
}
/** stdout of a --json command: exactly one JSON document */
function json(r: ReturnType<typeof run>): Record<string, unknown> {
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines.length, 1, `one line of JSON on stdout, got:\n${r.stdout}`);
  return JSON.parse(lines[0]);
}
function leaves(c: Command, pre: string[] = []): { name: string; cmd: Command }[] {
  return c.commands.flatMap((s) => (s.commands.length ? leaves(s, [...pre, s.name()]) : [{ name: [...pre, s.name()].join(' '), cmd: s }]));
}
const tmp = () => mkdtempSync(path.join(os.tmpdir(), 'obf-usage-'));

test('--version prints package.json\'s version; unknown options and commands are refused by name (exit 2), with a suggestion', () => {
  const v = run(['--version']);
  assert.equal(v.status, 0);
  assert.equal(v.stdout.trim(), JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version);
  const typo = run(['finetune', '--modle', 'x', '--out', '/nonexistent/run']);
  assert.equal(typo.status, 2);
  assert.match(typo.stderr, /unknown option '--modle'/);
  assert.match(typo.stderr, /Did you mean .*--model/);
  assert.doesNotMatch(typo.stderr, /required option|missing/);
  assert.ok(typo.stderr.split('\n').length < 6, 'a short message, not the whole help');
  const cmd = run(['provider', 'fecth']);
  assert.equal(cmd.status, 2, cmd.stderr);
  assert.match(cmd.stderr, /unknown command 'fecth'/);
  // conflicting and invalid values: refused before any work
  const d = tmp();
  try {
    const both = run(['obfuscate', '--model', MODEL, '--naive', '--kappa', '3', '--out', path.join(d, 'b')]);
    assert.equal(both.status, 2);
    assert.match(both.stderr, /'--kappa <k>' cannot be used with option '--naive'/);
    const kappas = run(['fidelity', '--model', 'gpt2', '--random-init', '--mode', 'sealed', '--two-sided']);
    assert.equal(kappas.status, 2, kappas.stderr);
    assert.match(kappas.stderr, /--two-sided .* paper mode/);
    assert.ok(!existsSync(path.join(d, 'b')), 'nothing written');
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('--json on every command that prints a result; with it stdout is one JSON document', () => {
  const services = ['accelerator serve', 'enclave serve', 'bench echo-accelerator'];
  const missing = leaves(buildProgram()).filter((l) => !services.includes(l.name) && !l.cmd.options.some((o) => o.long === '--json')).map((l) => l.name);
  assert.deepEqual(missing, [], 'commands without --json');
  // with --json console.log goes to stderr (src/cli/output.ts): a result printed with it would be lost from stdout
  const cli = path.join(ROOT, 'src', 'cli');
  const printed = readdirSync(cli).flatMap((f) => readFileSync(path.join(cli, f), 'utf8').split('\n').map((l, i) => ({ at: `${f}:${i + 1}`, l })))
    .filter(({ l }) => /console\.log\((JSON\.stringify|o\.json)/.test(l) && !/'listening'/.test(l)).map(({ at }) => at);
  assert.deepEqual(printed, [], 'results printed with console.log instead of emit()');
  const d = tmp();
  try {
    const m = path.join(d, 'm');
    assert.equal(json(run(['init', '--preset', 'gpt2-micro', '--out', m, '--json'])).params, 7872);
    const o = json(run(['obfuscate', '--model', m, '--seed', '3', '--out', path.join(d, 'b'), '--json']));
    assert.match(String(o.accelerator_sha256), /^[0-9a-f]{64}$/);
    const p = json(run(['party-key', '--key', path.join(d, 'p.json'), '--json']));
    const ow = json(run(['party-key', '--key', path.join(d, 'o.json'), '--json']));
    assert.equal(p.created, true);
    assert.equal(run(['party-key', '--key', path.join(d, 'p.json')]).stdout.trim(), p.party, 'without --json: the id alone');
    const c = path.join(d, 'contract.json');
    const drafted = json(run(['contract', 'draft', '--provider', String(p.party), '--owner', String(ow.party), '--bundles', path.join(d, 'b'), '--out', c, '--json']));
    const shown = json(run(['contract', 'show', '--contract', c, '--json']));
    assert.equal(shown.sha256, drafted.sha256);
    assert.equal((shown.signatures as string[]).length, 2);
    assert.equal(shown.provider, p.party);
    // a contract is not replaced by accident
    const again = run(['contract', 'draft', '--provider', String(p.party), '--owner', String(ow.party), '--bundles', path.join(d, 'b'), '--out', c]);
    assert.equal(again.status, 2);
    assert.match(again.stderr, /contract draft: --out .* exists/);
    assert.equal(JSON.parse(readFileSync(c, 'utf8')).body.owner, ow.party, 'the contract is untouched');
    // outputs that hold key material or models: a non-empty --out only with --force
    for (const args of [['provider', 'obfuscate', '--model', m, '--out', path.join(d, 'b')], ['init', '--preset', 'gpt2-micro', '--out', m]]) {
      const r = run(args);
      assert.equal(r.status, 2, args.join(' '));
      assert.match(r.stderr, /--out .* is not empty .*--force/);
    }
    assert.equal(json(run(['provider', 'obfuscate', '--model', m, '--out', path.join(d, 'b'), '--force', '--json'])).mode, 'sealed');
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('progress off a terminal: timed lines on every long command, JSON lines with --json (stdout stays the result)', () => {
  const d = tmp();
  const env = { OBFUSCATUNE_NO_PROGRESS: '0', OBFUSCATUNE_PROGRESS_INTERVAL_MS: '1' };
  try {
    const r = run(['finetune', '--model', MODEL, '--train', trainFile(d), '--task', 'lm', '--max-len', '8', '--steps', '12', '--batch', '2', '--out', path.join(d, 'run'), '--json'], env);
    assert.equal(json(r).steps, 12);
    const events = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
    assert.ok(events.length >= 2, r.stderr);
    for (const e of events) {
      assert.equal(e.event, 'progress');
      assert.equal(e.task, 'finetune sealed/lora');
      assert.equal(e.total, 12);
      assert.equal(typeof e.elapsed_s, 'number');
    }
    assert.equal(events[events.length - 1].done, 12);
    assert.equal(events[events.length - 1].eta_s, 0);
    // evaluation and fidelity, as text lines
    writeFileSync(path.join(d, 'eval.jsonl'), Array.from({ length: 12 }, (_, i) => JSON.stringify({ text: `line number ${i} of the evaluation` })).join('\n'));
    const ev = run(['eval', '--run', path.join(d, 'run'), '--data', path.join(d, 'eval.jsonl'), '--batch', '4'], env);
    assert.equal(ev.status, 0, ev.stderr);
    assert.match(ev.stderr, /^eval: 3\/3 \(100%\)/m);
    assert.match(ev.stdout, /^loss \d/);
    const f = run(['fidelity', '--model', 'gpt2-micro', '--random-init', '--tokens', '8', '--kappas', '1,naive', '--json'], env);
    assert.equal((json(f).rows as unknown[]).length, 2);
    const fe = f.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
    assert.ok(fe.length >= 1 && fe.every((e) => e.task === 'fidelity'), f.stderr);
    assert.equal(fe[fe.length - 1].done, 2);
    // the experiments that train and attack: JSON lines with --json, text lines without
    const owner = path.join(d, 'owner.jsonl');
    writeFileSync(owner, Array.from({ length: 16 }, (_, i) => JSON.stringify({ text: `${i % 2 ? 'good food' : 'bad soup'} ${i}`, label: i % 2 ? 'pos' : 'neg' })).join('\n'));
    const sec = run(['experiment', 'security', '--public', MODEL, '--provider-corpus', owner, '--provider-steps', '2', '--owner-data', owner, '--public-corpus', owner,
      '--modes', 'sealed:1', '--defences', 'none', '--attacks', 'frequency,label-recovery', '--steps', '2', '--batch', '2', '--max-len', '8', '--out', path.join(d, 'report'), '--json'], env);
    assert.equal((json(sec).rows as unknown[]).length, 2);
    const se = sec.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
    assert.ok(se.every((e) => e.event === 'progress' && e.task === 'experiment security'), sec.stderr);
    for (const label of [/^provider model, step 2\/2$/, /^sealed-k1: recording the view, step 2\/2$/, /^sealed-k1 frequency/]) assert.ok(se.some((e) => label.test(e.label)), `${label}: ${sec.stderr}`);
    assert.deepEqual([se[se.length - 1].done, se[se.length - 1].total], [4, 4]);
    const pb = run(['experiment', 'public-base', '--public', MODEL, '--provider-corpus', owner, '--provider-steps', '2', '--eval', owner, '--ranks', '1', '--energies', '',
      '--seq', '8', '--batch', '2', '--max-batches', '1', '--out', path.join(d, 'pb')], env);
    assert.equal(pb.status, 0, pb.stderr);
    assert.match(pb.stderr, /^experiment public-base: 2\/5 \(40%\) provider model, step 2\/2 elapsed /m);
    assert.match(pb.stderr, /^experiment public-base: 4\/5 \(80%\) rank 1 elapsed /m);
    assert.match(pb.stderr.trimEnd().split('\n').pop()!, /^experiment public-base: 5\/5 \(100%\) done elapsed /);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('recipes: --config YAML or JSON, checked setting by setting, flags override it, the run keeps the resolved recipe (loadable again); --resume reads it', () => {
  const d = tmp();
  try {
    const yaml = path.join(d, 'recipe.yaml');
    writeFileSync(yaml, ['# a recipe', 'task: lm', 'mode: paper', 'kappa: 10', 'steps: 5', 'batch: 2', 'max_len: 8', 'checkpoint_every: 1', 'lora:', '  rank: 4', '  targets: [q, v, fc]', ''].join('\n'));
    const a = path.join(d, 'a');
    const TRAIN = trainFile(d);
    const r = run(['finetune', '--config', yaml, '--model', MODEL, '--train', TRAIN, '--steps', '2', '--alpha', '4', '--out', a, '--json']);
    assert.equal(json(r).steps, 2);
    const spec = JSON.parse(readFileSync(path.join(a, 'run_spec.json'), 'utf8'));
    assert.deepEqual({ mode: spec.mode, kappa: spec.kappa, steps: spec.steps, batch: spec.batch, lora: spec.lora, lr: spec.lr },
      { mode: 'paper', kappa: '10', steps: 2, batch: 2, lora: { rank: 4, alpha: 4, dropout: 0, targets: ['q', 'v', 'fc'] }, lr: 1e-3 });
    // the resolved recipe runs again as it is
    const b = path.join(d, 'b');
    assert.equal(run(['finetune', '--config', path.join(a, 'run_spec.json'), '--model', MODEL, '--train', TRAIN, '--out', b]).status, 0);
    assert.deepEqual(JSON.parse(readFileSync(path.join(b, 'run_spec.json'), 'utf8')), spec);
    // --resume: the run's own settings, nothing repeated; a different one refused
    const res = run(['finetune', '--resume', '--out', a, '--steps', '3', '--json']);
    assert.equal(json(res).steps, 3);
    assert.deepEqual(JSON.parse(readFileSync(path.join(a, 'run_spec.json'), 'utf8')), { ...spec, steps: 3 });
    const other = run(['finetune', '--resume', '--out', a, '--rank', '8']);
    assert.equal(other.status, 2);
    assert.match(other.stderr, /lora\.rank: 8 differs from the run's 4/);
    // refused before any work, naming the file and the setting
    // refused setting by setting, naming the file and the setting
    const bad = (text: string, file = 'bad.yaml', refuse: string[] = []) => {
      writeFileSync(path.join(d, file), text);
      assert.throws(() => readRecipe(path.join(d, file), refuse), (e: Error) => e.name === 'RunSpecError' && e instanceof InputError);
      try {
        readRecipe(path.join(d, file), refuse);
      } catch (e) {
        return (e as Error).message;
      }
      return '';
    };
    assert.match(bad('steps: -1\n'), /bad\.yaml\): steps: must be a positive integer, got -1/);
    assert.match(bad('stpes: 3\n'), /bad\.yaml\): stpes: is not a setting of a run/);
    assert.match(bad('lora: {rnak: 3}\n'), /lora\.rnak: is not a setting of LoRA/);
    assert.match(bad('{"lr": "fast"}', 'bad.json'), /bad\.json\): lr: must be a number > 0, got "fast"/);
    assert.match(bad('steps: [1\n'), /bad\.yaml\): \(spec\): not valid YAML/);
    assert.match(bad('- 1\n'), /must be an object of run settings/);
    assert.match(bad('mode: paper\n', 'exp.yaml', ['method', 'mode']), /exp\.yaml\): mode: is not a recipe setting here/);
    // the rules between settings, before any work
    writeFileSync(path.join(d, 'full.yaml'), 'method: full\nlora: {rank: 2}\n');
    const x = run(['finetune', '--config', path.join(d, 'full.yaml'), '--model', MODEL, '--train', TRAIN, '--out', path.join(d, 'never')]);
    assert.equal(x.status, 2, x.stderr);
    assert.match(x.stderr, /full\.yaml and the command line\): lora: LoRA settings apply to method lora/);
    // experiment paper: each row's settings checked before any work
    writeFileSync(path.join(d, 'exp.yaml'), 'freeze_norms: true\n');
    const e2 = run(['experiment', 'paper', '--config', path.join(d, 'exp.yaml'), '--methods', 'lora', '--datasets', 'austen', '--models', MODEL, '--out', path.join(d, 'never')]);
    assert.equal(e2.status, 2);
    assert.match(e2.stderr, /freeze_norms: applies to method full/);
    assert.ok(!existsSync(path.join(d, 'never')));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('owner finetune has every run-spec option of finetune, with the same help and defaults, and --config', () => {
  const cmd = (p: string) => leaves(buildProgram()).find((l) => l.name === p)!.cmd;
  const opts = (c: Command) => new Map(c.options.map((o) => [o.long!, o.description]));
  const fin = opts(cmd('finetune')), own = opts(cmd('owner finetune'));
  // what only a local run has: its files, its directory, resume, the recorder, the in-process codec, a starting adapter
  const local = new Set(['--init-adapter', '--model', '--train', '--eval', '--resume', '--serialize', '--out', '--force', '--json', '--naive', '--record-view', '--record-view-layers', '--record-view-max-mb', '--method']);
  for (const [flag, help] of fin) {
    if (local.has(flag)) continue;
    assert.ok(own.has(flag), `owner finetune has ${flag}`);
    assert.ok(own.get(flag)!.startsWith(help.replace(/ \(default .*\)$/, '')), `${flag}: the same help`);
    assert.equal(own.get(flag)!.match(/\(default [^)]*\)/)?.[0], help.match(/\(default [^)]*\)/)?.[0], `${flag}: the same default`);
  }
  for (const f of ['--targets', '--alpha', '--dropout', '--warmup', '--seed', '--eval-every', '--mode', '--kappa', '--task', '--config']) assert.ok(own.has(f), f);
  assert.match(own.get('--task')!, /\(default lm\)/);
  assert.match(own.get('--mode')!, /the provider's bundle fixes it/);
});
