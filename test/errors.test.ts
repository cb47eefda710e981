// The error classes: names, the instanceof chain, causes; the mapping to gRPC status and back
// across real services on loopback; retry by status code only; a dead kernel worker fails the
// call instead of leaving it waiting; the CLI's exit status by class.
process.env.OBFUSCATUNE_THREADS = '3'; // two kernel workers beside this thread, whatever the machine
import { test } from 'node:test';
import { SignatureError } from '../src/tee/signing.js';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import {
  AcceleratorError, BundleError, InputError, IntegrityError, ObfuscatuneError, PolicyError, SessionError, StateError, TransportError, WorkerError,
  causeChain, findCause,
} from '../src/errors.js';
import { IntegrityError as IntegrityErrorFromSplit } from '../src/protocol/integrity.js';
import { GrpcAcceleratorLink, RpcError, isUnavailable } from '../src/rpc/accelerator_client.js';
import { ChannelError, ChannelRefusal, FramingError } from '../src/rpc/tensor_channel.js';
import { startAcceleratorServer, type RequestHandler } from '../src/rpc/accelerator_server.js';
import { ERROR_CLASS_KEY, errorFromStatus, serviceError, statusOf } from '../src/rpc/status.js';
import { AttestationError } from '../src/tee/platform.js';
import { SealError } from '../src/tee/seal.js';
import { ReplayError } from '../src/tee/replay.js';
import { HpkeError } from '../src/tee/hpke.js';
import { generateSimRoot, SimSoftwarePlatform, SimSoftwareVerifier } from '../src/tee/sim.js';
import { serveEnclave } from '../src/roles/enclave_server.js';
import { EnclaveClient, loadOrCreatePartyKey } from '../src/roles/parties.js';
import { exitCodeOf } from '../src/cli/main.js';
import { parallelTestHooks, resetParallelPool, sumSquaresParallel } from '../src/tensor/parallel.js';
import { backendName, setBackend } from '../src/tensor/gemm.js';
import { sharedFloat32 } from '../src/tensor/shared.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const T = { timeout: 30_000 };

