/**
 * The enclave's side of the transport: an `AcceleratorLink` that sends each request as one
 * encoded frame, over the accelerator's tensor channel when it announces one in Health
 * (tensor_channel.ts), else to `obfuscatune.Accelerator/Call`, with a per-call deadline, decodes the reply and shows both to the observers. A call that fails with
 * UNAVAILABLE (accelerator down or restarting) is retried with exponential backoff when
 * the caller asked for it; every other failure rejects with an `RpcError` (a TransportError)
 * naming the op, the linear and the gRPC status. See docs/rpc.md.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { InputError, TransportError } from '../errors.js';
import { observe, type AcceleratorLink, type CallOptions, type Observer } from '../protocol/link.js';
import { decodeMessage, encodeMessageParts, type AcceleratorReply, type AcceleratorRequest } from '../protocol/messages.js';
import { BufferPool, ChannelClient } from './tensor_channel.js';
import {
  ACCELERATOR_SERVICE,
  AcceleratorServiceClient,
  DEFAULT_DEADLINE_MS,
  DEFAULT_MAX_MESSAGE_BYTES,
  clientChannelOptions,
  describeRequest,
  formatAddress,
  parseAddress,
  statusName,
  type Address,
  type KeepaliveOptions,
  type ReconnectOptions,
} from './grpc.js';

export interface RetryOptions {
  /** tries in all, the first included (1 = no retry) */
  attempts: number;
  /** delay before the first retry; doubles on each further one */
  baseMs: number;
  /** cap of the delay */
  maxMs: number;
  /**
   * Retry only requests that are safe to repeat (default true, see `isRetrySafe`). An
   * UNAVAILABLE call may have reached the accelerator before the connection dropped, so
   * repeating `apply_update` or a weight-gradient `linear_backward` could apply it twice.
   */
  safeOnly?: boolean;
}

export interface GrpcLinkOptions {
  /** deadline of each call (default 120 s) */
  deadlineMs?: number;
  /** bound of one message in either direction (default 256 MiB) */
  maxMessageBytes?: number;
  /** retries of calls that fail with UNAVAILABLE (default: none) */
  retry?: RetryOptions;
  keepalive?: KeepaliveOptions;
  /** the channel's own reconnect backoff */
  reconnect?: ReconnectOptions;
  /** default: insecure (see docs/rpc.md for TLS) */
  credentials?: grpc.ChannelCredentials;
  /**
   * Send Call frames over the accelerator's tensor channel when it serves one (default: true
   * with the default insecure credentials, false with TLS ones, since the channel is plain
   * TCP); false keeps every frame on gRPC. Health and the admin services always use gRPC.
   */
  tensorChannel?: boolean;
  /**
   * This side's proof for an accelerator that authenticates its peers: turns the channel's
   * per-connection challenge into a proof (the enclave: attestation evidence over it). Needs
   * the tensor channel.
   */
  prove?: (challenge: Buffer) => Promise<Buffer>;
}

/** The accelerator's Health answer; a malformed optional field reads as null. */
const HealthSchema = z.object({
  status: z.string(),
  served: z.number(),
  /** SHA-256 of the accelerator manifest it serves (null before the provider's upload) */
  manifest_sha256: z.string().nullable().catch(null),
  /** port of its tensor channel (null: none) */
  tensor_port: z.number().int().gt(0).lt(65536).nullable().catch(null),
});

export type HealthStatus = z.infer<typeof HealthSchema>;

/** A failed call: `code` is the gRPC status (grpc.status), `op` the request's op. */
export class RpcError extends TransportError {
  constructor(message: string, code: number, readonly op: string, options?: { cause?: unknown }) {
    super(message, code, options);
  }
}

/** Whether a failed call may be tried again: a TransportError with status UNAVAILABLE, nothing else. */
export function isUnavailable(e: unknown): e is TransportError {
  return e instanceof TransportError && e.code === grpc.status.UNAVAILABLE;
}

/** Whether repeating the request after an ambiguous failure leaves the accelerator as one call would. */
export function isRetrySafe(req: AcceleratorRequest): boolean {
  switch (req.op) {
    case 'apply_update': return false;
    case 'linear_backward': return !req.weight;
    default: return true;
  }
}

const REPLY_OPS: ReadonlySet<string> = new Set(['tensor', 'ack', 'error']);

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Exponential backoff with jitter: attempt 0 -> about base, doubling up to max. */
function backoffMs(attempt: number, baseMs: number, maxMs: number): number {
  const d = Math.min(maxMs, baseMs * 2 ** attempt);
  return Math.round(d * (0.75 + 0.25 * Math.random()));
}

