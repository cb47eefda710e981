// The parties as separate processes on loopback: attestation, end-to-end encryption, policy,
// integrity against a lying accelerator, and recovery from killed services.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { spawnService, type Spawned } from '../src/roles/spawn.js';
import { writePeftAdapter } from '../src/model/peft.js';
import { freshClassifier, mergeAdapter, readAdapter } from '../src/train/session.js';
import { assertMixedRunsAgree, maxAbsDiff } from './helpers.js';
import { EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, uploadAcceleratorBundle, uploadEnclaveBundle, fetchAndMerge, uploadRecords, waitForJob } from '../src/roles/parties.js';
import { setup, records, spec, FIX, inProcessWorld, type Setup } from './world.js';
import { signBytes } from '../src/tee/signing.js';
import { commandSignedBytes } from '../src/roles/protocol.js';
import { obfuscateWeights, writeObfuscation } from '../src/obfuscate/provider.js';
import { loadEnclaveBundle, loadAcceleratorBundle } from '../src/obfuscate/bundle.js';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import { createSimRoot } from '../src/tee/sim.js';
import type { Record_ } from '../src/io/jsonl.js';
import { encodeRecords, labelSet } from '../src/io/jsonl.js';
import { gpt2Tokenizer } from '../src/model/tokenizer.js';
import { SplitModel } from '../src/enclave/split_model.js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { InProcessLink } from '../src/protocol/link.js';
import { Rng } from '../src/tensor/rng.js';
import { runFinetune } from '../src/train/finetune.js';
import { parseJobSpec, toFinetuneConfig, type JobSpecInput } from '../src/train/run_spec.js';
import { GPT2 } from '../src/model/gpt2.js';

interface World {
  dir: string;
  acc: Spawned;
  enc: Spawned;
  accAddr: string;
  encAddr: string;
  trust: Setup['trust'];
  setup: Setup;
  provider: EnclaveClient;
  owner: EnclaveClient;
  stop(): Promise<void>;
}

const accArgsOf = (s: Setup) => ['--contract', s.contractFile, '--trust', s.rootPublicKey];

