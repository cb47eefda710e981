/**
 * Attestation handshake between a client (data owner, model provider) and the enclave.
 *
 *  1. At start the enclave generates a fresh X25519 HPKE key pair (`EnclaveAttestor.create`).
 *  2. The client draws a random 32-byte nonce (`newNonce`) and sends it.
 *  3. The enclave asks its platform for evidence with
 *     report_data = SHA-512(enclave HPKE public key || nonce) (64 bytes) and returns the
 *     evidence together with the public key (`EnclaveAttestor.attest`).
 *  4. The client verifies the evidence (signature, measurement allow-list, report data
 *     recomputed from the returned key and its own nonce) and obtains the enclave public key
 *     and the attestation transcript (`verifyAttestation`).
 *  5. The client encrypts to the enclave with HPKE using the transcript as `info`
 *     (`sealToEnclave`); the enclave computed the same transcript in step 3 and opens with it.
 *
 * A man in the middle cannot substitute its own key (the report data would not match), and
 * cannot replay old evidence (it was bound to an old nonce).
 *
 * Once the enclave has accepted a deployment contract, the contract's SHA-256 is bound into
 * the report data as well: report_data = SHA-512(public key || nonce || contract hash), and
 * the response names the hash (`contract_sha256`), so a client learns, under the platform's
 * signature, which contract the enclave enforces.
 */
import { createHash, randomBytes } from 'node:crypto';
import {
  AttestationError,
  canonicalJson,
  fromBase64,
  lengthPrefixed,
  toBase64,
  verifyEvidence,
  type Evidence,
  type EvidenceVerifier,
  type TeePlatform,
  type VerifiedEvidence,
} from './platform.js';
import {
  generateHpkeKeyPair,
  openWith,
  publicKeyFromBase64,
  publicKeyToBase64,
  sealTo,
  X25519_KEY_BYTES,
  type HpkeKeyPair,
  type SealedMessage,
} from './hpke.js';
import { InputError } from '../errors.js';

export const NONCE_BYTES = 32;
const TRANSCRIPT_CONTEXT = new TextEncoder().encode('obfuscatune/attestation-transcript/v1');

/** What the client sends: a fresh random nonce, base64. */
export interface AttestationRequest {
  nonce: string;
}

/** What the enclave returns. */
export interface AttestationResponse {
  evidence: Evidence;
  /** raw X25519 public key, base64 */
  enclave_public_key: string;
  /** the deployment contract the enclave is bound to (hex SHA-256), bound into the report data; absent: none yet */
  contract_sha256?: string | null;
}

export function newNonce(): Uint8Array {
  return new Uint8Array(randomBytes(NONCE_BYTES));
}

/** report_data = SHA-512(enclave public key || nonce [|| binding]), binding: a 32-byte contract hash. */
export function attestationReportData(enclavePublicKey: Uint8Array, nonce: Uint8Array, binding?: Uint8Array | null): Uint8Array {
  checkLen(enclavePublicKey, X25519_KEY_BYTES, 'enclave public key');
  checkLen(nonce, NONCE_BYTES, 'nonce');
  const h = createHash('sha512').update(enclavePublicKey).update(nonce);
  if (binding) {
    checkLen(binding, 32, 'attestation binding');
    h.update(binding);
  }
  return new Uint8Array(h.digest());
}

function bindingOf(contractSha256: string | null | undefined): Uint8Array | null {
  if (contractSha256 === undefined || contractSha256 === null) return null;
  if (typeof contractSha256 !== 'string' || !/^[0-9a-f]{64}$/.test(contractSha256)) {
    throw new AttestationError('malformed_evidence', 'malformed attestation response: contract_sha256 must be 64 hex digits');
  }
  return new Uint8Array(Buffer.from(contractSha256, 'hex'));
}

/**
 * The attestation transcript: a canonical, length-framed encoding of the evidence (its wire
 * fields, canonical JSON), the enclave public key and the nonce. Both sides compute it
 * independently; it is the HPKE `info` of every message of the session.
 */
