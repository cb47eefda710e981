// A lying accelerator is caught by the enclave's secret-vector (Freivalds) checks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync, existsSync, readdirSync } from 'node:fs';
import { GPT2 } from '../src/model/gpt2.js';
import { getPreset } from '../src/model/config.js';
import { Rng } from '../src/tensor/rng.js';
import { buildSession } from '../src/train/session.js';
import { runFinetune, type FinetuneConfig } from '../src/train/finetune.js';
import { parseRunSpec, toFinetuneConfig, type RunSpecInput } from '../src/train/run_spec.js';
import type { EncodedSet } from '../src/io/jsonl.js';
import { obfuscateWeights } from '../src/obfuscate/provider.js';
import { Accelerator, EVIL_MODES } from '../src/accelerator/accelerator.js';
import { InProcessLink } from '../src/protocol/link.js';
import { Enclave } from '../src/enclave/enclave.js';
import { IntegrityChecker, makeCheckVectors } from '../src/protocol/integrity.js';
import { AcceleratorError, InputError } from '../src/errors.js';
import { RemoteLinears } from '../src/protocol/client.js';
import { asObfuscated } from '../src/protocol/messages.js';

/** A model with non-zero biases (a skipped bias must make a difference). */
const base = () => {
  const m = GPT2.random(getPreset('gpt2-micro'), 3);
  const rng = new Rng(9);
  for (const k of ['qkvb', 'attprojb', 'fcb', 'fcprojb'] as const) rng.fillNormal(m.layout.view(m.params, k), 0.1);
  return m.weights();
};
function data(): EncodedSet {
  const rng = new Rng(4);
  return { items: Array.from({ length: 16 }, () => ({ tokens: Int32Array.from({ length: 9 }, () => rng.int(64)), lossFrom: 0, label: -1 })), truncated: 0, dropped: 0, labels: [] };
}
const cfg = (o: RunSpecInput): FinetuneConfig => toFinetuneConfig(parseRunSpec({
  task: 'lm', method: 'full', mode: 'sealed', steps: 6, batch: 4, lr: 0.05, warmup: 0, min_lr_frac: 1, clip: 0, enclave_optimizer: 'sgd', checkpoint_every: 1, ...o,
}, 'test'), 'x');

