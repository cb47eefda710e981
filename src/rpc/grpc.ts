/**
 * Shared pieces of the gRPC transport between the enclave and the accelerator: the
 * hand-written service definition (no .proto, no code generation: every message is the
 * raw binary frame of `encodeMessage`, passed through as bytes), channel and server
 * options (message-size limits, keepalive, reconnect backoff) and address parsing.
 * See docs/rpc.md.
 */
import * as grpc from '@grpc/grpc-js';
import { InputError } from '../errors.js';
import type { AcceleratorRequest } from '../protocol/messages.js';

export const SERVICE_NAME = 'obfuscatune.Accelerator';

/** Default bound of one gRPC message, in either direction (256 MiB). */
export const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024;

/** Default per-call deadline of the client (one linear of a big batch can take a while). */
export const DEFAULT_DEADLINE_MS = 120_000;

export const DEFAULT_PORT = 50551;

/** How a service's messages become bytes and back. */
export interface Codec<T> {
  ser: (v: T) => Buffer;
  de: (b: Buffer) => T;
}

const BYTES: Codec<Buffer> = { ser: (b) => b, de: (b) => b };

/** Method `name` of `service`, both ways through `codec` (the reply is never a stream). */
export function methodDef<T>(service: string, name: string, codec: Codec<T>, requestStream = false): grpc.MethodDefinition<T, T> {
  return {
    path: `/${service}/${name}`, requestStream, responseStream: false, originalName: name,
    requestSerialize: codec.ser, requestDeserialize: codec.de, responseSerialize: codec.ser, responseDeserialize: codec.de,
  };
}

/**
 * `service obfuscatune.Accelerator { rpc Call(bytes) returns (bytes); rpc Health(bytes) returns (bytes); }`
 * Call: an encoded AcceleratorRequest frame in, an encoded AcceleratorReply frame out.
 * Health: empty in, UTF-8 JSON `{"status":"SERVING","served":n}` out.
 */
export const ACCELERATOR_SERVICE = {
  Call: methodDef(SERVICE_NAME, 'Call', BYTES),
  Health: methodDef(SERVICE_NAME, 'Health', BYTES),
} satisfies grpc.ServiceDefinition;

/** Generic client class for the service (methods are called through `makeUnaryRequest`). */
export const AcceleratorServiceClient = grpc.makeGenericClientConstructor(ACCELERATOR_SERVICE, 'Accelerator');

export interface KeepaliveOptions {
  /** ping the peer after this much idle time on a connection */
  timeMs: number;
  /** drop the connection when a ping is not answered within this */
  timeoutMs: number;
}

export const DEFAULT_KEEPALIVE: KeepaliveOptions = { timeMs: 30_000, timeoutMs: 10_000 };

export interface ReconnectOptions {
  /** first delay before the channel reconnects after a failed connection attempt */
  initialMs: number;
  /** cap of the channel's exponential reconnect backoff */
  maxMs: number;
}

export const DEFAULT_RECONNECT: ReconnectOptions = { initialMs: 100, maxMs: 5_000 };

function checkLimit(maxMessageBytes: number): number {
  if (!Number.isInteger(maxMessageBytes) || maxMessageBytes <= 0 || maxMessageBytes > 2 ** 31 - 1) {
    throw new InputError(`rpc: maxMessageBytes must be an integer in [1, 2^31-1], got ${maxMessageBytes}`);
  }
  return maxMessageBytes;
}

/** Options of the accelerator's server: the message bound, keepalive and, for large tensors, a 16 MiB HTTP/2 window. */
export function serverOptions(opts: { maxMessageBytes?: number; keepalive?: KeepaliveOptions } = {}): grpc.ServerOptions {
  const max = checkLimit(opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES);
  const ka = opts.keepalive ?? DEFAULT_KEEPALIVE;
  return {
    'grpc.max_send_message_length': max,
    'grpc.max_receive_message_length': max,
    'grpc.keepalive_time_ms': ka.timeMs,
    'grpc.keepalive_timeout_ms': ka.timeoutMs,
    'grpc-node.flow_control_window': 16 * 1024 * 1024,
  };
}

/** Options of the enclave's channel to the accelerator: the server's, reconnect backoff, and no HTTP(S) proxy between them. */
export function clientChannelOptions(opts: { maxMessageBytes?: number; keepalive?: KeepaliveOptions; reconnect?: ReconnectOptions } = {}): grpc.ChannelOptions {
  const rc = opts.reconnect ?? DEFAULT_RECONNECT;
  return {
    ...serverOptions(opts),
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.initial_reconnect_backoff_ms': rc.initialMs,
    'grpc.max_reconnect_backoff_ms': rc.maxMs,
    'grpc.enable_http_proxy': 0,
  };
}

