/**
 * Errors <-> gRPC status, in one place. Servers (the accelerator's, the enclave's, the
 * accelerator's admin service) answer a failed call with `serviceError(e)`: the status code
 * chosen by the error's class, its message as details, and the class name in the trailing
 * metadata. Clients turn a failed call back into a typed error with `errorFromStatus`.
 * docs/architecture.md ("Errors") has the table.
 */
import * as grpc from '@grpc/grpc-js';
import {
  BundleError, InputError, IntegrityError, ObfuscatuneError, PolicyError, SessionError, StateError, TransportError, findCause,
  type ObfuscatuneErrorOptions,
} from '../errors.js';
import { AttestationError } from '../tee/platform.js';
import { HpkeError } from '../tee/hpke.js';
import { ReplayError } from '../tee/replay.js';
import { SignatureError } from '../tee/signing.js';

/** Trailing-metadata key that names the class of the error a server failed with. */
export const ERROR_CLASS_KEY = 'obfuscatune-error';

/** The gRPC status a server answers with when a handler throws `e`. */
export function statusOf(e: unknown): grpc.status {
  if (e instanceof TransportError) return e.code;
  if (e instanceof SessionError || e instanceof SignatureError) return grpc.status.UNAUTHENTICATED;
  if (e instanceof PolicyError || e instanceof ReplayError) return grpc.status.PERMISSION_DENIED;
  if (e instanceof HpkeError || e instanceof AttestationError) return grpc.status.UNAUTHENTICATED;
  if (e instanceof InputError) return grpc.status.INVALID_ARGUMENT;
  if (e instanceof BundleError || e instanceof StateError) return grpc.status.FAILED_PRECONDITION;
  return grpc.status.INTERNAL;
}

/** What a server passes to a failed call's callback: code, details and the error's class. */
export function serviceError(e: unknown): grpc.ServerErrorResponse {
  const metadata = new grpc.Metadata();
  if (e instanceof ObfuscatuneError) metadata.set(ERROR_CLASS_KEY, e.name);
  const details = e instanceof Error ? e.message : String(e);
  return Object.assign(new Error(details), { code: statusOf(e), details, metadata });
}

type Rebuild = new (message: string, options?: ObfuscatuneErrorOptions) => ObfuscatuneError;

/** Classes a client rebuilds from the server's metadata (those whose constructor takes only a message). */
const BY_CLASS: Record<string, Rebuild> = { PolicyError, SessionError, SignatureError, InputError, BundleError, StateError, IntegrityError };

/** Without metadata (another server), the classes a status code stands for unambiguously. */
const BY_CODE: Partial<Record<number, Rebuild>> = {
  [grpc.status.PERMISSION_DENIED]: PolicyError,
  [grpc.status.INVALID_ARGUMENT]: InputError,
};

/**
 * A failed call as a typed error, its message `${what}: ${details}`: the server's error
 * class when it is one of PolicyError, SessionError, SignatureError, InputError, BundleError, StateError, IntegrityError
 * (or, without metadata, the class the code stands for), whose `cause` is a TransportError
 * with the status; otherwise that TransportError itself.
 */
export function errorFromStatus(err: unknown, what: string): ObfuscatuneError {
  const e = err as Partial<grpc.ServiceError> | null;
  const code = typeof e?.code === 'number' ? e.code : grpc.status.UNKNOWN;
  const details = typeof e?.details === 'string' && e.details !== '' ? e.details : err instanceof Error ? err.message : String(err);
  const message = `${what}: ${details}`;
  const transport = new TransportError(message, code, { cause: err });
  const named = e?.metadata instanceof grpc.Metadata ? e.metadata.get(ERROR_CLASS_KEY)[0] : undefined;
  const cls = (typeof named === 'string' ? BY_CLASS[named] : undefined) ?? BY_CODE[code];
  return cls ? new cls(message, { cause: transport }) : transport;
}

/** A unary handler answering with what `fn` returns (or resolves to), or with the error it throws. */
export function serveUnary(fn: (req: unknown) => unknown) {
  return (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>): void => {
    Promise.resolve(call.request).then(fn).then((v) => cb(null, v), (e: unknown) => cb(serviceError(e)));
  };
}

/**
 * Serves a client-streaming call: `take` sees each message in order and throws to refuse the
 * call (the first failure answers it; the rest of the stream is ignored); once the stream
 * ended, the call is answered with what `finish` returns, or with the error it throws.
 */
export function serveStream<M>(
  call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>, take: (m: M) => void, finish: () => unknown,
): void {
  let failed = false;
  const fail = (e: unknown) => {
    if (!failed) cb(serviceError(e));
    failed = true;
  };
  call.on('data', (m: M) => {
    if (failed) return;
    try {
      take(m);
    } catch (e) {
      fail(e);
    }
  });
  call.on('end', () => {
    if (!failed) Promise.resolve().then(finish).then((v) => cb(null, v), fail);
  });
  call.on('error', () => { failed = true; });
}