export function attestationTranscript(evidence: Evidence, enclavePublicKey: Uint8Array, nonce: Uint8Array): Uint8Array {
  checkLen(enclavePublicKey, X25519_KEY_BYTES, 'enclave public key');
  checkLen(nonce, NONCE_BYTES, 'nonce');
  const normalized = {
    platform: evidence.platform,
    format_version: evidence.format_version,
    measurement: evidence.measurement.toLowerCase(),
    report_data: evidence.report_data.toLowerCase(),
    body: evidence.body,
    signature: evidence.signature,
    cert_chain: evidence.cert_chain ?? [],
  };
  return lengthPrefixed(TRANSCRIPT_CONTEXT, new TextEncoder().encode(canonicalJson(normalized)), enclavePublicKey, nonce);
}

/** SHA-256 of a transcript, hex: a session identifier both sides can name the transcript by. */
export function transcriptId(transcript: Uint8Array): string {
  return createHash('sha256').update(transcript).digest('hex');
}

/** Enclave side of the handshake: owns the HPKE key pair and the platform. */
export class EnclaveAttestor {
  readonly publicKey: Uint8Array;
  readonly #privateKey: Uint8Array;

  private constructor(readonly platform: TeePlatform, keyPair: HpkeKeyPair) {
    this.publicKey = keyPair.publicKey;
    this.#privateKey = keyPair.privateKey;
  }

  /** Generates the enclave's HPKE key pair (or adopts `keyPair`, e.g. for tests). */
  static async create(platform: TeePlatform, keyPair?: HpkeKeyPair): Promise<EnclaveAttestor> {
    return new EnclaveAttestor(platform, keyPair ?? (await generateHpkeKeyPair()));
  }

  /** The contract hash (hex) bound into every report from now on (null: none). */
  contractSha256: string | null = null;

  /** Answers one client nonce: evidence bound to (public key, nonce, contract), plus the transcript to keep for the session. */
  async attest(nonce: Uint8Array): Promise<{ response: AttestationResponse; transcript: Uint8Array; transcriptId: string }> {
    const contract = this.contractSha256;
    const evidence = await this.platform.attest(attestationReportData(this.publicKey, nonce, bindingOf(contract)));
    const transcript = attestationTranscript(evidence, this.publicKey, nonce);
    return {
      response: { evidence, enclave_public_key: publicKeyToBase64(this.publicKey), ...(contract ? { contract_sha256: contract } : {}) },
      transcript,
      transcriptId: transcriptId(transcript),
    };
  }

  /** `attest` for a wire request. */
  async handle(request: AttestationRequest): Promise<{ response: AttestationResponse; transcript: Uint8Array; transcriptId: string }> {
    return this.attest(decodeNonce(request.nonce));
  }

