/**
 * The tensor channel: the enclave<->accelerator data plane beside gRPC. The same encoded
 * AcceleratorRequest/AcceleratorReply frames as `obfuscatune.Accelerator/Call`, carried
 * length-prefixed over one long-lived TCP connection instead of one HTTP/2 stream per call.
 * gRPC keeps the control plane (health, bundle upload, export) and remains a complete
 * data path on its own; docs/rpc.md gives the measurements that justify the second one.
 *
 * Frame (both directions): a 16-byte header, then `length` payload bytes.
 *   magic   u32 LE  0x4354424f ("OBTC")
 *   id      u32 LE  call id, echoed by the reply
 *   status  u32 LE  request: 0; reply: 0 = ok (payload is a reply frame), otherwise a gRPC
 *                   status code and the payload is the UTF-8 error text
 *   length  u32 LE  payload bytes, at most the configured limit
 * A frame longer than the limit is answered with RESOURCE_EXHAUSTED and its payload skipped
 * unread (the connection stays usable); a wrong magic means the stream lost sync, so the
 * peer closes the connection.
 * Calls are answered in order, one at a time (the accelerator's state depends on order).
 *
 * Peer authentication (when the server is given `authenticate`): a new connection must
 * first prove who it is, once. The client sends a frame with status AUTH_HELLO and gets a
 * fresh 32-byte challenge back; it answers with status AUTH_PROOF and a proof of the
 * challenge (the enclave: attestation evidence over it, see docs/deployment.md); only then
 * are request frames served. Anything else first closes the connection with
 * UNAUTHENTICATED. The frames after it cost nothing more: the connection is authenticated,
 * not each frame. Unauthenticated connections may send only small frames and must finish
 * within `authTimeoutMs`; the server holds at most `maxConnections` and closes one idle
 * for `idleTimeoutMs` (the client dials again, and authenticates again, on its next call).
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { TransportError } from '../errors.js';
import { statusOf } from './status.js';

export const CHANNEL_MAGIC = 0x4354424f;
export const HEADER_BYTES = 16;
/** request-frame statuses of the authentication handshake ("HELO", "PROF") */
export const AUTH_HELLO = 0x4f4c4548;
export const AUTH_PROOF = 0x464f5250;
export const AUTH_CHALLENGE_BYTES = 32;
/** largest frame an unauthenticated connection may send */
const PRE_AUTH_MAX_BYTES = 1 << 20;

export interface Frame {
  id: number;
  status: number;
  payload: Buffer;
}

export function frameHeader(id: number, status: number, length: number): Buffer {
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt32LE(CHANNEL_MAGIC, 0);
  h.writeUInt32LE(id >>> 0, 4);
  h.writeUInt32LE(status >>> 0, 8);
  h.writeUInt32LE(length >>> 0, 12);
  return h;
}

/**
 * Writes a frame without copying the payload parts (header and parts as one corked write).
 * `flushed` runs once the socket is done with the parts (written, or failed).
 */
export function writeFrame(sock: net.Socket, id: number, status: number, parts: Buffer[], flushed?: () => void): void {
  const length = parts.reduce((n, p) => n + p.length, 0);
  const chunks = [frameHeader(id, status, length), ...parts.filter((p) => p.length > 0)];
  sock.cork();
  // a socket calls write callbacks in order: the last one means every part is done with
  chunks.forEach((c, i) => sock.write(c, i === chunks.length - 1 && flushed ? () => flushed() : undefined));
  process.nextTick(() => sock.uncork());
}

/** Why a byte stream stopped being a frame stream. */
export class FramingError extends TransportError {
  constructor(message: string, code: number, readonly id: number | null) {
    super(message, code);
  }
}

/** Where a frame's payload is received: a fresh buffer, or one lent by a pool (released by the consumer). */
export type PayloadAlloc = (length: number, id: number) => Buffer;

