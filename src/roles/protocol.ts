/**
 * The clients <-> enclave protocol over gRPC, and the provider -> accelerator upload.
 *
 * service obfuscatune.Enclave {
 *   rpc Attest(AttestationRequest) returns (AttestationResponse);   // plain: evidence binds key + nonce
 *   rpc Upload(stream UploadChunk) returns (UploadReceipt);          // HPKE-sealed chunks / records
 *   rpc Command(SealedCommand) returns (SealedReply);                // HPKE both ways
 *   rpc Health(Empty) returns (HealthStatus);
 * }
 * service obfuscatune.AcceleratorAdmin {
 *   rpc LoadBundle(stream BundleChunk) returns (Receipt);            // obfuscated weights: no secret
 *   rpc Export(Empty) returns (Weights);                             // the trained obfuscated weights
 * }
 * Messages are UTF-8 JSON; binary fields are base64. Every upload chunk and command names its
 * sender (the party's Ed25519 public key) and the key its reply is sealed to, carries a
 * request id and a timestamp, and is signed by the sender over all of that, the attestation
 * transcript and the ciphertext (`commandSignedBytes`, `chunkSignedBytes`); the enclave
 * checks the signature before anything else and refuses replays and stale requests.
 */
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { SealedMessageJson } from '../tee/hpke.js';
import { clientChannelOptions, methodDef, type Codec } from '../rpc/grpc.js';
import { errorFromStatus } from '../rpc/status.js';
import { InputError } from '../errors.js';
import { lengthPrefixed, fromBase64 } from '../tee/platform.js';

const json: Codec<unknown> = {
  ser: (v) => Buffer.from(JSON.stringify(v), 'utf8'),
  de: (b) => {
    try {
      return JSON.parse(b.toString('utf8'));
    } catch {
      throw new InputError('malformed JSON message');
    }
  },
};

export const ENCLAVE_SERVICE = {
  Attest: methodDef('obfuscatune.Enclave', 'Attest', json),
  Upload: methodDef('obfuscatune.Enclave', 'Upload', json, true),
  Command: methodDef('obfuscatune.Enclave', 'Command', json),
  Health: methodDef('obfuscatune.Enclave', 'Health', json),
} satisfies grpc.ServiceDefinition;

export const ACC_ADMIN_SERVICE = {
  LoadBundle: methodDef('obfuscatune.AcceleratorAdmin', 'LoadBundle', json, true),
  Export: methodDef('obfuscatune.AcceleratorAdmin', 'Export', json),
} satisfies grpc.ServiceDefinition;

export type UploadKind = 'bundle' | 'dataset';

export type PackedFile = { name: string; data: Uint8Array };

/** What every upload chunk and command carries. */
interface SignedRequest {
  /** the sender's Ed25519 public key (base64): who the party is */
  sender: string;
  /** the sender's HPKE public key (base64): the reply (or receipt) is sealed to it */
  reply_key: string;
  /** the attestation session it was sealed under */
  session: string;
  /** when it was signed (ms since the epoch; the same for every chunk of an upload): the replay rules */
  ts: number;
  sealed: SealedMessageJson;
  /** the sender's signature of `chunkSignedBytes` or `commandSignedBytes` (base64) */
  signature: string;
}

export interface UploadChunk extends SignedRequest {
  kind: UploadKind;
  /** dataset split ("train" | "eval") or bundle name */
  name: string;
  upload_id: string;
  index: number;
  total: number;
}

export interface SealedCommand extends SignedRequest {
  /** request id (unique) */
  id: string;
}

export interface SealedReply {
  sealed: SealedMessageJson;
}

const te = (s: string) => new TextEncoder().encode(s);

/** additional authenticated data of an upload chunk: binds kind, name, position and upload */
export function chunkAad(c: Pick<UploadChunk, 'kind' | 'name' | 'upload_id' | 'index' | 'total'>): Uint8Array {
  return te(`obfuscatune/upload/${c.kind}/${c.name}/${c.upload_id}/${c.index}/${c.total}`);
}

