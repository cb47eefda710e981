/**
 * Replay protection: a bounded cache of request ids (or nonces) seen within a time window.
 *
 * Each id is accepted once. When the caller also passes the time the request was issued
 * (authenticated, e.g. inside the HPKE-protected payload or its aad), requests older than the
 * window or too far in the future are rejected, so an id can be forgotten once its window has
 * passed without ever letting a replay through. Without an issue time an id is remembered for
 * `ttlMs` after it was first seen; a replay after that would be accepted, so use issue times
 * for anything that matters.
 *
 * The cache fails closed: when it is full of unexpired ids it rejects new ones rather than
 * forgetting ids that are still inside their window.
 */
import { InputError, ObfuscatuneError } from '../errors.js';
import { toHex } from './platform.js';

export type ReplayErrorCode = 'replayed' | 'expired' | 'future' | 'cache_full';

export class ReplayError extends ObfuscatuneError {
  constructor(readonly code: ReplayErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

export interface ReplayCacheOptions {
  /** how long an id is remembered / how old a request may be, in ms (default 5 minutes) */
  ttlMs?: number;
  /** most ids held at once (default 100 000) */
  maxEntries?: number;
  /** tolerated clock skew for issue times in the future, in ms (default 30 s) */
  maxSkewMs?: number;
  /** clock, ms since the epoch (default Date.now) */
  now?: () => number;
}

const keyOf = (id: string | Uint8Array): string => (typeof id === 'string' ? id : toHex(id));

export class ReplayCache {
  readonly ttlMs: number;
  readonly maxEntries: number;
  readonly maxSkewMs: number;
  private readonly now: () => number;
  /** id -> expiry time (ms) */
  private readonly entries = new Map<string, number>();

  constructor(opts: ReplayCacheOptions = {}) {
    this.ttlMs = opts.ttlMs ?? 5 * 60_000;
    this.maxEntries = opts.maxEntries ?? 100_000;
    this.maxSkewMs = opts.maxSkewMs ?? 30_000;
    this.now = opts.now ?? Date.now;
    if (!(this.ttlMs > 0) || !Number.isInteger(this.maxEntries) || this.maxEntries < 1 || !(this.maxSkewMs >= 0)) {
      throw new InputError('ReplayCache: ttlMs must be > 0, maxEntries an integer >= 1, maxSkewMs >= 0');
    }
  }

  /** Number of ids currently remembered (including expired ones not yet pruned). */
  get size(): number {
    return this.entries.size;
  }

  /**
   * Accepts `id` once. Throws `ReplayError` if it was already seen within its window
   * ('replayed'), if `issuedAtMs` is outside the window ('expired' / 'future'), or if the
   * cache is full of live ids ('cache_full').
   */
  check(id: string | Uint8Array, issuedAtMs?: number): void {
    const key = keyOf(id);
    if (key.length === 0) throw new InputError('ReplayCache: empty request id');
    const now = this.now();
    let expiry = now + this.ttlMs;
    if (issuedAtMs !== undefined) {
      if (!Number.isFinite(issuedAtMs)) throw new ReplayError('expired', `request ${key}: invalid issue time`);
      if (issuedAtMs < now - this.ttlMs) {
        throw new ReplayError('expired', `request ${key} expired: issued ${now - issuedAtMs} ms ago, window is ${this.ttlMs} ms`);
      }
      if (issuedAtMs > now + this.maxSkewMs) {
        throw new ReplayError('future', `request ${key} issued ${issuedAtMs - now} ms in the future (max skew ${this.maxSkewMs} ms)`);
      }
      // Once issuedAt + ttl has passed the timestamp check rejects it, so it may be forgotten then.
      expiry = issuedAtMs + this.ttlMs;
    }
    const prev = this.entries.get(key);
    if (prev !== undefined && prev > now) {
      throw new ReplayError('replayed', `replay detected: request id ${key} was already seen`);
    }
    if (prev !== undefined) this.entries.delete(key);
    this.pruneFront(now);
    if (this.entries.size >= this.maxEntries) {
      this.prune(now);
      if (this.entries.size >= this.maxEntries) {
        throw new ReplayError('cache_full', `replay cache full (${this.maxEntries} live ids): request ${key} rejected`);
      }
    }
    this.entries.set(key, expiry);
  }

  /** Drops every expired id. */
  prune(now = this.now()): void {
    for (const [k, exp] of this.entries) if (exp <= now) this.entries.delete(k);
  }

  /** Cheap amortised pruning: drops expired ids at the front (oldest insertions) only. */
  private pruneFront(now: number): void {
    for (const [k, exp] of this.entries) {
      if (exp > now) break;
      this.entries.delete(k);
    }
  }
}