export class GrpcAcceleratorLink implements AcceleratorLink {
  readonly observers: Observer[] = [];
  /** messages and bytes that crossed (encoded frames, both directions) */
  stats = { messages: 0, bytes: 0 };
  /** calls retried after UNAVAILABLE */
  retries = 0;
  /** calls that failed on the transport, and the latest of those failures (see EnclaveService's recovery) */
  failures = 0;
  lastFailure: RpcError | null = null;
  /** "host:port" dialled */
  readonly address: string;
  deadlineMs: number;
  private readonly client: grpc.Client;
  private readonly retry: Required<RetryOptions>;
  private closed = false;
  /** null until the first call has asked Health whether the accelerator serves a channel */
  private channel: ChannelClient | null = null;
  /** scratch replies (see CallOptions): received into reused buffers, all given back by releaseScratch */
  private scratchPool = new BufferPool(4 * 2 ** 30, true);
  private scratchLent: Buffer[] = [];
  private channelWanted: boolean;
  private readonly maxBytes: number;
  private readonly prove?: (challenge: Buffer) => Promise<Buffer>;

  constructor(address: string | Address, opts: GrpcLinkOptions = {}) {
    this.address = formatAddress(typeof address === 'string' ? parseAddress(address) : address);
    this.deadlineMs = opts.deadlineMs ?? DEFAULT_DEADLINE_MS;
    if (!(this.deadlineMs > 0)) throw new InputError(`rpc: deadlineMs must be positive, got ${this.deadlineMs}`);
    const r = opts.retry ?? { attempts: 1, baseMs: 100, maxMs: 5_000 };
    if (!Number.isInteger(r.attempts) || r.attempts < 1) throw new InputError(`rpc: retry.attempts must be an integer >= 1, got ${r.attempts}`);
    if (!(r.baseMs >= 0) || !(r.maxMs >= r.baseMs)) throw new InputError('rpc: retry needs 0 <= baseMs <= maxMs');
    this.retry = { safeOnly: true, ...r };
    // the channel is plain TCP: with TLS credentials, frames stay on the TLS channel unless asked
    // (a proof of this side is made only on the channel)
    this.prove = opts.prove;
    this.channelWanted = this.prove !== undefined || (opts.tensorChannel ?? opts.credentials === undefined);
    this.maxBytes = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.client = new AcceleratorServiceClient(
      this.address,
      opts.credentials ?? grpc.credentials.createInsecure(),
      clientChannelOptions({ maxMessageBytes: this.maxBytes, keepalive: opts.keepalive, reconnect: opts.reconnect }),
    );
  }