export function replyAad(requestId: string): Uint8Array {
  return te(`obfuscatune/reply/${requestId}`);
}

/** additional authenticated data of a command's ciphertext: binds it to its request id */
export function commandAad(requestId: string): Uint8Array {
  return te(`obfuscatune/command/${requestId}`);
}

function sealedBytes(j: SealedMessageJson): Uint8Array[] {
  try {
    return [fromBase64(String(j?.enc), 'enc'), fromBase64(String(j?.ciphertext), 'ciphertext')];
  } catch (e) {
    throw new InputError(`malformed sealed message: ${(e as Error).message}`, { cause: e });
  }
}

/** What the sender of a command signs: every field of the request and the session's transcript. */
export function commandSignedBytes(c: Omit<SealedCommand, 'signature'>, transcript: Uint8Array): Uint8Array {
  return lengthPrefixed(te('obfuscatune/command/v1'), te(String(c.sender)), te(String(c.reply_key)), transcript, te(String(c.id)), te(String(c.ts)), ...sealedBytes(c.sealed));
}

/** What the sender of an upload chunk signs. */
export function chunkSignedBytes(c: Omit<UploadChunk, 'signature'>, transcript: Uint8Array): Uint8Array {
  return lengthPrefixed(
    te('obfuscatune/upload/v1'), te(String(c.sender)), te(String(c.reply_key)), transcript, te(String(c.upload_id)), te(String(c.ts)),
    te(String(c.kind)), te(String(c.name)), te(String(c.index)), te(String(c.total)), ...sealedBytes(c.sealed),
  );
}

/** Replies are padded (JSON, then spaces) to a multiple of this many bytes for their command, so their length tells little. */
export const REPLY_PAD_BYTES: Record<string, number> = {
  status: 16 * 1024, infer: 64 * 1024, fetch_update: 1024 * 1024, submit_contract: 1024, cancel: 1024,
};

export function padReply(op: string, json: string): Uint8Array {
  const b = te(json);
  const block = REPLY_PAD_BYTES[op] ?? 1024;
  const out = new Uint8Array(Math.max(1, Math.ceil(b.length / block)) * block).fill(0x20);
  out.set(b);
  return out;
}

/**
 * `checkpoint_load` of this tag makes the accelerator service reload its bundle's weights
 * from disk (the enclave does so at the fresh start of every job).
 */
export const BUNDLE_WEIGHTS_TAG = 'bundle-weights';

/** The checkpoint tags an accelerator service accepts (the training loop's names, and BUNDLE_WEIGHTS_TAG for loads). */
export const CHECKPOINT_TAG = /^step-\d{7}$/;

export const EnclaveServiceClient = grpc.makeGenericClientConstructor(ENCLAVE_SERVICE, 'Enclave');
export const AccAdminClient = grpc.makeGenericClientConstructor(ACC_ADMIN_SERVICE, 'AcceleratorAdmin');

export const MAX_CLIENT_MESSAGE_BYTES = 64 * 1024 * 1024;

export function clientOptions(): grpc.ChannelOptions {
  return clientChannelOptions({ maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES });
}

type MethodDef = grpc.MethodDefinition<unknown, unknown>;

/** The callback of a call to `def`: a failure rejects with the typed error of errorFromStatus. */
function settle<T>(def: MethodDef, resolve: (v: T) => void, reject: (e: unknown) => void) {
  return (err: unknown, v?: unknown) => (err ? reject(errorFromStatus(err, String(def.originalName ?? def.path))) : resolve(v as T));
}

/** Promise wrapper of a unary call. */
export function unary<T>(client: grpc.Client, def: MethodDef, req: unknown, deadlineMs = 60_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const deadline = { deadline: Date.now() + deadlineMs };
    client.makeUnaryRequest(def.path, def.requestSerialize, def.responseDeserialize, req, new grpc.Metadata(), deadline, settle(def, resolve, reject));
  });
}

