/**
 * Ed25519 signatures (Node's crypto) for the parties' requests and the deployment contract.
 *
 * A party's signing key is its identity towards the enclave: every upload chunk and every
 * command is signed over the whole request (the sender's public key, the reply key, the
 * attestation session transcript, the request id, the timestamp and the ciphertext), so
 * stating someone else's public key in clear text proves nothing. Public keys travel as
 * raw 32-byte keys in base64; private keys are PKCS#8 DER in base64 in the party's key file.
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { ObfuscatuneError } from '../errors.js';
import { fromBase64, toBase64 } from './platform.js';

export const ED25519_PUBLIC_KEY_BYTES = 32;
export const ED25519_SIGNATURE_BYTES = 64;
/** DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw key follows */
const SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

/** A signature that does not verify, or a key or signature that is not well formed. */
export class SignatureError extends ObfuscatuneError {}

export interface SigningKeyPair {
  /** raw Ed25519 public key, 32 bytes */
  publicKey: Uint8Array;
  privateKey: KeyObject;
}

export function generateSigningKeyPair(): SigningKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return { publicKey: rawPublicKey(publicKey), privateKey };
}

function rawPublicKey(k: KeyObject): Uint8Array {
  const der = k.export({ format: 'der', type: 'spki' });
  return new Uint8Array(der.subarray(der.length - ED25519_PUBLIC_KEY_BYTES));
}

/** PKCS#8 DER (base64) of a private key, for the key file. */
export function signingPrivateKeyToBase64(k: KeyObject): string {
  return k.export({ format: 'der', type: 'pkcs8' }).toString('base64');
}

/** Reads a private key written by `signingPrivateKeyToBase64`; its public half is derived from it. */
export function signingKeyPairFromBase64(privateB64: string, what = 'signing key'): SigningKeyPair {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: Buffer.from(fromBase64(privateB64, what)), format: 'der', type: 'pkcs8' });
  } catch (e) {
    throw new SignatureError(`${what}: not a PKCS#8 private key (${(e as Error).message})`, { cause: e });
  }
  if (privateKey.asymmetricKeyType !== 'ed25519') throw new SignatureError(`${what}: an ${privateKey.asymmetricKeyType} key, expected ed25519`);
  return { publicKey: rawPublicKey(createPublicKey(privateKey)), privateKey };
}

export function signingPublicKeyFromBase64(s: unknown, what = 'signing public key'): Uint8Array {
  let k: Uint8Array;
  try {
    if (typeof s !== 'string') throw new TypeError('not a string');
    k = fromBase64(s, what);
  } catch (e) {
    throw new SignatureError(`${what} is not valid base64`, { cause: e });
  }
  if (k.length !== ED25519_PUBLIC_KEY_BYTES) throw new SignatureError(`${what} must be ${ED25519_PUBLIC_KEY_BYTES} bytes`);
  return k;
}

export function signBytes(key: SigningKeyPair, message: Uint8Array): string {
  return toBase64(new Uint8Array(sign(null, message, key.privateKey)));
}

/** Throws SignatureError unless `signature` (base64) is `publicKey`'s signature of `message`. */
export function verifySignature(publicKey: Uint8Array, message: Uint8Array, signature: unknown, what: string): void {
  let sig: Uint8Array;
  try {
    if (typeof signature !== 'string') throw new TypeError('missing');
    sig = fromBase64(signature, 'signature');
  } catch (e) {
    throw new SignatureError(`${what}: signature missing or not base64`, { cause: e });
  }
  if (sig.length !== ED25519_SIGNATURE_BYTES) throw new SignatureError(`${what}: signature must be ${ED25519_SIGNATURE_BYTES} bytes`);
  if (publicKey.length !== ED25519_PUBLIC_KEY_BYTES) throw new SignatureError(`${what}: public key must be ${ED25519_PUBLIC_KEY_BYTES} bytes`);
  const key = createPublicKey({ key: Buffer.concat([SPKI_PREFIX, publicKey]), format: 'der', type: 'spki' });
  if (!verify(null, message, key, sig)) throw new SignatureError(`${what}: bad signature (the request was not signed by the key it names)`);
}
