// Parties that prove who they are (issue 13): signed requests, the deployment contract, an
// accelerator that serves only its enclave, jobs that behave, and the policy as written.
// Services run in this process (serveEnclave, serveAccelerator): no process boundary is needed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import net from 'node:net';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { inProcessWorld, setup, records, spec, FIX, derivedFromFixture } from './world.js';
import {
  EnclaveClient, enclaveMeasurement, exportAcceleratorWeights, fetchAndMerge, loadOrCreatePartyKey, partyId, uploadAcceleratorBundle, uploadEnclaveBundle,
  uploadRecords, waitForJob, type PartyKey,
} from '../src/roles/parties.js';
import { describeSignatures, draftContract, signContract, verifyContract, type Contract } from '../src/roles/contract.js';
import { REPLY_PAD_BYTES, chunkSignedBytes, commandSignedBytes, type SealedCommand, type UploadChunk } from '../src/roles/protocol.js';
import { signBytes, SignatureError } from '../src/tee/signing.js';
import { attestationRequest, newNonce, provePeer } from '../src/tee/attest.js';
import { GrpcAcceleratorLink } from '../src/rpc/accelerator_client.js';
import { startAcceleratorServer } from '../src/rpc/accelerator_server.js';
import { encodeMessageParts } from '../src/protocol/messages.js';
import { frameHeader, AUTH_HELLO } from '../src/rpc/tensor_channel.js';
import { obfuscateWeights, writeObfuscation, publicBaseSha256, factoredModel } from '../src/obfuscate/provider.js';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import { loadSimRoot, SimSoftwarePlatform } from '../src/tee/sim.js';
import { BundleError, PolicyError, StateError } from '../src/errors.js';
import { ENCLAVE_SERVICE, EnclaveServiceClient, unary, clientOptions } from '../src/roles/protocol.js';
import * as grpc from '@grpc/grpc-js';
import { fromBase64 } from '../src/tee/platform.js';
import { loadView, loadTruth } from '../src/protocol/view.js';
import { assertMixedRunsAgree, maxAbsDiff } from './helpers.js';
import { loadAcceleratorBundle } from '../src/obfuscate/bundle.js';

/** An attacker: a key of its own, requests signed with it but naming `victim` as sender. */
async function spoofed(c: EnclaveClient, attacker: PartyKey, victim: string, op: string, args: Record<string, unknown> = {}): Promise<SealedCommand> {
  const s = c.attested!;
  const honest = await c.sealedCommand(s, op, args);
  const forged: Omit<SealedCommand, 'signature'> = { ...honest, sender: victim };
  return { ...forged, signature: signBytes(attacker.signing, commandSignedBytes(forged, s.transcript)) };
}