async function world(accArgs: string[] = []): Promise<World> {
  const st = await setup();
  const dir = st.dir;
  const acc = await spawnService(['accelerator', 'serve', '--state-dir', path.join(dir, 'acc'), '--port', '0', ...accArgsOf(st), ...accArgs]);
  const accAddr = `127.0.0.1:${acc.port}`;
  const enc = await spawnService(['enclave', 'serve', '--platform', path.join(dir, 'platform'), '--state-dir', path.join(dir, 'enc'), '--accelerator', accAddr, '--port', '0']);
  const encAddr = `127.0.0.1:${enc.port}`;
  const provider = new EnclaveClient(encAddr, st.providerKey, st.trust);
  const owner = new EnclaveClient(encAddr, st.ownerKey, st.trust);
  await provider.attest();
  await owner.attest();
  await uploadAcceleratorBundle(accAddr, path.join(dir, 'bundles', 'accelerator'), st.providerKey);
  await uploadEnclaveBundle(provider, path.join(dir, 'bundles', 'enclave'));
  await uploadRecords(owner, 'train', records(48, 1));
  await uploadRecords(owner, 'eval', records(16, 2));
  const w: World = {
    dir, acc, enc, accAddr, encAddr, trust: st.trust, setup: st, provider, owner,
    stop: async () => {
      w.provider.close();
      w.owner.close();
      await w.enc.kill('SIGKILL');
      await w.acc.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return w;
}

/** The same job in one process, from the same bundles: the reference for recovery tests. */
async function reference(dir: string, input: JobSpecInput): Promise<{ last: number; eval: number }> {
  const enc = loadEnclaveBundle(path.join(dir, 'bundles', 'enclave'));
  const s = parseJobSpec(input, { mode: enc.mode, kappa: enc.spec, two_sided: enc.twoSided }, 'test');
  const acc = loadAcceleratorBundle(path.join(dir, 'bundles', 'accelerator'));
  const train = records(48, 1), ev = records(16, 2);
  const labels = labelSet(train, 'train');
  const rng = new Rng(s.seed);
  const model = new SplitModel({ mode: enc.mode, method: s.method, task: s.task, config: enc.config, tensors: enc.tensors, link: new InProcessLink(new Accelerator(acc.weights, { stateDir: path.join(dir, 'ref-acc') })), numLabels: labels.length, padTokenId: gpt2Tokenizer.eotId, rng, classifierInit: freshClassifier(labels.length, enc.config.n_embd, s.seed) });
  const enc_ = (r: Record_[]) => encodeRecords(r, gpt2Tokenizer, { task: s.task, maxLen: s.max_len, labels, source: 'x' });
  const cfg = { ...toFinetuneConfig(s, 'ref'), checkpoint_every: 0 };
  const sum = await runFinetune(model, enc_(train), enc_(ev), cfg, path.join(dir, 'ref-run'), gpt2Tokenizer.eotId, { rng });
  return { last: sum.train_loss_last, eval: sum.eval!.loss };
}

async function waitForStep(c: EnclaveClient, step: number): Promise<void> {
  for (let i = 0; i < 600; i++) {
    const s = await c.command<{ job: { step: number; state: string } | null }>('status');
    if (s.job && (s.job.step >= step || s.job.state !== 'running')) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('job did not reach the step');
}

test('multi-process flow: attested uploads, LoRA fine-tuning, inference, policy, provider merge', async () => {
  const w = await world();
  try {
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', lr: 1e-2, steps: 16, enclave_optimizer: 'adamw', lora: { rank: 4, alpha: 8 } }) });
    const st = await waitForJob(w.owner) as { job: { state: string; summary: { eval: { accuracy: number } } } };
    assert.equal(st.job.state, 'done');
    assert.ok(st.job.summary.eval.accuracy >= 0);
    const inf = await w.owner.command<{ predictions: string[] }>('infer', { texts: ['this was good really good', 'this was awful really awful'] });
    assert.equal(inf.predictions.length, 2);
    await assert.rejects(w.owner.command('fetch_update'), /policy: "fetch_update" is not allowed for owner/);
    await assert.rejects(w.provider.command('infer', { texts: ['x'] }), /policy: "infer" is not allowed for provider/);
    const base = loadCheckpoint(path.join(FIX, 'vocab50257'));
    const { merged, adapters } = await fetchAndMerge(w.provider, w.accAddr, base, path.join(w.dir, 'bundles'), path.join(w.dir, 'scratch'));
    // the update as a PEFT adapter (provider fetch --peft-out), merged into the plain base, is the merged model
    writePeftAdapter(path.join(w.dir, 'peft'), adapters!, { task: 'cls', baseModel: 'base', score: merged.cls!.weight });
    const viaPeft = mergeAdapter(base, readAdapter(path.join(w.dir, 'peft'), base.config));
    assert.ok(maxAbsDiff(viaPeft.params, merged.params) < 1e-4 && maxAbsDiff(viaPeft.cls!.weight, merged.cls!.weight) === 0);
    // the provider's merged plain model classifies like the enclave
    const m = new GPT2(merged);
    m.padTokenId = gpt2Tokenizer.eotId;
    const ids = gpt2Tokenizer.encode('this was good really good');
    const r = await m.forwardCls(Int32Array.from(ids), 1, ids.length);
    const lab = merged.cls!.labels!;
    assert.equal(lab[r.logits[0] > r.logits[1] ? 0 : 1], inf.predictions[0]);
  } finally {
    await w.stop();
  }
});

test('attestation and transport attacks are refused; the enclave keeps serving', async () => {
  const w = await world();
  try {
    // evidence for a measurement not on the allow-list
    const other = new EnclaveClient(w.encAddr, await loadOrCreatePartyKey(path.join(w.dir, 'x.json')), { ...w.trust, allowList: ['00'.repeat(32)] });
    await assert.rejects(other.attest(), /not in allow-list/);
    other.close();
    // a tampered ciphertext, honestly signed
    const s0 = w.owner.attested!;
    const good = await w.owner.sealedCommand(s0, 'status');
    const bad = { ...good, sealed: { enc: Buffer.alloc(32).toString('base64'), ciphertext: Buffer.alloc(40).toString('base64') } };
    const { signature: _drop, ...unsigned } = bad;
    await assert.rejects(w.owner.rawCommand({ ...unsigned, signature: signBytes(w.owner.key.signing, commandSignedBytes(unsigned, s0.transcript)) }), /decryption failed|tampered/);
    // an unknown session
    await assert.rejects(w.owner.rawCommand({ ...good, session: 'nope' }), /unknown attestation session/);
    // a replayed request: the same signed command twice
    const wire = await w.owner.sealedCommand(s0, 'status');
    await w.owner.rawCommand(wire);
    await assert.rejects(w.owner.rawCommand(wire), /replay/);
    const c = w.owner;
    // an oversized message, from a client that is willing to send it: the server refuses
    const grpc = await import('@grpc/grpc-js');
    const { EnclaveServiceClient, ENCLAVE_SERVICE, unary } = await import('../src/roles/protocol.js');
    const big = new EnclaveServiceClient(w.encAddr, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 256 * 1024 * 1024 });
    await assert.rejects(unary(big, ENCLAVE_SERVICE.Command, { ...wire, pad: 'x'.repeat(65 * 1024 * 1024) }), /larger than max|RESOURCE_EXHAUSTED|exceeds/i);
    big.close();
    // still serving
    const st = await c.command<{ records: { train: number } }>('status');
    assert.equal(st.records.train, 48);
  } finally {
    await w.stop();
  }
});

test('a lying accelerator process is caught: the job fails with an integrity error', async () => {
  const w = await world(['--evil', 'tamper']);
  try {
    await w.owner.command('start_finetune', { spec: spec({ steps: 4 }) });
    const st = await waitForJob(w.owner) as { job: { state: string; error: string } };
    assert.equal(st.job.state, 'failed');
    assert.match(st.job.error, /integrity check failed/);
  } finally {
    await w.stop();
  }
});

test('accelerator killed mid-training: the enclave waits, restores it from its checkpoint, and the run equals an uninterrupted one', async () => {
  const w = await world();
  try {
    const s = spec();
    await w.owner.command('start_finetune', { spec: s });
    await waitForStep(w.owner, 10);
    await w.acc.kill('SIGKILL');
    w.acc = await spawnService(['accelerator', 'serve', '--state-dir', path.join(w.dir, 'acc'), '--port', String(Number(w.accAddr.split(':')[1])), ...accArgsOf(w.setup)]);
    const st = await waitForJob(w.owner) as { job: { state: string; recoveries: number; summary: { train_loss_last: number; eval: { loss: number } } } };
    assert.equal(st.job.state, 'done', JSON.stringify(st.job));
    assert.ok(st.job.recoveries >= 1, 'a recovery happened');
    const ref = await reference(w.dir, s); // unmixed; the job mixes (the default)
    assertMixedRunsAgree([st.job.summary.train_loss_last, st.job.summary.eval.loss], [ref.last, ref.eval], 'the recovered job against an uninterrupted run');
  } finally {
    await w.stop();
  }
});

test('enclave killed mid-run: it restarts, unseals its checkpoint, resumes, and the run equals an uninterrupted one', async () => {
  const w = await world();
  try {
    const s = spec();
    await w.owner.command('start_finetune', { spec: s });
    await waitForStep(w.owner, 10);
    await w.enc.kill('SIGKILL');
    w.enc = await spawnService(['enclave', 'serve', '--platform', path.join(w.dir, 'platform'), '--state-dir', path.join(w.dir, 'enc'), '--accelerator', w.accAddr, '--port', String(Number(w.encAddr.split(':')[1]))]);
    // a new enclave key: the owner attests again (its own key identifies it)
    await w.owner.attest();
    const st = await waitForJob(w.owner) as { job: { state: string; recoveries: number; summary: { train_loss_last: number; eval: { loss: number }; resumed_from: number } } };
    assert.equal(st.job.state, 'done', JSON.stringify(st.job));
    assert.ok(st.job.summary.resumed_from >= 4);
    const ref = await reference(w.dir, s); // unmixed; the job mixes (the default)
    assertMixedRunsAgree([st.job.summary.train_loss_last, st.job.summary.eval.loss], [ref.last, ref.eval], 'the recovered job against an uninterrupted run');
  } finally {
    await w.stop();
  }
});

test('the enclave service\'s LM inference generates with the KV cache, equal to recomputing the whole forward per token', async () => {
  const w = await inProcessWorld({ deploy: false });
  const { provider, owner } = w;
  const srv = { service: w.enclave };
  try {
    await provider.attest();
    await owner.attest();
    await uploadAcceleratorBundle(w.accAddr, path.join(w.dir, 'bundles', 'accelerator'), w.providerKey);
    await uploadEnclaveBundle(provider, path.join(w.dir, 'bundles', 'enclave'));
    await uploadRecords(owner, 'train', records(16, 1).map((r) => ({ text: r.text })));
    await owner.command('start_finetune', { spec: { task: 'lm', method: 'lora', steps: 3, batch: 4, max_len: 12, lr: 0.01, warmup: 1, seed: 3, checkpoint_every: 0 } });
    const st = await waitForJob(owner);
    assert.equal((st.job as { state: string }).state, 'done', JSON.stringify(st.job));
    const texts = ['this was good', 'awful really'];
    const maxTokens = 6;
    const got = await owner.command<{ completions: string[] }>('infer', { texts, max_tokens: maxTokens });
    // reference: the fine-tuned split model, the whole sequence re-run for every new token
    const m = (srv.service as unknown as { runner: { model: SplitModel } }).runner.model;
    const V = m.config.vocab_size;
    const want: string[] = [];
    for (const t of texts) {
      const seq = gpt2Tokenizer.encode(t);
      const gen: number[] = [];
      for (let k = 0; k < maxTokens; k++) {
        const ids = [...seq, ...gen];
        const r = await m.forward(Int32Array.from(ids), 1, ids.length, new Int32Array(ids.length).fill(-1), false);
        const p = r.probs!.subarray((ids.length - 1) * V, ids.length * V);
        let best = 0;
        for (let i = 1; i < V; i++) if (p[i] > p[best]) best = i;
        if (best === gpt2Tokenizer.eotId) break;
        gen.push(best);
      }
      want.push(gpt2Tokenizer.decode(gen));
    }
    assert.deepEqual(got.completions, want);
    assert.ok(got.completions.some((c) => c.length > 0), 'something was generated');
  } finally {
    await w.stop();
  }
});
