import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { Accelerator } from '../src/accelerator/accelerator.js';
import { asObfuscated, encodeMessage, type AcceleratorReply, type AcceleratorRequest } from '../src/protocol/messages.js';
import type { CrossingEvent } from '../src/protocol/link.js';
import { LINEARS, linearDims, type LinearName } from '../src/model/block.js';
import type { AcceleratorWeights, ObfLinear } from '../src/protocol/linears.js';
import { Rng } from '../src/tensor/rng.js';
import { startAcceleratorServer, type AcceleratorServer, type RequestHandler } from '../src/rpc/accelerator_server.js';
import { GrpcAcceleratorLink, RpcError, isRetrySafe } from '../src/rpc/accelerator_client.js';
import { formatAddress, parseAddress } from '../src/rpc/grpc.js';
import { randn } from './helpers.js';
import net from 'node:net';
import { once } from 'node:events';
import { frameHeader } from '../src/rpc/tensor_channel.js';

const D = 8;
const T = { timeout: 10_000 };

function tinyWeights(seed: number): AcceleratorWeights {
  const rng = new Rng(seed);
  const layer = {} as Record<LinearName, ObfLinear>;
  for (const name of LINEARS) {
    const [din, dout] = linearDims(name, D);
    layer[name] = { w: randn(din * dout, rng, 0.2), b: randn(dout, rng, 0.1), din, dout };
  }
  return { n_layer: 1, layers: [layer] };
}

function fwd(name: LinearName, rows: number, seed: number, save = false): AcceleratorRequest {
  const [din] = linearDims(name, D);
  return { op: 'linear_forward', layer: 0, name, rows, x: asObfuscated(randn(rows * din, new Rng(seed))), save };
}

/** A port on which nothing listens (bound once, then released). */
async function freePort(): Promise<number> {
  const s = await startAcceleratorServer({ handle: () => ({ op: 'ack' }) });
  const p = s.port;
  await s.close();
  return p;
}

async function rejectsWith(p: Promise<unknown>, code: number, re?: RegExp): Promise<RpcError> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof RpcError, `expected an RpcError, got ${String(err)}`);
  assert.equal(err.code, code, `expected ${grpc.status[code]}, got ${grpc.status[err.code]}: ${err.message}`);
  if (re) assert.match(err.message, re);
  return err;
}

/** Runs `body` with a started server and a link to it; always closes both. */
async function withServer(
  handler: RequestHandler,
  body: (link: GrpcAcceleratorLink, srv: AcceleratorServer) => Promise<void>,
  serverOpts: Parameters<typeof startAcceleratorServer>[1] = {},
  linkOpts: ConstructorParameters<typeof GrpcAcceleratorLink>[1] = {},
): Promise<void> {
  const srv = await startAcceleratorServer(handler, { host: '127.0.0.1', port: 0, ...serverOpts });
  const link = new GrpcAcceleratorLink(`127.0.0.1:${srv.port}`, { deadlineMs: 5_000, ...linkOpts });
  try {
    await body(link, srv);
  } finally {
    await link.close();
    await srv.close(1_000);
  }
}

test('parseAddress / formatAddress', () => {
  assert.deepEqual(parseAddress('10.0.0.2:7000'), { host: '10.0.0.2', port: 7000 });
  assert.deepEqual(parseAddress('grpc://acc.internal:443'), { host: 'acc.internal', port: 443 });
  assert.deepEqual(parseAddress('9000'), { host: '127.0.0.1', port: 9000 });
  assert.deepEqual(parseAddress(':9000', '0.0.0.0'), { host: '0.0.0.0', port: 9000 });
  assert.deepEqual(parseAddress('[::1]:5'), { host: '::1', port: 5 });
  assert.deepEqual(parseAddress('acc', '127.0.0.1', 1234), { host: 'acc', port: 1234 });
  assert.equal(formatAddress({ host: '::1', port: 5 }), '[::1]:5');
  assert.equal(formatAddress({ host: 'h', port: 0 }), 'h:0');
  assert.throws(() => parseAddress('h:70000'), /out of range/);
  assert.throws(() => parseAddress('h:x'), /invalid port/);
  assert.throws(() => parseAddress('ftp://h:1'), /unsupported address scheme/);
  assert.throws(() => parseAddress(''), /empty/);
});

