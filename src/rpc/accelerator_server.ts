/**
 * The accelerator's gRPC server: service `obfuscatune.Accelerator`, whose `Call` takes one
 * encoded AcceleratorRequest frame and answers one encoded AcceleratorReply frame, and
 * whose `Health` answers `{"status":"SERVING","served":n,"tensor_port":p}`. The same frames
 * are also served on the tensor channel (tensor_channel.ts), through the same queue. A malformed frame is refused
 * with INVALID_ARGUMENT, an oversized one with RESOURCE_EXHAUSTED; a failing handler
 * answers with the status its error's class maps to (status.ts; INTERNAL for an untyped one). None of these stops the server. Requests are handled one at a time,
 * in arrival order (the accelerator's state, saved inputs and accumulated gradients,
 * depends on that order).
 */
import * as grpc from '@grpc/grpc-js';
import { decodeMessage, encodeMessageParts, type AcceleratorReply, type AcceleratorRequest } from '../protocol/messages.js';
import {
  ACCELERATOR_SERVICE,
  DEFAULT_MAX_MESSAGE_BYTES,
  bindServer,
  describeRequest,
  formatAddress,
  serverOptions,
  type KeepaliveOptions,
} from './grpc.js';
import { BufferPool, ChannelRefusal, startChannelServer } from './tensor_channel.js';
import { statusOf } from './status.js';
import { InputError, TransportError } from '../errors.js';

/** Anything that answers requests: an `Accelerator`, or a test double (may be async). */
export interface RequestHandler {
  handle(req: AcceleratorRequest): AcceleratorReply | Promise<AcceleratorReply>;
  /** extra fields of the Health answer (e.g. which bundle is loaded) */
  info?(): Record<string, unknown>;
  /** lets the server lend reply buffers (it takes them back once each reply is sent) */
  useOutputAllocator?(alloc: ((n: number) => Float32Array) | null): void;
}

export interface AcceleratorServerOptions {
  /** interface to bind (default 127.0.0.1; "0.0.0.0" or "::" for every interface) */
  host?: string;
  /** port to bind; 0 (the default) picks an ephemeral port */
  port?: number;
  /** bound of one message in either direction (default 256 MiB) */
  maxMessageBytes?: number;
  keepalive?: KeepaliveOptions;
  /** default: insecure (the payloads are obfuscated; see docs/rpc.md for TLS) */
  credentials?: grpc.ServerCredentials;
  /** one line per refused or failed call */
  log?: (line: string) => void;
  /** registers further services on the same server (e.g. the provider's bundle upload) */
  addServices?: (server: grpc.Server) => void;
  /** serve the tensor channel beside gRPC (default true; see tensor_channel.ts) */
  tensorChannel?: boolean;
  /** its port (default 0: ephemeral; announced in the Health answer as tensor_port) */
  tensorPort?: number;
  /**
   * Serve only an authenticated peer: every tensor-channel connection proves itself once
   * (tensor_channel.ts; `verify` throws to refuse), and `Call` over gRPC is refused, since
   * its calls carry no proof. Needs the tensor channel.
   */
  peerAuth?: { verify(challenge: Buffer, proof: Buffer): Promise<void>; authTimeoutMs?: number };
  /** tensor-channel connections held at once (default 8) */
  maxConnections?: number;
  /** tensor-channel connections idle this long are closed (default 10 minutes) */
  idleTimeoutMs?: number;
}

export interface AcceleratorServer {
  /** the bound port (the ephemeral one when asked for port 0) */
  port: number;
  host: string;
  /** "host:port" a client can dial */
  address: string;
  server: grpc.Server;
  /** the tensor channel's port (null when it is off) */
  tensorPort: number | null;
  /** calls answered with a reply frame */
  readonly served: number;
  /** calls refused (malformed, oversized, handler failure, cancelled while queued) */
  readonly rejected: number;
  /** Stops accepting calls, lets in-flight ones finish for up to `graceMs` (default 5 s), then forces. */
  close(graceMs?: number): Promise<void>;
}

const REQUEST_OPS: ReadonlySet<string> = new Set([
  'linear_forward', 'linear_backward', 'apply_update', 'grad_sq_norm', 'reset', 'checkpoint_save', 'checkpoint_load',
]);