/** Reads below this many payload bytes go through the staging buffer rather than straight into the payload. */
const DIRECT_MIN = 64 << 10;

/**
 * Incremental frame parser. Two ways to feed it:
 * - `push(chunk)`: socket chunks (each payload is copied once out of them);
 * - `readTarget()` / `didRead(n, buf)`, for a socket's `onread`: while a large payload is
 *   incomplete the next read lands straight in it (no copy at all); otherwise in the
 *   staging buffer, whose bytes are then parsed like a pushed chunk.
 * Payloads come from `alloc` (default: a fresh buffer), 8-byte aligned, so tensors decode as
 * zero-copy views.
 */
export class FrameReader {
  private readonly head = Buffer.alloc(HEADER_BYTES);
  private headFill = 0;
  private header: { id: number; status: number; length: number } | null = null;
  private payload: Buffer | null = null;
  private filled = 0;
  private dead = false;
  /** payload bytes of an oversized frame still to discard */
  private skip = 0;
  private staging: Buffer | null = null;

  constructor(
    /** frame size limit (may be raised later, e.g. once a connection is authenticated) */
    public maxBytes: number,
    private readonly onFrame: (f: Frame) => void,
    private readonly onOversized: (e: FramingError) => void,
    private readonly alloc: PayloadAlloc = (n) => Buffer.allocUnsafeSlow(n),
    private readonly stagingBytes = 4 << 20,
  ) {}

  /** The buffer the next socket read should fill. */
  readTarget(): Buffer {
    if (!this.dead && this.header && this.header.length - this.filled >= DIRECT_MIN) return this.payload!.subarray(this.filled);
    return (this.staging ??= Buffer.allocUnsafeSlow(this.stagingBytes));
  }

  /** A socket read put `n` bytes at the start of `buf` (what `readTarget` returned). */
  didRead(n: number, buf: Uint8Array): FramingError | null {
    if (this.dead) return null;
    if (this.payload && buf.buffer === this.payload.buffer && buf.byteOffset === this.payload.byteOffset + this.filled) {
      this.filled += n;
      if (this.filled === this.header!.length) this.emit();
      return null;
    }
    return this.push(Buffer.from(buf.buffer, buf.byteOffset, n));
  }

  private emit(): void {
    const f = { id: this.header!.id, status: this.header!.status, payload: this.payload! };
    this.header = null;
    this.payload = null;
    this.onFrame(f);
  }

  /** Returns a FramingError when the stream is unusable from here on (the caller closes it). */
  push(chunk: Buffer): FramingError | null {
    let off = 0;
    while (!this.dead && off < chunk.length) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, chunk.length - off);
        this.skip -= k;
        off += k;
        continue;
      }
      if (!this.header) {
        const k = Math.min(HEADER_BYTES - this.headFill, chunk.length - off);
        chunk.copy(this.head, this.headFill, off, off + k);
        this.headFill += k;
        off += k;
        if (this.headFill < HEADER_BYTES) break;
        this.headFill = 0;
        const magic = this.head.readUInt32LE(0);
        const id = this.head.readUInt32LE(4);
        if (magic !== CHANNEL_MAGIC) {
          this.dead = true;
          return new FramingError(`bad frame magic 0x${magic.toString(16).padStart(8, '0')} (not a tensor-channel peer, or the stream lost sync)`, grpc.status.INVALID_ARGUMENT, null);
        }
        const length = this.head.readUInt32LE(12);
        if (length > this.maxBytes) {
          this.skip = length;
          this.onOversized(new FramingError(`frame of ${length} bytes exceeds the ${this.maxBytes}-byte limit`, grpc.status.RESOURCE_EXHAUSTED, id));
          continue;
        }
        this.header = { id, status: this.head.readUInt32LE(8), length };
        this.payload = this.alloc(length, id);
        this.filled = 0;
      }
      const k = Math.min(this.header.length - this.filled, chunk.length - off);
      chunk.copy(this.payload!, this.filled, off, off + k);
      this.filled += k;
      off += k;
      if (this.filled === this.header.length) this.emit();
    }
    return null;
  }

  /** stops parsing (after a close) */
  stop(): void {
    this.dead = true;
    this.payload = null;
    this.staging = null;
  }
}