for (const tensorChannel of [true, false]) test(`requests over ${tensorChannel ? 'the tensor channel' : 'gRPC only'} give exactly what Accelerator.handle gives`, T, async () => {
  const direct = new Accelerator(tinyWeights(7));
  const remote = new Accelerator(tinyWeights(7));
  const rows = 3;
  const reqs: AcceleratorRequest[] = [];
  for (const [i, name] of LINEARS.entries()) reqs.push(fwd(name, rows, 100 + i, true));
  for (const [i, name] of LINEARS.entries()) {
    const [, dout] = linearDims(name, D);
    reqs.push({ op: 'linear_backward', layer: 0, name, rows, dy: asObfuscated(randn(rows * dout, new Rng(200 + i))), input: true, weight: true });
  }
  reqs.push({ op: 'grad_sq_norm' });
  reqs.push({ op: 'apply_update', lr: 0.1, momentum: 0.9, gradScale: 0.5 });
  for (const [i, name] of LINEARS.entries()) reqs.push(fwd(name, 2, 300 + i));
  // a request the accelerator refuses: an error reply, not a transport failure
  reqs.push({ op: 'linear_forward', layer: 0, name: 'qkv', rows: 2, x: asObfuscated(new Float32Array(5)) });

  const events: CrossingEvent[] = [];
  const wants: AcceleratorReply[] = [];
  await withServer(remote, async (link) => {
    link.observers.push((e) => events.push(e));
    assert.equal(link.dataPath, tensorChannel ? 'undecided' : 'grpc');
    for (const req of reqs) {
      const want = direct.handle(req);
      wants.push(want);
      const got = await link.call(req);
      assert.deepEqual(got, want, `reply to ${req.op} differs`);
    }
    assert.equal(link.stats.messages, reqs.length);
    assert.ok(link.stats.bytes > 0);
    assert.equal((await link.health()).served, reqs.length);
    assert.equal(link.dataPath, tensorChannel ? 'tensor-channel' : 'grpc');
  }, {}, { tensorChannel });
  assert.equal(remote.served, reqs.length);
  // the observers saw every tensor that crossed, in both directions
  const sent = reqs.filter((r) => r.op === 'linear_forward' || r.op === 'linear_backward').length;
  const tensorReplies = wants.filter((w): w is Extract<AcceleratorReply, { op: 'tensor' }> => w.op === 'tensor');
  assert.equal(events.filter((e) => e.direction === 'to_accelerator').length, sent);
  const back = events.filter((e) => e.direction === 'to_enclave');
  assert.equal(back.length, tensorReplies.length);
  back.forEach((e, i) => assert.deepEqual(e.data, tensorReplies[i].data));
  assert.ok(wants.at(-1)?.op === 'error');
});

test('scratch replies: received into reused buffers once released, intact until then; observed calls stay fresh', T, async () => {
  const direct = new Accelerator(tinyWeights(9));
  await withServer(new Accelerator(tinyWeights(9)), async (link) => {
    const a = await link.call(fwd('fc', 3, 1), { scratch: true });
    assert.equal(a.op, 'tensor');
    const bufA = (a as Extract<AcceleratorReply, { op: 'tensor' }>).data.buffer;
    const b = await link.call(fwd('fc', 3, 2), { scratch: true });
    const bufB = (b as Extract<AcceleratorReply, { op: 'tensor' }>).data.buffer;
    assert.notEqual(bufB, bufA, 'not released yet: a second buffer');
    assert.deepEqual(a, direct.handle(fwd('fc', 3, 1)), 'the first reply is intact after the second');
    link.releaseScratch();
    const c = await link.call(fwd('fc', 3, 3), { scratch: true });
    const bufC = (c as Extract<AcceleratorReply, { op: 'tensor' }>).data.buffer;
    assert.ok(bufC === bufA || bufC === bufB, 'after releaseScratch a buffer is reused');
    assert.deepEqual(c, direct.handle(fwd('fc', 3, 3)));
    const d = await link.call(fwd('fc', 3, 4));
    assert.ok(![bufA, bufB].includes((d as Extract<AcceleratorReply, { op: 'tensor' }>).data.buffer as ArrayBuffer), 'a call without scratch gets a fresh buffer');
  });
});

