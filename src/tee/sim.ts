/**
 * SOFTWARE SIMULATION of a TEE platform ('sim-software').
 *
 * This is not a trusted execution environment and gives no hardware protection: the
 * "enclave" is an ordinary process, and anyone who can read the simulated platform root's
 * private files can forge evidence and derive every sealing key. It exists so that the
 * attestation protocol, the relying party's checks and their failure modes are real and
 * testable on any machine; a deployment replaces it with a hardware platform (docs/tee.md).
 *
 * What stands in for what:
 *  - hardware root of trust (AMD ARK/VCEK, Intel PCK/QE) -> an Ed25519 "platform root" key
 *    pair; verifiers trust its public key, loaded from a file or passed in;
 *  - launch measurement (SNP launch digest, TDX MRTD, SGX MRENCLAVE) -> SHA-256 over the
 *    enclave program's files (sorted, each hashed) and a canonical JSON of its configuration;
 *  - hardware sealing key (SNP MSG_KEY_REQ, SGX EGETKEY) -> HKDF-SHA256 of a platform secret,
 *    salted with the measurement, with the label as info.
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  hkdfSync,
  randomBytes,
  sign,
  verify,
  type KeyObject,
} from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  AttestationError,
  REPORT_DATA_BYTES,
  canonicalJson,
  checkEvidenceShape,
  fromBase64,
  fromHex,
  toBase64,
  toHex,
  type Evidence,
  type EvidenceVerifier,
  type TeePlatform,
  type VerifiedEvidence,
} from './platform.js';
import { InputError } from '../errors.js';

export const SIM_PLATFORM = 'sim-software' as const;
export const SIM_FORMAT_VERSION = 1;

const REPORT_TYPE = 'obfuscatune-sim-report';
const SIGNATURE_CONTEXT = Buffer.from('obfuscatune/sim-software/report/v1\0', 'utf8');
const SEALING_CONTEXT = 'obfuscatune/sim-software/sealing/v1\0';
const MEASUREMENT_CONTEXT = Buffer.from('obfuscatune/sim-software/measurement/v1\0', 'utf8');
const PLATFORM_SECRET_BYTES = 32;

// ---------------------------------------------------------------------------------------
// Simulated platform root

/** The simulated platform's secrets: what a CPU would keep fused in hardware. */
export interface SimRoot {
  /** Ed25519 private key that signs simulated attestation reports */
  signingKey: KeyObject;
  /** Ed25519 public key that verifiers trust */
  publicKey: KeyObject;
  /** secret from which sealing keys are derived */
  platformSecret: Uint8Array;
}

/** File names used by `createSimRoot` / `loadSimRoot` inside a root directory. */
export const SIM_ROOT_FILES = {
  privateKey: 'sim-root.key.pem',
  publicKey: 'sim-root.pub.pem',
  platformSecret: 'sim-platform.secret',
} as const;

export function generateSimRoot(): SimRoot {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return { signingKey: privateKey, publicKey, platformSecret: new Uint8Array(randomBytes(PLATFORM_SECRET_BYTES)) };
}

/**
 * Generates a root and writes it into `dir`: the private key and platform secret with mode
 * 0600, the public key (the file to hand to verifiers) with mode 0644. Refuses to overwrite
 * unless `overwrite`.
 */
export function createSimRoot(dir: string, opts: { overwrite?: boolean } = {}): SimRoot {
  const root = generateSimRoot();
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const flag = opts.overwrite ? 'w' : 'wx';
  const write = (name: string, data: string | Buffer, mode: number) => {
    fs.writeFileSync(path.join(dir, name), data, { mode, flag });
  };
  write(SIM_ROOT_FILES.privateKey, root.signingKey.export({ format: 'pem', type: 'pkcs8' }), 0o600);
  write(SIM_ROOT_FILES.platformSecret, toHex(root.platformSecret) + '\n', 0o600);
  write(SIM_ROOT_FILES.publicKey, root.publicKey.export({ format: 'pem', type: 'spki' }), 0o644);
  return root;
}

/** Loads a root written by `createSimRoot`. */
export function loadSimRoot(dir: string): SimRoot {
  const signingKey = createPrivateKey(fs.readFileSync(path.join(dir, SIM_ROOT_FILES.privateKey)));
  if (signingKey.asymmetricKeyType !== 'ed25519') {
    throw new InputError(`simulated platform root key in ${dir} is ${signingKey.asymmetricKeyType}, expected ed25519`);
  }
  const secretHex = fs.readFileSync(path.join(dir, SIM_ROOT_FILES.platformSecret), 'utf8').trim();
  const platformSecret = fromHex(secretHex, 'simulated platform secret');
  if (platformSecret.length !== PLATFORM_SECRET_BYTES) {
    throw new InputError(`simulated platform secret in ${dir} must be ${PLATFORM_SECRET_BYTES} bytes`);
  }
  return { signingKey, publicKey: createPublicKey(signingKey), platformSecret };
}