  private unary(method: keyof typeof ACCELERATOR_SERVICE, frame: Buffer, deadlineMs: number): Promise<Buffer> {
    const m = ACCELERATOR_SERVICE[method];
    return new Promise<Buffer>((resolve, reject) => {
      this.client.makeUnaryRequest(m.path, m.requestSerialize, m.responseDeserialize, frame, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, value) => {
        // grpc-js reports the status as `code` and the server's text as `details`
        if (err) reject(new TransportError(err.details || err.message, typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN, { cause: err }));
        else if (!Buffer.isBuffer(value)) reject(new TransportError('empty response', grpc.status.INTERNAL));
        else resolve(value);
      });
    });
  }

  /** Which data path Call frames take: "tensor-channel" or "grpc" (known after the first call). */
  get dataPath(): string {
    return this.channel ? 'tensor-channel' : this.channelWanted ? 'undecided' : 'grpc';
  }

  /** One Call frame over the tensor channel when there is one, else over gRPC. */
  private async send(frame: { parts: Buffer[]; length: number }, deadlineMs: number, scratch = false): Promise<Buffer> {
    if (this.channelWanted && !this.channel) {
      const h = await this.health(Math.min(deadlineMs, 5_000));
      if (typeof h.tensor_port === 'number') {
        const host = parseAddress(this.address).host;
        this.channel = new ChannelClient(async () => {
          const again = await this.health(5_000); // a restarted accelerator may use another port
          if (typeof again.tensor_port !== 'number') throw new TransportError('the accelerator no longer serves a tensor channel', grpc.status.UNAVAILABLE);
          return { host, port: again.tensor_port };
        }, this.maxBytes, this.prove);
      } else if (this.prove) {
        throw new TransportError('the accelerator serves no tensor channel, the only path that authenticates this enclave', grpc.status.UNAVAILABLE);
      } else this.channelWanted = false;
    }
    if (!this.channel) return this.unary('Call', Buffer.concat(frame.parts, frame.length), deadlineMs);
    const alloc = scratch ? (n: number) => {
      const b = this.scratchPool.take(n);
      this.scratchLent.push(b);
      return b;
    } : undefined;
    return this.channel.call(frame.parts, deadlineMs, alloc);
  }

  releaseScratch(): void {
    for (const b of this.scratchLent) this.scratchPool.release(b);
    this.scratchLent = [];
  }

  private checkOpen(what: string): void {
    if (this.closed) throw new RpcError(`accelerator rpc ${what}: link to ${this.address} is closed`, grpc.status.CANCELLED, what.split(' ')[0]);
  }

  /**
   * Sends one already-encoded frame to `Call` and returns the raw reply frame (no retry,
   * no observers). `call` is the normal entry point; this one exists for diagnostics.
   */
  async callRaw(frame: Buffer, deadlineMs = this.deadlineMs): Promise<Buffer> {
    this.checkOpen('raw');
    try {
      return await this.unary('Call', frame, deadlineMs);
    } catch (e) {
      throw this.wrap(e, 'raw frame');
    }
  }

  async call(req: AcceleratorRequest, opts: CallOptions = {}): Promise<AcceleratorReply> {
    const what = describeRequest(req);
    this.checkOpen(what);
    const frame = encodeMessageParts(req);
    const mayRetry = !this.retry.safeOnly || isRetrySafe(req);
    let back: Buffer;
    for (let attempt = 0; ; attempt++) {
      try {
        // observers may keep what they see: their replies stay in fresh buffers
        back = await this.send(frame, this.deadlineMs, opts.scratch === true && this.observers.length === 0);
        break;
      } catch (e) {
        const retryable = isUnavailable(e) && mayRetry && attempt + 1 < this.retry.attempts && !this.closed;
        if (!retryable) {
          const failed = this.wrap(e, what, attempt + 1);
          this.failures++;
          this.lastFailure = failed;
          throw failed;
        }
        this.retries++;
        await sleep(backoffMs(attempt, this.retry.baseMs, this.retry.maxMs));
      }
    }
    let rep: AcceleratorReply;
    try {
      const decoded = decodeMessage(back);
      if (!REPLY_OPS.has(decoded.op)) throw new TransportError(`"${decoded.op}" is not a reply op`, grpc.status.DATA_LOSS);
      rep = decoded as AcceleratorReply;
    } catch (e) {
      throw new RpcError(`accelerator rpc ${what} to ${this.address}: malformed reply frame: ${(e as Error).message}`, grpc.status.DATA_LOSS, req.op, { cause: e });
    }
    this.stats.messages++;
    this.stats.bytes += frame.length + back.length;
    observe(req, rep, this.observers);
    return rep;
  }

  /** The accelerator's `Health` answer (rejects when it does not answer within `deadlineMs`, default 5 s). */
  async health(deadlineMs = 5_000): Promise<HealthStatus> {
    this.checkOpen('health');
    let back: Buffer;
    try {
      back = await this.unary('Health', Buffer.alloc(0), deadlineMs);
    } catch (e) {
      throw this.wrap(e, 'health');
    }
    let parsed: ReturnType<typeof HealthSchema.safeParse>;
    try {
      parsed = HealthSchema.safeParse(JSON.parse(back.toString('utf8')));
    } catch {
      throw new RpcError(`accelerator rpc health to ${this.address}: answer is not JSON`, grpc.status.DATA_LOSS, 'health');
    }
    if (!parsed.success) throw new RpcError(`accelerator rpc health to ${this.address}: unexpected answer ${back.toString('utf8').slice(0, 200)}`, grpc.status.DATA_LOSS, 'health');
    return parsed.data;
  }

  /**
   * Polls `Health` with exponential backoff (50 ms doubling up to 1 s) until the accelerator
   * answers SERVING; rejects with a clear error after `timeoutMs`.
   */
  async waitForReady(timeoutMs: number): Promise<HealthStatus> {
    const end = Date.now() + timeoutMs;
    let last = 'no answer';
    for (let attempt = 0; ; attempt++) {
      this.checkOpen('health');
      const left = end - Date.now();
      if (left <= 0) break;
      try {
        const h = await this.health(Math.max(1, Math.min(left, 2_000)));
        if (h.status === 'SERVING') return h;
        last = `status ${h.status}`;
      } catch (e) {
        if (this.closed) throw e;
        last = (e as Error).message;
      }
      const wait = Math.min(backoffMs(attempt, 50, 1_000), end - Date.now());
      if (wait <= 0) break;
      await sleep(wait);
    }
    throw new RpcError(`accelerator at ${this.address} not ready after ${timeoutMs} ms (last: ${last})`, grpc.status.DEADLINE_EXCEEDED, 'health');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.channel?.close();
    this.client.close();
  }

  private wrap(e: unknown, what: string, attempts = 1): RpcError {
    // every failure of unary() and the tensor channel is a TransportError; anything else is a bug here
    const code = e instanceof TransportError ? e.code : grpc.status.UNKNOWN;
    const msg = e instanceof Error ? e.message : String(e);
    const tries = attempts > 1 ? ` after ${attempts} attempts` : '';
    const hint = code === grpc.status.RESOURCE_EXHAUSTED ? ' (raise maxMessageBytes on both ends, or send fewer rows per call)' : '';
    return new RpcError(`accelerator rpc ${what} to ${this.address} failed${tries}: ${statusName(code)}: ${msg}${hint}`, code, what.split(' ')[0], { cause: e });
  }
}