/**
 * Reusable buffers for the accelerator's side of the data plane: request payloads and reply
 * tensors are dead once the reply is written (the accelerator copies what it keeps), so a
 * few buffers serve every call instead of fresh ones whose pages the kernel must zero and
 * the garbage collector must trace. Only buffers lent by `take` are taken back by `release`.
 */
export class BufferPool {
  private free: ArrayBuffer[] = [];
  // weak: a buffer whose write never completed (a dropped peer) is simply collected
  private lent = new WeakSet<ArrayBuffer>();
  private freeBytes = 0;

  /** `exact`: buffers of exactly the asked size (for sizes that recur), else rounded up to a power of two */
  constructor(private readonly maxFreeBytes = 256 << 20, private readonly exact = false) {}

  /** A buffer of `length` bytes (8-byte aligned, contents undefined). */
  take(length: number): Buffer {
    let best = -1;
    for (let i = 0; i < this.free.length; i++) {
      const b = this.free[i];
      if (b.byteLength >= length && (best < 0 || b.byteLength < this.free[best].byteLength)) best = i;
    }
    let ab: ArrayBuffer;
    if (best >= 0) {
      ab = this.free.splice(best, 1)[0];
      this.freeBytes -= ab.byteLength;
    } else {
      // exact, or rounded up to a power of two so that nearby sizes share buffers
      ab = Buffer.allocUnsafeSlow(this.exact ? Math.max(length, 8) : 2 ** Math.ceil(Math.log2(Math.max(length, 4096)))).buffer as ArrayBuffer;
    }
    this.lent.add(ab);
    return Buffer.from(ab, 0, length);
  }

  /** Gives back the buffer under a view of one from `take`; any other view is ignored. */
  release(view: ArrayBufferView): void {
    const ab = view.buffer as ArrayBuffer;
    if (!this.lent.delete(ab)) return;
    if (this.freeBytes + ab.byteLength > this.maxFreeBytes) return; // let it go
    this.free.push(ab);
    this.freeBytes += ab.byteLength;
  }
}

/**
 * `onread` options that read a socket into `reader` (no per-read allocation; large payloads
 * land in place).
 */
export function onreadOptions(reader: () => FrameReader | null, onError: (e: FramingError) => void): net.OnReadOpts {
  return {
    buffer: () => reader()?.readTarget() ?? Buffer.allocUnsafe(64 << 10),
    callback: (n: number, buf: Uint8Array) => {
      const r = reader();
      const err = r ? r.didRead(n, buf) : null;
      if (err) onError(err);
      return true;
    },
  };
}

/**
 * An accepted socket re-wrapped so that it reads with `onread` as well (Node offers
 * `onread` only when dialling). Needs the server's `pauseOnConnect` so that no byte was read
 * by the original wrapper; falls back to that wrapper's 'data' events if the handle is not
 * accessible.
 */
function adoptWithOnread(sock: net.Socket, onread: net.OnReadOpts): net.Socket | null {
  const handle = (sock as unknown as { _handle?: unknown })._handle;
  if (!handle) return null;
  try {
    const s = new net.Socket({ handle, onread } as net.SocketConstructorOpts & { handle: unknown; onread: net.OnReadOpts });
    s.resume();
    return s;
  } catch {
    return null;
  }
}