test('each class: its name, its place in the hierarchy, its cause', () => {
  const cause = new Error('the root of it');
  const plain: [new (m: string, o?: { cause?: unknown }) => ObfuscatuneError, string][] = [
    [ObfuscatuneError, 'ObfuscatuneError'], [IntegrityError, 'IntegrityError'], [PolicyError, 'PolicyError'], [BundleError, 'BundleError'],
    [StateError, 'StateError'], [InputError, 'InputError'], [SessionError, 'SessionError'], [SignatureError, 'SignatureError'],
  ];
  for (const [Cls, name] of plain) {
    const e = new Cls('m', { cause });
    assert.equal(e.name, name);
    assert.ok(e instanceof Cls && e instanceof ObfuscatuneError && e instanceof Error, name);
    assert.equal(e.message, 'm');
    assert.equal(e.cause, cause, `${name} keeps its cause`);
    assert.match(String(e), new RegExp(`^${name}: m$`));
    assert.equal(new Cls('no cause').cause, undefined);
  }
  // the subclasses are siblings, not each other
  assert.ok(!(new PolicyError('x') instanceof InputError));
  assert.ok(!(new BundleError('x') instanceof StateError));
  assert.ok(new SessionError('x') instanceof PolicyError, 'an unknown session is a policy refusal, to attest again');

  const acc = new AcceleratorError('refused', 'linear_forward', { cause });
  assert.equal(acc.name, 'AcceleratorError');
  assert.equal(acc.op, 'linear_forward');
  assert.equal(acc.cause, cause);
  const w = new WorkerError('gone', 2, { cause });
  assert.ok(w instanceof ObfuscatuneError);
  assert.equal(w.name, 'WorkerError');
  assert.equal(w.worker, 2);
  assert.equal(w.cause, cause);

  // integrity.ts re-exports the one class
  assert.equal(IntegrityErrorFromSplit, IntegrityError);

  // the transport family: every one carries its gRPC status
  const t = new TransportError('down', grpc.status.UNAVAILABLE, { cause });
  assert.equal(t.name, 'TransportError');
  assert.equal(t.code, grpc.status.UNAVAILABLE);
  assert.equal(t.cause, cause);
  const transports: [TransportError, string, number][] = [
    [new RpcError('rpc', grpc.status.DEADLINE_EXCEEDED, 'reset', { cause }), 'RpcError', grpc.status.DEADLINE_EXCEEDED],
    [new ChannelError('channel', grpc.status.UNAVAILABLE, { cause }), 'ChannelError', grpc.status.UNAVAILABLE],
    [new FramingError('framing', grpc.status.INVALID_ARGUMENT, 7), 'FramingError', grpc.status.INVALID_ARGUMENT],
    [new ChannelRefusal(grpc.status.RESOURCE_EXHAUSTED, 'refusal', { cause }), 'ChannelRefusal', grpc.status.RESOURCE_EXHAUSTED],
  ];
  for (const [e, name, code] of transports) {
    assert.equal(e.name, name);
    assert.ok(e instanceof TransportError && e instanceof ObfuscatuneError, name);
    assert.equal(e.code, code);
  }
  assert.equal((transports[0][0] as RpcError).op, 'reset');
  assert.equal(transports[0][0].cause, cause);
  assert.equal((transports[2][0] as FramingError).id, 7);

  // the TEE's errors keep their own string codes, under the same base
  const tee: [ObfuscatuneError & { code: string }, string, string][] = [
    [new AttestationError('bad_signature', 'a', { cause }), 'AttestationError', 'bad_signature'],
    [new SealError('auth_failed', 's', { cause }), 'SealError', 'auth_failed'],
    [new ReplayError('replayed', 'r', { cause }), 'ReplayError', 'replayed'],
  ];
  for (const [e, name, code] of tee) {
    assert.equal(e.name, name);
    assert.ok(e instanceof ObfuscatuneError);
    assert.ok(!(e instanceof TransportError));
    assert.equal(e.code, code);
    assert.equal(e.cause, cause);
  }
  const h = new HpkeError('h', { cause });
  assert.equal(h.name, 'HpkeError');
  assert.ok(h instanceof ObfuscatuneError);
  assert.equal(h.cause, cause);

  // cause chains
  const outer = new Error('step failed', { cause: new RpcError('rpc', grpc.status.UNAVAILABLE, 'reset', { cause }) });
  assert.equal(causeChain(outer).length, 3);
  assert.equal(findCause(outer, TransportError)?.code, grpc.status.UNAVAILABLE);
  assert.equal(findCause(outer, IntegrityError), null);
});

test('statusOf: one table from class to gRPC status; errorFromStatus rebuilds the class', () => {
  const cases: [unknown, grpc.status][] = [
    [new PolicyError('p'), grpc.status.PERMISSION_DENIED],
    [new ReplayError('replayed', 'r'), grpc.status.PERMISSION_DENIED],
    [new InputError('i'), grpc.status.INVALID_ARGUMENT],
    [new BundleError('b'), grpc.status.FAILED_PRECONDITION],
    [new StateError('s'), grpc.status.FAILED_PRECONDITION],
    [new HpkeError('h'), grpc.status.UNAUTHENTICATED],
    [new SessionError('s'), grpc.status.UNAUTHENTICATED],
    [new SignatureError('g'), grpc.status.UNAUTHENTICATED],
    [new AttestationError('bad_signature', 'a'), grpc.status.UNAUTHENTICATED],
    [new TransportError('t', grpc.status.RESOURCE_EXHAUSTED), grpc.status.RESOURCE_EXHAUSTED],
    [new RpcError('r', grpc.status.DEADLINE_EXCEEDED, 'reset'), grpc.status.DEADLINE_EXCEEDED],
    [new IntegrityError('x'), grpc.status.INTERNAL],
    [new Error('untyped'), grpc.status.INTERNAL],
    ['a string', grpc.status.INTERNAL],
  ];
  for (const [e, code] of cases) assert.equal(statusOf(e), code, `${String(e)} -> ${grpc.status[code]}`);

  for (const Cls of [PolicyError, SessionError, SignatureError, InputError, BundleError, StateError, IntegrityError]) {
    const sent = serviceError(new Cls('why'));
    const back = errorFromStatus(sent, 'Command');
    assert.ok(back instanceof Cls, `${Cls.name} comes back as itself`);
    assert.equal(back.message, 'Command: why');
    assert.ok(back.cause instanceof TransportError);
    assert.equal((back.cause as TransportError).code, statusOf(new Cls('why')));
  }
  // no metadata (another server): by code where the code is unambiguous, else a TransportError
  const bare = (code: grpc.status) => Object.assign(new Error('x'), { code, details: 'd', metadata: new grpc.Metadata() });
  assert.ok(errorFromStatus(bare(grpc.status.PERMISSION_DENIED), 'C') instanceof PolicyError);
  assert.ok(errorFromStatus(bare(grpc.status.INVALID_ARGUMENT), 'C') instanceof InputError);
  const fp = errorFromStatus(bare(grpc.status.FAILED_PRECONDITION), 'C');
  assert.ok(fp instanceof TransportError && fp.code === grpc.status.FAILED_PRECONDITION);
  // a class the client does not rebuild keeps its status
  const md = new grpc.Metadata();
  md.set(ERROR_CLASS_KEY, 'SomethingElse');
  const other = errorFromStatus(Object.assign(new Error('x'), { code: grpc.status.UNAUTHENTICATED, details: 'd', metadata: md }), 'C');
  assert.ok(other instanceof TransportError && other.code === grpc.status.UNAUTHENTICATED);
});