test('every command and upload is signed: a spoofed sender, a tampered field or an unknown key is refused', async () => {
  const w = await inProcessWorld();
  try {
    const attacker = await loadOrCreatePartyKey(path.join(w.dir, 'attacker.json'));
    const mallory = new EnclaveClient(w.encAddr, attacker, w.trust);
    await mallory.attest(); // the enclave is bound to the contract already: attesting is public
    const ops: [string, Record<string, unknown>][] = [
      ['status', {}], ['start_finetune', { spec: spec({ lr: 5 }) }], ['cancel', {}], ['infer', { texts: ['x'] }], ['fetch_update', {}],
    ];
    for (const [op, args] of ops) {
      for (const victim of [partyId(w.ownerKey), partyId(w.providerKey)]) {
        await assert.rejects(mallory.rawCommand(await spoofed(mallory, attacker, victim, op, args)), (e: Error) => {
          assert.ok(e instanceof SignatureError, `${op}: ${e.name} ${e.message}`);
          assert.match(e.message, /bad signature/);
          return true;
        });
      }
      // its own key, honestly signed: not a party of the contract
      await assert.rejects(mallory.command(op, args), (e: Error) => e instanceof PolicyError && /not allowed for a key the contract does not name/.test(e.message));
    }
    // a legitimate request with one field changed after signing
    const s = w.owner.attested!;
    const good = await w.owner.sealedCommand(s, 'status');
    for (const tamper of [{ ts: good.ts + 1 }, { id: 'other-id' }, { reply_key: Buffer.from(attacker.publicKey).toString('base64') }]) {
      await assert.rejects(w.owner.rawCommand({ ...good, ...tamper }), SignatureError);
    }
    // no signature at all
    await assert.rejects(w.owner.rawCommand({ ...good, signature: undefined }), /signature missing/);
    // uploads: a dataset and a bundle in the owner's and the provider's name
    for (const [kind, name, victim] of [['dataset', 'train', partyId(w.ownerKey)], ['bundle', 'enclave', partyId(w.providerKey)]] as const) {
      const chunksOf = await mallory.uploadChunks(mallory.attested!, kind, name, records(3, 9).map((r) => new TextEncoder().encode(JSON.stringify(r))));
      const forged = chunksOf.map((c) => {
        const f: Omit<UploadChunk, 'signature'> = { ...c, sender: victim };
        return { ...f, signature: signBytes(attacker.signing, chunkSignedBytes(f, mallory.attested!.transcript)) };
      });
      await assert.rejects(mallory.rawUpload(forged), SignatureError);
      // a forged later chunk behind an honest first one
      const honest = await w.owner.uploadChunks(w.owner.attested!, 'dataset', 'train', records(3, 9).map((r) => new TextEncoder().encode(JSON.stringify(r))));
      const mixed = [honest[0], { ...honest[1], signature: forged[1].signature }, honest[2]];
      await assert.rejects(w.owner.rawUpload(mixed), /upload chunk 1: bad signature/);
      await assert.rejects(mallory.upload(kind, name, [new Uint8Array(4)]), (e: Error) => e instanceof PolicyError && /only the contract's/.test(e.message));
    }
    // nothing of it got through
    const st = await w.owner.command<{ records: { train: number }; job: unknown }>('status');
    assert.equal(st.records.train, 48);
    assert.equal(st.job, null);
    mallory.close();
  } finally {
    await w.stop();
  }
});

test('the contract: unsigned or signed by one party is refused, a second one too; the attestation report is bound to it', async () => {
  const s = await setup();
  const w = await inProcessWorld({ deploy: false });
  try {
    // the world's enclave has no contract yet: nothing but the contract is accepted
    const raw = new EnclaveClient(w.encAddr, w.ownerKey, w.trust);
    const a = await (raw as unknown as { handshake(): Promise<{ contractSha256: string | null }> }).handshake();
    assert.equal(a.contractSha256, null);
    raw.attested = a as never;
    await assert.rejects(raw.command('status'), /no deployment contract accepted yet/);
    await assert.rejects(raw.upload('dataset', 'train', [new Uint8Array(2)]), /no deployment contract accepted yet/);
    // unsigned, and signed by the provider only
    const unsigned: Contract = { ...w.contract, signatures: {} };
    const oneSig: Contract = { ...w.contract, signatures: { provider: w.contract.signatures.provider } };
    assert.throws(() => verifyContract(unsigned), /not signed by the provider/);
    assert.throws(() => verifyContract(oneSig), /not signed by the owner/);
    await assert.rejects(raw.command('submit_contract', { contract: unsigned }), /not signed by the provider/);
    await assert.rejects(raw.command('submit_contract', { contract: oneSig }), /not signed by the owner/);
    // a body changed after both signed
    const changed: Contract = { ...w.contract, body: { ...w.contract.body, jobs: { ...w.contract.body.jobs, max_steps: 10 ** 7 } } };
    await assert.rejects(raw.command('submit_contract', { contract: changed }), SignatureError);
    // both signatures, but sent by a third party's key
    const third = new EnclaveClient(w.encAddr, await loadOrCreatePartyKey(path.join(w.dir, 'third.json')), w.trust);
    await assert.rejects(third.attest(), /only a party the contract names may submit it/);
    // the real one: accepted, and from now on every report carries its hash
    const att = await w.owner.attest();
    assert.equal(att.contractSha256, verifyContract(w.contract).sha256);
    assert.deepEqual(describeSignatures(w.contract).map((l) => l.split(': ')[1]), ['signed', 'signed']);
    // a client holding another contract (another deployment's) refuses this enclave, and the enclave refuses its contract
    const other = new EnclaveClient(w.encAddr, s.ownerKey, { ...s.trust, rootPublicKey: w.rootPublicKey });
    await assert.rejects(other.attest(), /the enclave is bound to contract/);
    other.close();
    const c2 = new EnclaveClient(w.encAddr, w.ownerKey, w.trust);
    (c2 as unknown as { attested: unknown }).attested = att;
    await assert.rejects(c2.command('submit_contract', { contract: s.contract }), /only a party the contract names may submit it/);
    // the owner's client will not upload before the contract's bundle is in the enclave
    await assert.rejects(uploadRecords(w.owner, 'train', records(4, 1)), (e: Error) => e instanceof BundleError && /no record was sent/.test(e.message));
    raw.close();
    third.close();
    c2.close();
  } finally {
    await w.stop();
    rmSync(s.dir, { recursive: true, force: true });
  }
});

test('bundle swap: the enclave and the accelerator take only the contract\'s bundles, the accelerator only from the provider; fetch refuses a foreign update', async () => {
  const w = await inProcessWorld();
  const other = mkdtempSync(path.join(os.tmpdir(), 'obf-other-'));
  try {
    writeObfuscation(other, obfuscateWeights(loadCheckpoint(path.join(FIX, 'vocab50257')), { mode: 'sealed', seed: 99 }));
    // the provider's own key, another bundle: refused by both services
    await assert.rejects(uploadEnclaveBundle(w.provider, path.join(other, 'enclave')), (e: Error) => e instanceof BundleError && /not the contract's enclave bundle/.test(e.message));
    await assert.rejects(uploadAcceleratorBundle(w.accAddr, path.join(other, 'accelerator'), w.providerKey), /not the contract's/);
    // the contract's bundle from another key, and unsigned
    await assert.rejects(uploadAcceleratorBundle(w.accAddr, path.join(w.dir, 'bundles', 'accelerator'), w.ownerKey), /only the contract's provider/);
    const { AccAdminClient, ACC_ADMIN_SERVICE, clientStream } = await import('../src/roles/protocol.js');
    const admin = new AccAdminClient(w.accAddr, grpc.credentials.createInsecure(), clientOptions());
    await assert.rejects(clientStream(admin, ACC_ADMIN_SERVICE.LoadBundle, [{ index: 0, total: 1, data: '' }]), /unauthenticated/);
    await assert.rejects(unary(admin, ACC_ADMIN_SERVICE.Export, {}), /unauthenticated/);
    admin.close();
    await assert.rejects(exportAcceleratorWeights(w.accAddr, w.ownerKey), /only the contract's provider/);
    const ex = await exportAcceleratorWeights(w.accAddr, w.providerKey);
    assert.ok(ex.weights.length > 0);
    // still the contract's bundle on both, and a job runs
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 2, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    const st = await waitForJob(w.owner) as { job: { state: string } };
    assert.equal(st.job.state, 'done', JSON.stringify(st.job));
    // provider fetch: merged only from its own bundle and contract
    const base = loadCheckpoint(path.join(FIX, 'vocab50257'));
    const swapped = path.join(other, 'mixed');
    cpSync(path.join(w.dir, 'bundles'), swapped, { recursive: true });
    // another obfuscation's enclave bundle and its key (a consistent pair, but not what made the update)
    for (const d of ['enclave', 'provider']) {
      rmSync(path.join(swapped, d), { recursive: true });
      cpSync(path.join(other, d), path.join(swapped, d), { recursive: true });
    }
    await assert.rejects(fetchAndMerge(w.provider, w.accAddr, base, swapped, path.join(other, 'scratch')), (e: Error) => e instanceof BundleError && /not this provider's/.test(e.message));
    // the right bundles with another obfuscation's mask key: refused before anything is fetched or written
    const wrongKey = path.join(other, 'wrong-key');
    cpSync(path.join(w.dir, 'bundles'), wrongKey, { recursive: true });
    rmSync(path.join(wrongKey, 'provider'), { recursive: true });
    cpSync(path.join(other, 'provider'), path.join(wrongKey, 'provider'), { recursive: true });
    await assert.rejects(fetchAndMerge(w.provider, w.accAddr, base, wrongKey, path.join(wrongKey, 'scratch')), (e: Error) => e instanceof BundleError && /did not make the enclave bundle/.test(e.message));
    assert.ok(!existsSync(path.join(wrongKey, 'scratch')), 'nothing written');
    const { update } = await fetchAndMerge(w.provider, w.accAddr, base, path.join(w.dir, 'bundles'), path.join(w.dir, 'scratch'));
    assert.equal(update.method, 'lora');
  } finally {
    await w.stop();
    rmSync(other, { recursive: true, force: true });
  }
});

test('replays: at once, and after the window, of commands and uploads, are refused; the dataset does not roll back', async () => {
  let offset = 0;
  const w = await inProcessWorld({ enclave: { now: () => Date.now() + offset } });
  try {
    const s = w.owner.attested!;
    const cmd = await w.owner.sealedCommand(s, 'status');
    await w.owner.rawCommand(cmd);
    await assert.rejects(w.owner.rawCommand(cmd), /replay detected/);
    const old = await w.owner.uploadChunks(s, 'dataset', 'train', records(5, 7).map((r) => new TextEncoder().encode(JSON.stringify(r))));
    await w.owner.rawUpload(old);
    await assert.rejects(w.owner.rawUpload(old), /replay detected/);
    await uploadRecords(w.owner, 'train', records(48, 1));
    // eleven minutes on: past the 10-minute window, inside the 30-minute session
    offset = 11 * 60_000;
    await assert.rejects(w.owner.rawUpload(old), /expired/);
    await assert.rejects(w.owner.rawCommand(cmd), /expired/);
    offset = 0;
    const st = await w.owner.command<{ records: { train: number } }>('status');
    assert.equal(st.records.train, 48, 'the replayed upload did not replace the dataset');
  } finally {
    await w.stop();
  }
});

test('sessions expire and a flood of handshakes keeps a bounded number; the client attests again by itself', async () => {
  let offset = 0;
  const w = await inProcessWorld({ deploy: false, enclave: { maxSessions: 50, now: () => Date.now() + offset } });
  try {
    await w.owner.attest();
    const first = w.owner.attested!.transcriptId;
    const client = new EnclaveServiceClient(w.encAddr, grpc.credentials.createInsecure(), clientOptions());
    for (let i = 0; i < 2000; i++) await w.enclave.attest(attestationRequest(newNonce()));
    assert.ok(w.enclave.sessionCount <= 50, `${w.enclave.sessionCount} sessions held`);
    // the owner's session was among the oldest: dropped; the client attests again and goes on
    const s = w.owner.attested!;
    const req = await w.owner.sealedCommand(s, 'status');
    await assert.rejects(w.owner.rawCommand(req), /unknown attestation session/);
    const st = await w.owner.command<{ role: string }>('status');
    assert.equal(st.role, 'owner');
    assert.notEqual(w.owner.attested!.transcriptId, first);
    // expiry: 31 minutes later the session is gone
    offset = 31 * 60_000;
    const stale = await w.owner.sealedCommand(w.owner.attested!, 'status', {}, 'x-1', Date.now() + offset);
    await assert.rejects(w.owner.rawCommand(stale), /session expired/);
    client.close();
  } finally {
    await w.stop();
  }
});

test('third parties to the accelerator: every compute and admin call refused, relayed client evidence refused; the enclave\'s own connection works', async () => {
  const w = await inProcessWorld({ deploy: false });
  try {
    await w.provider.attest();
    await uploadAcceleratorBundle(w.accAddr, path.join(w.dir, 'bundles', 'accelerator'), w.providerKey);
    const reqs = [
      { op: 'reset' }, { op: 'checkpoint_save', tag: 'step-0000001' }, { op: 'checkpoint_load', tag: 'bundle-weights' }, { op: 'grad_sq_norm' },
      { op: 'apply_update', lr: 1, momentum: 0, gradScale: 1 }, { op: 'linear_forward', layer: 0, name: 'qkv', rows: 1, x: new Float32Array(64) as never, save: false },
    ] as const;
    // over the tensor channel, without proof
    for (const r of reqs) {
      const plain = new GrpcAcceleratorLink(w.accAddr, { deadlineMs: 5000 });
      await assert.rejects(plain.call(r as never), /UNAUTHENTICATED: tensor channel: this accelerator serves only its authenticated enclave/);
      await plain.close();
    }
    // over gRPC Call
    const viaGrpc = new GrpcAcceleratorLink(w.accAddr, { deadlineMs: 5000, tensorChannel: false });
    for (const r of reqs) await assert.rejects(viaGrpc.call(r as never), /UNAUTHENTICATED/);
    await viaGrpc.close();
    // relay: the attacker gets the enclave to attest the accelerator's challenge as a client nonce
    const relay = new GrpcAcceleratorLink(w.accAddr, {
      deadlineMs: 5000,
      prove: async (challenge) => {
        const resp = await w.enclave.attest(attestationRequest(new Uint8Array(challenge)));
        return Buffer.from(JSON.stringify((resp as { evidence: unknown }).evidence));
      },
    });
    await assert.rejects(relay.call({ op: 'reset' }), /authentication refused/);
    await relay.close();
    // evidence from the right platform over the right challenge, but another contract
    const platform = new SimSoftwarePlatform(loadSimRoot(path.join(w.dir, 'platform')), enclaveMeasurement());
    const wrongContract = new GrpcAcceleratorLink(w.accAddr, { deadlineMs: 5000, prove: (c) => provePeer(platform, c, 'ab'.repeat(32)) });
    await assert.rejects(wrongContract.call({ op: 'reset' }), /authentication refused/);
    await wrongContract.close();
    // the enclave's own proof
    const sha = verifyContract(w.contract).sha256;
    const own = new GrpcAcceleratorLink(w.accAddr, { deadlineMs: 5000, prove: (c) => provePeer(platform, c, sha) });
    assert.equal((await own.call({ op: 'reset' })).op, 'ack');
    // a checkpoint tag not of the training loop's form is refused even so
    const bad = await own.call({ op: 'checkpoint_save', tag: 'evil.tag' });
    assert.equal(bad.op, 'error');
    await own.close();
    // a raw socket that skips the handshake is answered UNAUTHENTICATED and closed
    const probe = new GrpcAcceleratorLink(w.accAddr);
    const h = await probe.health();
    await probe.close();
    const frame = encodeMessageParts({ op: 'reset' });
    const answer = await new Promise<Buffer>((resolve) => {
      const sock = net.connect(h.tensor_port!, '127.0.0.1', () => {
        sock.write(frameHeader(7, 0, frame.length));
        for (const p of frame.parts) sock.write(p);
      });
      const got: Buffer[] = [];
      sock.on('data', (d) => got.push(d));
      sock.on('close', () => resolve(Buffer.concat(got)));
    });
    assert.equal(answer.readUInt32LE(8), grpc.status.UNAUTHENTICATED);
  } finally {
    await w.stop();
  }
});

test('the tensor channel: connection limit, handshake timeout, idle timeout', async () => {
  const srv = await startAcceleratorServer({ handle: () => ({ op: 'ack' }) }, {
    peerAuth: { verify: async (_c, p) => { if (p.toString() !== 'yes') throw new Error('no'); }, authTimeoutMs: 300 }, maxConnections: 2, idleTimeoutMs: 400,
  });
  try {
    const probe = new GrpcAcceleratorLink(srv.address);
    const h = await probe.health();
    await probe.close();
    const closedAfter = (hello: boolean) => new Promise<number>((resolve) => {
      const t0 = Date.now();
      const sock = net.connect(h.tensor_port!, '127.0.0.1', () => { if (hello) sock.write(frameHeader(1, AUTH_HELLO, 0)); });
      sock.on('data', () => {});
      sock.on('error', () => {});
      sock.on('close', () => resolve(Date.now() - t0));
    });
    // a connection that never proves itself is closed after the handshake timeout
    const t = await closedAfter(true);
    assert.ok(t >= 250 && t < 3000, `closed after ${t} ms`);
    // two authenticated links fill the limit; a third connection is closed at once
    const a = new GrpcAcceleratorLink(srv.address, { prove: async () => Buffer.from('yes') });
    const b = new GrpcAcceleratorLink(srv.address, { prove: async () => Buffer.from('yes') });
    assert.equal((await a.call({ op: 'reset' })).op, 'ack');
    assert.equal((await b.call({ op: 'reset' })).op, 'ack');
    const t3 = await closedAfter(false);
    assert.ok(t3 < 250, `the third connection was closed after ${t3} ms`);
    // idle: the server closes; the link dials and authenticates again on its next call
    await new Promise((r) => setTimeout(r, 700));
    assert.equal((await a.call({ op: 'reset' })).op, 'ack');
    const liar = new GrpcAcceleratorLink(srv.address, { prove: async () => Buffer.from('no') });
    await new Promise((r) => setTimeout(r, 500)); // let b's idle connection go, to make room
    await assert.rejects(liar.call({ op: 'reset' }), /authentication refused/);
    await Promise.all([a.close(), b.close(), liar.close()]);
  } finally {
    await srv.close();
  }
});

test('policy as written: the provider sees aggregates only; replies have one length per message type', async () => {
  const w = await inProcessWorld();
  try {
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 3, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    await waitForJob(w.owner);
    const own = await w.owner.command<{ job: Record<string, unknown> }>('status');
    const prov = await w.provider.command<{ job: Record<string, unknown> }>('status');
    assert.equal((own.job.losses as number[]).length, 3);
    assert.ok(!('losses' in prov.job) && !('loss' in prov.job), JSON.stringify(prov.job));
    assert.ok(!JSON.stringify(prov.job.summary).includes('train_loss'), JSON.stringify(prov.job.summary));
    assert.ok(prov.job.eval, 'the aggregate evaluation is the provider\'s');
    // reply length: one text or three, either label: the same sealed size
    const sizes = new Set<number>();
    for (const texts of [['this was good really good'], ['this was awful really awful'], ['a', 'bb', 'this was poor really poor']]) {
      const req = await w.owner.sealedCommand(w.owner.attested!, 'infer', { texts });
      const rep = await w.owner.rawCommand(req) as { sealed: { ciphertext: string } };
      sizes.add(fromBase64(rep.sealed.ciphertext).length);
      assert.ok((await w.owner.openReply<{ predictions: string[] }>(w.owner.attested!, req.id, rep as never)).predictions.length === texts.length);
    }
    assert.equal(sizes.size, 1, `infer replies of ${[...sizes]} bytes`);
    assert.equal([...sizes][0], REPLY_PAD_BYTES.infer + 16);
    const statusSizes = new Set<number>();
    for (const c of [w.owner, w.provider]) {
      const req = await c.sealedCommand(c.attested!, 'status');
      statusSizes.add(fromBase64((await c.rawCommand(req) as { sealed: { ciphertext: string } }).sealed.ciphertext).length);
    }
    assert.equal(statusSizes.size, 1);
  } finally {
    await w.stop();
  }
});

test('the release policy: what the contract does not release is refused', async () => {
  const w = await inProcessWorld({ contract: { releaseProvider: ['aggregate_metrics'], releaseOwner: ['metrics'] } });
  try {
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 2, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    await waitForJob(w.owner);
    await assert.rejects(w.owner.command('infer', { texts: ['x'] }), /the contract does not release "inference" to the owner/);
    await assert.rejects(w.provider.command('fetch_update'), /the contract does not release "update" to the provider/);
    const prov = await w.provider.command<{ job: Record<string, unknown> }>('status');
    assert.ok(prov.job.eval, 'aggregate metrics are released to the provider');
  } finally {
    await w.stop();
  }
  const w2 = await inProcessWorld({ deploy: false, contract: { releaseProvider: ['update'], releaseOwner: ['inference'] } });
  try {
    await w2.provider.attest();
    await uploadEnclaveBundle(w2.provider, path.join(w2.dir, 'bundles', 'enclave'));
    await w2.owner.attest();
    await uploadRecords(w2.owner, 'train', records(16, 1));
    await w2.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 1, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    await w2.owner.command('cancel').catch(() => {});
    for (const c of [w2.owner, w2.provider]) {
      const st = await c.command<{ job: Record<string, unknown> }>('status');
      assert.deepEqual(Object.keys(st.job).sort(), ['error', 'state', 'step', 'steps'], 'no metrics without their release');
    }
  } finally {
    await w2.stop();
  }
});

test('jobs: contract limits, an endless job cancelled, a second full job after a full one, checkpoints kept until the provider fetched', async () => {
  const w = await inProcessWorld({ contract: { methods: ['full', 'lora'], tasks: ['cls'], maxSteps: 1_000_000, maxJobs: 3, cancel: ['owner'] } });
  try {
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ steps: 2_000_000 }) }), /exceed the contract's limit/);
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ task: 'lm' }) }), /task "lm" is not allowed/);
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ lr: -1 }) }), /lr/);
    // an endless job: cancelled by the owner, not by the provider (the contract says so)
    await w.owner.command('start_finetune', { spec: spec({ steps: 1_000_000, checkpoint_every: 0, lr: 0.01 }) });
    for (let i = 0; i < 500; i++) {
      const s = await w.owner.command<{ job: { step: number } }>('status');
      if (s.job.step >= 2) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    await assert.rejects(w.provider.command('cancel'), /policy: "cancel" is not allowed for provider/);
    const c = await w.owner.command<{ cancelled: boolean; step: number }>('cancel');
    assert.ok(c.cancelled && c.step >= 2 && c.step < 1_000_000);
    const st = await w.owner.command<{ job: { state: string; error: string } }>('status');
    assert.equal(st.job.state, 'cancelled');
    await assert.rejects(w.owner.command('cancel'), StateError);
    // a full job after the cancelled full one (the accelerator's weights moved): passes honestly
    await w.owner.command('start_finetune', { spec: spec({ steps: 6, checkpoint_every: 2 }) });
    const a = await waitForJob(w.owner) as { job: { state: string; error: string | null; summary: { train_loss_last: number } } };
    assert.equal(a.job.state, 'done', a.job.error ?? '');
    // the provider has not fetched it: a new job would lose the update
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ steps: 6 }) }), /has not fetched the update/);
    await assert.rejects(uploadRecords(w.owner, 'train', records(8, 3)), /new data waits until then/);
    const base = loadCheckpoint(path.join(FIX, 'vocab50257'));
    await fetchAndMerge(w.provider, w.accAddr, base, path.join(w.dir, 'bundles'), path.join(w.dir, 'scratch'));
    // the third full job, after a full one: the same start, the same run
    await w.owner.command('start_finetune', { spec: spec({ steps: 6, checkpoint_every: 2 }) });
    const b = await waitForJob(w.owner) as { job: { state: string; error: string | null; summary: { train_loss_last: number } } };
    assert.equal(b.job.state, 'done', b.job.error ?? '');
    assertMixedRunsAgree([b.job.summary.train_loss_last], [a.job.summary.train_loss_last], 'each job starts from the bundle\'s weights');
    await fetchAndMerge(w.provider, w.accAddr, base, path.join(w.dir, 'bundles'), path.join(w.dir, 'scratch'));
    await assert.rejects(w.owner.command('start_finetune', { spec: spec({ steps: 6 }) }), /allows 3 job\(s\)/);
    // accelerator checkpoints are pruned to the latest two
    const { readdirSync } = await import('node:fs');
    const ck = readdirSync(path.join(w.dir, 'acc', 'checkpoints')).filter((n) => n.startsWith('step-'));
    assert.ok(ck.length <= 2, ck.join(','));
  } finally {
    await w.stop();
  }
});

