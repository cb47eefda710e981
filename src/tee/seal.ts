/**
 * Sealing: encrypting data so that only the same program on the same platform can read it
 * back (e.g. checkpoints or adapter weights the enclave stores on untrusted disk).
 *
 * Blob layout:
 *   magic 'OBFTSEAL' (8 bytes) | version u8 (=1) | header length u32 BE | header (JSON) | AES-256-GCM ciphertext || tag
 * The header names the platform, label and measurement the blob was sealed under, plus a
 * random salt and IV. The data key is HKDF-SHA256(platform sealing key for `label`, salt),
 * so each blob has its own key; everything before the ciphertext is the GCM additional data,
 * so the header cannot be altered without detection.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { z } from 'zod';
import { canonicalJson, fromBase64, toBase64, type TeePlatform } from './platform.js';
import { ObfuscatuneError } from '../errors.js';

const MAGIC = Buffer.from('OBFTSEAL', 'latin1');
const VERSION = 1;
const PREFIX_BYTES = MAGIC.length + 1 + 4;
const TAG_BYTES = 16;
const IV_BYTES = 12;
const SALT_BYTES = 32;
const KEY_CONTEXT = 'obfuscatune/seal/v1\0';
const MAX_HEADER_BYTES = 64 * 1024;

const HeaderSchema = z.object({
  platform: z.string(), label: z.string(), measurement: z.string(), alg: z.literal('AES-256-GCM'), kdf: z.literal('HKDF-SHA256'),
  /** both base64 */
  salt: z.string(), iv: z.string(),
}).passthrough();

export type SealedBlobHeader = z.infer<typeof HeaderSchema>;

export type SealErrorCode = 'malformed' | 'label_mismatch' | 'platform_mismatch' | 'measurement_mismatch' | 'auth_failed';

export class SealError extends ObfuscatuneError {
  constructor(readonly code: SealErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

function dataKey(sealingKey: Uint8Array, salt: Uint8Array, label: string): Buffer {
  return Buffer.from(hkdfSync('sha256', sealingKey, salt, Buffer.from(KEY_CONTEXT + label, 'utf8'), 32));
}

/** Seals `data` under `platform`'s sealing key for `label`. */
export async function sealBlob(platform: TeePlatform, label: string, data: Uint8Array): Promise<Uint8Array> {
  const sealingKey = await platform.sealingKey(label);
  const salt = randomBytes(SALT_BYTES);
  const iv = randomBytes(IV_BYTES);
  const header: SealedBlobHeader = {
    platform: platform.name,
    label,
    measurement: platform.measurement(),
    alg: 'AES-256-GCM',
    kdf: 'HKDF-SHA256',
    salt: toBase64(salt),
    iv: toBase64(iv),
  };
  const headerBytes = Buffer.from(canonicalJson(header), 'utf8');
  const prefix = Buffer.alloc(PREFIX_BYTES);
  MAGIC.copy(prefix, 0);
  prefix.writeUInt8(VERSION, MAGIC.length);
  prefix.writeUInt32BE(headerBytes.length, MAGIC.length + 1);
  const aad = Buffer.concat([prefix, headerBytes]);
  const cipher = createCipheriv('aes-256-gcm', dataKey(sealingKey, salt, label), iv);
  cipher.setAAD(aad);
  const ct = Buffer.concat([cipher.update(data), cipher.final()]);
  return new Uint8Array(Buffer.concat([aad, ct, cipher.getAuthTag()]));
}

/** Reads a sealed blob's header without decrypting (e.g. to report which program sealed it). */
export function readSealedHeader(blob: Uint8Array): SealedBlobHeader {
  return parse(blob).header;
}

function parse(blob: Uint8Array): { header: SealedBlobHeader; aad: Buffer; body: Buffer } {
  const b = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
  if (b.length < PREFIX_BYTES || !b.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new SealError('malformed', 'not a sealed blob (bad magic)');
  }
  const version = b.readUInt8(MAGIC.length);
  if (version !== VERSION) throw new SealError('malformed', `unsupported sealed blob version ${version}`);
  const headerLen = b.readUInt32BE(MAGIC.length + 1);
  if (headerLen > MAX_HEADER_BYTES || PREFIX_BYTES + headerLen + TAG_BYTES > b.length) {
    throw new SealError('malformed', 'sealed blob truncated or header too large');
  }
  let parsed: ReturnType<typeof HeaderSchema.safeParse>;
  try {
    parsed = HeaderSchema.safeParse(JSON.parse(b.subarray(PREFIX_BYTES, PREFIX_BYTES + headerLen).toString('utf8')));
  } catch (err) {
    throw new SealError('malformed', 'sealed blob header is not JSON', { cause: err });
  }
  if (!parsed.success) throw new SealError('malformed', 'sealed blob header has missing or unsupported fields');
  return { header: parsed.data, aad: b.subarray(0, PREFIX_BYTES + headerLen), body: b.subarray(PREFIX_BYTES + headerLen) };
}

/**
 * Unseals a blob produced by `sealBlob` on the same platform, by the same program, under the
 * same label. Throws `SealError` naming what differs, or 'auth_failed' if the blob was altered
 * or sealed by another platform instance.
 */
export async function unsealBlob(platform: TeePlatform, label: string, blob: Uint8Array): Promise<Uint8Array> {
  const { header, aad, body } = parse(blob);
  if (header.label !== label) {
    throw new SealError('label_mismatch', `sealed blob label '${header.label}' does not match expected label '${label}'`);
  }
  if (header.platform !== platform.name) {
    throw new SealError('platform_mismatch', `blob was sealed on platform '${header.platform}', this is '${platform.name}'`);
  }
  const measurement = platform.measurement();
  if (header.measurement !== measurement) {
    throw new SealError(
      'measurement_mismatch',
      `blob was sealed under measurement ${header.measurement}, this enclave's measurement is ${measurement}: a different program cannot unseal it`,
    );
  }
  let salt: Uint8Array;
  let iv: Uint8Array;
  try {
    salt = fromBase64(header.salt, 'salt');
    iv = fromBase64(header.iv, 'iv');
  } catch (err) {
    throw new SealError('malformed', `sealed blob header: ${(err as Error).message}`, { cause: err });
  }
  if (salt.length !== SALT_BYTES || iv.length !== IV_BYTES) throw new SealError('malformed', 'sealed blob header: bad salt or iv length');
  const sealingKey = await platform.sealingKey(label);
  try {
    const decipher = createDecipheriv('aes-256-gcm', dataKey(sealingKey, salt, label), iv);
    decipher.setAAD(aad);
    decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
    const pt = Buffer.concat([decipher.update(body.subarray(0, body.length - TAG_BYTES)), decipher.final()]);
    return new Uint8Array(pt.buffer, pt.byteOffset, pt.byteLength);
  } catch (err) {
    throw new SealError('auth_failed', 'unseal failed: blob tampered, or sealed by another platform instance or program', { cause: err });
  }
}
