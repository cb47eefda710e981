// Data formats: field mapping, Alpaca and chat records, integer labels; owner infer --file
// through the enclave service; eval of a merged classifier and of an LM on JSONL.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  parseJsonl, labelSet, encodeRecords, datasetWarnings, trainLabels, alpacaPrompt, chatPrompt, DEFAULT_FIELDS, type JsonObject,
} from '../src/io/jsonl.js';
import { gpt2Tokenizer } from '../src/model/tokenizer.js';
import { parseRunSpec, jobSpecOf } from '../src/train/run_spec.js';
import { GPT2 } from '../src/model/gpt2.js';
import { saveCheckpoint } from '../src/model/checkpoint.js';
import { InputError } from '../src/errors.js';
import { inferRecords, uploadRecords, waitForJob } from '../src/roles/parties.js';
import { inProcessWorld, spec } from './world.js';
import { jobData } from '../src/roles/enclave_job.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');
const TINY = path.join(ROOT, 'test/fixtures/vocab50257');
const env = { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' };
const run = (args: string[]) => spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env, cwd: ROOT });
const jsonl = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).join('\n') + '\n';
const refused = (text: string, ...parts: (string | RegExp)[]) => {
  let err: unknown;
  try {
    parseJsonl(text, 'f.jsonl');
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof InputError, `refused with an InputError: ${text}`);
  for (const p of parts) assert.match((err as Error).message, typeof p === 'string' ? new RegExp(p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')) : p);
};

test('formats: text, prompt/completion, Alpaca (with and without input) and chat records, with labels', () => {
  const recs = parseJsonl(jsonl([
    { text: 'a', label: 1 },
    { prompt: 'p', completion: 'c' },
    { instruction: 'Add', input: '2 and 3', output: '5' },
    { instruction: 'Say hi', output: 'hi', label: 'greet' },
    { messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'U' }, { role: 'assistant', content: 'A1' }, { role: 'user', content: 'U2' }, { role: 'assistant', content: 'A2' }] },
  ]), 'f');
  assert.deepEqual(recs[0], { text: 'a', label: '1' });
  assert.deepEqual(recs[1], { prompt: 'p', completion: 'c' });
  assert.deepEqual(recs[2], { prompt: '### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n', completion: '5' });
  assert.deepEqual(recs[3], { prompt: '### Instruction:\nSay hi\n\n### Response:\n', completion: 'hi', label: 'greet' });
  assert.equal(recs[4].prompt, '### System:\nS\n\n### User:\nU\n\n### Assistant:\nA1\n\n### User:\nU2\n\n### Assistant:\n');
  assert.equal(recs[4].completion, 'A2');
  assert.equal(alpacaPrompt('x', ''), '### Instruction:\nx\n\n### Response:\n');
  assert.equal(chatPrompt([]), '### Assistant:\n');
  // a template's placeholders inside the data are data, not placeholders
  assert.equal(alpacaPrompt('{input} $&', 'y'), '### Instruction:\n{input} $&\n\n### Input:\ny\n\n### Response:\n');
  // the loss is on the completion only: the prompt's targets are masked
  const set = encodeRecords([recs[2]], gpt2Tokenizer, { task: 'lm', maxLen: 64, source: 'f' });
  const p = gpt2Tokenizer.encode(recs[2].prompt!).length;
  assert.equal(set.items[0].lossFrom, p - 1);
  assert.equal(set.items[0].tokens.length, p + gpt2Tokenizer.encode('5').length + 1);
  // inference: no completion needed; a chat ending with the user is completed by the assistant
  const inf = parseJsonl(jsonl([{ instruction: 'x' }, { messages: [{ role: 'user', content: 'hey' }] }, { prompt: 'q' }]), 'f', DEFAULT_FIELDS, { inference: true });
  assert.deepEqual(inf[0], { prompt: '### Instruction:\nx\n\n### Response:\n', completion: undefined });
  assert.equal(inf[1].prompt, '### User:\nhey\n\n### Assistant:\n');
  assert.equal(inf[2].prompt, 'q');
});