export interface ChannelServerOptions {
  host: string;
  /** 0 picks an ephemeral port */
  port: number;
  maxBytes: number;
  log: (line: string) => void;
  /** answers one request payload with the parts of a reply payload, or throws a ChannelRefusal */
  answer: (payload: Buffer) => Promise<Buffer[]>;
  /** counts a refusal made by the channel itself (an oversized frame); returns the message */
  refused: (message: string) => string;
  /** request payloads are read into buffers lent by this pool; after a reply is written, its request and reply buffers go back */
  pool?: BufferPool;
  /** when set, every connection must first prove itself (see the file's comment); throws to refuse */
  authenticate?: (challenge: Buffer, proof: Buffer) => Promise<void>;
  /** ms an unauthenticated connection has to finish the handshake (default 10 s) */
  authTimeoutMs?: number;
  /** connections held at once; more are closed at once (default 8) */
  maxConnections?: number;
  /** a connection with no frame for this long is closed (default 10 minutes; 0: never) */
  idleTimeoutMs?: number;
}

/** A refusal the server sends back as an error frame. */
export class ChannelRefusal extends TransportError {
  constructor(code: number, message: string, options?: { cause?: unknown }) {
    super(message, code, options);
  }
}

export async function startChannelServer(o: ChannelServerOptions): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const maxConnections = o.maxConnections ?? 8;
  const server = net.createServer({ pauseOnConnect: true }, (accepted) => {
    const peer = `${accepted.remoteAddress}:${accepted.remotePort}`;
    if (sockets.size >= maxConnections) {
      o.log(`tensor channel: refusing ${peer}: ${maxConnections} connections already open`);
      accepted.destroy();
      return;
    }
    const pool = o.pool ?? new BufferPool();
    let sock: net.Socket = accepted;
    // replies leave in request order even when a refusal is immediate and an answer is queued
    let order: Promise<void> = Promise.resolve();
    const reply = (id: number, result: Promise<Buffer[]>, request?: Buffer) => {
      const done = (out?: Buffer[]) => {
        if (request) pool.release(request);
        for (const p of out ?? []) pool.release(p);
      };
      order = order.then(() => result.then(
        (out) => { if (!sock.destroyed) writeFrame(sock, id, 0, out, () => done(out)); else done(out); },
        (e) => {
          const code = statusOf(e);
          if (!sock.destroyed) writeFrame(sock, id, code, [Buffer.from((e as Error)?.message ?? String(e), 'utf8')], done);
          else done();
        },
      ));
    };
    const close = (why: string) => {
      o.log(`tensor channel: closing ${peer}: ${why}`);
      sock.destroy();
    };
    // the handshake, when the server authenticates its peers: one HELLO, one PROOF, then frames
    let authed = !o.authenticate;
    let challenge: Buffer | null = null;
    let authTimer: NodeJS.Timeout | null = null;
    // a refused handshake is answered with UNAUTHENTICATED, then the connection ends
    const refusal = (why: string) => {
      o.log(`tensor channel: ${peer}: ${why}`);
      return new ChannelRefusal(grpc.status.UNAUTHENTICATED, `tensor channel: ${why}`);
    };
    const endAfterReplies = () => { order = order.then(() => { sock.end(); }); };
    const handshake = (f: Frame) => {
      if (f.status === AUTH_HELLO && !challenge) {
        challenge = randomBytes(AUTH_CHALLENGE_BYTES);
        reply(f.id, Promise.resolve([challenge]));
      } else if (f.status === AUTH_PROOF && challenge) {
        reply(f.id, o.authenticate!(challenge, Buffer.from(f.payload)).then(() => {
          authed = true;
          reader.maxBytes = o.maxBytes;
          if (authTimer) clearTimeout(authTimer);
          return [Buffer.from('ok')];
        }, (e: unknown) => {
          endAfterReplies();
          throw refusal(`authentication refused: ${(e as Error)?.message ?? e}`);
        }));
      } else {
        reply(f.id, Promise.reject(refusal('this accelerator serves only its authenticated enclave (authenticate the connection first)')));
        endAfterReplies();
      }
    };
    const reader: FrameReader = new FrameReader(authed ? o.maxBytes : Math.min(o.maxBytes, PRE_AUTH_MAX_BYTES), (f) => {
      if (!authed) return handshake(f);
      reply(f.id, o.answer(f.payload), f.payload);
    }, (e) => {
      o.log(`tensor channel: ${peer}: ${e.message}`);
      reply(e.id!, Promise.reject(new ChannelRefusal(e.code, o.refused(e.message))));
    }, (n) => (authed ? pool.take(n) : Buffer.allocUnsafeSlow(n)));
    const lost = (err: FramingError) => close(err.message);
    // requests are read with onread: large payloads straight into pooled buffers
    sock = adoptWithOnread(accepted, onreadOptions(() => reader, lost)) ?? accepted;
    if (sock === accepted) {
      sock.on('data', (chunk: Buffer) => {
        const err = reader.push(chunk);
        if (err) lost(err);
      });
      sock.resume();
    }
    sockets.add(sock);
    sock.setNoDelay(true);
    const authMs = o.authTimeoutMs ?? 10_000;
    if (!authed) (authTimer = setTimeout(() => close(`no authentication within ${authMs} ms`), authMs)).unref();
    const idle = o.idleTimeoutMs ?? 10 * 60_000;
    if (idle > 0) sock.setTimeout(idle, () => close(`idle for ${idle} ms`));
    sock.on('error', (e) => o.log(`tensor channel: ${peer}: ${e.message}`));
    sock.on('close', () => {
      if (authTimer) clearTimeout(authTimer);
      reader.stop();
      sockets.delete(sock);
    });
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.once('error', (e) => reject(new TransportError(`tensor channel: cannot listen on ${o.host}:${o.port}: ${e.message}`, grpc.status.UNAVAILABLE, { cause: e })));
    server.listen(o.port, o.host, () => resolve((server.address() as net.AddressInfo).port));
  });
  return {
    port,
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

/** A failed channel call, with the gRPC status code that the same failure would have had. */
export class ChannelError extends TransportError {}

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (e: ChannelError) => void;
  timer: NodeJS.Timeout;
  /** where this call's reply payload goes (default: a fresh buffer the caller keeps) */
  alloc?: (length: number) => Buffer;
}