  /** Opens a message a client sealed to this enclave under `transcript`. */
  async open(sealed: SealedMessage, transcript: Uint8Array, aad?: Uint8Array): Promise<Uint8Array> {
    return openWith(this.#privateKey, sealed, transcript, aad);
  }
}

/** Client side: the result of a successful handshake. */
export interface AttestedEnclave {
  /** the enclave's X25519 public key, to encrypt to */
  publicKey: Uint8Array;
  /** HPKE `info` for every message of this session */
  transcript: Uint8Array;
  transcriptId: string;
  /** what the verifier vouched for (measurement, simulated flag, platform claims) */
  evidence: VerifiedEvidence;
  /** the contract the enclave is bound to (hex SHA-256, covered by the report data), or null */
  contractSha256: string | null;
}

export interface VerifyAttestationOptions {
  /** accepted enclave measurements (see `VerifyEvidenceOptions.allowList`) */
  allowList: readonly string[];
  /** the verifiers of the trusted platforms */
  verifiers: readonly EvidenceVerifier[];
}

export function attestationRequest(nonce: Uint8Array): AttestationRequest {
  checkLen(nonce, NONCE_BYTES, 'nonce');
  return { nonce: toBase64(nonce) };
}

/**
 * Verifies the enclave's answer to `nonce`. Throws `AttestationError` ('unknown_platform',
 * 'bad_signature', 'measurement_not_allowed', 'report_data_mismatch', 'malformed_evidence').
 */
export async function verifyAttestation(
  response: AttestationResponse,
  nonce: Uint8Array,
  opts: VerifyAttestationOptions,
): Promise<AttestedEnclave> {
  checkLen(nonce, NONCE_BYTES, 'nonce');
  if (typeof response !== 'object' || response === null || typeof response.enclave_public_key !== 'string') {
    throw new AttestationError('malformed_evidence', 'malformed attestation response: enclave_public_key missing');
  }
  let publicKey: Uint8Array;
  try {
    publicKey = publicKeyFromBase64(response.enclave_public_key);
  } catch (err) {
    throw new AttestationError('malformed_evidence', `malformed attestation response: ${(err as Error).message}`, { cause: err });
  }
  const binding = bindingOf(response.contract_sha256);
  const evidence = await verifyEvidence(response.evidence, {
    allowList: opts.allowList,
    expectedReportData: attestationReportData(publicKey, nonce, binding),
    verifiers: opts.verifiers,
  });
  const transcript = attestationTranscript(response.evidence, publicKey, nonce);
  return { publicKey, transcript, transcriptId: transcriptId(transcript), evidence, contractSha256: binding ? response.contract_sha256! : null };
}

/** Encrypts a message to an attested enclave, bound to the session transcript and `aad`. */
export async function sealToEnclave(enclave: AttestedEnclave, plaintext: Uint8Array, aad?: Uint8Array): Promise<SealedMessage> {
  return sealTo(enclave.publicKey, plaintext, enclave.transcript, aad);
}

function decodeNonce(s: unknown): Uint8Array {
  if (typeof s !== 'string') throw new InputError('attestation request: nonce must be a base64 string');
  let n: Uint8Array;
  try {
    n = fromBase64(s, 'attestation request nonce');
  } catch (err) {
    throw new InputError((err as Error).message, { cause: err });
  }
  checkLen(n, NONCE_BYTES, 'nonce');
  return n;
}

function checkLen(b: Uint8Array, n: number, what: string): void {
  if (!(b instanceof Uint8Array) || b.length !== n) throw new InputError(`${what} must be ${n} bytes`);
}

// ------------------------------------------------------------------ the enclave towards its accelerator
const PEER_AUTH_CONTEXT = new TextEncoder().encode('obfuscatune/accelerator-peer-auth/v1');

/**
 * report_data of the enclave's answer to an accelerator's connection challenge:
 * SHA-512(context || challenge || contract hash). The context keeps it apart from the
 * clients' handshake (whose input is a 32-byte key and a nonce), so evidence a client asked
 * for can never pass as the enclave's proof towards the accelerator.
 */
export function peerAuthReportData(challenge: Uint8Array, contractSha256: string): Uint8Array {
  checkLen(challenge, NONCE_BYTES, 'connection challenge');
  const binding = bindingOf(contractSha256);
  if (!binding) throw new InputError('peer authentication needs the contract hash');
  return new Uint8Array(createHash('sha512').update(PEER_AUTH_CONTEXT).update(challenge).update(binding).digest());
}

/** The enclave's proof for one connection: evidence over the challenge and its contract (JSON bytes). */
export async function provePeer(platform: TeePlatform, challenge: Uint8Array, contractSha256: string): Promise<Buffer> {
  const evidence = await platform.attest(peerAuthReportData(challenge, contractSha256));
  return Buffer.from(JSON.stringify(evidence), 'utf8');
}

/**
 * The accelerator's check of a connection's proof: evidence from an allowed enclave
 * measurement over this connection's challenge and the accelerator's contract. Throws
 * AttestationError otherwise.
 */
export async function verifyPeerProof(challenge: Uint8Array, proof: Uint8Array, opts: VerifyAttestationOptions & { contractSha256: string }): Promise<VerifiedEvidence> {
  let evidence: Evidence;
  try {
    evidence = JSON.parse(Buffer.from(proof).toString('utf8')) as Evidence;
  } catch (e) {
    throw new AttestationError('malformed_evidence', 'connection proof is not JSON evidence', { cause: e });
  }
  return verifyEvidence(evidence, { allowList: opts.allowList, expectedReportData: peerAuthReportData(challenge, opts.contractSha256), verifiers: opts.verifiers });
}