test('a malformed frame gets INVALID_ARGUMENT and the server keeps serving', T, async () => {
  const acc = new Accelerator(tinyWeights(1));
  await withServer(acc, async (link, srv) => {
    const junk = randomBytes(256);
    junk.writeUInt32LE(0xfffffff0, 0);
    await rejectsWith(link.callRaw(junk), grpc.status.INVALID_ARGUMENT, /malformed request frame: message truncated/);
    await rejectsWith(link.callRaw(randomBytes(3)), grpc.status.INVALID_ARGUMENT, /malformed request frame/);
    const badJson = Buffer.concat([Buffer.from([8, 0, 0, 0]), Buffer.from('{"op":xx')]);
    await rejectsWith(link.callRaw(badJson), grpc.status.INVALID_ARGUMENT, /not valid JSON/);
    // a reply frame is not a request
    await rejectsWith(link.callRaw(encodeMessage({ op: 'ack' })), grpc.status.INVALID_ARGUMENT, /not a request op/);
    const rep = await link.call(fwd('qkv', 2, 5));
    assert.equal(rep.op, 'tensor');
    assert.deepEqual(rep, acc.handle(fwd('qkv', 2, 5)));
    assert.equal(srv.rejected, 4);
    assert.equal(srv.served, 1);
  });
});

test('an oversized message is refused with RESOURCE_EXHAUSTED and the server keeps serving', T, async () => {
  const acc = new Accelerator(tinyWeights(2));
  await withServer(acc, async (link) => {
    const big = fwd('qkv', 4096, 9); // 4096 x 8 float32 = 128 KiB > 64 KiB
    await rejectsWith(link.call(big), grpc.status.RESOURCE_EXHAUSTED, /linear_forward h\.0\.qkv.*RESOURCE_EXHAUSTED/);
    const rep = await link.call(fwd('fc', 2, 3));
    assert.equal(rep.op, 'tensor');
    assert.equal((await link.health()).status, 'SERVING');
  }, { maxMessageBytes: 64 * 1024 });

  // the client's own limit refuses before sending
  await withServer(acc, async (link) => {
    await rejectsWith(link.call(fwd('qkv', 4096, 9)), grpc.status.RESOURCE_EXHAUSTED, /linear_forward h\.0\.qkv/);
    assert.equal((await link.call(fwd('qkv', 2, 3))).op, 'tensor');
  }, {}, { maxMessageBytes: 64 * 1024 });
});

test('deadline exceeded is reported with the op, the linear and the status', T, async () => {
  const slow: RequestHandler = {
    handle: (req) => new Promise<AcceleratorReply>((r) => setTimeout(() => r(req.op === 'reset' ? { op: 'ack' } : { op: 'ack', value: 1 }), 300)),
  };
  await withServer(slow, async (link) => {
    link.deadlineMs = 100;
    const t0 = Date.now();
    const err = await rejectsWith(link.call(fwd('attproj', 1, 1)), grpc.status.DEADLINE_EXCEEDED, /linear_forward h\.0\.attproj.*DEADLINE_EXCEEDED/);
    assert.equal(err.op, 'linear_forward');
    assert.ok(Date.now() - t0 < 1_000);
    link.deadlineMs = 2_000;
    assert.deepEqual(await link.call({ op: 'reset' }), { op: 'ack' });
  });
});