test('malformed records are refused naming the line and the field', () => {
  const two = (bad: unknown) => jsonl([{ text: 'ok' }, bad]);
  refused(two({ instruction: 'x' }), 'f.jsonl:2', '"output" is missing');
  refused(two({ output: 'x' }), 'f.jsonl:2', '"instruction" is missing');
  refused(two({ instruction: 'x', input: 3, output: 'y' }), 'f.jsonl:2', '"input" must be a string, got 3');
  refused(two({ messages: [] }), 'f.jsonl:2', '"messages" must be a non-empty array');
  refused(two({ messages: 'hi' }), 'f.jsonl:2', '"messages" must be a non-empty array');
  refused(two({ messages: [{ role: 'bot', content: 'x' }] }), 'f.jsonl:2', 'messages[0].role must be one of system, user, assistant, got "bot"');
  refused(two({ messages: [{ role: 'user', content: 'x' }, { role: 'assistant' }] }), 'f.jsonl:2', 'messages[1].content must be a string');
  refused(two({ messages: ['x'] }), 'f.jsonl:2', 'messages[0] must be an object');
  refused(two({ messages: [{ role: 'assistant', content: 'a' }, { role: 'user', content: 'u' }] }), 'f.jsonl:2', 'the last message must be the assistant\'s');
  refused(two({ prompt: 'p' }), 'f.jsonl:2', 'the completion "completion" is missing');
  refused(two({ text: 5 }), 'f.jsonl:2', 'the text "text" must be a string, got 5');
  refused(two({ text: 't', label: [1] }), 'f.jsonl:2', '"label" (the label) must be a string or a number');
  refused(two({ body: 'x' }), 'f.jsonl:2', 'needs "text", or "prompt" and "completion", or "instruction" and "output" (Alpaca), or "messages" (chat); it has "body"');
  refused('{"text": "a"}\n\n[1]\n', 'f.jsonl:3', 'must be a JSON object');
  refused('{"text": "a"}\n{oops\n', 'f.jsonl:2', 'not valid JSON');
});

test('field mapping: the run spec names the fields; every entry point reads records with them', () => {
  const spec = parseRunSpec({ text_field: 'review', label_field: 'stars', prompt_field: 'q', completion_field: 'a' }, 't');
  assert.deepEqual([spec.text_field, spec.label_field, spec.prompt_field, spec.completion_field], ['review', 'stars', 'q', 'a']);
  // the job the owner sends the enclave carries them
  assert.equal(jobSpecOf(spec).text_field, 'review');
  const d = parseRunSpec({}, 't');
  assert.deepEqual([d.text_field, d.label_field, d.prompt_field, d.completion_field], ['text', 'label', 'prompt', 'completion']);
  assert.throws(() => parseRunSpec({ text_field: '' }, 't'), /text_field: must be a non-empty field name/);
  assert.throws(() => parseRunSpec({ label_field: 3 }, 't'), /label_field: must be a field name, got 3/);
  const recs = parseJsonl(jsonl([{ review: 'r', stars: 4, text: 'ignored?' }, { q: 'Q', a: 'A' }]), 'f', spec);
  assert.deepEqual(recs, [{ text: 'r', label: '4' }, { prompt: 'Q', completion: 'A' }]);
  // a record without the mapped field: the message names the mapped names
  assert.throws(() => parseJsonl(jsonl([{ text: 'x' }]), 'f', spec), /f:1: needs "review", or "q" and "a"/);
});