/**
 * The client end: one connection, opened on first use and again after any failure.
 * `connectTo` says where to dial (asked again on every reconnect, since a restarted
 * accelerator may listen on another port). Connection failures surface as UNAVAILABLE,
 * a missed deadline as DEADLINE_EXCEEDED, server refusals with their own codes.
 */
export class ChannelClient {
  private sock: net.Socket | null = null;
  private connecting: Promise<net.Socket> | null = null;
  private pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;

  /**
   * `prove`, when the server authenticates its peers: turns the server's challenge into this
   * side's proof (once per connection).
   */
  constructor(
    private readonly connectTo: () => Promise<{ host: string; port: number }>,
    private readonly maxBytes: number,
    private readonly prove?: (challenge: Buffer) => Promise<Buffer>,
  ) {}

  private async socket(): Promise<net.Socket> {
    if (this.sock && !this.sock.destroyed && this.sock.writable) return this.sock;
    this.connecting ??= this.open().finally(() => { this.connecting = null; });
    return this.connecting;
  }

  private async open(): Promise<net.Socket> {
    let where: { host: string; port: number };
    try {
      where = await this.connectTo();
    } catch (e) {
      throw new ChannelError(`tensor channel: cannot locate the accelerator's channel: ${(e as Error).message}`, grpc.status.UNAVAILABLE, { cause: e });
    }
    // replies are read with onread: large payloads straight into their own (fresh) buffers,
    // the rest through one reused staging buffer; never the default 64 KiB chunks
    let reader: FrameReader | null = null;
    let onError: (e: FramingError) => void = () => {};
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: where.host, port: where.port, onread: onreadOptions(() => reader, (e) => onError(e)) });
      s.once('connect', () => { s.removeAllListeners('error'); resolve(s); });
      s.once('error', (e) => reject(new ChannelError(`tensor channel: cannot connect to ${where.host}:${where.port}: ${e.message}`, grpc.status.UNAVAILABLE, { cause: e })));
    });
    sock.setNoDelay(true);
    const settle = (id: number, f: (p: Pending) => void) => {
      const p = this.pending.get(id);
      if (!p) return; // a reply to a call that already timed out
      this.pending.delete(id);
      clearTimeout(p.timer);
      f(p);
    };
    reader = new FrameReader(this.maxBytes, (f) => settle(f.id, (p) => {
      if (f.status === 0) p.resolve(f.payload);
      else p.reject(new ChannelError(f.payload.toString('utf8'), f.status));
    }), (e) => settle(e.id!, (p) => p.reject(new ChannelError(`reply ${e.message}`, e.code))),
    (length, id) => this.pending.get(id)?.alloc?.(length) ?? Buffer.allocUnsafeSlow(length));
    const fail = (why: string, code: number) => {
      if (this.sock === sock) this.sock = null;
      reader?.stop();
      sock.destroy();
      for (const id of [...this.pending.keys()]) settle(id, (p) => p.reject(new ChannelError(why, code)));
    };
    onError = (err: FramingError) => fail(`tensor channel: malformed reply stream: ${err.message}`, grpc.status.DATA_LOSS);
    sock.on('error', (e) => fail(`tensor channel: connection lost: ${e.message}`, grpc.status.UNAVAILABLE));
    for (const ev of ['end', 'close']) sock.on(ev, () => fail('tensor channel: connection closed by the accelerator', grpc.status.UNAVAILABLE));
    if (this.prove) {
      const handshake = (status: number, payload: Buffer) => this.request(sock, status, [payload], 30_000,
        'tensor channel: authentication handshake: no answer within 30000 ms');
      const challenge = await handshake(AUTH_HELLO, Buffer.alloc(0));
      let proof: Buffer;
      try {
        proof = await this.prove(challenge);
      } catch (e) {
        sock.destroy();
        throw new ChannelError(`tensor channel: cannot prove this side's identity: ${(e as Error).message}`, grpc.status.UNAUTHENTICATED, { cause: e });
      }
      await handshake(AUTH_PROOF, proof);
    }
    this.sock = sock;
    return sock;
  }

  /** One frame on `sock` and its answer (a handshake frame, or a request with `status` 0). */
  private request(sock: net.Socket, status: number, payload: Buffer[], deadlineMs: number, late: string, alloc?: Pending['alloc']): Promise<Buffer> {
    const id = this.nextId;
    this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        // the reply may still come and would desynchronise nothing (ids), but the call's
        // effect on the accelerator is unknown: drop the connection like gRPC drops the stream
        if (this.sock === sock) this.sock = null;
        sock.destroy();
        reject(new ChannelError(late, grpc.status.DEADLINE_EXCEEDED));
      }, deadlineMs);
      this.pending.set(id, { resolve, reject, timer, alloc });
      writeFrame(sock, id, status, payload);
    });
  }

  /** One request payload (as parts) -> its reply payload (received into `alloc`'s buffer when given). */
  async call(payload: Buffer[], deadlineMs: number, alloc?: (length: number) => Buffer): Promise<Buffer> {
    if (this.closed) throw new ChannelError('tensor channel is closed', grpc.status.CANCELLED);
    const length = payload.reduce((n, p) => n + p.length, 0);
    if (length > this.maxBytes) throw new ChannelError(`request frame of ${length} bytes exceeds the ${this.maxBytes}-byte limit`, grpc.status.RESOURCE_EXHAUSTED);
    return this.request(await this.socket(), 0, payload, deadlineMs, `deadline of ${deadlineMs} ms exceeded`, alloc);
  }

  close(): void {
    this.closed = true;
    this.sock?.destroy();
    this.sock = null;
  }
}
