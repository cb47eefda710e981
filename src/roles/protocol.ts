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
 * Messages are UTF-8 JSON; binary fields are base64. Every sealed payload carries a request
 * id and a timestamp inside the ciphertext; the enclave refuses replays.
 */
import * as grpc from '@grpc/grpc-js';
import type { SealedMessageJson } from '../tee/hpke.js';
import { clientChannelOptions, serverOptions } from '../rpc/grpc.js';
import { errorFromStatus } from '../rpc/status.js';
import { InputError } from '../errors.js';

const json = {
  ser: (v: unknown): Buffer => Buffer.from(JSON.stringify(v), 'utf8'),
  de: (b: Buffer): unknown => {
    try {
      return JSON.parse(b.toString('utf8'));
    } catch {
      throw new InputError('malformed JSON message');
    }
  },
};

function method(service: string, name: string, requestStream = false): grpc.MethodDefinition<unknown, unknown> {
  return {
    path: `/${service}/${name}`, requestStream, responseStream: false,
    requestSerialize: json.ser, requestDeserialize: json.de, responseSerialize: json.ser, responseDeserialize: json.de, originalName: name,
  };
}

export const ENCLAVE_SERVICE = {
  Attest: method('obfuscatune.Enclave', 'Attest'),
  Upload: method('obfuscatune.Enclave', 'Upload', true),
  Command: method('obfuscatune.Enclave', 'Command'),
  Health: method('obfuscatune.Enclave', 'Health'),
} satisfies grpc.ServiceDefinition;

export const ACC_ADMIN_SERVICE = {
  LoadBundle: method('obfuscatune.AcceleratorAdmin', 'LoadBundle', true),
  Export: method('obfuscatune.AcceleratorAdmin', 'Export'),
} satisfies grpc.ServiceDefinition;

export type UploadKind = 'bundle' | 'dataset';

export interface UploadChunk {
  kind: UploadKind;
  /** dataset split ("train" | "eval") or bundle name */
  name: string;
  upload_id: string;
  index: number;
  total: number;
  /** the sender's HPKE public key (base64): replies are sealed to it */
  sender: string;
  /** the attestation session this chunk was sealed under */
  session: string;
  sealed: SealedMessageJson;
}

export interface SealedCommand {
  sender: string;
  session: string;
  sealed: SealedMessageJson;
}

export interface SealedReply {
  sealed: SealedMessageJson;
}

/** additional authenticated data of an upload chunk: binds kind, name, position and upload */
export function chunkAad(c: Pick<UploadChunk, 'kind' | 'name' | 'upload_id' | 'index' | 'total'>): Uint8Array {
  return new TextEncoder().encode(`obfuscatune/upload/${c.kind}/${c.name}/${c.upload_id}/${c.index}/${c.total}`);
}

export function replyAad(requestId: string): Uint8Array {
  return new TextEncoder().encode(`obfuscatune/reply/${requestId}`);
}

export const COMMAND_AAD = new TextEncoder().encode('obfuscatune/command');

export const EnclaveServiceClient = grpc.makeGenericClientConstructor(ENCLAVE_SERVICE, 'Enclave');
export const AccAdminClient = grpc.makeGenericClientConstructor(ACC_ADMIN_SERVICE, 'AcceleratorAdmin');

export const MAX_CLIENT_MESSAGE_BYTES = 64 * 1024 * 1024;

export function clientOptions(): grpc.ChannelOptions {
  return clientChannelOptions({ maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES });
}

export function enclaveServerOptions(): grpc.ServerOptions {
  return serverOptions({ maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES });
}

/** Promise wrapper of a unary call; a failure rejects with the typed error of errorFromStatus. */
export function unary<T>(client: grpc.Client, def: grpc.MethodDefinition<unknown, unknown>, req: unknown, deadlineMs = 60_000): Promise<T> {
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(def.path, def.requestSerialize, def.responseDeserialize, req, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, v) => {
      if (err) reject(errorFromStatus(err, String(def.originalName ?? def.path)));
      else resolve(v as T);
    });
  });
}

/** Promise wrapper of a client-streaming call. */
export function clientStream<T>(client: grpc.Client, def: grpc.MethodDefinition<unknown, unknown>, items: unknown[], deadlineMs = 600_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const call = client.makeClientStreamRequest(def.path, def.requestSerialize, def.responseDeserialize, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, v) => {
      if (err) reject(errorFromStatus(err, String(def.originalName ?? def.path)));
      else resolve(v as T);
    });
    (async () => {
      for (const it of items) {
        if (!call.write(it)) await new Promise((r) => call.once('drain', r));
      }
      call.end();
    })().catch((e) => reject(errorFromStatus(e, String(def.originalName ?? def.path))));
  });
}

/** Splits bytes into chunks of at most n bytes. */
export function chunks(b: Uint8Array, n = 4 * 1024 * 1024): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < b.length; i += n) out.push(b.subarray(i, Math.min(b.length, i + n)));
  if (out.length === 0) out.push(new Uint8Array(0));
  return out;
}

/** A tiny archive of a directory's files: [u32 name length, name, u64 size, bytes]*. */
export function packFiles(files: { name: string; data: Uint8Array }[]): Uint8Array {
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

export function unpackFiles(b: Uint8Array, maxFiles = 64): { name: string; data: Uint8Array }[] {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  const out: { name: string; data: Uint8Array }[] = [];
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