export async function startAcceleratorServer(acc: RequestHandler, opts: AcceleratorServerOptions = {}): Promise<AcceleratorServer> {
  const host = opts.host ?? '127.0.0.1';
  const wantPort = opts.port ?? 0;
  if (!Number.isInteger(wantPort) || wantPort < 0 || wantPort > 65535) throw new InputError(`accelerator server: invalid port ${wantPort}`);
  const maxBytes = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  if (opts.peerAuth && opts.tensorChannel === false) throw new InputError('accelerator server: peer authentication needs the tensor channel');
  const server = new grpc.Server(serverOptions({ maxMessageBytes: maxBytes, keepalive: opts.keepalive }));
  const log = opts.log ?? (() => {});
  let served = 0;
  // request payloads (tensor channel) and reply tensors live in reused buffers: each goes
  // back to the pool once its reply is on the wire
  const pool = new BufferPool();
  acc.useOutputAllocator?.((n) => new Float32Array(pool.take(4 * n).buffer, 0, n));
  let rejected = 0;
  // one request at a time, in arrival order
  let tail: Promise<void> = Promise.resolve();

  /** Counts and logs a refused call; the refusal carries the gRPC status. */
  const refusal = (code: grpc.status, details: string, cause?: unknown): ChannelRefusal => {
    rejected++;
    log(`accelerator server: ${grpc.status[code]}: ${details}`);
    return new ChannelRefusal(code, details, { cause });
  };

  /**
   * One request frame -> one reply frame, queued behind every earlier request (both data
   * paths share the queue). Refusals throw a ChannelRefusal.
   */
  const answer = (frame: Buffer, cancelled: () => boolean = () => false): Promise<Buffer[]> => {
    if (frame.length > maxBytes) return Promise.reject(refusal(grpc.status.RESOURCE_EXHAUSTED, `request frame of ${frame.length} bytes exceeds the ${maxBytes}-byte limit`));
    let req: AcceleratorRequest;
    try {
      const decoded = decodeMessage(frame, maxBytes);
      if (!REQUEST_OPS.has(decoded.op)) throw new InputError(`"${decoded.op}" is not a request op`);
      req = decoded as AcceleratorRequest;
    } catch (e) {
      return Promise.reject(refusal(grpc.status.INVALID_ARGUMENT, `malformed request frame: ${(e as Error).message}`, e));
    }
    const what = describeRequest(req);
    const run = async (): Promise<Buffer[]> => {
      if (cancelled()) throw refusal(grpc.status.CANCELLED, `${what} cancelled before it ran`);
      let rep: AcceleratorReply;
      try {
        rep = await acc.handle(req);
      } catch (e) {
        throw refusal(statusOf(e), `${what} failed in the accelerator: ${(e as Error)?.message ?? String(e)}`, e);
      }
      let out: { parts: Buffer[]; length: number };
      try {
        out = encodeMessageParts(rep);
      } catch (e) {
        throw refusal(grpc.status.INTERNAL, `${what}: reply could not be encoded: ${(e as Error).message}`, e);
      }
      if (out.length > maxBytes) throw refusal(grpc.status.RESOURCE_EXHAUSTED, `${what}: reply frame of ${out.length} bytes exceeds the ${maxBytes}-byte limit`);
      served++;
      return out.parts;
    };
    const result = tail.then(run);
    tail = result.then(() => undefined, () => undefined);
    return result;
  };

  const onCall = (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>): void => {
    const frame = call.request;
    const fail = (e: unknown) => {
      const r = e instanceof ChannelRefusal ? e : new ChannelRefusal(statusOf(e), `unexpected failure: ${(e as Error)?.message ?? String(e)}`, { cause: e });
      try {
        cb({ code: r.code, details: r.message });
      } catch {
        // the call is already closed
      }
    };
    // compute calls over gRPC carry no proof of the enclave: with peer authentication, only the channel serves them
    if (opts.peerAuth) return fail(refusal(grpc.status.UNAUTHENTICATED, 'this accelerator serves compute calls only to its authenticated enclave, on the tensor channel'));
    if (!Buffer.isBuffer(frame)) return fail(refusal(grpc.status.INVALID_ARGUMENT, 'request is not a byte frame'));
    answer(frame, () => call.cancelled).then((parts) => {
      const whole = Buffer.concat(parts);
      for (const p of parts) pool.release(p);
      cb(null, whole);
    }, fail);
  };

  const channel = opts.tensorChannel === false ? null : await startChannelServer({
    host, port: opts.tensorPort ?? 0, maxBytes, log, answer: (f) => answer(f), pool,
    authenticate: opts.peerAuth ? (c, p) => opts.peerAuth!.verify(c, p) : undefined, authTimeoutMs: opts.peerAuth?.authTimeoutMs,
    maxConnections: opts.maxConnections, idleTimeoutMs: opts.idleTimeoutMs,
    refused: (m) => {
      rejected++;
      return `request ${m}`;
    },
  });

  const onHealth = (_call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>): void => {
    cb(null, Buffer.from(JSON.stringify({ status: 'SERVING', served, tensor_port: channel?.port ?? null, ...(acc.info?.() ?? {}) }), 'utf8'));
  };

  server.addService(ACCELERATOR_SERVICE, { Call: onCall, Health: onHealth });
  opts.addServices?.(server);

  const bindTo = formatAddress({ host, port: wantPort });
  let port: number;
  try {
    port = await bindServer(server, bindTo, opts.credentials ?? grpc.ServerCredentials.createInsecure());
  } catch (err) {
    server.forceShutdown();
    void channel?.close();
    throw new TransportError(`accelerator server: cannot listen on ${bindTo}: ${(err as Error).message}`, grpc.status.UNAVAILABLE, { cause: err });
  }

  let closing: Promise<void> | null = null;
  return {
    port,
    host,
    address: formatAddress({ host, port }),
    server,
    tensorPort: channel?.port ?? null,
    get served() {
      return served;
    },
    get rejected() {
      return rejected;
    },
    close(graceMs = 5_000): Promise<void> {
      closing ??= new Promise<void>((resolve) => {
        void channel?.close();
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        timer.unref();
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      return closing;
    },
  };
}
