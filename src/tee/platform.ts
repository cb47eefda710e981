/**
 * TEE platform abstraction.
 *
 * Three roles use this module:
 *  - the enclave holds a `TeePlatform`: it produces attestation evidence bound to 64 bytes
 *    of caller-chosen report data, and derives sealing keys tied to its own measurement;
 *  - a relying party (data owner, model provider) holds one `EvidenceVerifier` per platform
 *    it is willing to trust and calls `verifyEvidence`, which authenticates the evidence and
 *    applies the policy checks (measurement allow-list, report-data binding);
 *  - the wire format between them is the plain-JSON `Evidence` object.
 *
 * A new kind of hardware (AMD SEV-SNP, Intel TDX, Intel SGX) is added by writing one
 * `TeePlatform` and one `EvidenceVerifier`; callers do not change. Policy lives in
 * `verifyEvidence`, not in verifiers, so a new verifier cannot forget a check: a verifier
 * only has to say "this evidence is authentic and these are its signed claims".
 *
 * See docs/tee.md for the threat model and how real platforms map onto these types.
 */
import { timingSafeEqual } from 'node:crypto';
import { ObfuscatuneError } from '../errors.js';

/** Length of the report data every platform binds into its evidence (SNP, TDX and SGX all use 64). */
export const REPORT_DATA_BYTES = 64;

/**
 * Attestation evidence as it travels on the wire. Every field is a JSON scalar/array so it
 * survives any transport (gRPC JSON mapping, files).
 *
 * `measurement` and `report_data` are unauthenticated convenience copies: a verifier must
 * take the authoritative values from the signed `body` and reject evidence whose copies
 * disagree with it.
 */
export interface Evidence {
  /** platform identifier, e.g. 'sim-software', 'amd-sev-snp', 'intel-tdx', 'intel-sgx' */
  platform: string;
  /** version of this platform's evidence encoding */
  format_version: number;
  /** measurement claimed by the evidence, lower-case hex */
  measurement: string;
  /** report data claimed by the evidence, lower-case hex of REPORT_DATA_BYTES bytes */
  report_data: string;
  /** platform-specific signed structure (SNP attestation report, TDX/SGX quote, simulated report), base64 */
  body: string;
  /** signature over `body`, base64 (for formats whose signature is embedded in `body`, may repeat or be empty) */
  signature: string;
  /** certificates needed to chain the signing key to the platform root (e.g. VCEK/ASK/ARK, PCK chain), base64 DER each */
  cert_chain?: string[];
}

/** What a verifier vouches for after checking a piece of evidence. */
export interface VerifiedEvidence {
  platform: string;
  /** authenticated measurement (from the signed body), lower-case hex */
  measurement: string;
  /** authenticated report data (from the signed body) */
  reportData: Uint8Array;
  /** true when the evidence comes from a software simulation and gives no hardware protection */
  simulated: boolean;
  /** other signed, platform-specific claims (TCB version, debug policy, issue time, signer ...) */
  claims: Record<string, unknown>;
  /** the evidence that was verified */
  evidence: Evidence;
}

/** The enclave-side view of a TEE. */
export interface TeePlatform {
  /** platform identifier, same as `Evidence.platform` */
  readonly name: string;
  /** this enclave's measurement, lower-case hex */
  measurement(): string;
  /** produces evidence binding exactly REPORT_DATA_BYTES bytes of report data to this enclave's measurement */
  attest(reportData: Uint8Array): Promise<Evidence>;
  /**
   * A 32-byte key derived from a platform secret, this enclave's measurement and `label`.
   * Another program (different measurement) or another machine derives a different key.
   */
  sealingKey(label: string): Promise<Uint8Array>;
}

/**
 * Authenticates one platform's evidence. It checks signatures and certificate chains and that
 * the unauthenticated copies in `Evidence` agree with the signed body, and may enforce
 * platform-specific policy (e.g. reject debug enclaves, minimum TCB). It does NOT check the
 * measurement allow-list or the report data: `verifyEvidence` does that for every platform.
 * It throws `AttestationError` on failure.
 */
export interface EvidenceVerifier {
  readonly platform: string;
  verify(e: Evidence): Promise<VerifiedEvidence>;
}

export type AttestationErrorCode =
  | 'malformed_evidence'
  | 'unknown_platform'
  | 'bad_signature'
  | 'measurement_not_allowed'
  | 'report_data_mismatch'
  | 'policy_violation';

