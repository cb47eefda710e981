/**
 * Reader and writer for the safetensors format
 * (https://github.com/huggingface/safetensors):
 *
 *   [8 bytes: little-endian u64 N][N bytes: JSON header][data section]
 *
 * The header maps tensor names to `{dtype, shape, data_offsets: [begin, end]}` (offsets
 * relative to the start of the data section) plus an optional `"__metadata__"` object of
 * string values. Tensor data is little-endian, row-major.
 *
 * Reading parses and validates the header, then reads each tensor's byte range on demand
 * with positioned reads, so multi-gigabyte files are never loaded into one buffer.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BundleError, InputError, ObfuscatuneError } from '../errors.js';

/** Byte sizes of every dtype the safetensors format defines (sub-byte dtypes excluded). */
const DTYPE_SIZES: Record<string, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, F8_E8M0: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  F64: 8, I64: 8, U64: 8, C64: 8,
};

/** Dtypes `get()` converts to float. */
const FLOAT_READ = new Set(['F32', 'F16', 'BF16', 'F64']);
/** Dtypes `getInt()` converts to Int32 (with a range check where needed). */
const INT_READ = new Set(['BOOL', 'U8', 'I8', 'I16', 'U16', 'I32', 'U32', 'I64', 'U64']);
/** Int dtypes whose every value fits in int32, read through a typed view. */
const INT_VIEWS: Record<string, { BYTES_PER_ELEMENT: number; new (b: ArrayBufferLike, off: number, n: number): ArrayLike<number> }> = {
  BOOL: Uint8Array, U8: Uint8Array, I8: Int8Array, I16: Int16Array, U16: Uint16Array, I32: Int32Array,
};

export type WriteDtype = 'F32' | 'F64' | 'F16' | 'BF16' | 'I32';
const WRITE_DTYPES = new Set<string>(['F32', 'F64', 'F16', 'BF16', 'I32']);

/** Largest header accepted (the reference implementation's limit). */
export const MAX_HEADER_BYTES = 100_000_000;

export interface TensorInfo {
  dtype: string;
  shape: number[];
  /** `[begin, end)` byte offsets relative to the data section. */
  dataOffsets: [number, number];
  /** Number of elements (product of the shape; 1 for a scalar). */
  numel: number;
}

export interface SafetensorsHeader {
  path: string;
  /** Length N of the JSON header in bytes. */
  headerLength: number;
  /** Absolute file offset of the data section (8 + N). */
  dataStart: number;
  /** Total file size in bytes. */
  fileSize: number;
  /** Tensors in header order. */
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

export interface SafetensorsFile {
  path: string;
  metadata: Record<string, string>;
  /** Tensor names in header order. */
  names(): string[];
  has(name: string): boolean;
  /** dtype, shape, offsets of a tensor; throws naming the file when absent. */
  info(name: string): TensorInfo;
  /** A floating-point tensor (F32/F16/BF16/F64) as float32 (F64 is rounded). */
  get(name: string): Float32Array;
  /** Like `get` but into an existing array of exactly `numel` elements (no extra copy for F32). */
  getInto(name: string, out: Float32Array): Float32Array;
  /** A floating-point tensor as float64 (exact for every supported float dtype). */
  getFloat64(name: string): Float64Array;
  /** An integer or bool tensor as int32; throws when a value does not fit. */
  getInt(name: string): Int32Array;
  /** The tensor's raw little-endian bytes. */
  getBytes(name: string): Uint8Array;
}

export interface TensorToWrite {
  name: string;
  dtype: WriteDtype;
  shape: number[];
  data: Float32Array | Float64Array | Int32Array;
}

if (os.endianness() !== 'LE') {
  // Typed-array views below reinterpret file bytes in host order.
  throw new ObfuscatuneError('safetensors: only little-endian hosts are supported');
}

// ---------------------------------------------------------------------------
// fp16 / bf16 conversions
// ---------------------------------------------------------------------------

const cvtF32 = new Float32Array(1);
const cvtU32 = new Uint32Array(cvtF32.buffer);

/** IEEE 754 binary16 bit pattern -> number (exact; subnormals, ±inf and NaN included). */
export function halfToFloat(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) {
    // Zero or subnormal: mant * 2^-24 (exact in float32).
    const v = mant * 5.960464477539063e-8;
    return sign ? -v : v;
  }
  if (exp === 0x1f) {
    cvtU32[0] = (sign | 0x7f800000 | (mant << 13)) >>> 0;
    return cvtF32[0]!;
  }
  cvtU32[0] = (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
  return cvtF32[0]!;
}

/** number -> binary16 bit pattern, rounding to nearest, ties to even (overflow gives ±inf). */
export function floatToHalf(f: number): number {
  cvtF32[0] = f; // round to float32 first (the values written come from Float32Arrays)
  const x = cvtU32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) {
    // Inf stays inf; NaN keeps its top payload bits and is forced quiet.
    return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  }
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Result is a half subnormal (or zero). float32 subnormals are far below 2^-25.
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e; // 14..24
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1) !== 0)) h++;
    return sign | h; // a carry into bit 10 correctly yields the smallest normal
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1) !== 0)) h++; // carry may give inf: correct
  return sign | h;
}

