/**
 * The one narrow API between the enclave and the accelerator. Every request names an
 * obfuscated linear layer and carries an obfuscated tensor; there is no message that
 * carries token ids, labels, logits, losses or a plaintext activation. Messages encode to
 * a self-describing binary frame (JSON header + raw float32 payloads) for any transport.
 */
import { z } from 'zod';
import { ALL_LINEARS } from '../model/block.js';

declare const obfuscatedBrand: unique symbol;
/**
 * A float32 tensor in an obfuscated basis. Only the enclave's bases (src/enclave/bases.ts)
 * create these, the token mixing (src/enclave/mixing.ts) as row combinations of obfuscated
 * tensors, and the client from a reply it has checked (`checkTensorReply`), so a
 * plaintext Float32Array cannot be handed to the accelerator by mistake.
 */
export type Obfuscated = Float32Array & { readonly [obfuscatedBrand]: true };

/** Marks a tensor as obfuscated. Call only on tensors produced in a masked basis. */
export function asObfuscated(x: Float32Array): Obfuscated {
  return x as Obfuscated;
}

const f32 = <T extends Float32Array>() => z.custom<T>((v) => v instanceof Float32Array, { error: 'not a float32 tensor' });
const layerRef = {
  layer: z.number().int().nonnegative({ error: (i) => `invalid layer ${JSON.stringify(i.input)}` }),
  name: z.enum(ALL_LINEARS, { error: (i) => `unknown linear "${String(i.input)}" (expected one of ${ALL_LINEARS.join(', ')})` }),
};
const rows = z.number().int().positive({ error: 'rows must be a positive integer' });
const tag = z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, { error: 'checkpoint tag must be 1-64 characters of [A-Za-z0-9_.-]' });

/** Every message as the schema a decoded frame must match (shapes are checked by the receiver). */
const MESSAGE = z.discriminatedUnion('op', [
  // y* = x* W* + b* (x*: rows x din); with `save` the accelerator keeps x* for the backward pass
  z.object({ op: z.literal('linear_forward'), ...layerRef, rows, x: f32<Obfuscated>(), save: z.boolean().optional() }),
  // backward of a linear whose input was saved: dx* = dy* W*^T when `input`; with `weight`
  // dW* += x*^T dy*, db* += colsum(dy*) on the accelerator
  z.object({ op: z.literal('linear_backward'), ...layerRef, rows, dy: f32<Obfuscated>(), input: z.boolean(), weight: z.boolean() }),
  // SGD(-momentum) step on every accumulated weight gradient, then zero them; gradients are
  // multiplied by gradScale first (global-norm clipping is decided by the enclave)
  z.object({ op: z.literal('apply_update'), lr: z.number(), momentum: z.number(), gradScale: z.number() }),
  // squared Frobenius norm of all accumulated weight gradients (for global clipping)
  z.object({ op: z.literal('grad_sq_norm') }),
  // drop saved inputs and accumulated gradients (an aborted step)
  z.object({ op: z.literal('reset') }),
  // persist (or restore) the accelerator's weights and optimiser state under a tag
  z.object({ op: z.enum(['checkpoint_save', 'checkpoint_load']), tag }),
  // data: in the basis of the request's tensor; `Obfuscated` once the client has checked it
  z.object({ op: z.literal('tensor'), rows: z.number(), cols: z.number(), data: f32() }),
  // value: e.g. the squared gradient norm; text: e.g. a checkpoint digest
  z.object({ op: z.literal('ack'), value: z.number().optional(), text: z.string().optional() }),
  z.object({ op: z.literal('error'), message: z.string() }),
], { error: (i) => `unknown message op ${JSON.stringify((i.input as { op?: unknown } | undefined)?.op)}` });

type Message = z.infer<typeof MESSAGE>;
const REQUEST_OPS = ['linear_forward', 'linear_backward', 'apply_update', 'grad_sq_norm', 'reset', 'checkpoint_save', 'checkpoint_load'] as const;
export type AcceleratorRequest = Extract<Message, { op: (typeof REQUEST_OPS)[number] }>;
export type AcceleratorReply = Exclude<Message, AcceleratorRequest>;