test('integer labels are class indices (label 2 is class 2); the mapping is the run\'s label list', () => {
  const r = (...ls: (string | number)[]) => ls.map((l) => ({ text: 'x', label: String(l) }));
  assert.deepEqual(labelSet(r(2, 0), 't'), ['0', '1', '2']);
  assert.deepEqual(labelSet(r(10, 2, 1, 0), 't'), Array.from({ length: 11 }, (_, i) => String(i)));
  // not class indices: negative, fractional, with leading zeros, or very large: sorted by value
  assert.deepEqual(labelSet(r(-1, 2), 't'), ['-1', '2']);
  assert.deepEqual(labelSet(r(1.5, 0), 't'), ['0', '1.5']);
  assert.deepEqual(labelSet(r('01', '2'), 't'), ['01', '2']);
  assert.deepEqual(labelSet(r(5000, 3), 't'), ['3', '5000']);
  const recs = parseJsonl(jsonl([{ text: 'a', label: 2 }, { text: 'b', label: 0 }, { text: 'c', label: '2' }]), 'f');
  const labels = labelSet(recs, 'f');
  const set = encodeRecords(recs, gpt2Tokenizer, { task: 'cls', maxLen: 8, labels, source: 'f' });
  assert.deepEqual(set.items.map((x) => x.label), [2, 0, 2]);
  assert.match(datasetWarnings(recs, 'cls', labels, 'f').join(), /f has no record of class 1 \(integer labels are class indices 0\.\.2\)/);
  assert.match(datasetWarnings(recs, 'lm', [], 'f').join(), /f has labelled records, and the task is lm: the labels are ignored/);
  assert.deepEqual(datasetWarnings(parseJsonl(jsonl([{ text: 'a' }]), 'f'), 'lm', [], 'f'), []);
  // evaluation labels: within the training set's (one label is enough)
  assert.deepEqual(trainLabels(recs, r(1), 'train', 'eval'), ['0', '1', '2']);
  assert.throws(() => trainLabels(recs, r(3), 'train', 'eval'), /eval has labels not in train's label set \[0, 1, 2\]: 3/);
});

test('the enclave\'s job reads the uploaded records with its fields: warnings, labels and malformed records by number', () => {
  const rows: JsonObject[] = [{ body: 'a', y: 0 }, { body: 'b', y: 2 }];
  const lm = jobData(parseRunSpec({ text_field: 'body', label_field: 'y' }, 't'), { train: rows, eval: [] });
  assert.deepEqual(lm.train.map((r) => r.text), ['a', 'b']);
  assert.match(lm.warnings.join(), /training data has labelled records, and the task is lm/);
  const cls = jobData(parseRunSpec({ task: 'cls', text_field: 'body', label_field: 'y' }, 't'), { train: rows, eval: [{ body: 'c', y: 1 }] });
  assert.deepEqual(cls.labels, ['0', '1', '2']);
  assert.match(cls.warnings.join(), /no record of class 1/);
  assert.throws(() => jobData(parseRunSpec({ task: 'cls' }, 't'), { train: rows, eval: [] }), /training data record 1: needs "text"/);
  assert.throws(() => jobData(parseRunSpec({ task: 'cls', text_field: 'body', label_field: 'y' }, 't'), { train: rows, eval: [{ body: 'c', y: 7 }] }), /evaluation data has labels not in .*: 7/);
  assert.throws(() => jobData(parseRunSpec({ text_field: 'body' }, 't'), { train: [...rows, { messages: [{ role: 'user', content: 'x' }] }], eval: [] }), /training data record 3: the last message must be the assistant's/);
});

test('finetune, eval and generate on mapped and Alpaca data: integer classes, per-class counts, baselines, predictions', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-data-'));
  try {
    const words = ['good', 'bad', 'meh'];
    const cls = path.join(dir, 'cls.jsonl');
    writeFileSync(cls, jsonl(Array.from({ length: 24 }, (_, i) => ({ review: `it was ${words[i % 3]} so ${words[i % 3]}`, stars: i % 3 === 1 ? 2 : i % 3 }))));
    const runDir = path.join(dir, 'run');
    const f = run(['finetune', '--model', TINY, '--train', cls, '--eval', cls, '--task', 'cls', '--text-field', 'review', '--label-field', 'stars', '--mode', 'local',
      '--method', 'full', '--steps', '4', '--batch', '8', '--max-len', '12', '--lr', '0.05', '--out', runDir, '--json']);
    assert.equal(f.status, 0, f.stderr);
    const sum = JSON.parse(f.stdout);
    assert.deepEqual(sum.labels, ['0', '1', '2'], 'integer labels 0 and 2 are classes 0 and 2; class 1 is kept');
    assert.match(f.stderr, /warning: .*has no record of class 1/);
    assert.equal(JSON.parse(readFileSync(path.join(runDir, 'run_spec.json'), 'utf8')).text_field, 'review');
    // the run's merged classifier, scored on the file with the run's fields
    const preds = path.join(dir, 'preds.jsonl');
    const e = run(['eval', '--run', runDir, '--data', cls, '--predictions', preds, '--json']);
    assert.equal(e.status, 0, e.stderr);
    const r = JSON.parse(e.stdout);
    assert.ok(Math.abs(r.loss - sum.eval.loss) < 1e-5 && r.accuracy === sum.eval.accuracy, 'the merged model scores as the run measured it');
    assert.deepEqual(r.per_class.map((c: { count: number }) => c.count), [8, 0, 16]);
    assert.equal(r.per_class.reduce((a: number, c: { correct: number }) => a + c.correct, 0), Math.round(r.accuracy * 24));
    assert.equal(r.per_class.reduce((a: number, c: { predicted: number }) => a + c.predicted, 0), 24);
    assert.deepEqual(r.baselines.majority, { label: '2', accuracy: 16 / 24 });
    assert.ok(Math.abs(r.baselines.uniform.loss - Math.log(3)) < 1e-12);
    assert.deepEqual(r.before_training, sum.eval_before, 'the run\'s own measurement before training on this file');
    const lines = readFileSync(preds, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.length, 24);
    for (const [i, l] of lines.entries()) {
      assert.equal(l.index, i);
      assert.equal(l.label, String(i % 3 === 1 ? 2 : i % 3));
      const p = Object.values(l.probabilities as Record<string, number>);
      assert.ok(Math.abs(p.reduce((a, b) => a + b, 0) - 1) < 1e-4);
      assert.equal(l.prediction, Object.entries(l.probabilities as Record<string, number>).sort((a, b) => b[1] - a[1])[0][0]);
    }
    assert.equal(lines.filter((l) => l.prediction === l.label).length, Math.round(r.accuracy * 24));
    // --model on the merged checkpoint: its head's labels; the fields given as flags
    const m = run(['eval', '--model', path.join(runDir, 'merged'), '--data', cls, '--text-field', 'review', '--label-field', 'stars', '--max-len', '12', '--json']);
    assert.equal(m.status, 0, m.stderr);
    assert.ok(Math.abs(JSON.parse(m.stdout).loss - r.loss) < 1e-6);
    const human = run(['eval', '--run', runDir, '--data', cls]);
    assert.match(human.stdout, /majority class "2": accuracy 66\.67%/);
    assert.match(human.stdout, /before training: loss/);
    assert.equal(run(['eval', '--run', runDir, '--model', TINY, '--data', cls]).status, 2);

    // Alpaca records for an LM: a model with room for the template
    const lm = path.join(dir, 'lm');
    saveCheckpoint(lm, GPT2.random({ n_layer: 1, n_head: 1, n_embd: 8, n_ctx: 48, vocab_size: 50257, layer_norm_epsilon: 1e-5 }, 1).weights());
    const alpaca = path.join(dir, 'alpaca.jsonl');
    writeFileSync(alpaca, jsonl(Array.from({ length: 8 }, (_, i) => ({ instruction: 'Count', input: i % 2 ? '' : 'to two', output: 'one two' }))));
    const lmRun = path.join(dir, 'lmrun');
    const g = run(['finetune', '--model', lm, '--train', alpaca, '--eval', alpaca, '--mode', 'local', '--steps', '2', '--batch', '4', '--max-len', '40', '--out', lmRun, '--json']);
    assert.equal(g.status, 0, g.stderr);
    const le = run(['eval', '--run', lmRun, '--data', alpaca, '--base', lm, '--json']);
    assert.equal(le.status, 0, le.stderr);
    const lr = JSON.parse(le.stdout);
    assert.ok(Math.abs(lr.perplexity - Math.exp(lr.loss)) < 1e-6 * lr.perplexity);
    assert.ok(Math.abs(lr.before_training.loss - JSON.parse(g.stdout).eval_before.loss) < 1e-5, 'the base model scored as the run measured it before training');
    const out = path.join(dir, 'gen.jsonl');
    const gen = run(['generate', '--run', lmRun, '--file', alpaca, '--out', out, '--max-tokens', '2']);
    assert.equal(gen.status, 0, gen.stderr);
    const gl = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(gl.map((l) => l.index), [0, 1, 2, 3, 4, 5, 6, 7]);
    assert.ok(gl.every((l) => typeof l.completion === 'string'));
    assert.match(run(['generate', '--run', lmRun, '--file', alpaca]).stderr, /generate --file needs --out/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('owner finetune and infer --file through the enclave service: the job\'s field names, probabilities per record', async () => {
  const w = await inProcessWorld({ deploy: false });
  try {
    await w.provider.attest();
    await w.owner.attest();
    const { uploadAcceleratorBundle, uploadEnclaveBundle } = await import('../src/roles/parties.js');
    await uploadAcceleratorBundle(w.accAddr, path.join(w.dir, 'bundles', 'accelerator'), w.providerKey);
    await uploadEnclaveBundle(w.provider, path.join(w.dir, 'bundles', 'enclave'));
    const rows: JsonObject[] = Array.from({ length: 16 }, (_, i) => ({ body: i % 2 ? 'this was awful really awful' : 'this was good really good', y: i % 2 }));
    // the records travel as they are: the enclave reads them with the job's fields
    await uploadRecords(w.owner, 'train', rows);
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ steps: 2 }) }), /training data record 1: needs "text"/);
    const st = await w.owner.command<{ warnings: string[] }>('start_finetune', { spec: spec({ steps: 4, text_field: 'body', label_field: 'y' }) });
    assert.deepEqual(st.warnings, []);
    const s = await waitForJob(w.owner);
    const job = s.job as { state: string; labels: string[]; error: string | null };
    assert.equal(job.state, 'done', job.error ?? '');
    assert.deepEqual(job.labels, ['0', '1']);
    // the library call, over more records than one command carries
    const many = Array.from({ length: 300 }, (_, i) => rows[i % 16]);
    const lines = await inferRecords(w.owner, many);
    assert.equal(lines.length, 300);
    assert.deepEqual(lines.map((l) => l.index), many.map((_, i) => i));
    for (const l of lines) {
      const p = l.probabilities as Record<string, number>;
      assert.deepEqual(Object.keys(p), ['0', '1']);
      assert.ok(Math.abs(p['0'] + p['1'] - 1) < 1e-4);
      assert.equal(l.prediction, p['0'] >= p['1'] ? '0' : '1');
    }
    await assert.rejects(inferRecords(w.owner, [{ text: 'no body' }]), /infer record 1: needs "body"/);
    // the command line: a file in, one JSON line per record out
    const inFile = path.join(w.dir, 'in.jsonl');
    const outFile = path.join(w.dir, 'preds.jsonl');
    writeFileSync(inFile, jsonl(rows.slice(0, 5)));
    const trust = ['--enclave', w.encAddr, '--trust', w.rootPublicKey, '--contract', w.contractFile, '--key', path.join(w.dir, 'owner.json')];
    const r = await promisify(execFile)(process.execPath, [BIN, 'owner', 'infer', ...trust, '--file', inFile, '--out', outFile, '--json'], { env, cwd: ROOT });
    assert.deepEqual(JSON.parse(r.stdout), { records: 5, out: outFile });
    const got = readFileSync(outFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(got, lines.slice(0, 5));
    // --text still works, now with the probabilities
    const t = await promisify(execFile)(process.execPath, [BIN, 'owner', 'infer', ...trust, '--text', String(rows[0].body), '--json'], { env, cwd: ROOT });
    const tj = JSON.parse(t.stdout);
    assert.equal(tj.predictions[0], lines[0].prediction);
    assert.ok(Math.abs(tj.probabilities[0][0] - (lines[0].probabilities as Record<string, number>)['0']) < 1e-5);
    await assert.rejects(promisify(execFile)(process.execPath, [BIN, 'owner', 'infer', ...trust, '--file', inFile], { env, cwd: ROOT }), /owner infer --file needs --out FILE/);
  } finally {
    await w.stop();
  }
});