/** Promise wrapper of a client-streaming call. */
export function clientStream<T>(client: grpc.Client, def: MethodDef, items: unknown[], deadlineMs = 600_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const done = settle(def, resolve, reject);
    const deadline = { deadline: Date.now() + deadlineMs };
    const call = client.makeClientStreamRequest(def.path, def.requestSerialize, def.responseDeserialize, new grpc.Metadata(), deadline, done);
    (async () => {
      for (const it of items) {
        if (!call.write(it)) await new Promise((r) => call.once('drain', r));
      }
      call.end();
    })().catch((e) => done(e));
  });
}

/** Splits bytes into chunks of at most n bytes. */
export function chunks(b: Uint8Array, n = 4 * 1024 * 1024): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < b.length; i += n) out.push(b.subarray(i, Math.min(b.length, i + n)));
  if (out.length === 0) out.push(new Uint8Array(0));
  return out;
}

/** The files of a directory (not recursive), as packFiles takes them. */
export function readDirFiles(dir: string): PackedFile[] {
  return readdirSync(dir).map((name) => ({ name, data: readFileSync(path.join(dir, name)) }));
}

/** Writes `files` into `dir`, which is made afresh (what was there goes). */
export function writeDirFiles(dir: string, files: PackedFile[]): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  for (const f of files) writeFileSync(path.join(dir, f.name), f.data);
}

/** A tiny archive of a directory's files: [u32 name length, name, u64 size, bytes]*. */
export function packFiles(files: PackedFile[]): Uint8Array {
  const parts: Buffer[] = [];
  for (const f of files) {
    const name = Buffer.from(f.name, 'utf8');
    const h = Buffer.alloc(12);
    h.writeUInt32LE(name.length, 0);
    h.writeBigUInt64LE(BigInt(f.data.length), 4);
    parts.push(h.subarray(0, 4), name, h.subarray(4, 12), Buffer.from(f.data.buffer, f.data.byteOffset, f.data.length));
  }
  return Buffer.concat(parts);
}

export function unpackFiles(b: Uint8Array, maxFiles = 64): PackedFile[] {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  const out: PackedFile[] = [];
  let off = 0;
  while (off < buf.length) {
    if (out.length >= maxFiles) throw new InputError('archive: too many files');
    if (off + 4 > buf.length) throw new InputError('archive: truncated');
    const nl = buf.readUInt32LE(off);
    off += 4;
    if (nl === 0 || nl > 255 || off + nl + 8 > buf.length) throw new InputError('archive: bad file name');
    const name = buf.subarray(off, off + nl).toString('utf8');
    if (!/^[A-Za-z0-9_.-]+$/.test(name)) throw new InputError(`archive: refusing file name "${name}"`);
    off += nl;
    const size = Number(buf.readBigUInt64LE(off));
    off += 8;
    if (off + size > buf.length) throw new InputError(`archive: file ${name} truncated`);
    out.push({ name, data: buf.subarray(off, off + size) });
    off += size;
  }
  return out;
}

/** The provider's proof on an accelerator admin call (LoadBundle, Export), signed with its contract key. */
export interface AdminAuth {
  /** the provider's Ed25519 public key (base64) */
  sender: string;
  ts: number;
  /** random, once per call (the replay rules) */
  nonce: string;
  /** SHA-256 (hex) of the call's payload: the packed bundle of LoadBundle, empty for Export */
  payload_sha256: string;
  signature: string;
}

export function adminSignedBytes(method: string, a: Omit<AdminAuth, 'signature'>): Uint8Array {
  return lengthPrefixed(te('obfuscatune/accelerator-admin/v1'), te(method), te(String(a.sender)), te(String(a.ts)), te(String(a.nonce)), te(String(a.payload_sha256)));
}