/** A request in words for errors and logs: its op and, for a linear, "h.<layer>.<name>". */
export function describeRequest(req: AcceleratorRequest): string {
  return 'layer' in req ? `${req.op} h.${req.layer}.${req.name}` : req.op;
}

export interface Address {
  host: string;
  port: number;
}

/**
 * Parses "host:port", "[v6]:port", "grpc://host:port", ":port" or a bare "port"
 * (host defaults to `defaultHost`); a bare host takes `defaultPort`.
 */
export function parseAddress(s: string, defaultHost = '127.0.0.1', defaultPort = DEFAULT_PORT): Address {
  let t = s.trim();
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(t);
  if (scheme) {
    if (!['grpc', 'dns', 'ipv4', 'ipv6', 'http'].includes(scheme[1].toLowerCase())) throw new InputError(`rpc: unsupported address scheme "${scheme[1]}" in "${s}"`);
    t = t.slice(scheme[0].length).replace(/\/+$/, '');
  }
  if (t === '') throw new InputError('rpc: empty address');
  let host: string;
  let portStr: string | undefined;
  if (/^\d+$/.test(t)) {
    host = defaultHost;
    portStr = t;
  } else if (t.startsWith('[')) {
    const m = /^\[([0-9a-fA-F:.%a-zA-Z]+)\](?::(\d+))?$/.exec(t);
    if (!m) throw new InputError(`rpc: invalid address "${s}"`);
    host = m[1];
    portStr = m[2];
  } else if ((t.match(/:/g) ?? []).length > 1) {
    // a bare IPv6 address without a port
    if (!/^[0-9a-fA-F:.]+$/.test(t)) throw new InputError(`rpc: invalid address "${s}"`);
    host = t;
  } else {
    const i = t.indexOf(':');
    host = i < 0 ? t : t.slice(0, i);
    portStr = i < 0 ? undefined : t.slice(i + 1);
    if (host === '') host = defaultHost;
    if (!/^[A-Za-z0-9.-]+$/.test(host)) throw new InputError(`rpc: invalid host "${host}" in "${s}"`);
  }
  let port = defaultPort;
  if (portStr !== undefined) {
    if (!/^\d+$/.test(portStr)) throw new InputError(`rpc: invalid port in "${s}"`);
    port = Number(portStr);
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InputError(`rpc: port out of range in "${s}"`);
  return { host, port };
}

/** "host:port" as gRPC targets and binds it (IPv6 hosts in brackets). */
export function formatAddress(a: Address): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/** Name of a gRPC status code, e.g. "UNAVAILABLE" (or the number when unknown). */
export function statusName(code: number | undefined): string {
  if (code === undefined) return 'UNKNOWN';
  const name = (grpc.status as unknown as Record<number, string>)[code];
  return typeof name === 'string' ? name : String(code);
}

/**
 * Binds `server` to `address` and resolves the bound port. grpc-js servers advertise Node's
 * default 64 KiB HTTP/2 receive window whatever `grpc-node.flow_control_window` says (the
 * option is read by clients only), which throttles large uploads to the server, so this
 * widens the per-stream window (SETTINGS) before binding and the connection window of every
 * new session after. That reaches into grpc-js internals, so it is best effort: if they
 * change, the server simply keeps the default window.
 */
export async function bindServer(server: grpc.Server, address: string, credentials: grpc.ServerCredentials, windowBytes = 16 * 1024 * 1024): Promise<number> {
  const s = server as unknown as {
    commonServerOptions?: { settings?: Record<string, unknown> };
    http2Servers?: Map<{ on(ev: string, f: (s: { setLocalWindowSize?(n: number): void }) => void): void }, unknown>;
  };
  const bestEffort = (f: () => void) => {
    try {
      f();
    } catch {
      // keep the default window
    }
  };
  bestEffort(() => {
    if (s.commonServerOptions) s.commonServerOptions.settings = { ...(s.commonServerOptions.settings ?? {}), initialWindowSize: windowBytes };
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(address, credentials, (err, p) => (err ? reject(err) : resolve(p)));
  });
  bestEffort(() => {
    for (const h of s.http2Servers?.keys() ?? []) h.on('session', (session) => bestEffort(() => session.setLocalWindowSize?.(windowBytes)));
  });
  return port;
}