for (const evil of EVIL_MODES) {
  test(`training: an accelerator in "${evil}" mode is caught, the step aborted, no checkpoint of the bad state`, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-evil-'));
    try {
      const sess = buildSession(base(), {
        mode: 'sealed', method: 'full', task: 'lm', padTokenId: 0, seed: 1, maskSeed: 2,
        link: (acc) => new InProcessLink(new Accelerator(acc, { evil, stateDir: path.join(dir, 'acc') })),
      });
      assert.ok(sess.model.integrity, 'checks are on');
      await assert.rejects(runFinetune(sess.model, data(), null, cfg({}), dir, 0, { rng: sess.rng }), (e: Error) => {
        assert.match(e.message, /training stopped at step 1: integrity check failed: the accelerator's (forward|backward) of h\.\d\.\w+ is wrong/);
        assert.match(e.message, /no checkpoint written yet/);
        return true;
      });
      const ck = path.join(dir, 'checkpoints');
      assert.ok(!existsSync(ck) || readdirSync(ck).length === 0, 'nothing was checkpointed');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('inference: tampered or bias-less replies are refused; an honest accelerator passes', async () => {
  const w = base();
  const r = obfuscateWeights(w, { mode: 'sealed', seed: 5 });
  const tokens = Int32Array.from({ length: 12 }, (_, i) => (i * 5) % 64);
  const honest = new Enclave(r.enclave, new InProcessLink(new Accelerator(r.accelerator)));
  await honest.forward(tokens, 1, 12);
  assert.ok(honest.integrity!.checks > 0);
  for (const evil of ['tamper', 'skip-bias'] as const) {
    const e = new Enclave(r.enclave, new InProcessLink(new Accelerator(r.accelerator, { evil })));
    await assert.rejects(e.forward(tokens, 1, 12), /integrity check failed/);
  }
});

test('backward replies are checked too', async () => {
  const w = base();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-evil-'));
  try {
    const sess = buildSession(w, {
      mode: 'paper', method: 'full', task: 'lm', padTokenId: 0, seed: 1, maskSeed: 2,
      link: (acc) => {
        const a = new Accelerator(acc);
        return {
          async call(q) {
            const rep = a.handle(q);
            if (q.op === 'linear_backward' && rep.op === 'tensor') {
              const d = Float32Array.from(rep.data);
              d[d.length >> 1] *= 1.5;
              return { ...rep, data: d };
            }
            return rep;
          },
        };
      },
    });
    await assert.rejects(runFinetune(sess.model, data(), null, cfg({ mode: 'paper' }), dir, 0, { rng: sess.rng }), /integrity check failed: the accelerator's backward of h\.1\.fcproj is wrong/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('checks track full fine-tuning: 30 honest SGD-momentum steps, no false alarm; the tracked vectors equal W r', async () => {
  const w = base();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-evil-'));
  try {
    const sess = buildSession(w, { mode: 'sealed', method: 'full', task: 'lm', padTokenId: 0, seed: 1, maskSeed: 2, acceleratorStateDir: path.join(dir, 'acc') });
    await runFinetune(sess.model, data(), null, cfg({ steps: 30, checkpoint_every: 10 }), dir, 0, { rng: sess.rng });
    // recompute the vectors from the trained weights: they match the tracked ones
    const fresh = new IntegrityChecker(sess.model.allTensors().chk!);
    const st = sess.model.integrity!.state();
    const r = sess.model.allTensors().chk![1].fc!.r;
    const W = sess.accelerator!.weights.layers[1].fc!;
    const K = 2;
    for (let i = 0; i < 5; i++) {
      let wr = 0;
      for (let j = 0; j < W.dout; j++) wr += W.w[i * W.dout + j] * r[j * K];
      const tracked = st.get('1.fc.w')![i * K];
      assert.ok(Math.abs(wr - tracked) < 1e-4 * (1 + Math.abs(wr)), `row ${i}: W r = ${wr}, tracked ${tracked}`);
    }
    assert.ok(fresh);
    // a stale accelerator is noticed before the next checkpoint
    const cv = makeCheckVectors(sess.accelerator!.weights, new Rng(1));
    assert.ok(cv.length === 2 && cv.every((l) => Object.keys(l).length === 4 && Object.values(l).every((v) => Object.keys(v).length === 5)));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a non-finite value in a reply is refused by name and index, with the checks on and off', async () => {
  const r = obfuscateWeights(base(), { mode: 'sealed', seed: 5 });
  const tokens = Int32Array.from({ length: 12 }, (_, i) => (i * 5) % 64);
  for (const bad of [Number.NaN, Infinity, -Infinity]) {
    for (const checks of [true, false]) {
      const a = new Accelerator(r.accelerator);
      const link = new InProcessLink(a);
      const call = link.call.bind(link);
      link.call = async (q: Parameters<typeof call>[0]) => {
        const rep = await call(q);
        if (q.op !== 'linear_forward' || q.name !== 'fc' || rep.op !== 'tensor') return rep;
        const d = Float32Array.from(rep.data);
        d[7] = bad;
        return { ...rep, data: d };
      };
      const e = new Enclave(checks ? r.enclave : { ...r.enclave, tensors: { ...r.enclave.tensors, chk: null } }, link);
      assert.equal(e.integrity !== null, checks);
      await assert.rejects(e.forward(tokens, 1, 12), (err: Error) => err instanceof AcceleratorError && /reply for h\.0\.fc contains a non-finite value at 7/.test(err.message));
    }
  }
});

test('a non-finite value the enclave would send is refused by name and index before it leaves, with the checks on and off', async () => {
  const r = obfuscateWeights(base(), { mode: 'sealed', seed: 5 });
  const config = getPreset('gpt2-micro'), C = config.n_embd, rows = 6;
  for (const bad of [Number.NaN, Infinity, -Infinity]) {
    for (const checks of [true, false]) {
      const link = new InProcessLink(new Accelerator(r.accelerator));
      let sent = 0;
      const call = link.call.bind(link);
      link.call = async (q: Parameters<typeof call>[0]) => (sent++, call(q));
      const integrity = checks ? new Enclave(r.enclave, link).integrity : null;
      assert.equal(integrity !== null, checks);
      const lin = new RemoteLinears(link, config, { trainWeights: false, integrity });
      const x = Float32Array.from({ length: rows * C }, (_, i) => Math.sin(i));
      x[C + 3] = bad;
      await assert.rejects(lin.forward(0, 'fc', asObfuscated(x), rows, false), (e: Error) => e instanceof InputError && new RegExp(`input to h\\.0\\.fc contains a non-finite value at index ${C + 3}`).test(e.message));
      const dy = Float32Array.from({ length: rows * 4 * C }, (_, i) => Math.cos(i));
      dy[5] = bad;
      await assert.rejects(lin.backward(0, 'fc', asObfuscated(dy), rows, true), (e: Error) => e instanceof InputError && /gradient for h\.0\.fc contains a non-finite value at index 5/.test(e.message));
      assert.equal(sent, 0, 'nothing crossed');
      // finite values pass, and the reply is checked
      x[C + 3] = 0.5;
      assert.equal((await lin.forward(0, 'fc', asObfuscated(x), rows, false)).length, rows * 4 * C);
    }
  }
});