test('an enclave stopped before its first checkpoint, or between a checkpoint and its state write: the restart resumes, equal to an uninterrupted run, no gaps in the losses', async () => {
  const w = await inProcessWorld();
  try {
    // the uninterrupted run
    await w.owner.command('start_finetune', { spec: spec({ steps: 10 }) });
    const ref = await waitForJob(w.owner) as { job: { state: string; losses: number[]; summary: { train_loss_last: number; eval: { loss: number } } } };
    assert.equal(ref.job.state, 'done');
    await w.provider.command('fetch_update');
    // a stop at step 1-3 (no checkpoint yet) after the accelerator trained: no state written after the start
    const freeze = () => { (w.enclave as unknown as { persist: () => Promise<void> }).persist = async () => {}; };
    for (const stopAt of [0, 5]) {
      await w.owner.command('start_finetune', { spec: spec({ steps: 10 }) });
      freeze(); // the sealed state stays as it was written at the job's start (a kill after every later write)
      // 0: stopped after its first step, before the first checkpoint (step 4); 5: after it
      for (let i = 0; i < 2000 && stopAt > 0; i++) {
        const s = await w.owner.command<{ job: { step: number } }>('status');
        if (s.job.step >= stopAt) break;
        await new Promise((r) => setTimeout(r, 5));
      }
      await (w.enclave as unknown as { runner: { cancel(r: string): Promise<void> } }).runner.cancel('stopped by the test');
      await w.restartEnclave();
      const st = await waitForJob(w.owner) as { job: { state: string; error: string | null; losses: (number | null)[]; recoveries: number; summary: { train_loss_last: number; eval: { loss: number }; resumed_from: number | null } } };
      assert.equal(st.job.state, 'done', st.job.error ?? '');
      assert.ok(st.job.recoveries >= 1);
      assert.equal(st.job.losses.length, 10);
      assert.ok(st.job.losses.every((l) => typeof l === 'number' && Number.isFinite(l)), JSON.stringify(st.job.losses));
      // two jobs, two mixing keys: equal up to float error
      assertMixedRunsAgree([...(st.job.losses as number[]), st.job.summary.eval.loss], [...ref.job.losses, ref.job.summary.eval.loss], `stopped at ${stopAt}`);
      if (stopAt === 0) assert.equal(st.job.summary.resumed_from, null, 'a fresh start: the accelerator reloaded the bundle');
      else assert.ok((st.job.summary.resumed_from ?? 0) >= 4, 'resumed from a checkpoint');
      if (stopAt === 5) {
        // a restart after the job finished: its model comes back from the final checkpoint
        const texts = ['this was good really good', 'this was awful really awful'];
        const before = await w.owner.command<{ predictions: string[] }>('infer', { texts });
        await w.restartEnclave();
        assert.deepEqual(await w.owner.command<{ predictions: string[] }>('infer', { texts }), before);
      }
      await w.provider.command('fetch_update');
    }
  } finally {
    await w.stop();
  }
});