/** SHA-256 of the raw 32-byte Ed25519 public key, hex: a short name for a root in logs and reports. */
export function simRootFingerprint(publicKey: KeyObject): string {
  const jwk = publicKey.export({ format: 'jwk' });
  if (jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || typeof jwk.x !== 'string') throw new InputError('not an Ed25519 public key');
  return createHash('sha256').update(Buffer.from(jwk.x, 'base64url')).digest('hex');
}

function parseEd25519PublicKey(k: KeyObject | string): KeyObject {
  const key = typeof k === 'string' ? createPublicKey(k) : k.type === 'private' ? createPublicKey(k) : k;
  if (key.asymmetricKeyType !== 'ed25519') throw new InputError(`simulated platform root must be ed25519, got ${key.asymmetricKeyType}`);
  return key;
}

// ---------------------------------------------------------------------------------------
// Measurement

export interface MeasuredFile {
  /** path relative to the measured root, '/'-separated */
  path: string;
  /** SHA-256 of the file's contents, hex */
  sha256: string;
}

export interface ProgramMeasurement {
  /** the measurement, lower-case hex (SHA-256) */
  hex: string;
  /** the files that went in, sorted by path */
  files: MeasuredFile[];
}

/**
 * Measures the enclave program in `dir` (e.g. the compiled dist/src of the enclave) together
 * with its configuration. Walks `dir` recursively, keeps the files whose names end in '.js', and
 * returns SHA-256(context || canonicalJson({config, files: [{path, sha256}] sorted by path})).
 * Symbolic links are rejected: the measured bytes must be the bytes that run.
 */
export function measureDirectory(dir: string, config: unknown): ProgramMeasurement {
  const rel: string[] = [];
  const walk = (abs: string, prefix: string) => {
    for (const ent of fs.readdirSync(abs, { withFileTypes: true })) {
      const relPath = prefix ? `${prefix}/${ent.name}` : ent.name;
      if (ent.isSymbolicLink()) throw new InputError(`measureDirectory: symbolic link ${relPath} is not supported`);
      if (ent.isDirectory()) walk(path.join(abs, ent.name), relPath);
      else if (ent.isFile() && relPath.endsWith('.js')) rel.push(relPath);
    }
  };
  walk(dir, '');
  return measureFiles(dir, rel, config);
}

/** Measures the listed files (paths relative to `root`, any order) and configuration; see `measureDirectory`. */
export function measureFiles(root: string, relPaths: readonly string[], config: unknown): ProgramMeasurement {
  const normalized = relPaths.map((p) => p.split(path.sep).join('/'));
  if (new Set(normalized).size !== normalized.length) throw new InputError('measureFiles: duplicate path');
  const sha256 = (p: string) => createHash('sha256').update(fs.readFileSync(path.join(root, ...p.split('/')))).digest('hex');
  const files = normalized.sort().map((p) => ({ path: p, sha256: sha256(p) }));
  const manifest = canonicalJson({ config: config ?? null, files });
  return { hex: createHash('sha256').update(MEASUREMENT_CONTEXT).update(manifest, 'utf8').digest('hex'), files };
}

// ---------------------------------------------------------------------------------------
// Platform (enclave side)

/** The simulated platform an enclave process runs on. */
export class SimSoftwarePlatform implements TeePlatform {
  readonly name = SIM_PLATFORM;
  private readonly signer: string;
  private readonly measurementHex: string;

  constructor(private readonly root: Pick<SimRoot, 'signingKey' | 'platformSecret'>, measurement: string | { hex: string }) {
    const hex = (typeof measurement === 'string' ? measurement : measurement.hex).toLowerCase();
    if (hex.length === 0 || fromHex(hex, 'measurement').length === 0) throw new InputError('measurement must be non-empty hex');
    if (root.signingKey.asymmetricKeyType !== 'ed25519' || root.signingKey.type !== 'private') {
      throw new InputError('simulated platform signing key must be an Ed25519 private key');
    }
    this.measurementHex = hex;
    this.signer = simRootFingerprint(createPublicKey(root.signingKey));
  }

  measurement(): string {
    return this.measurementHex;
  }

