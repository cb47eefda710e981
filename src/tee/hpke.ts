/**
 * End-to-end encryption to an attested enclave with HPKE (RFC 9180), base mode, single shot.
 *
 * Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, via the @hpke packages.
 * The X25519 KEM comes from @hpke/dhkem-x25519 (a pure-JavaScript implementation), so it does
 * not depend on the Node version's WebCrypto X25519 support.
 *
 * Keys are raw bytes: 32-byte X25519 public and private keys. Callers pass the attestation
 * transcript (see attest.ts) as `info`, so a ciphertext can only be opened by the enclave
 * instance whose evidence the sender verified; `aad` binds request metadata (request id, kind).
 */
import { Aes256Gcm, CipherSuite, HkdfSha256 } from '@hpke/core';
import { DhkemX25519HkdfSha256 } from '@hpke/dhkem-x25519';
import { fromBase64, toBase64 } from './platform.js';
import { ObfuscatuneError } from '../errors.js';

/** Length of X25519 public keys, private keys and the HPKE encapsulated key `enc`. */
export const X25519_KEY_BYTES = 32;

const suite = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm() });

export class HpkeError extends ObfuscatuneError {}

export interface HpkeKeyPair {
  /** raw X25519 public key, 32 bytes */
  publicKey: Uint8Array;
  /** raw X25519 private key, 32 bytes: never leaves the enclave */
  privateKey: Uint8Array;
}

/** An HPKE single-shot ciphertext: the encapsulated key and the AEAD ciphertext (with tag). */
export interface SealedMessage {
  enc: Uint8Array;
  ciphertext: Uint8Array;
}

/** JSON form of `SealedMessage` (base64 fields) for transports that carry strings. */
export interface SealedMessageJson {
  enc: string;
  ciphertext: string;
}

const EMPTY = new Uint8Array(0);

export async function generateHpkeKeyPair(): Promise<HpkeKeyPair> {
  const kp = await suite.kem.generateKeyPair();
  return {
    publicKey: new Uint8Array(await suite.kem.serializePublicKey(kp.publicKey)),
    privateKey: new Uint8Array(await suite.kem.serializePrivateKey(kp.privateKey)),
  };
}

/** Encrypts `plaintext` to `recipientPublicKey`, bound to `info` and `aad`. */
export async function sealTo(
  recipientPublicKey: Uint8Array,
  plaintext: Uint8Array,
  info: Uint8Array,
  aad: Uint8Array = EMPTY,
): Promise<SealedMessage> {
  checkKey(recipientPublicKey, 'recipient public key');
  const pk = await suite.kem.deserializePublicKey(recipientPublicKey).catch((err: unknown) => {
    throw new HpkeError('invalid recipient public key', { cause: err });
  });
  try {
    const { ct, enc } = await suite.seal({ recipientPublicKey: pk, info }, plaintext, aad);
    return { enc: new Uint8Array(enc), ciphertext: new Uint8Array(ct) };
  } catch (err) {
    throw new HpkeError(`encryption failed: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Decrypts a message sealed with `sealTo`. Throws `HpkeError('decryption failed: ciphertext or
 * context tampered')` when the ciphertext, `enc`, `info` or `aad` differ from the sender's, or the
 * message was sealed to another key.
 */
export async function openWith(
  privateKey: Uint8Array,
  sealed: SealedMessage,
  info: Uint8Array,
  aad: Uint8Array = EMPTY,
): Promise<Uint8Array> {
  checkKey(privateKey, 'private key');
  if (!(sealed.enc instanceof Uint8Array) || sealed.enc.length !== X25519_KEY_BYTES || !(sealed.ciphertext instanceof Uint8Array)) {
    throw new HpkeError(`decryption failed: malformed message (enc must be ${X25519_KEY_BYTES} bytes)`);
  }
  const sk = await suite.kem.deserializePrivateKey(privateKey).catch((err: unknown) => {
    throw new HpkeError('invalid private key', { cause: err });
  });
  try {
    const pt = await suite.open({ recipientKey: sk, enc: sealed.enc, info }, sealed.ciphertext, aad);
    return new Uint8Array(pt);
  } catch (err) {
    throw new HpkeError('decryption failed: ciphertext or context tampered', { cause: err });
  }
}

function checkKey(k: Uint8Array, what: string): void {
  if (!(k instanceof Uint8Array) || k.length !== X25519_KEY_BYTES) {
    throw new HpkeError(`${what} must be ${X25519_KEY_BYTES} bytes`);
  }
}

export function publicKeyToBase64(publicKey: Uint8Array): string {
  checkKey(publicKey, 'public key');
  return toBase64(publicKey);
}

/** base64 -> raw public key (checked to be 32 bytes). */
export function publicKeyFromBase64(s: string): Uint8Array {
  let k: Uint8Array;
  try {
    k = fromBase64(s, 'public key');
  } catch (err) {
    throw new HpkeError('public key is not valid base64', { cause: err });
  }
  checkKey(k, 'public key');
  return k;
}

export function sealedToJson(m: SealedMessage): SealedMessageJson {
  return { enc: toBase64(m.enc), ciphertext: toBase64(m.ciphertext) };
}

export function sealedFromJson(j: SealedMessageJson): SealedMessage {
  try {
    return { enc: fromBase64(j.enc, 'enc'), ciphertext: fromBase64(j.ciphertext, 'ciphertext') };
  } catch (err) {
    throw new HpkeError(`malformed sealed message: ${(err as Error).message}`, { cause: err });
  }
}