/** bfloat16 bit pattern -> number (exact). */
export function bf16ToFloat(b: number): number {
  cvtU32[0] = (b & 0xffff) << 16;
  return cvtF32[0]!;
}

/** number -> bfloat16 bit pattern, rounding to nearest, ties to even (NaN stays NaN). */
export function floatToBf16(f: number): number {
  cvtF32[0] = f;
  const x = cvtU32[0]!;
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

let halfTable: Float32Array | undefined;
/** All 65536 fp16 values as float32, built on first use. */
function getHalfTable(): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = halfToFloat(i);
  }
  return halfTable;
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/** A file that cannot be read as asked: missing, corrupt, or not holding what was asked for. */
function fail(file: string, msg: string): never {
  throw new BundleError(`${file}: ${msg}`);
}

/** Tensors that cannot be written as given (names, shapes, dtypes, values). */
function failWrite(file: string, msg: string): never {
  throw new InputError(`${file}: ${msg}`);
}

function readFully(fd: number, dst: Uint8Array, position: number, file: string, what: string): void {
  let done = 0;
  // readSync reads at most ~2 GiB per call; loop in 1 GiB steps.
  const STEP = 1 << 30;
  while (done < dst.length) {
    const want = Math.min(STEP, dst.length - done);
    const n = fs.readSync(fd, dst, done, want, position + done);
    if (n <= 0) fail(file, `unexpected end of file while reading ${what} (got ${done} of ${dst.length} bytes)`);
    done += n;
  }
}