  async attest(reportData: Uint8Array): Promise<Evidence> {
    if (reportData.length !== REPORT_DATA_BYTES) {
      throw new RangeError(`report data must be ${REPORT_DATA_BYTES} bytes, got ${reportData.length}`);
    }
    // what the evidence claims in clear, and its signed body repeats
    const claimed = {
      platform: SIM_PLATFORM, format_version: SIM_FORMAT_VERSION, measurement: this.measurementHex, report_data: toHex(reportData),
    };
    // issued_at is informational (freshness comes from the nonce); signer: the root's fingerprint (simRootFingerprint)
    const body = { type: REPORT_TYPE, ...claimed, issued_at: new Date().toISOString(), signer: this.signer, simulated: true };
    const bodyBytes = Buffer.from(canonicalJson(body), 'utf8');
    const signature = sign(null, Buffer.concat([SIGNATURE_CONTEXT, bodyBytes]), this.root.signingKey);
    return { ...claimed, body: bodyBytes.toString('base64'), signature: signature.toString('base64') };
  }

  async sealingKey(label: string): Promise<Uint8Array> {
    return deriveSimSealingKey(this.root.platformSecret, this.measurementHex, label);
  }
}

/** HKDF-SHA256(ikm = platform secret, salt = measurement bytes, info = context || label), 32 bytes. */
export function deriveSimSealingKey(platformSecret: Uint8Array, measurementHex: string, label: string): Uint8Array {
  const salt = fromHex(measurementHex.toLowerCase(), 'measurement');
  const info = Buffer.from(SEALING_CONTEXT + label, 'utf8');
  return new Uint8Array(hkdfSync('sha256', platformSecret, salt, info, 32));
}

// ---------------------------------------------------------------------------------------
// Verifier (relying-party side)

/**
 * Verifies 'sim-software' evidence against one or more trusted simulated roots. Configure it
 * only where simulated evidence is acceptable (development, tests, demos): it proves nothing
 * about hardware isolation.
 */
export class SimSoftwareVerifier implements EvidenceVerifier {
  readonly platform = SIM_PLATFORM;
  private readonly roots: KeyObject[];

  constructor(trustedRoots: KeyObject | string | ReadonlyArray<KeyObject | string>) {
    const list = Array.isArray(trustedRoots) ? trustedRoots : [trustedRoots as KeyObject | string];
    if (list.length === 0) throw new InputError('SimSoftwareVerifier needs at least one trusted root public key');
    this.roots = list.map(parseEd25519PublicKey);
  }

  /** Trusts the root public key in a PEM file (the one `createSimRoot` names sim-root.pub.pem). */
  static fromPublicKeyFile(file: string): SimSoftwareVerifier {
    return new SimSoftwareVerifier(fs.readFileSync(file, 'utf8'));
  }

  async verify(e: Evidence): Promise<VerifiedEvidence> {
    checkEvidenceShape(e);
    if (e.platform !== SIM_PLATFORM) {
      throw new AttestationError('unknown_platform', `unknown platform '${e.platform}' (this verifier handles '${SIM_PLATFORM}')`);
    }
    if (e.format_version !== SIM_FORMAT_VERSION) {
      throw new AttestationError('malformed_evidence', `malformed evidence: unsupported ${SIM_PLATFORM} format_version ${e.format_version}`);
    }
    let bodyBytes: Uint8Array;
    let sig: Uint8Array;
    try {
      bodyBytes = fromBase64(e.body, 'body');
      sig = fromBase64(e.signature, 'signature');
    } catch (err) {
      throw new AttestationError('malformed_evidence', `malformed evidence: ${(err as Error).message}`);
    }
    const signed = Buffer.concat([SIGNATURE_CONTEXT, bodyBytes]);
    const root = sig.length === 64 ? this.roots.find((k) => verify(null, signed, k, sig)) : undefined;
    if (!root) throw new AttestationError('bad_signature', 'bad signature: evidence is not signed by a trusted simulated platform root');

    let body: Record<string, unknown>;
    try {
      body = JSON.parse(Buffer.from(bodyBytes).toString('utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new AttestationError('malformed_evidence', 'malformed evidence: signed body is not JSON', { cause: err });
    }
    // the clear copies must be the signed values (checked in this order)
    const signedAs: Record<string, unknown> = {
      type: REPORT_TYPE, platform: e.platform, format_version: e.format_version, measurement: e.measurement.toLowerCase(),
      report_data: e.report_data.toLowerCase(), signer: simRootFingerprint(root),
    };
    const differs = Object.keys(signedAs).find((k) => body[k] !== signedAs[k]);
    if (differs) throw new AttestationError('malformed_evidence', `malformed evidence: ${differs} does not match the signed body`);

    return {
      platform: SIM_PLATFORM,
      measurement: body.measurement as string,
      reportData: fromHex(body.report_data as string, 'report_data'),
      simulated: true,
      claims: { issued_at: body.issued_at, signer: body.signer },
      evidence: e,
    };
  }
}
