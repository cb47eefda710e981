// The run specification: defaults, refusals with the setting named, conflicts, resume, the
// enclave's job view, and the same invalid spec refused alike by every entry point (CLI,
// enclave service, experiment runner) before any work; resume of a CLI run from its stored
// spec with no flags repeated.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  RUN_SPEC_DEFAULTS, RUN_SPEC_FILE, RunSpecError, parseRunSpec, resumeRunSpec, parseJobSpec, jobSpecOf, mergeRunSpecInputs, toFinetuneConfig, toSessionOptions,
  type RunSpec, type RunSpecInput,
} from '../src/train/run_spec.js';
import { runPaperExperiments, experimentSpec, DATASET_RECIPES } from '../src/experiments/paper.js';
import { serveEnclave } from '../src/roles/enclave_server.js';
import { EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, uploadEnclaveBundle, uploadRecords } from '../src/roles/parties.js';
import { createSimRoot, loadSimRoot, SimSoftwarePlatform } from '../src/tee/sim.js';
import { obfuscateWeights, writeObfuscation } from '../src/obfuscate/provider.js';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import { readJsonl } from '../src/io/jsonl.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'obfuscatune.js');
const MODEL = path.join(ROOT, 'test/fixtures/vocab50257');

function cli(args: string[]) {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' }, cwd: ROOT });
}