test('round trip through the enclave service: a PolicyError raised there arrives as a PolicyError with PERMISSION_DENIED', T, async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-errors-'));
  const root = generateSimRoot();
  const measurement = 'ab'.repeat(32);
  // the accelerator is never dialled by these commands
  const svc = await serveEnclave({ platform: new SimSoftwarePlatform(root, measurement), stateDir: path.join(dir, 'state'), accelerator: '127.0.0.1:1', port: 0, log: () => {} });
  // a contract between two keys; the client is its owner
  const { signedContract, FIX } = await import('./world.js');
  const { obfuscateWeights, writeObfuscation } = await import('../src/obfuscate/provider.js');
  const { loadCheckpoint } = await import('../src/model/checkpoint.js');
  writeObfuscation(path.join(dir, 'bundles'), obfuscateWeights(loadCheckpoint(path.join(FIX, 'vocab50257')), { mode: 'sealed', seed: 5 }));
  const ownerKey = await loadOrCreatePartyKey(path.join(dir, 'party.json'));
  const contract = signedContract(await loadOrCreatePartyKey(path.join(dir, 'provider.json')), ownerKey, path.join(dir, 'bundles'));
  const client = new EnclaveClient(`127.0.0.1:${svc.port}`, ownerKey, { verifiers: [new SimSoftwareVerifier(root.publicKey)], allowList: [measurement], contract });
  const rejection = async (p: Promise<unknown>): Promise<unknown> => {
    try {
      await p;
    } catch (e) {
      return e;
    }
    assert.fail('expected a rejection');
  };
  try {
    await client.attest();
    // the provider's command from the owner: the policy refuses
    const denied = await rejection(client.command('fetch_update'));
    assert.ok(denied instanceof PolicyError, `expected a PolicyError, got ${String(denied)}`);
    assert.match(denied.message, /^Command: policy: "fetch_update" is not allowed for owner$/);
    assert.ok(denied.cause instanceof TransportError);
    assert.equal((denied.cause as TransportError).code, grpc.status.PERMISSION_DENIED);
    assert.equal(exitCodeOf(denied), 4);
    // an unknown command is bad input
    const unknown = await rejection(client.command('no_such_command'));
    assert.ok(unknown instanceof InputError, `expected an InputError, got ${String(unknown)}`);
    assert.equal((unknown.cause as TransportError).code, grpc.status.INVALID_ARGUMENT);
    // a sealed message under an unknown session: refused by policy, before any decryption
    const stranger = await rejection(client.rawCommand({ sender: 'AAAA', session: 'nope', sealed: { enc: '', ciphertext: '' } }));
    assert.ok(stranger instanceof SessionError && stranger instanceof PolicyError, `expected a SessionError, got ${String(stranger)}`);
    assert.match(stranger.message, /unknown attestation session/);
    // a request not signed by the key it names: UNAUTHENTICATED, a SignatureError
    const good = await client.sealedCommand(client.attested!, 'status');
    const unsigned = await rejection(client.rawCommand({ ...good, sender: 'AAAA' }));
    assert.ok(unsigned instanceof SignatureError, `expected a SignatureError, got ${String(unsigned)}`);
    assert.equal((unsigned.cause as TransportError).code, grpc.status.UNAUTHENTICATED);
    assert.equal(exitCodeOf(unsigned), 5);
    // a tampered ciphertext under a real session, signed: HPKE fails, UNAUTHENTICATED
    const { signBytes } = await import('../src/tee/signing.js');
    const { commandSignedBytes } = await import('../src/roles/protocol.js');
    const { signature: _s, ...body } = { ...good, id: 'tampered-1', sealed: { enc: Buffer.alloc(32).toString('base64'), ciphertext: Buffer.alloc(40).toString('base64') } };
    const tampered = await rejection(client.rawCommand({ ...body, signature: signBytes(ownerKey.signing, commandSignedBytes(body, client.attested!.transcript)) }));
    assert.ok(tampered instanceof TransportError, `expected a TransportError, got ${String(tampered)}`);
    assert.equal(tampered.code, grpc.status.UNAUTHENTICATED);
    assert.match(tampered.message, /decryption failed/);
  } finally {
    client.close();
    await svc.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('round trip through the accelerator server: a handler\'s error class picks the status the link reports', T, async () => {
  let fail: unknown = null;
  const handler: RequestHandler = {
    handle: () => {
      if (fail) throw fail;
      return { op: 'ack' };
    },
  };
  const srv = await startAcceleratorServer(handler);
  const link = new GrpcAcceleratorLink(`127.0.0.1:${srv.port}`, { deadlineMs: 5_000 });
  try {
    for (const [e, code] of [[new BundleError('no bundle'), grpc.status.FAILED_PRECONDITION], [new PolicyError('not you'), grpc.status.PERMISSION_DENIED], [new Error('plain'), grpc.status.INTERNAL]] as const) {
      fail = e;
      await assert.rejects(link.call({ op: 'reset' }), (err: unknown) => err instanceof RpcError && err.code === code && err.op === 'reset');
    }
    assert.equal(link.failures, 3);
    assert.equal(link.lastFailure?.code, grpc.status.INTERNAL);
  } finally {
    await link.close();
    await srv.close(1_000);
  }
});

for (const tensorChannel of [true, false]) test(`retry (${tensorChannel ? 'tensor channel' : 'gRPC'}): a TransportError UNAVAILABLE is retried, an error that only says "UNAVAILABLE" is not`, T, async () => {
  assert.equal(isUnavailable(new TransportError('down', grpc.status.UNAVAILABLE)), true);
  assert.equal(isUnavailable(new TransportError('slow', grpc.status.DEADLINE_EXCEEDED)), false);
  assert.equal(isUnavailable(new Error('14 UNAVAILABLE: No connection established')), false);
  assert.equal(isUnavailable(Object.assign(new Error('duck'), { code: grpc.status.UNAVAILABLE })), false);

  let calls = 0;
  let script: (n: number) => void = () => {};
  const srv = await startAcceleratorServer({
    handle: () => {
      script(++calls);
      return { op: 'ack' };
    },
  });
  const link = new GrpcAcceleratorLink(`127.0.0.1:${srv.port}`, { deadlineMs: 5_000, tensorChannel, retry: { attempts: 5, baseMs: 5, maxMs: 20 } });
  try {
    // the accelerator says it is unavailable twice (by status), then answers
    script = (n) => {
      if (n <= 2) throw new TransportError('accelerator restarting', grpc.status.UNAVAILABLE);
    };
    assert.equal((await link.call({ op: 'reset' })).op, 'ack');
    assert.equal(calls, 3);
    assert.equal(link.retries, 2);
    // a failure whose text merely contains UNAVAILABLE is INTERNAL: tried once
    calls = 0;
    script = () => {
      throw new Error('UNAVAILABLE: the disk is on fire');
    };
    await assert.rejects(link.call({ op: 'reset' }), (err: unknown) => err instanceof RpcError && err.code === grpc.status.INTERNAL && /UNAVAILABLE: the disk is on fire/.test(err.message));
    assert.equal(calls, 1);
    assert.equal(link.retries, 2);
    assert.equal(link.dataPath, tensorChannel ? 'tensor-channel' : 'grpc');
  } finally {
    await link.close();
    await srv.close(1_000);
  }
});

test('a dead kernel worker fails the call with a WorkerError instead of leaving it waiting; later calls fail fast until reset', T, async () => {
  // the TypeScript kernels' worker pool (the native backend runs these kernels in the addon)
  const prevBackend = backendName();
  setBackend('js');
  try {
    const n = 1 << 21;
    const g = sharedFloat32(n).fill(1);
    assert.equal(sumSquaresParallel(g), n);
    assert.equal(parallelTestHooks.workers(), 2);

    // a kernel that throws in a worker: that call fails, the worker stays in service
    parallelTestHooks.failNext(1);
    assert.throws(() => sumSquaresParallel(g), (e: unknown) => e instanceof WorkerError && e.worker === 1 && /worker 1 failed in sumsq: kernel failure injected/.test(e.message));
    assert.equal(sumSquaresParallel(g), n);

    // worker 0 stuck in a kernel, then killed while this thread waits for it
    parallelTestHooks.busy(0, 20_000);
    parallelTestHooks.terminate(0, 200);
    let t0 = Date.now();
    assert.throws(() => sumSquaresParallel(g), (e: unknown) => e instanceof WorkerError && e.worker === 0 && /worker 0 died during sumsq: thread \d+ exited/.test(e.message));
    const took = Date.now() - t0;
    assert.ok(took >= 150 && took < 5_000, `the call failed after ${took} ms`);
    // every later call fails at once, naming the same worker
    t0 = Date.now();
    assert.throws(() => sumSquaresParallel(g), (e: unknown) => e instanceof WorkerError && e.worker === 0 && /resetParallelPool/.test(e.message));
    assert.ok(Date.now() - t0 < 1_000);
    // small buffers never used the pool, and still work
    assert.equal(sumSquaresParallel(sharedFloat32(64).fill(2)), 256);

    // a fresh pool; a worker that dies between calls is noticed by the next one
    await resetParallelPool();
    assert.equal(sumSquaresParallel(g), n);
    parallelTestHooks.terminate(1, 0);
    for (let i = 0; i < 250 && !parallelTestHooks.dead(1); i++) await new Promise((r) => setTimeout(r, 20));
    assert.ok(parallelTestHooks.dead(1), 'the supervisor marked worker 1 dead');
    assert.throws(() => sumSquaresParallel(g), (e: unknown) => e instanceof WorkerError && e.worker === 1 && /worker 1 died between calls/.test(e.message));
    await resetParallelPool();
    assert.equal(sumSquaresParallel(g), n);
    await resetParallelPool();
  } finally {
    setBackend(prevBackend);
  }
});

test('the CLI\'s exit status follows the error class', () => {
  assert.equal(exitCodeOf(new InputError('x')), 2);
  assert.equal(exitCodeOf(new BundleError('x')), 3);
  assert.equal(exitCodeOf(new PolicyError('x')), 4);
  assert.equal(exitCodeOf(new StateError('x')), 4);
  assert.equal(exitCodeOf(new IntegrityError('x')), 5);
  assert.equal(exitCodeOf(new SealError('auth_failed', 'x')), 5);
  assert.equal(exitCodeOf(new RpcError('x', grpc.status.UNAVAILABLE, 'reset')), 6);
  assert.equal(exitCodeOf(new WorkerError('x', 0)), 6);
  assert.equal(exitCodeOf(new Error('x')), 1);
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'obfuscatune.js'), 'generate', '--model', path.join(os.tmpdir(), 'obf-no-such-model'), '--prompt', 'x'], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' } });
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /^obfuscatune: model ".*" not found/);
});