function parseHeaderJson(file: string, text: string, headerLength: number, dataLength: number): {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
} {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    fail(file, `safetensors header is not valid JSON (${(e as Error).message})`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    fail(file, `safetensors header must be a JSON object, got ${Array.isArray(raw) ? 'an array' : JSON.stringify(raw)}`);
  }
  const tensors = new Map<string, TensorInfo>();
  const metadata: Record<string, string> = {};
  for (const [name, v] of Object.entries(raw as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) fail(file, '"__metadata__" must be an object of strings');
      for (const [k, s] of Object.entries(v as Record<string, unknown>)) {
        if (typeof s !== 'string') fail(file, `"__metadata__" value for "${k}" must be a string, got ${JSON.stringify(s)}`);
        metadata[k] = s;
      }
      continue;
    }
    const where = `tensor "${name}"`;
    if (v === null || typeof v !== 'object' || Array.isArray(v)) fail(file, `${where}: header entry must be an object`);
    const entry = v as Record<string, unknown>;
    const dtype = entry['dtype'];
    if (typeof dtype !== 'string') fail(file, `${where}: missing or non-string "dtype"`);
    const size = DTYPE_SIZES[dtype];
    if (size === undefined) {
      fail(file, `${where}: unknown dtype "${dtype}" (known: ${Object.keys(DTYPE_SIZES).join(', ')})`);
    }
    const shape = entry['shape'];
    if (!Array.isArray(shape)) fail(file, `${where}: "shape" must be an array, got ${JSON.stringify(shape)}`);
    for (const d of shape) {
      if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
        fail(file, `${where}: shape ${JSON.stringify(shape)} must contain non-negative integers`);
      }
    }
    const offs = entry['data_offsets'];
    if (
      !Array.isArray(offs) ||
      offs.length !== 2 ||
      !offs.every((o) => typeof o === 'number' && Number.isSafeInteger(o) && o >= 0)
    ) {
      fail(file, `${where}: "data_offsets" must be [begin, end] non-negative integers, got ${JSON.stringify(offs)}`);
    }
    const [begin, end] = offs as [number, number];
    if (end < begin) fail(file, `${where}: data_offsets [${begin}, ${end}] end before begin`);
    const numel = (shape as number[]).reduce((a, b) => a * b, 1);
    if (!Number.isSafeInteger(numel * size)) fail(file, `${where}: shape ${JSON.stringify(shape)} is too large`);
    if (end - begin !== numel * size) {
      fail(
        file,
        `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape ${JSON.stringify(shape)} ` +
          `of ${dtype} needs ${numel * size}`,
      );
    }
    if (end > dataLength) {
      fail(
        file,
        `${where}: data_offsets [${begin}, ${end}] go past the end of the data section ` +
          `(${dataLength} bytes after the ${headerLength}-byte header; file truncated?)`,
      );
    }
    tensors.set(name, { dtype, shape: shape as number[], dataOffsets: [begin, end], numel });
  }
  // Overlap check (zero-sized tensors cannot overlap anything).
  const spans = [...tensors.entries()]
    .filter(([, t]) => t.dataOffsets[1] > t.dataOffsets[0])
    .sort((a, b) => a[1].dataOffsets[0] - b[1].dataOffsets[0]);
  for (let i = 1; i < spans.length; i++) {
    const [pn, p] = spans[i - 1]!;
    const [cn, c] = spans[i]!;
    if (c.dataOffsets[0] < p.dataOffsets[1]) {
      fail(
        file,
        `tensor "${cn}": data_offsets [${c.dataOffsets.join(', ')}] overlap tensor "${pn}" [${p.dataOffsets.join(', ')}]`,
      );
    }
  }
  return { tensors, metadata };
}