test('a handler that throws becomes INTERNAL; the server keeps serving', T, async () => {
  let n = 0;
  const flaky: RequestHandler = {
    handle: async () => {
      if (n++ === 0) throw new Error('boom');
      return { op: 'ack', text: 'ok' };
    },
  };
  await withServer(flaky, async (link) => {
    await rejectsWith(link.call({ op: 'grad_sq_norm' }), grpc.status.INTERNAL, /grad_sq_norm.*INTERNAL.*boom/);
    assert.deepEqual(await link.call({ op: 'grad_sq_norm' }), { op: 'ack', text: 'ok' });
  });
});

test('health answers SERVING with the count of served calls', T, async () => {
  await withServer(new Accelerator(tinyWeights(3)), async (link) => {
    const h = await link.health();
    assert.ok(typeof h.tensor_port === 'number' && h.tensor_port > 0);
    assert.deepEqual(h, { status: 'SERVING', served: 0, manifest_sha256: null, tensor_port: h.tensor_port });
    await link.call({ op: 'reset' });
    assert.deepEqual(await link.health(), { status: 'SERVING', served: 1, manifest_sha256: null, tensor_port: h.tensor_port });
  });
  // a server without the channel: the link keeps to gRPC
  await withServer(new Accelerator(tinyWeights(3)), async (link) => {
    assert.equal((await link.health()).tensor_port, null);
    assert.equal((await link.call(fwd('fc', 2, 3))).op, 'tensor');
    assert.equal(link.dataPath, 'grpc');
  }, { tensorChannel: false });
});

test('tensor channel: a peer that breaks the framing is dropped, other connections keep being served', T, async () => {
  const acc = new Accelerator(tinyWeights(5));
  const logs: string[] = [];
  await withServer(acc, async (link, srv) => {
    assert.equal((await link.call(fwd('qkv', 2, 1))).op, 'tensor');
    const bad = net.connect({ host: '127.0.0.1', port: srv.tensorPort! });
    await once(bad, 'connect');
    bad.write(randomBytes(64)); // no magic
    await once(bad, 'close');
    assert.ok(logs.some((l) => /bad frame magic/.test(l)), logs.join('\n'));
    // a well-framed header announcing a huge payload is refused without reading it
    const big = net.connect({ host: '127.0.0.1', port: srv.tensorPort! });
    await once(big, 'connect');
    big.write(frameHeader(7, 0, 2 ** 31));
    const [reply] = (await once(big, 'data')) as [Buffer];
    assert.equal(reply.readUInt32LE(4), 7);
    assert.equal(reply.readUInt32LE(8), grpc.status.RESOURCE_EXHAUSTED);
    assert.match(reply.subarray(16).toString('utf8'), /exceeds the \d+-byte limit/);
    big.destroy();
    assert.deepEqual(await link.call(fwd('fc', 2, 4)), acc.handle(fwd('fc', 2, 4)));
    assert.equal(link.dataPath, 'tensor-channel');
  }, { log: (l) => logs.push(l) });
});

test('tensor channel: the accelerator going away mid-run is UNAVAILABLE, and the link reconnects to its successor', T, async () => {
  const srv1 = await startAcceleratorServer(new Accelerator(tinyWeights(6)), { port: 0 });
  const port = srv1.port;
  const link = new GrpcAcceleratorLink(`127.0.0.1:${port}`, { deadlineMs: 2_000, reconnect: { initialMs: 20, maxMs: 100 } });
  try {
    assert.equal((await link.call(fwd('qkv', 2, 1))).op, 'tensor');
    await srv1.close(100);
    await rejectsWith(link.call(fwd('qkv', 2, 1)), grpc.status.UNAVAILABLE);
    const srv2 = await startAcceleratorServer(new Accelerator(tinyWeights(6)), { port });
    try {
      assert.notEqual(srv2.tensorPort, null);
      await link.waitForReady(5_000);
      assert.deepEqual(await link.call(fwd('fc', 3, 2)), new Accelerator(tinyWeights(6)).handle(fwd('fc', 3, 2)));
      assert.equal(link.dataPath, 'tensor-channel');
    } finally {
      await srv2.close(100);
    }
  } finally {
    await link.close();
  }
});