test('key files: an old one (HPKE keys only) gains a signing key once, with a message; the HPKE keys are kept', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-keys-'));
  try {
    const f = path.join(dir, 'old.json');
    const fresh = await loadOrCreatePartyKey(path.join(dir, 'x.json'));
    writeFileSync(f, JSON.stringify({ public: Buffer.from(fresh.publicKey).toString('base64'), private: Buffer.from(fresh.privateKey).toString('base64') }));
    const lines: string[] = [];
    const k1 = await loadOrCreatePartyKey(f, (l) => lines.push(l));
    assert.equal(lines.length, 1);
    assert.match(lines[0], /had no signing key.*added an Ed25519 signing key/);
    assert.deepEqual(k1.publicKey, fresh.publicKey);
    const k2 = await loadOrCreatePartyKey(f, (l) => lines.push(l));
    assert.equal(lines.length, 1, 'migrated once');
    assert.equal(partyId(k2), partyId(k1));
    assert.ok(JSON.parse(readFileSync(f, 'utf8')).signing_private);
    writeFileSync(f, '{"public": 1}');
    await assert.rejects(loadOrCreatePartyKey(f), /"public" and "private"/);
    const other = await loadOrCreatePartyKey(path.join(dir, 'y.json'));
    assert.throws(() => draftContract({ provider: partyId(k1), owner: partyId(other), acceleratorDir: path.join(dir, 'nope'), enclaveDir: dir }), /cannot read the accelerator manifest/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  // a contract names keys; signing with the wrong one is refused
  const s = await setup();
  try {
    assert.throws(() => signContract(s.contract, 'owner', s.providerKey.signing), /not the contract's owner key/);
  } finally {
    rmSync(s.dir, { recursive: true, force: true });
  }
});

test('a lying grad_sq_norm is caught: the enclave computes the exact norm from what it sent (a lie of 1% fails), and the honest one passes', async () => {
  const { loadEnclaveBundle, loadAcceleratorBundle } = await import('../src/obfuscate/bundle.js');
  const { SplitModel, checkGradSq, checkedGradSq } = await import('../src/enclave/split_model.js');
  const { Accelerator } = await import('../src/accelerator/accelerator.js');
  const { InProcessLink } = await import('../src/protocol/link.js');
  const { Rng } = await import('../src/tensor/rng.js');
  const { runFinetune } = await import('../src/train/finetune.js');
  const { parseJobSpec, toFinetuneConfig } = await import('../src/train/run_spec.js');
  const { encodeRecords, labelSet } = await import('../src/io/jsonl.js');
  const { gpt2Tokenizer } = await import('../src/model/tokenizer.js');
  const { freshClassifier } = await import('../src/train/session.js');
  const s = await setup();
  try {
    const enc = loadEnclaveBundle(path.join(s.dir, 'bundles', 'enclave'));
    const run = async (factor: number) => {
      const acc = new Accelerator(loadAcceleratorBundle(path.join(s.dir, 'bundles', 'accelerator')).weights, { stateDir: path.join(s.dir, `acc-${factor}`) });
      const lying = { handle: (r: Parameters<typeof acc.handle>[0]) => {
        const rep = acc.handle(r);
        return r.op === 'grad_sq_norm' && rep.op === 'ack' ? { ...rep, value: rep.value! * factor } : rep;
      } };
      const js = parseJobSpec(spec({ steps: 3, checkpoint_every: 0 }), { mode: enc.mode, kappa: enc.spec, two_sided: enc.twoSided }, 'test');
      const train = records(24, 1);
      const labels = labelSet(train, 'train');
      const rng = new Rng(js.seed);
      const model = new SplitModel({ mode: enc.mode, method: 'full', task: 'cls', config: enc.config, tensors: enc.tensors, link: new InProcessLink(lying), numLabels: labels.length, padTokenId: gpt2Tokenizer.eotId, rng, classifierInit: freshClassifier(labels.length, enc.config.n_embd, js.seed) });
      const set = encodeRecords(train, gpt2Tokenizer, { task: 'cls', maxLen: js.max_len, labels, source: 'x' });
      return runFinetune(model, set, null, toFinetuneConfig(js, 'lie'), path.join(s.dir, `run-${factor}`), gpt2Tokenizer.eotId, { rng });
    };
    const honest = await run(1);
    assert.equal(honest.losses.length, 3);
    for (const factor of [1e-6, 0, 0.5, 1.01, 2, 1e6]) {
      await assert.rejects(run(factor), (e: Error) => /squared gradient norm/.test(String((e as { cause?: Error }).cause?.message ?? e.message)));
    }
    assert.throws(() => checkGradSq(Number.NaN, 1), /squared gradient norm/);
    assert.doesNotThrow(() => checkGradSq(2, 1));
    // the enclave's exact value is what is used; without one, the estimate's bound
    assert.equal(checkedGradSq(1.0000001, 1, 5), 1);
    assert.throws(() => checkedGradSq(1.01, 1, 1), /enclave computes 1\.000000e\+0 from what it sent/);
    assert.equal(checkedGradSq(3, null, 1), 3);
  } finally {
    rmSync(s.dir, { recursive: true, force: true });
  }
});

test('enclave service --record-view: the view of a job (both directions, the bundle handed over, the labels) is saved when it is done', async () => {
  const rv = { file: '', accelerator: '' };
  const w = await inProcessWorld({ enclave: { recordView: rv } });
  try {
    rv.file = path.join(w.dir, 'job.view.safetensors');
    rv.accelerator = path.join(w.dir, 'bundles', 'accelerator');
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 2, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    const st = await waitForJob(w.owner) as { job: { state: string } };
    assert.equal(st.job.state, 'done', JSON.stringify(st.job));
    const view = loadView(rv.file);
    const truth = loadTruth(`${rv.file}.truth.json`, view);
    assert.equal(view.header.kind, 'finetune');
    assert.equal(view.header.mode, 'sealed');
    const dirs = new Set(view.events.map((e) => `${e.direction}/${e.op}`));
    for (const k of ['to_accelerator/linear_forward', 'to_enclave/linear_forward', 'to_accelerator/linear_backward', 'to_enclave/linear_backward']) assert.ok(dirs.has(k), k);
    assert.ok(truth.batches.length >= 2 && truth.batches.every((b) => b.labels?.length === 8), 'every training batch and its labels are in the scoring key');
    const acc = loadAcceleratorBundle(rv.accelerator).weights;
    assert.deepEqual(view.bundle().layers[0].qkv!.w, acc.layers[0].qkv!.w, 'the bundle as handed over');
  } finally {
    await w.stop();
  }
});

test('a public-base deployment: the job runs with its integrity checks, the owner infers, the provider\'s merge is the factored model plus the adapters', async () => {
  const w = await inProcessWorld({ publicBase: true });
  try {
    assert.equal(loadAcceleratorBundle(path.join(w.dir, 'bundles', 'accelerator')).manifest.public_base_sha256, publicBaseSha256(loadCheckpoint(path.join(FIX, 'vocab50257'))));
    await w.owner.command('start_finetune', { spec: spec({ method: 'lora', steps: 3, checkpoint_every: 0, enclave_optimizer: 'adamw', lr: 0.01 }) });
    const st = await waitForJob(w.owner) as { job: { state: string } };
    assert.equal(st.job.state, 'done', JSON.stringify(st.job));
    const inf = await w.owner.command<{ predictions: string[] }>('infer', { texts: ['this was good really good'] });
    assert.equal(inf.predictions.length, 1);
    const model = derivedFromFixture();
    const { merged } = await fetchAndMerge(w.provider, w.accAddr, model, path.join(w.dir, 'bundles'), path.join(w.dir, 'scratch'));
    const fm = factoredModel(model, { weights: loadCheckpoint(path.join(FIX, 'vocab50257')), choice: { rank: 1 } }, 'sealed');
    const lay = merged.layout;
    // LoRA on q, v: the other linears are the factored model's; the provider's delta is in them, not the public base
    for (const k of ['attprojw', 'fcw', 'fcprojw'] as const) {
      const got = lay.view(merged.params, k), want = lay.view(fm.params, k), base = lay.view(loadCheckpoint(path.join(FIX, 'vocab50257')).params, k);
      assert.ok(maxAbsDiff(got, want) < 1e-5 && maxAbsDiff(want, base) > 1e-2, `${k}: merged is the factored model (${maxAbsDiff(got, want)}), not the public base (${maxAbsDiff(want, base)})`);
    }
  } finally {
    await w.stop();
  }
});