/** Runs `f` on `file` opened for reading, closing it afterwards. */
function withFd<T>(file: string, f: (fd: number) => T): T {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    fail(file, `cannot open safetensors file (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  try {
    return f(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Parses and validates the header of a safetensors file without reading tensor data. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  return withFd(file, (fd) => {
    const fileSize = fs.fstatSync(fd).size;
    if (fileSize < 8) fail(file, `not a safetensors file: ${fileSize} bytes, shorter than the 8-byte header length`);
    const lenBuf = Buffer.alloc(8);
    readFully(fd, lenBuf, 0, file, 'header length');
    const n = lenBuf.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES)) {
      fail(file, `safetensors header length ${n} is absurd (limit ${MAX_HEADER_BYTES} bytes); not a safetensors file?`);
    }
    const headerLength = Number(n);
    if (8 + headerLength > fileSize) {
      fail(file, `safetensors header length ${headerLength} exceeds the file size (${fileSize} bytes); file truncated?`);
    }
    const hdr = Buffer.alloc(headerLength);
    readFully(fd, hdr, 8, file, 'header');
    const dataStart = 8 + headerLength;
    const { tensors, metadata } = parseHeaderJson(file, hdr.toString('utf8'), headerLength, fileSize - dataStart);
    return { path: file, headerLength, dataStart, fileSize, tensors, metadata };
  });
}

const u16 = (b: Uint8Array) => new Uint16Array(b.buffer, b.byteOffset, b.length >> 1);

/** Chunk converters of the float dtypes but F32: a chunk's bytes -> out[i0..]. */
const TO_F32: Record<string, (b: Uint8Array, out: Float32Array, i0: number) => void> = {
  F16: (b, out, i0) => {
    const h = u16(b), table = getHalfTable();
    for (let i = 0; i < h.length; i++) out[i0 + i] = table[h[i]!]!;
  },
  BF16: (b, out, i0) => {
    const h = u16(b), o32 = new Uint32Array(out.buffer, out.byteOffset + 4 * i0, h.length);
    for (let i = 0; i < h.length; i++) o32[i] = h[i]! << 16;
  },
  F64: (b, out, i0) => out.set(new Float64Array(b.buffer, b.byteOffset, b.length >> 3), i0),
};

/** Conversion chunk size for non-F32 dtypes (bytes). */
const CHUNK = 8 << 20;

/** Opens a safetensors file; tensor bytes are read on demand by `get`/`getInt`. */
export function openSafetensors(file: string): SafetensorsFile {
  const header = readSafetensorsHeader(file);
  const { tensors, dataStart } = header;

  const info = (name: string): TensorInfo => {
    const t = tensors.get(name);
    if (!t) fail(file, `no tensor named "${name}"`);
    return t;
  };

  /** Streams the tensor's bytes in chunks (aligned to the element size) to `sink`. */
  const stream = (name: string, t: TensorInfo, sink: (bytes: Uint8Array, firstElem: number) => void): void => {
    const size = DTYPE_SIZES[t.dtype]!;
    const total = t.dataOffsets[1] - t.dataOffsets[0];
    withFd(file, (fd) => {
      const cur = fs.fstatSync(fd).size;
      if (dataStart + t.dataOffsets[1] > cur) {
        fail(file, `tensor "${name}": data ends at byte ${dataStart + t.dataOffsets[1]} but the file has ${cur} bytes`);
      }
      const step = Math.max(size, CHUNK - (CHUNK % size));
      const buf = new Uint8Array(Math.min(step, total));
      for (let done = 0; done < total; done += step) {
        const len = Math.min(step, total - done);
        const view = buf.subarray(0, len);
        readFully(fd, view, dataStart + t.dataOffsets[0] + done, file, `tensor "${name}"`);
        sink(view, done / size);
      }
    });
  };

  const readRaw = (name: string, t: TensorInfo, dst: Uint8Array): void =>
    withFd(file, (fd) => readFully(fd, dst, dataStart + t.dataOffsets[0], file, `tensor "${name}"`));

  const getInto = (name: string, out: Float32Array): Float32Array => {
    const t = info(name);
    if (!FLOAT_READ.has(t.dtype)) {
      fail(file, `tensor "${name}": dtype ${t.dtype} cannot be read as float (supported: F32, F16, BF16, F64)`);
    }
    if (out.length !== t.numel) {
      fail(file, `tensor "${name}": destination has ${out.length} elements, tensor has ${t.numel}`);
    }
    if (t.numel === 0) return out;
    if (t.dtype === 'F32') readRaw(name, t, new Uint8Array(out.buffer, out.byteOffset, out.byteLength));
    else stream(name, t, (b, i0) => TO_F32[t.dtype]!(b, out, i0));
    return out;
  };

  return {
    path: file,
    metadata: header.metadata,
    names: () => [...tensors.keys()],
    has: (name) => tensors.has(name),
    info: (name) => ({ ...info(name), shape: [...info(name).shape], dataOffsets: [...info(name).dataOffsets] }),
    get: (name) => getInto(name, new Float32Array(info(name).numel)),
    getInto,
    getFloat64: (name) => {
      const t = info(name);
      if (t.dtype === 'F64') {
        const out = new Float64Array(t.numel);
        if (t.numel > 0) readRaw(name, t, new Uint8Array(out.buffer));
        return out;
      }
      return Float64Array.from(getInto(name, new Float32Array(t.numel)));
    },
    getInt: (name) => {
      const t = info(name);
      if (!INT_READ.has(t.dtype)) {
        fail(file, `tensor "${name}": dtype ${t.dtype} cannot be read as int (supported: ${[...INT_READ].join(', ')})`);
      }
      const out = new Int32Array(t.numel);
      if (t.numel === 0) return out;
      const range = (i: number, v: number | bigint): never =>
        fail(file, `tensor "${name}": element ${i} = ${v} of dtype ${t.dtype} does not fit in int32`);
      const View = INT_VIEWS[t.dtype];
      stream(name, t, (b, i0) => {
        if (View) return out.set(new View(b.buffer, b.byteOffset, b.length / View.BYTES_PER_ELEMENT), i0);
        // U32: one word; I64, U64: two, the low one first
        const wide = t.dtype !== 'U32';
        const w = new Int32Array(b.buffer, b.byteOffset, b.length >> 2);
        for (let i = 0; i < w.length >> (wide ? 1 : 0); i++) {
          const lo = w[wide ? 2 * i : i]!, hi = wide ? w[2 * i + 1]! : 0;
          if (wide ? hi !== lo >> 31 || (t.dtype === 'U64' && hi !== 0) : lo < 0) {
            const v = new DataView(b.buffer, b.byteOffset + (wide ? 8 : 4) * i, wide ? 8 : 4);
            range(i0 + i, !wide ? v.getUint32(0, true) : t.dtype === 'U64' ? v.getBigUint64(0, true) : v.getBigInt64(0, true));
          }
          out[i0 + i] = lo;
        }
      });
      return out;
    },
    getBytes: (name) => {
      const t = info(name);
      const out = new Uint8Array(t.dataOffsets[1] - t.dataOffsets[0]);
      if (out.length > 0) readRaw(name, t, out);
      return out;
    },
  };
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

function encodeTensor(file: string, t: TensorToWrite): Uint8Array {
  const { name, dtype, data } = t;
  const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  switch (dtype) {
    case 'F32':
      return bytes(data instanceof Float32Array ? data : Float32Array.from(data));
    case 'F64':
      return bytes(data instanceof Float64Array ? data : Float64Array.from(data));
    case 'F16':
    case 'BF16': {
      const cvt = dtype === 'F16' ? floatToHalf : floatToBf16;
      const h = new Uint16Array(data.length);
      for (let i = 0; i < data.length; i++) h[i] = cvt(data[i]!);
      return bytes(h);
    }
    case 'I32': {
      if (data instanceof Int32Array) return bytes(data);
      const o = new Int32Array(data.length);
      for (let i = 0; i < data.length; i++) {
        const v = data[i]!;
        if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647) {
          failWrite(file, `tensor "${name}": element ${i} = ${v} is not an int32 value`);
        }
        o[i] = v;
      }
      return bytes(o);
    }
  }
}

/**
 * Writes tensors (in the given order, contiguously) to a safetensors file. The file is
 * written under a temporary name in the same directory, synced, then renamed over `file`,
 * so an interrupted write never leaves a partial file at `file`.
 */
export function writeSafetensors(file: string, tensors: TensorToWrite[], metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') failWrite(file, `metadata value for "${k}" must be a string, got ${JSON.stringify(v)}`);
    }
    header['__metadata__'] = { ...metadata };
  }
  let offset = 0;
  const seen = new Set<string>();
  for (const t of tensors) {
    const where = `tensor "${t.name}"`;
    if (typeof t.name !== 'string' || t.name.length === 0 || t.name === '__metadata__') {
      failWrite(file, `invalid tensor name ${JSON.stringify(t.name)}`);
    }
    if (seen.has(t.name)) failWrite(file, `${where} given twice`);
    seen.add(t.name);
    if (!WRITE_DTYPES.has(t.dtype)) failWrite(file, `${where}: cannot write dtype "${t.dtype}" (supported: F32, F64, F16, BF16, I32)`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      failWrite(file, `${where}: shape ${JSON.stringify(t.shape)} must contain non-negative integers`);
    }
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (t.data.length !== numel) {
      failWrite(file, `${where}: shape ${JSON.stringify(t.shape)} has ${numel} elements but data has ${t.data.length}`);
    }
    const nbytes = numel * DTYPE_SIZES[t.dtype]!;
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + nbytes] };
    offset += nbytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  if (pad > 0) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(json.length), 0);

  writeFileAtomic(file, (write) => {
    write(lenBuf);
    write(json);
    for (const t of tensors) if (t.data.length > 0) write(encodeTensor(file, t));
  });
}

/**
 * Writes `file` under a temporary name in the same directory (`fill` gets the writer of its
 * bytes), syncs it, then renames it over `file`: an interrupted write never leaves a partial file.
 */
export function writeFileAtomic(file: string, fill: (write: (bytes: Uint8Array) => void) => void): void {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 10)}`);
  const fd = fs.openSync(tmp, 'w');
  try {
    fill((bytes) => {
      // writeSync writes at most ~2 GiB per call; loop in 1 GiB steps
      for (let done = 0; done < bytes.length; ) done += fs.writeSync(fd, bytes, done, Math.min(1 << 30, bytes.length - done));
    });
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, file);
  } catch (e) {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}