async function inTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-spec-'));
  try {
    await fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The refusal of `input` as parseRunSpec gives it: "field: reason" (what every entry point must say). */
function refusal(input: unknown): { field: string; text: string } {
  try {
    parseRunSpec(input, 'reference');
  } catch (e) {
    assert.ok(e instanceof RunSpecError, String(e));
    return { field: e.field, text: `${e.field}: ${e.reason}` };
  }
  throw new Error(`${JSON.stringify(input)} was accepted`);
}

function refuses(input: unknown, field: string, reason: RegExp, source = 'a test'): void {
  assert.throws(() => parseRunSpec(input, source), (e: unknown) => {
    assert.ok(e instanceof RunSpecError, `a RunSpecError for ${JSON.stringify(input)}`);
    assert.equal(e.field, field, `${JSON.stringify(input)}: ${e.message}`);
    assert.equal(e.source, source);
    assert.match(e.reason, reason);
    assert.ok(e.message.includes(`(${source})`) && e.message.includes(`${field}: `), e.message);
    return true;
  });
}

test('defaults: an empty spec is the table of RUN_SPEC_DEFAULTS, resolved (orthogonal masks in split modes, LoRA only for lora)', () => {
  const D = RUN_SPEC_DEFAULTS;
  const s = parseRunSpec({}, 'a test');
  assert.deepEqual(s, {
    task: D.task, method: D.method, mode: D.mode, kappa: '1', two_sided: D.two_sided, mask_seed: D.mask_seed, rotary_masks: 'full',
    token_mixing: 'on', mixing_scheme: D.mixing_scheme, mixing_kappa: D.mixing_kappa, mixing_block: D.mixing_block, mixing_rounds: D.mixing_rounds, mixing_shields: D.mixing_shields, max_len: D.max_len, steps: D.steps, batch: D.batch,
    text_field: D.text_field, prompt_field: D.prompt_field, completion_field: D.completion_field, label_field: D.label_field,
    lr: D.lr, warmup: D.warmup, min_lr_frac: D.min_lr_frac, clip: D.clip, weight_decay: D.weight_decay, enclave_optimizer: D.enclave_optimizer, momentum: D.momentum,
    adam_eps: D.adam_eps, seed: D.seed, eval_every: D.eval_every, eval_batches: D.eval_batches, checkpoint_every: D.checkpoint_every, pooling: D.pooling,
    freeze_norms: D.freeze_norms, lora: { rank: D.lora.rank, alpha: D.lora.alpha, dropout: D.lora.dropout, targets: [...D.lora.targets] },
  });
  assert.deepEqual(Object.keys(s).sort(), Object.keys(D).sort(), 'every setting has a default');
  assert.equal(parseRunSpec({ mode: 'local' }, 'a test').kappa, null);
  assert.equal(parseRunSpec({ method: 'full' }, 'a test').lora, null);
  assert.equal(parseRunSpec({ mode: 'paper', kappa: 10 }, 'a test').kappa, '10');
  assert.deepEqual(parseRunSpec({ task: 'cls', lora: { targets: 'qkv,wte' } }, 'a test').lora!.targets, ['q', 'k', 'v', 'wte']);
  assert.deepEqual(parseRunSpec({ lora: { rank: 4 } }, 'a test').lora, { ...s.lora, rank: 4 });
  // a stored spec reads back as itself
  const full = parseRunSpec({ task: 'cls', method: 'full', mode: 'paper', kappa: 'naive', pooling: 'mean', freeze_norms: true }, 'a test');
  assert.deepEqual(parseRunSpec(JSON.parse(JSON.stringify(full)), 'a test'), full);
  // the projections carry every setting
  const cfg = toFinetuneConfig(s, 'id');
  assert.deepEqual(
    [cfg.steps, cfg.batch, cfg.lr, cfg.warmup, cfg.min_lr_frac, cfg.clip, cfg.weight_decay, cfg.enclave_optimizer, cfg.momentum, cfg.adam_eps, cfg.seed, cfg.eval_every, cfg.eval_batches, cfg.checkpoint_every, cfg.kappa, cfg.modelId],
    [s.steps, s.batch, s.lr, s.warmup, s.min_lr_frac, s.clip, s.weight_decay, s.enclave_optimizer, s.momentum, s.adam_eps, s.seed, s.eval_every, s.eval_batches, s.checkpoint_every, '1', 'id'],
  );
  const so = toSessionOptions(full, { padTokenId: 0, numLabels: 3 });
  assert.deepEqual([so.mode, so.method, so.task, so.kappa, so.pooling, so.foldedBaseline, so.maskSeed, so.lora, so.numLabels], ['paper', 'full', 'cls', 'naive', 'mean', true, full.seed, undefined, 3]);
});

test('each invalid value is refused with the setting and the source named', () => {
  const cases: [unknown, string, RegExp][] = [
    [{ steps: -3 }, 'steps', /positive integer, got -3/],
    [{ steps: 0 }, 'steps', /positive integer, got 0/],
    [{ steps: 2.5 }, 'steps', /positive integer, got 2.5/],
    [{ steps: '100' }, 'steps', /positive integer, got "100"/],
    [{ batch: 0 }, 'batch', /positive integer/],
    [{ max_len: -1 }, 'max_len', /positive integer/],
    [{ lr: 0 }, 'lr', /> 0, got 0/],
    [{ lr: -1e-3 }, 'lr', /> 0/],
    [{ lr: Infinity }, 'lr', /got Infinity/],
    [{ lr: NaN }, 'lr', /got NaN/],
    [{ warmup: -1 }, 'warmup', /integer >= 0/],
    [{ min_lr_frac: 1.5 }, 'min_lr_frac', /\[0, 1\]/],
    [{ clip: -1 }, 'clip', />= 0/],
    [{ weight_decay: -0.1 }, 'weight_decay', />= 0/],
    [{ momentum: 1 }, 'momentum', /\[0, 1\)/],
    [{ adam_eps: 0 }, 'adam_eps', /\(0, 1\)/],
    [{ seed: -1 }, 'seed', /integer >= 0/],
    [{ eval_every: 1.5 }, 'eval_every', /integer >= 0/],
    [{ eval_batches: -2 }, 'eval_batches', /integer >= 0/],
    [{ checkpoint_every: -5 }, 'checkpoint_every', /integer >= 0/],
    [{ enclave_optimizer: 'adam' }, 'enclave_optimizer', /one of adamw, sgd, got "adam"/],
    [{ mode: 'secret' }, 'mode', /one of sealed, paper, local/],
    [{ method: 'local' }, 'method', /one of lora, full/],
    [{ task: 'seq2seq' }, 'task', /one of lm, cls/],
    [{ kappa: 0.5 }, 'kappa', />= 1 or "naive", got 0.5/],
    [{ kappa: 'wide' }, 'kappa', /got "wide"/],
    [{ mask_seed: -1 }, 'mask_seed', /integer >= 0/],
    [{ two_sided: 'yes' }, 'two_sided', /true or false/],
    [{ task: 'cls', pooling: 'max' }, 'pooling', /one of last, mean/],
    [{ lora: { rank: 0 } }, 'lora.rank', /positive integer/],
    [{ lora: { alpha: 0 } }, 'lora.alpha', /> 0/],
    [{ lora: { dropout: 1 } }, 'lora.dropout', /\[0, 1\), got 1/],
    [{ lora: { dropout: -0.1 } }, 'lora.dropout', /\[0, 1\)/],
    [{ lora: { targets: 'q,attn' } }, 'lora.targets', /unknown LoRA target "attn"/],
    [{ lora: { targets: '' } }, 'lora.targets', /no LoRA targets/],
    [{ lora: { ranks: 4 } }, 'lora.ranks', /not a setting of LoRA/],
    [{ learning_rate: 1e-3 }, 'learning_rate', /not a setting of a run/],
    [42, '(spec)', /an object of run settings, got 42/],
  ];
  for (const [input, field, reason] of cases) refuses(input, field, reason);
});

test('conflicting values are refused with the setting named', () => {
  const cases: [RunSpecInput, string, RegExp][] = [
    [{ task: 'lm', lora: { targets: 'wte,q' } }, 'lora.targets', /wte LoRA target .* classification/],
    [{ mode: 'local', kappa: '10' }, 'kappa', /not for mode local, got "10"/],
    [{ mode: 'local', kappa: 'naive' }, 'kappa', /not for mode local/],
    [{ mode: 'local', kappa: 1 }, 'kappa', /not for mode local/],
    [{ mode: 'local', mask_seed: 4 }, 'mask_seed', /mode local has no masks/],
    [{ mode: 'sealed', two_sided: true }, 'two_sided', /mode paper only, not sealed/],
    [{ method: 'full', lora: { rank: 4 } }, 'lora', /apply to method lora, not full/],
    [{ method: 'lora', freeze_norms: true }, 'freeze_norms', /method full/],
    [{ task: 'lm', pooling: 'mean' }, 'pooling', /task cls/],
  ];
  for (const [input, field, reason] of cases) refuses(input, field, reason);
  // the same settings without the conflict are accepted
  parseRunSpec({ task: 'cls', lora: { targets: 'wte,q' } }, 'a test');
  parseRunSpec({ mode: 'paper', kappa: '10', two_sided: true, mask_seed: 4 }, 'a test');
  parseRunSpec({ mode: 'sealed', kappa: 'naive' }, 'a test');
  parseRunSpec({ method: 'full', freeze_norms: true, lora: null }, 'a test');
});

test('resume: the stored spec, with only steps, eval_every, eval_batches, checkpoint_every changeable', () => {
  const stored = parseRunSpec({ task: 'cls', mode: 'paper', kappa: 10, steps: 20, lora: { rank: 4 } }, 'stored');
  assert.deepEqual(resumeRunSpec(stored, {}, 'flags', 'RUN/run_spec.json'), stored);
  const longer = resumeRunSpec(stored, { steps: 40, eval_every: 5, eval_batches: 2, checkpoint_every: 10 }, 'flags', 'RUN/run_spec.json');
  assert.deepEqual(longer, { ...stored, steps: 40, eval_every: 5, eval_batches: 2, checkpoint_every: 10 });
  // a setting given with the run's own value is not a change (also in another spelling)
  assert.deepEqual(resumeRunSpec(stored, { task: 'cls', kappa: '10.0', lora: { rank: 4, targets: 'v,q' } }, 'flags', 'RUN/run_spec.json'), stored);
  const refused: [RunSpecInput, string][] = [[{ lr: 2e-3 }, 'lr'], [{ mode: 'local' }, 'mode'], [{ kappa: 1 }, 'kappa'], [{ lora: { rank: 8 } }, 'lora.rank'], [{ lora: { targets: 'q,k,v' } }, 'lora.targets'], [{ batch: 4 }, 'batch'], [{ seed: 2 }, 'seed']];
  for (const [changes, field] of refused) {
    assert.throws(() => resumeRunSpec(stored, changes, 'flags', 'RUN/run_spec.json'), (e: unknown) => {
      assert.ok(e instanceof RunSpecError);
      assert.equal(e.field, field);
      assert.match(e.message, /invalid run spec \(flags\): .* differs from the run's .*RUN\/run_spec\.json.*except steps, eval_every, eval_batches, checkpoint_every/);
      return true;
    });
  }
  assert.throws(() => resumeRunSpec(parseRunSpec({ method: 'full' }, 's'), { lora: { rank: 4 } }, 'flags', 'f'), /lora: the run has no LoRA/);
  // a safe change is still validated
  assert.throws(() => resumeRunSpec(stored, { steps: -1 }, 'flags', 'f'), /steps: must be a positive integer/);
});

test('the enclave\'s job: the bundle fixes mode and masks; the owner\'s settings parse as any run spec', () => {
  const bundle = { mode: 'paper' as const, kappa: '10', two_sided: true };
  const s = parseJobSpec({ task: 'cls', steps: 5 }, bundle, 'start_finetune');
  assert.deepEqual([s.mode, s.kappa, s.two_sided, s.mask_seed, s.freeze_norms, s.steps], ['paper', '10', true, null, false, 5]);
  const owner = jobSpecOf(parseRunSpec({ task: 'cls', steps: 5 }, 'command line'));
  for (const k of ['mode', 'kappa', 'two_sided', 'mask_seed', 'freeze_norms']) assert.ok(!(k in owner), `${k} is the bundle's`);
  assert.deepEqual(parseJobSpec(owner, bundle, 'start_finetune'), s, 'what the owner sends parses to the job');
  assert.deepEqual(parseJobSpec({ ...owner, mode: 'paper', kappa: 10 }, bundle, 'start_finetune'), s, 'the bundle\'s own values are accepted');
  for (const [k, v] of [['mode', 'sealed'], ['kappa', '1'], ['two_sided', false], ['mask_seed', 3], ['freeze_norms', true]] as const) {
    assert.throws(() => parseJobSpec({ ...owner, [k]: v }, bundle, 'start_finetune'), (e: unknown) => e instanceof RunSpecError && e.field === k && /provider's choice/.test(e.message));
  }
  assert.throws(() => parseJobSpec('steps=5', bundle, 'start_finetune'), /\(spec\): must be an object/);
});

test('experiment recipes are partial specs over the defaults (the common recipe and food-reviews\' own)', () => {
  const q = { quick: false };
  const austen = experimentSpec('lm', 'austen', 'lora', { mode: 'sealed', kappa: '1' }, q);
  assert.deepEqual([austen.steps, austen.batch, austen.max_len, austen.warmup, austen.lr, austen.adam_eps, austen.checkpoint_every, austen.lora!.targets], [25, 8, 128, 1, 1.5e-3, 1e-6, 0, ['q', 'v']]);
  const food = experimentSpec('cls', 'food-reviews', 'full', { mode: 'local', kappa: null }, q, { name: 'm', nCtx: 32 });
  assert.deepEqual([food.steps, food.batch, food.max_len, food.lr, food.enclave_optimizer, food.freeze_norms, food.pooling, food.kappa, food.lora], [100, 16, 32, 3e-3, 'adamw', true, 'mean', null, null]);
  assert.deepEqual(experimentSpec('cls', 'food-reviews', 'lora', { mode: 'paper', kappa: 'naive' }, q).lora!.targets, ['q', 'v', 'wte']);
  assert.ok(DATASET_RECIPES['food-reviews'].lora);
  assert.deepEqual(mergeRunSpecInputs({ lora: { rank: 4 } }, { lora: { alpha: 2 } }, { steps: 3 }), { lora: { rank: 4, alpha: 2 }, steps: 3 });
});

/** One invalid spec as each entry point takes it: flags, a job spec, a recipe. */
interface Case { input: RunSpecInput; flags: string[]; service: boolean; experiment: boolean }
const CASES: Case[] = [
  { input: { steps: -3 }, flags: ['--steps=-3'], service: true, experiment: true },
  { input: { batch: 2.5 }, flags: ['--batch', '2.5'], service: true, experiment: true },
  { input: { lr: 0 }, flags: ['--lr', '0'], service: true, experiment: true },
  { input: { enclave_optimizer: 'adam' as 'adamw' }, flags: ['--enclave-optimizer', 'adam'], service: true, experiment: true },
  { input: { task: 'lm', lora: { targets: 'wte,q' } }, flags: ['--task', 'lm', '--targets', 'wte,q'], service: true, experiment: true },
  { input: { lora: { dropout: 1 } }, flags: ['--dropout', '1'], service: true, experiment: true },
  { input: { lora: { targets: 'q,attn' } }, flags: ['--targets', 'q,attn'], service: true, experiment: true },
  { input: { task: 'lm', pooling: 'mean' }, flags: ['--task', 'lm', '--pooling', 'mean'], service: true, experiment: true },
  { input: { method: 'full', lora: { rank: 4 } }, flags: ['--method', 'full', '--rank', '4'], service: true, experiment: false },
  { input: { mode: 'local', kappa: '10' }, flags: ['--mode', 'local', '--kappa', '10'], service: false, experiment: false },
];

test('the CLI refuses each invalid spec before any work (no model loaded, no run directory), as parseRunSpec does', async () => {
  await inTmp(async (dir) => {
    for (const c of CASES) {
      const out = path.join(dir, 'run');
      // a model path that does not exist: the spec is refused before the model is looked at
      const r = cli(['finetune', '--model', path.join(dir, 'no-model'), '--train', path.join(dir, 'no-data.jsonl'), ...c.flags, '--out', out]);
      const want = refusal(c.input);
      // a refused spec is bad input: exit status 2
      assert.equal(r.status, 2, `${c.flags.join(' ')}: ${r.stderr}`);
      assert.ok(r.stderr.includes(`invalid run spec (command line): ${want.text}`), `${c.flags.join(' ')}: ${r.stderr}`);
      assert.equal(r.stdout, '');
      assert.ok(!existsSync(out), 'no run directory was created');
    }
    // the CLI's own spellings: --method local and --naive
    const local = cli(['finetune', '--method', 'local', '--mode', 'paper', '--out', path.join(dir, 'run')]);
    assert.match(local.stderr, /invalid run spec \(command line\): mode: --method local .* conflicts with mode "paper"/);
    const naive = cli(['finetune', '--naive', '--kappa', '10', '--out', path.join(dir, 'run')]);
    assert.match(naive.stderr, /kappa: give --kappa or --naive, not both/);
    assert.match(cli(['finetune', '--naive', '--mode', 'local', '--out', path.join(dir, 'run')]).stderr, /kappa: a mask spec is for the split modes/);
    assert.ok(!existsSync(path.join(dir, 'run')));
  });
});

test('the enclave service\'s start_finetune refuses each invalid spec as parseRunSpec does, and starts no job', async () => {
  await inTmp(async (dir) => {
    createSimRoot(path.join(dir, 'platform'));
    const platform = new SimSoftwarePlatform(loadSimRoot(path.join(dir, 'platform')), enclaveMeasurement());
    // no accelerator is needed: a refused job never reaches it
    const srv = await serveEnclave({ platform, stateDir: path.join(dir, 'state'), accelerator: '127.0.0.1:9', port: 0, privateDir: path.join(dir, 'private'), log: () => {} });
    writeObfuscation(path.join(dir, 'bundles'), obfuscateWeights(loadCheckpoint(MODEL), { mode: 'sealed', seed: 5 }));
    const { signedContract } = await import('./world.js');
    const providerKey = await loadOrCreatePartyKey(path.join(dir, 'provider.json'));
    const ownerKey = await loadOrCreatePartyKey(path.join(dir, 'owner.json'));
    const trust = { rootPublicKey: path.join(dir, 'platform', 'sim-root.pub.pem'), allowList: [enclaveMeasurement()], contract: signedContract(providerKey, ownerKey, path.join(dir, 'bundles')) };
    const provider = new EnclaveClient(`127.0.0.1:${srv.port}`, providerKey, trust);
    const owner = new EnclaveClient(`127.0.0.1:${srv.port}`, ownerKey, trust);
    try {
      await provider.attest();
      await owner.attest();
      await uploadEnclaveBundle(provider, path.join(dir, 'bundles', 'enclave'));
      await uploadRecords(owner, 'train', readJsonl(path.join(ROOT, 'data/food-reviews/train.jsonl')).slice(0, 16));
      for (const c of CASES.filter((x) => x.service)) {
        const want = refusal(c.input);
        await assert.rejects(owner.command('start_finetune', { spec: c.input }), (e: Error) => {
          assert.ok(e.message.includes(`invalid run spec (start_finetune): ${want.text}`), e.message);
          return true;
        });
      }
      // what the provider's bundle fixes is not the owner's to choose
      await assert.rejects(owner.command('start_finetune', { spec: { mode: 'local', task: 'cls' } }), /invalid run spec \(start_finetune\): mode: is the provider's choice/);
      await assert.rejects(owner.command('start_finetune', { spec: { task: 'cls', max_len: 64 } }), /max_len: exceeds the model's context of 16, got 64/);
      const st = await owner.command<{ job: unknown }>('status');
      assert.equal(st.job, null, 'no job was started');
      assert.equal(srv.service.job, null);
      assert.deepEqual(readdirSync(path.join(dir, 'state', 'checkpoints')), []);
      assert.ok(!existsSync(path.join(dir, 'private', 'run')), 'no run directory');
    } finally {
      provider.close();
      owner.close();
      await srv.close();
    }
  });
});

test('the experiment runner refuses each invalid recipe as parseRunSpec does, before loading a model or writing', async () => {
  await inTmp(async (dir) => {
    const out = path.join(dir, 'report');
    // a model that does not exist: the specs are refused before any model is loaded
    const base = { models: [path.join(dir, 'no-model')], datasets: ['austen'], dataDir: path.join(ROOT, 'data'), out, quick: true, methods: ['lora' as const] };
    for (const c of CASES.filter((x) => x.experiment)) {
      const want = refusal(c.input);
      await assert.rejects(runPaperExperiments({ ...base, recipes: { austen: { lora: c.input } } }), (e: unknown) => {
        assert.ok(e instanceof RunSpecError, String(e));
        assert.equal(`${e.field}: ${e.reason}`, want.text);
        assert.match(e.source, /^experiment recipe of austen\/lora\//);
        return true;
      });
    }
    await assert.rejects(runPaperExperiments({ ...base, steps: 0 }), /invalid run spec \(experiment recipe of austen\/lora\/local\): steps: must be a positive integer, got 0/);
    assert.ok(!existsSync(out), 'nothing was written');
  });
});

test('resume from the run\'s stored spec with no flags repeated continues bit-identically (CLI, sealed LoRA and full)', async () => {
  await inTmp(async (dir) => {
    const train = path.join(dir, 'train.jsonl'), evalF = path.join(dir, 'eval.jsonl');
    writeFileSync(train, readFileSync(path.join(ROOT, 'data/food-reviews/train.jsonl'), 'utf8').split('\n').slice(0, 32).join('\n') + '\n');
    writeFileSync(evalF, readFileSync(path.join(ROOT, 'data/food-reviews/test.jsonl'), 'utf8').split('\n').slice(0, 8).join('\n') + '\n');
    for (const method of ['lora', 'full']) {
      // two runs compared byte for byte: without token mixing, whose key is fresh per run (test/finetune.test.ts resumes a mixed run exactly)
      const flags = ['--model', MODEL, '--train', train, '--eval', evalF, '--task', 'cls', '--method', method, '--token-mixing', 'off', '--max-len', '12', '--batch', '4', '--steps', '6', '--checkpoint-every', '3', '--lr', '3e-3', '--json'];
      const whole = path.join(dir, `whole-${method}`), cut = path.join(dir, `cut-${method}`);
      for (const out of [whole, cut]) {
        const r = cli(['finetune', ...flags, '--out', out]);
        assert.equal(r.status, 0, r.stderr);
      }
      const stored = JSON.parse(readFileSync(path.join(cut, RUN_SPEC_FILE), 'utf8')) as RunSpec;
      assert.deepEqual(stored, parseRunSpec({ task: 'cls', method, token_mixing: 'off', max_len: 12, batch: 4, steps: 6, checkpoint_every: 3, lr: 3e-3 }, 'a test'), 'the run directory stores its whole spec');
      // the state after a crash between the checkpoints of step 3 and step 6
      rmSync(path.join(cut, 'checkpoints', 'step-0000006'), { recursive: true });
      for (const f of ['final', 'merged', 'summary.json']) rmSync(path.join(cut, f), { recursive: true });
      // a changed setting is refused before any work
      const bad = cli(['finetune', '--resume', '--out', cut, '--lr', '0.01']);
      assert.equal(bad.status, 2);
      assert.match(bad.stderr, /invalid run spec \(command line\): lr: 0.01 differs from the run's 0.003; .*run_spec\.json/);
      assert.ok(!existsSync(path.join(cut, 'merged')));
      const r = cli(['finetune', '--resume', '--out', cut, '--json']);
      assert.equal(r.status, 0, r.stderr);
      const sum = JSON.parse(r.stdout);
      assert.equal(sum.resumed_from, 3);
      assert.equal(readFileSync(path.join(cut, 'metrics.jsonl'), 'utf8'), readFileSync(path.join(whole, 'metrics.jsonl'), 'utf8'), `${method}: metrics.jsonl equals the uninterrupted run's`);
      assert.deepEqual(readFileSync(path.join(cut, 'merged', 'model.safetensors')), readFileSync(path.join(whole, 'merged', 'model.safetensors')), `${method}: the merged model equals the uninterrupted run's`);
      assert.deepEqual(sum.eval, JSON.parse(readFileSync(path.join(whole, 'summary.json'), 'utf8')).eval);
    }
  });
});
