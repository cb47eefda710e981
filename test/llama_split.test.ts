/**
 * The Llama family through the split: the obfuscated model equals the plain one (both modes,
 * both rotary options, grouped queries, untied head), fine-tuning through the split equals
 * local training (LoRA and full), integrity checks catch a lying accelerator, and the
 * transform inverts.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { Llama } from '../src/model/llama.js';
import { LLAMA_PRESETS, type LlamaConfig } from '../src/model/config.js';
import { Rng } from '../src/tensor/rng.js';
import { buildSession, mergedLlamaModel } from '../src/train/session.js';
import { runFinetune } from '../src/train/finetune.js';
import { parseJobSpec, parseRunSpec, RunSpecError, toFinetuneConfig } from '../src/train/run_spec.js';
import type { EncodedSet } from '../src/io/jsonl.js';
import { deobfuscateLlama, deriveLlamaMasks, obfuscateLlama } from '../src/obfuscate/llama_transform.js';
import { KeyedRng } from '../src/tensor/rng.js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { InProcessLink } from '../src/protocol/link.js';
import { SplitModel } from '../src/enclave/split_model.js';
import { makeCheckVectors } from '../src/protocol/integrity.js';
import { BundleError, IntegrityError } from '../src/errors.js';
import { generate } from '../src/model/transformer.js';
import { saveLlamaCheckpoint } from '../src/model/llama_checkpoint.js';
import { deobfuscateLlamaDirs, obfuscateLlamaWeights, writeObfuscation } from '../src/obfuscate/provider.js';
import { checkBundlePair, loadAcceleratorBundle, loadEnclaveBundle } from '../src/obfuscate/bundle.js';
import { Enclave } from '../src/enclave/enclave.js';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
const cli = (...args: string[]) => spawnSync(process.execPath, [path.join(ROOT, 'bin', 'obfuscatune.js'), ...args], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' }, cwd: ROOT });
import { maxAbsDiff, relErr, patternData } from './helpers.js';

const tiny = (over: Partial<LlamaConfig> = {}): LlamaConfig => ({ ...LLAMA_PRESETS['llama-micro'], ...over });


test('an obfuscated Llama-family model gives the plain model\'s probabilities (sealed, paper two-sided; full and block rotary masks; GQA; tied and untied; q/k/v bias)', async () => {
  const B = 2, T = 10;
  const tokens = Int32Array.from({ length: B * T }, (_, i) => (i * 7 + 3) % 64);
  const targets = Int32Array.from({ length: B * T }, (_, i) => (i * 5 + 1) % 64);
  for (const cfg of [tiny(), tiny({ tie_word_embeddings: true, qkv_bias: true, n_kv_head: 4 })]) {
    const m = Llama.random(cfg, 5);
    const ref = await m.forward(tokens, B, T, targets, false);
    const probs = Float32Array.from(ref.logits);
    for (const mode of ['sealed', 'paper'] as const) {
      for (const rotaryMasks of ['full', 'blocks'] as const) {
        const s = buildSession(m.weights(), { mode, method: 'lora', task: 'lm', padTokenId: 0, seed: 1, maskSeed: 2, kappa: mode === 'paper' ? '10' : '1', twoSided: mode === 'paper', rotaryMasks, lora: { rank: 2, alpha: 4, dropout: 0, targets: ['q'] } });
        // the adapter's B is zero at init: the model is the base model
        const r = await s.model.forward(tokens, B, T, targets, false);
        const what = `${mode} ${rotaryMasks} tied=${cfg.tie_word_embeddings}`;
        assert.ok(Math.abs(r.loss - ref.loss!) < 1e-5, `${what}: loss ${r.loss} vs ${ref.loss}`);
        assert.ok(maxAbsDiff(r.probs!, probs) < 1e-5, `${what}: probabilities differ by ${maxAbsDiff(r.probs!, probs)}`);
        assert.ok(s.model.integrity && s.model.integrity.checks > 0, `${what}: replies were checked`);
      }
    }
  }
});

test('the accelerator of a Llama-family model holds only masked weights, and the transform inverts (both modes, both rotary options)', () => {
  const m = Llama.random(tiny({ qkv_bias: true }), 8);
  const key = KeyedRng.fromSeed(4).key;
  for (const mode of ['sealed', 'paper'] as const) {
    for (const rotary of ['full', 'blocks'] as const) {
      const masks = deriveLlamaMasks(m.config, key, { mode, spec: { kind: 'kappa', kappa: 10 }, twoSided: mode === 'paper', headPermutation: true }, rotary);
      const r = obfuscateLlama(m.weights(), masks);
      const plainQkv = m.layout.layer(m.params, 'qkvw', 0);
      assert.ok(relErr(r.accelerator.layers[0].qkv!.w, plainQkv) > 0.5, `${mode} ${rotary}: qkv is masked`);
      const back = deobfuscateLlama(m.weights(), r.accelerator, r.enclave, masks);
      assert.ok(relErr(back.params, m.params) < 1e-4, `${mode} ${rotary}: deobfuscate gives the weights back (${relErr(back.params, m.params)})`);
    }
  }
});

async function finetune(cfg: LlamaConfig, mode: 'local' | 'sealed' | 'paper', method: 'lora' | 'full', dir: string, rotaryMasks: 'full' | 'blocks' = 'full') {
  const spec = parseRunSpec({
    mode, method, task: 'lm', steps: 50, batch: 4, lr: method === 'full' ? 0.05 : 1e-2, warmup: 2, seed: 3, checkpoint_every: 0,
    enclave_optimizer: method === 'full' ? 'sgd' : 'adamw', ...(mode === 'local' ? {} : { kappa: '1' }), ...(method === 'lora' ? { lora: { rank: 4, alpha: 8, targets: ['q', 'k', 'v', 'proj', 'gate', 'up', 'mlp-proj'] } } : {}),
  }, 'test');
  const w = Llama.random(cfg, 9).weights();
  const sess = buildSession(w, { mode, method, task: 'lm', padTokenId: 0, seed: 11, maskSeed: 12, kappa: '1', lora: spec.lora ?? undefined, foldedBaseline: mode === 'local' && method === 'full', rotaryMasks: mode === 'local' ? undefined : rotaryMasks, acceleratorStateDir: path.join(dir, 'acc') });
  const s = await runFinetune(sess.model, patternData(32, cfg.vocab_size, 12, 2), null, toFinetuneConfig(spec, 't'), dir, 0, { rng: sess.rng });
  return { sess, s };
}

test('fine-tuning a Llama-family model through the split equals local training for 50 steps (LoRA and full; sealed and paper; integrity on)', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-llama-split-'));
  try {
    const cfg = tiny();
    for (const method of ['lora', 'full'] as const) {
      const local = await finetune(cfg, 'local', method, path.join(dir, `local-${method}`));
      for (const [mode, rot] of [['sealed', 'full'], ['paper', 'full'], ['sealed', 'blocks']] as const) {
        if (method === 'full' && mode === 'paper') continue; // paper trains the norms, local-folded freezes them: compared below
        const split = await finetune(cfg, mode, method, path.join(dir, `${mode}-${rot}-${method}`), rot);
        let worst = 0;
        for (let i = 0; i < 50; i++) worst = Math.max(worst, Math.abs(split.s.losses[i] - local.s.losses[i]) / local.s.losses[i]);
        assert.ok(worst < 1e-4, `${mode} ${rot} ${method}: loss differs from local training by ${worst} (relative)`);
        assert.ok(split.s.losses[49] < split.s.losses[0], `${mode} ${method}: training lowers the loss`);
        assert.ok(split.sess.model.integrity!.checks > 0);
        if (method === 'full') {
          // the merged model (gains unfolded again) computes what the locally trained folded twin computes
          const toks = Int32Array.from({ length: 12 }, (_, i) => (i * 3 + 1) % cfg.vocab_size);
          const pa = Float32Array.from((await new Llama(mergedLlamaModel(split.sess)).forward(toks, 1, 12, toks, false)).logits);
          const pb = Float32Array.from((await new Llama(mergedLlamaModel(local.sess)).forward(toks, 1, 12, toks, false)).logits);
          assert.ok(maxAbsDiff(pa, pb) < 1e-4, `${mode} full: the merged model equals the locally trained one (${maxAbsDiff(pa, pb)})`);
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('full fine-tuning of a Llama-family model in paper mode (kappa 1: SGD on masked weights is SGD on the plain ones) trains the RMSNorm gains as local training does', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-llama-paper-'));
  try {
    const cfg = tiny();
    const spec = parseRunSpec({ mode: 'paper', method: 'full', task: 'lm', steps: 50, batch: 4, lr: 0.05, warmup: 2, seed: 3, checkpoint_every: 0, enclave_optimizer: 'sgd' }, 'test');
    const run = async (mode: 'local' | 'paper') => {
      const sess = buildSession(Llama.random(cfg, 9).weights(), { mode, method: 'full', task: 'lm', padTokenId: 0, seed: 11, maskSeed: 12, kappa: '1', acceleratorStateDir: path.join(dir, mode) });
      return { sess, s: await runFinetune(sess.model, patternData(32, cfg.vocab_size, 12, 2), null, toFinetuneConfig(spec, 't'), path.join(dir, `${mode}-run`), 0, { rng: sess.rng }) };
    };
    const local = await run('local'), paper = await run('paper');
    for (let i = 0; i < 50; i++) assert.ok(Math.abs(paper.s.losses[i] - local.s.losses[i]) / local.s.losses[i] < 1e-4, `step ${i + 1}: ${paper.s.losses[i]} vs ${local.s.losses[i]}`);
    const a = mergedLlamaModel(paper.sess), b = mergedLlamaModel(local.sess);
    assert.ok(relErr(a.layout.view(a.params, 'ln1w'), b.layout.view(b.params, 'ln1w')) < 1e-4, 'the gains trained alike');
    assert.ok(relErr(a.layout.view(a.params, 'ln1w'), Llama.random(cfg, 9).layout.view(Llama.random(cfg, 9).params, 'ln1w')) > 1e-4, 'the gains did train');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a lying accelerator is caught for a Llama-family model (a falsified gate/up reply fails the integrity check)', async () => {
  const m = Llama.random(tiny(), 2);
  const masks = deriveLlamaMasks(m.config, KeyedRng.fromSeed(3).key, { mode: 'sealed', spec: { kind: 'kappa', kappa: 1 }, twoSided: false, headPermutation: true });
  const r = obfuscateLlama(m.weights(), masks);
  r.enclave.chk = makeCheckVectors(r.accelerator, new Rng(4));
  r.accelerator.layers[1].gateup!.w[17] += 0.5; // the accelerator serves other weights than it was given
  const model = new SplitModel({ mode: 'sealed', method: 'lora', task: 'lm', config: m.config, tensors: r.enclave, link: new InProcessLink(new Accelerator(r.accelerator)), lora: { rank: 2, alpha: 4, dropout: 0, targets: ['q'] }, rng: new Rng(1) });
  const tokens = Int32Array.from({ length: 8 }, (_, i) => i + 1);
  await assert.rejects(model.forward(tokens, 1, 8, tokens, false), (e: unknown) => e instanceof IntegrityError && /h\.1\.gateup/.test((e as Error).message));
});

test('Llama-family bundles on disk: the loaded enclave and accelerator give the plain model\'s logits and greedy generation (KV cache of the key/value heads); a tampered bundle is refused', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-llama-bundles-'));
  try {
    const m = Llama.random(tiny({ qkv_bias: true }), 6);
    const tokens = Int32Array.from({ length: 12 }, (_, i) => (i * 11 + 2) % 64);
    const plain = Float32Array.from((await m.forward(tokens, 1, 12)).logits);
    const want = await generate(m, [3, 9, 4], { maxNewTokens: 6, temperature: 0 });
    for (const rotary of ['full', 'blocks'] as const) {
      const out = path.join(dir, rotary);
      writeObfuscation(out, obfuscateLlamaWeights(m.weights(), { mode: 'sealed', seed: 5, rotary }));
      const enc = loadEnclaveBundle(path.join(out, 'enclave')), acc = loadAcceleratorBundle(path.join(out, 'accelerator'));
      checkBundlePair(enc, acc);
      assert.equal('family' in enc.tensors && enc.tensors.rotary, rotary);
      const enclave = new Enclave(enc, new InProcessLink(new Accelerator(acc.weights)));
      assert.ok(maxAbsDiff(await enclave.forward(tokens, 1, 12), plain) < 1e-4, `${rotary}: logits through the loaded bundles`);
      assert.deepEqual(await enclave.generate([3, 9, 4], { maxNewTokens: 6, temperature: 0 }), want, `${rotary}: greedy generation`);
      const back = deobfuscateLlamaDirs(m.weights(), path.join(out, 'accelerator'), path.join(out, 'enclave'), path.join(out, 'provider'));
      assert.ok(relErr(back.params, m.params) < 1e-4, `${rotary}: deobfuscate from the directories`);
    }
    const mf = path.join(dir, 'full', 'enclave', 'manifest.json');
    writeFileSync(mf, readFileSync(mf, 'utf8').replace('"rotary_masks": "full"', '"rotary_masks": "spiral"'));
    assert.throws(() => loadEnclaveBundle(path.join(dir, 'full', 'enclave')), (e: unknown) => e instanceof BundleError && /rotary_masks/.test((e as Error).message));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the CLI fine-tunes a Llama-family checkpoint through the split and obfuscates and merges it back', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-llama-cli-'));
  try {
    const model = path.join(dir, 'm');
    saveLlamaCheckpoint(model, Llama.random({ ...LLAMA_PRESETS['llama-micro'], vocab_size: 50257, n_ctx: 64 }, 3).weights());
    const data = path.join(dir, 'train.jsonl');
    writeFileSync(data, Array.from({ length: 12 }, (_, i) => JSON.stringify({ text: `record ${i} of the owner's private data` })).join('\n') + '\n');
    const run = cli('finetune', '--model', model, '--train', data, '--mode', 'sealed', '--rotary-masks', 'blocks', '--steps', '4', '--batch', '2', '--max-len', '32', '--out', path.join(dir, 'run'), '--json');
    assert.equal(run.status, 0, run.stderr);
    const s = JSON.parse(run.stdout);
    assert.equal(s.mode, 'sealed');
    assert.ok(Number.isFinite(s.train_loss_last));
    assert.equal(JSON.parse(readFileSync(path.join(dir, 'run', 'run_spec.json'), 'utf8')).rotary_masks, 'blocks');
    assert.equal(JSON.parse(readFileSync(path.join(dir, 'run', 'merged', 'config.json'), 'utf8')).architectures[0], 'LlamaForCausalLM');
    const ob = cli('obfuscate', '--model', model, '--out', path.join(dir, 'b'), '--seed', '1', '--json');
    assert.equal(ob.status, 0, ob.stderr);
    assert.equal(JSON.parse(ob.stdout).family, 'llama');
    const de = cli('deobfuscate', '--base', model, '--bundles', path.join(dir, 'b'), '--out', path.join(dir, 'back'));
    assert.equal(de.status, 0, de.stderr);
    const gpt2 = cli('obfuscate', '--model', path.join(ROOT, 'models', 'base-small'), '--rotary-masks', 'full', '--out', path.join(dir, 'g'));
    assert.notEqual(gpt2.status, 0);
    assert.match(gpt2.stderr, /--rotary-masks applies to Llama-family models/);
    const pob = cli('provider', 'obfuscate', '--model', model, '--rotary-masks', 'blocks', '--out', path.join(dir, 'pb'), '--json');
    assert.equal(pob.status, 0, pob.stderr);
    assert.equal(JSON.parse(readFileSync(path.join(dir, 'pb', 'enclave', 'manifest.json'), 'utf8')).rotary_masks, 'blocks');
    const g2 = cli('finetune', '--model', path.join(ROOT, 'test', 'fixtures', 'vocab50257'), '--train', data, '--rotary-masks', 'blocks', '--steps', '1', '--out', path.join(dir, 'g2'));
    assert.notEqual(g2.status, 0);
    assert.match(g2.stderr, /rotary_masks blocks applies to Llama-family models/);
    assert.ok(!existsSync(path.join(dir, 'g2', 'run_spec.json')), 'nothing of the run was written');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('npm start on the bundled Llama-family model: four parties in separate processes, the confidential run equals the local one and the provider\'s merge', () => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'obf-llama-start-'));
  try {
    const r = cli('start', '--family', 'llama', '--steps', '3', '--out', out, '--force');
    assert.equal(r.status, 0, r.stderr);
    const s = JSON.parse(readFileSync(path.join(out, 'summary.json'), 'utf8'));
    assert.ok(Math.abs(s.confidential.loss - s.local.loss) < 1e-4 * s.local.loss, `confidential ${s.confidential.loss} vs local ${s.local.loss}`);
    assert.ok(Math.abs(s.merged.loss - s.local.loss) < 1e-4 * s.local.loss, `merged ${s.merged.loss} vs local ${s.local.loss}`);
    assert.ok(s.integrity_checks > 0);
    assert.match(r.stdout, /llama-small \([0-9.]+M parameters, Llama family\)/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('an enclave job on a Llama-family bundle takes the bundle\'s rotary option; an owner who names another is refused', () => {
  const bundle = { mode: 'sealed' as const, kappa: '1', two_sided: false, rotary_masks: 'blocks' as const };
  assert.equal(parseJobSpec({ steps: 2 }, bundle, 'test').rotary_masks, 'blocks');
  assert.throws(() => parseJobSpec({ steps: 2, rotary_masks: 'full' }, bundle, 'test'), (e: unknown) => e instanceof RunSpecError && /rotary_masks/.test((e as Error).message));
});