test('waitForReady succeeds when the server starts late', T, async () => {
  const port = await freePort();
  const link = new GrpcAcceleratorLink(`127.0.0.1:${port}`, { deadlineMs: 2_000 });
  let srv: AcceleratorServer | undefined;
  const timer = setTimeout(() => {
    void startAcceleratorServer(new Accelerator(tinyWeights(4)), { port }).then((s) => (srv = s));
  }, 300);
  try {
    const t0 = Date.now();
    const h = await link.waitForReady(5_000);
    assert.equal(h.status, 'SERVING');
    assert.ok(Date.now() - t0 >= 250);
    assert.equal((await link.call(fwd('fcproj', 1, 2))).op, 'tensor');
  } finally {
    clearTimeout(timer);
    await link.close();
    await srv?.close(1_000);
  }
});

test('waitForReady fails cleanly with a timeout when nothing listens', T, async () => {
  const port = await freePort();
  const link = new GrpcAcceleratorLink(`127.0.0.1:${port}`);
  try {
    const t0 = Date.now();
    await rejectsWith(link.waitForReady(400), grpc.status.DEADLINE_EXCEEDED, /not ready after 400 ms.*UNAVAILABLE/);
    const dt = Date.now() - t0;
    assert.ok(dt >= 350 && dt < 3_000, `took ${dt} ms`);
    // a plain call fails fast with UNAVAILABLE, naming the op
    await rejectsWith(link.call({ op: 'reset' }), grpc.status.UNAVAILABLE, /accelerator rpc reset to 127\.0\.0\.1:\d+ failed: UNAVAILABLE/);
  } finally {
    await link.close();
  }
});

test('UNAVAILABLE is retried with backoff for retry-safe requests only', T, async () => {
  assert.equal(isRetrySafe({ op: 'apply_update', lr: 1, momentum: 0, gradScale: 1 }), false);
  assert.equal(isRetrySafe({ op: 'linear_backward', layer: 0, name: 'fc', rows: 1, dy: asObfuscated(new Float32Array(32)), input: true, weight: true }), false);
  assert.equal(isRetrySafe(fwd('fc', 1, 1, true)), true);

  const port = await freePort();
  const link = new GrpcAcceleratorLink(`127.0.0.1:${port}`, { deadlineMs: 2_000, retry: { attempts: 30, baseMs: 20, maxMs: 100 } });
  let srv: AcceleratorServer | undefined;
  try {
    await rejectsWith(link.call({ op: 'apply_update', lr: 0.1, momentum: 0, gradScale: 1 }), grpc.status.UNAVAILABLE, /apply_update.*UNAVAILABLE/);
    assert.equal(link.retries, 0);
    const timer = setTimeout(() => {
      void startAcceleratorServer(new Accelerator(tinyWeights(5)), { port }).then((s) => (srv = s));
    }, 300);
    try {
      const rep = await link.call(fwd('qkv', 1, 4));
      assert.equal(rep.op, 'tensor');
      assert.ok(link.retries > 0);
    } finally {
      clearTimeout(timer);
    }
  } finally {
    await link.close();
    await srv?.close(1_000);
  }
});

test('close() stops cleanly: the link refuses further calls, the server stops listening', T, async () => {
  const srv = await startAcceleratorServer(new Accelerator(tinyWeights(6)));
  const link = new GrpcAcceleratorLink(formatAddress({ host: '127.0.0.1', port: srv.port }), { deadlineMs: 2_000 });
  try {
    assert.equal((await link.call({ op: 'reset' })).op, 'ack');
    await link.close();
    await link.close();
    await rejectsWith(link.call({ op: 'reset' }), grpc.status.CANCELLED, /closed/);
  } finally {
    await srv.close(1_000);
    await srv.close(1_000);
  }
  const again = new GrpcAcceleratorLink(`127.0.0.1:${srv.port}`, { deadlineMs: 1_000 });
  try {
    await rejectsWith(again.health(500), grpc.status.UNAVAILABLE);
  } finally {
    await again.close();
  }
});