export class AttestationError extends ObfuscatuneError {
  constructor(readonly code: AttestationErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

export interface VerifyEvidenceOptions {
  /**
   * Accepted measurements: lower- or upper-case hex, optionally prefixed by a platform name
   * ('intel-tdx:ab12...') to accept that measurement only from that platform.
   */
  allowList: readonly string[];
  /** the report data the evidence must carry (e.g. SHA-512(enclave key || fresh nonce)) */
  expectedReportData: Uint8Array;
  /** the verifiers of the platforms the caller trusts (evidence of any other platform is refused) */
  verifiers: readonly EvidenceVerifier[];
}

/**
 * Verifies evidence end to end: shape, authenticity (via the platform's verifier), the
 * measurement allow-list and the report-data binding. Returns the verified claims or
 * throws an `AttestationError` naming the failed check.
 */
export async function verifyEvidence(e: Evidence, opts: VerifyEvidenceOptions): Promise<VerifiedEvidence> {
  checkEvidenceShape(e);
  if (opts.expectedReportData.length !== REPORT_DATA_BYTES) {
    throw new RangeError(`expectedReportData must be ${REPORT_DATA_BYTES} bytes, got ${opts.expectedReportData.length}`);
  }
  const verifier = opts.verifiers.find((v) => v.platform === e.platform);
  if (!verifier) {
    throw new AttestationError('unknown_platform', `unknown platform '${e.platform}': no evidence verifier configured for it`);
  }
  const verified = await verifier.verify(e);
  if (verified.platform !== e.platform) {
    throw new AttestationError('malformed_evidence', `verifier for '${e.platform}' returned claims for '${verified.platform}'`);
  }
  const measurement = verified.measurement.toLowerCase();
  if (!measurementAllowed(opts.allowList, e.platform, measurement)) {
    throw new AttestationError('measurement_not_allowed', `measurement ${measurement} not in allow-list`);
  }
  if (!bytesEqual(verified.reportData, opts.expectedReportData)) {
    throw new AttestationError('report_data_mismatch', 'report data mismatch (stale or replayed nonce?)');
  }
  return { ...verified, measurement };
}

function measurementAllowed(allowList: readonly string[], platform: string, measurement: string): boolean {
  return allowList.some((entry) => {
    const colon = entry.lastIndexOf(':');
    const hex = (colon >= 0 ? entry.slice(colon + 1) : entry).trim().toLowerCase();
    return (colon < 0 || entry.slice(0, colon) === platform) && hex === measurement;
  });
}

const HEX_RE = /^(?:[0-9a-fA-F]{2})*$/;
const B64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

/** Throws `AttestationError('malformed_evidence')` unless `e` has the shape of `Evidence`. */
export function checkEvidenceShape(e: unknown): asserts e is Evidence {
  const bad = (what: string): never => {
    throw new AttestationError('malformed_evidence', `malformed evidence: ${what}`);
  };
  if (typeof e !== 'object' || e === null) bad('not an object');
  const o = e as Record<string, unknown>;
  if (typeof o.platform !== 'string' || o.platform.length === 0) bad('platform must be a non-empty string');
  if (typeof o.format_version !== 'number' || !Number.isInteger(o.format_version)) bad('format_version must be an integer');
  if (typeof o.measurement !== 'string' || o.measurement.length === 0 || !HEX_RE.test(o.measurement)) bad('measurement must be hex');
  const rd = o.report_data;
  if (typeof rd !== 'string' || !HEX_RE.test(rd) || rd.length !== 2 * REPORT_DATA_BYTES) bad(`report_data must be ${REPORT_DATA_BYTES} bytes of hex`);
  if (typeof o.body !== 'string' || !B64_RE.test(o.body)) bad('body must be base64');
  if (typeof o.signature !== 'string' || !B64_RE.test(o.signature)) bad('signature must be base64');
  const chain = o.cert_chain;
  const chainOk = chain === undefined || (Array.isArray(chain) && chain.every((c) => typeof c === 'string' && B64_RE.test(c)));
  if (!chainOk) bad('cert_chain must be an array of base64 strings');
}

// ---------------------------------------------------------------------------------------
// Small encoding helpers shared by the tee modules.

/** Constant-time equality of two byte strings (false when lengths differ). */
export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return timingSafeEqual(a, b);
}

export function toHex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

export function fromHex(s: string, what = 'value'): Uint8Array {
  if (!HEX_RE.test(s)) throw new TypeError(`${what} is not valid hex`);
  return new Uint8Array(Buffer.from(s, 'hex'));
}

export function toBase64(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('base64');
}

export function fromBase64(s: string, what = 'value'): Uint8Array {
  if (!B64_RE.test(s) || s.length % 4 !== 0) throw new TypeError(`${what} is not valid base64`);
  return new Uint8Array(Buffer.from(s, 'base64'));
}

/** Concatenates byte strings, each prefixed by its length as a big-endian u32 (unambiguous framing). */
export function lengthPrefixed(...parts: Uint8Array[]): Uint8Array {
  const out = Buffer.alloc(parts.reduce((n, p) => n + 4 + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, out.writeUInt32BE(p.length, off));
    off += 4 + p.length;
  }
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/**
 * Canonical JSON: object keys sorted by UTF-16 code units, no whitespace, `undefined`
 * object members omitted. Rejects values JSON cannot represent faithfully (non-finite
 * numbers, bigint, functions, symbols, `undefined` at top level or in arrays, cycles).
 */
export function canonicalJson(value: unknown): string {
  const seen = new Set<object>();
  const enc = (v: unknown, path: string): string => {
    if (typeof v === 'number' && !Number.isFinite(v)) throw new TypeError(`canonicalJson: non-finite number at ${path}`);
    if (v === null || ['boolean', 'string', 'number'].includes(typeof v)) return JSON.stringify(v);
    if (typeof v !== 'object') throw new TypeError(`canonicalJson: cannot encode ${typeof v} at ${path}`);
    const toJSON = (v as { toJSON?: unknown }).toJSON;
    if (typeof toJSON === 'function') return enc(toJSON.call(v), path);
    if (seen.has(v)) throw new TypeError(`canonicalJson: cycle at ${path}`);
    if (ArrayBuffer.isView(v)) throw new TypeError(`canonicalJson: binary data at ${path}; encode it as hex or base64 first`);
    seen.add(v);
    const o = v as Record<string, unknown>;
    const out = Array.isArray(v)
      ? '[' + v.map((x, i) => {
        if (x === undefined) throw new TypeError(`canonicalJson: undefined at ${path}[${i}]`);
        return enc(x, `${path}[${i}]`);
      }).join(',') + ']'
      : '{' + Object.keys(o).sort().filter((k) => o[k] !== undefined).map((k) => JSON.stringify(k) + ':' + enc(o[k], `${path}.${k}`)).join(',') + '}';
    seen.delete(v);
    return out;
  };
  return enc(value, '$');
}