/** Hard upper bound of one frame (guards every decoder). */
export const MAX_FRAME_BYTES = 1 << 30;

/** Binary frame: u32 header length | JSON header | float32 payloads (4-byte aligned). */
export function encodeMessage(m: AcceleratorRequest | AcceleratorReply): Buffer {
  const { parts, length } = encodeMessageParts(m);
  return Buffer.concat(parts, length);
}

/**
 * The frame of `encodeMessage` as parts whose concatenation is the frame: the header, then
 * views of the tensors' own memory (no copy), for transports that can write a vector.
 */
export function encodeMessageParts(m: AcceleratorRequest | AcceleratorReply): { parts: Buffer[]; length: number } {
  const tensors: Float32Array[] = [];
  const header: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(m)) {
    if (v instanceof Float32Array) {
      header[k] = { tensor: tensors.length, length: v.length };
      tensors.push(v);
    } else header[k] = v;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (4 - ((4 + json.length) % 4)) % 4;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const total = 4 + json.length + tensors.reduce((s, t) => s + t.byteLength, 0);
  if (total > MAX_FRAME_BYTES) throw new Error(`message of ${total} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
  const head = Buffer.allocUnsafe(4 + json.length);
  head.writeUInt32LE(json.length, 0);
  json.copy(head, 4);
  return { parts: [head, ...tensors.map((t) => Buffer.from(t.buffer, t.byteOffset, t.byteLength))], length: total };
}

export function decodeMessage(buf: Uint8Array, maxBytes = MAX_FRAME_BYTES): AcceleratorRequest | AcceleratorReply {
  if (buf.length > maxBytes) throw new Error(`message of ${buf.length} bytes exceeds the ${maxBytes}-byte limit`);
  if (buf.length < 4) throw new Error('message truncated: no header length');
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  const hlen = b.readUInt32LE(0);
  if (4 + hlen > b.length) throw new Error(`message truncated: header of ${hlen} bytes, frame of ${b.length}`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(b.subarray(4, 4 + hlen).toString('utf8'));
  } catch {
    throw new Error('message header is not valid JSON');
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) throw new Error('message header is not an object');
  let off = 4 + hlen;
  const out: Record<string, unknown> = {};
  const entries = Object.entries(header);
  const tensorEntries = entries
    .filter(([, v]) => typeof v === 'object' && v !== null && 'tensor' in (v as object))
    .sort((x, y) => (x[1] as { tensor: number }).tensor - (y[1] as { tensor: number }).tensor);
  for (const [k, v] of entries) if (!tensorEntries.some(([tk]) => tk === k)) out[k] = v;
  for (const [k, v] of tensorEntries) {
    const len = (v as { length: unknown }).length;
    if (!Number.isInteger(len) || (len as number) < 0) throw new Error(`message tensor "${k}" has an invalid length`);
    const bytes = (len as number) * 4;
    if (off + bytes > b.length) throw new Error(`message truncated: tensor "${k}" needs ${bytes} bytes, ${b.length - off} left`);
    // aligned: a view of the received frame (no copy), the frame's memory is the message's from here on
    const at = b.byteOffset + off;
    out[k] = at % 4 === 0 ? new Float32Array(b.buffer, at, len as number) : new Float32Array(b.buffer.slice(at, at + bytes));
    off += bytes;
  }
  if (off !== b.length) throw new Error(`message has ${b.length - off} trailing bytes`);
  return validateMessage(out);
}

/** Structural validation of a decoded message (shapes are checked by the receiver). */
function validateMessage(o: Record<string, unknown>): Message {
  const r = MESSAGE.safeParse(o);
  if (r.success) return r.data;
  const i = r.error.issues[0];
  throw new Error(`message "${String(o.op)}": ${i.path.length ? `field "${i.path.join('.')}": ` : ''}${i.message}`);
}
