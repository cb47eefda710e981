/**
 * The project's error classes. Code that decides something from an error (retry, recovery,
 * the gRPC status a service answers with, the CLI's exit code) looks at the class and, for
 * a `TransportError`, at its gRPC status `code`; never at the message, which is for people.
 *
 *   ObfuscatuneError
 *   ├── IntegrityError     an accelerator reply failed a secret-vector check
 *   ├── PolicyError        a party asked for something it may not do
 *   │     └── SessionError   the request names an unknown or expired attestation session
 *   ├── BundleError        a bundle or checkpoint is missing, corrupt or mismatched
 *   │     └── ViewError    a recorded accelerator view is truncated, corrupt, or from another model or mode
 *   ├── StateError         the service is not in a state to do that now (a job is running, none has finished)
 *   ├── InputError         bad user or data input: shapes, token ids, labels, NaN, configuration values
 *   ├── AcceleratorError   the accelerator answered a request with an error reply
 *   ├── WorkerError        a kernel worker thread died or failed (src/tensor/parallel.ts)
 *   ├── TransportError     a call failed on the wire; `code` is its gRPC status
 *   │     (RpcError, ChannelError, FramingError, ChannelRefusal in src/rpc)
 *   └── AttestationError, SealError, ReplayError, HpkeError, SignatureError (src/tee)
 *
 * The mapping to gRPC status codes lives in one place, src/rpc/status.ts; docs/architecture.md
 * has the table.
 */

export interface ObfuscatuneErrorOptions {
  /** the error this one explains (kept as `cause`, ES2022) */
  cause?: unknown;
}

/** Base of every error the project throws on purpose. */
export class ObfuscatuneError extends Error {
  constructor(message: string, options?: ObfuscatuneErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** An accelerator reply failed an integrity check (src/protocol/integrity.ts). */
export class IntegrityError extends ObfuscatuneError {}

/** A party asked for something it may not do (the enclave's policy, another provider's bundle, an unknown session). */
export class PolicyError extends ObfuscatuneError {}

/** A request names an attestation session the enclave does not hold (never made, expired or evicted): attest again. */
export class SessionError extends PolicyError {}

/** A bundle or checkpoint is missing, corrupt, or does not match its counterpart. */
export class BundleError extends ObfuscatuneError {}

/**
 * A recorded view of the accelerator (src/protocol/view.ts) cannot be used as asked: truncated or
 * corrupt, of another format version, or recorded from another model, mode or bundle.
 */
export class ViewError extends BundleError {}

/** The service cannot do that in its present state (a job is running; no job has finished yet). */
export class StateError extends ObfuscatuneError {}

/** Bad input from a user or a dataset: shapes, token ids, labels, non-finite values, configuration values. */
export class InputError extends ObfuscatuneError {}

/** The accelerator refused a request: it answered with an error reply rather than a result. */
export class AcceleratorError extends ObfuscatuneError {
  constructor(message: string, readonly op?: string, options?: ObfuscatuneErrorOptions) {
    super(message, options);
  }
}

/** A worker thread of the element-wise kernels died or failed; `worker` is its index. */
export class WorkerError extends ObfuscatuneError {
  constructor(message: string, readonly worker: number, options?: ObfuscatuneErrorOptions) {
    super(message, options);
  }
}

/** A call that failed on the wire (or would have, had it been sent): `code` is its gRPC status (grpc.status). */
export class TransportError extends ObfuscatuneError {
  constructor(message: string, readonly code: number, options?: ObfuscatuneErrorOptions) {
    super(message, options);
  }
}

/** `e` and the errors it names as its cause, outermost first (cycles cut). */
export function causeChain(e: unknown): unknown[] {
  const out: unknown[] = [];
  const seen = new Set<unknown>();
  for (let x: unknown = e; x !== undefined && x !== null && !seen.has(x); x = (x as { cause?: unknown }).cause) {
    seen.add(x);
    out.push(x);
    if (typeof x !== 'object') break;
  }
  return out;
}

/** The first error of class `cls` in `e`'s cause chain (e itself included), or null. */
export function findCause<T>(e: unknown, cls: abstract new (...args: never[]) => T): T | null {
  for (const x of causeChain(e)) if (x instanceof cls) return x;
  return null;
}
