import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rng } from './helpers.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  bf16ToFloat,
  floatToBf16,
  floatToHalf,
  halfToFloat,
  openSafetensors,
  readSafetensorsHeader,
  writeSafetensors,
} from '../src/io/safetensors.js';

let tmp: string;
before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'st-test-'));
});
after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Writes a file with a hand-made header (object or raw string) and data bytes. */
function rawFile(name: string, header: unknown, data: Uint8Array = new Uint8Array(0), headerLen?: bigint): string {
  const file = path.join(tmp, name);
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLen ?? BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([len, json, data]));
  return file;
}


function randn(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (r() * 2 - 1) * scale;
  return out;
}

/** Asserts `fn` throws an Error whose message contains every string in `parts`. */
function throwsWith(fn: () => unknown, ...parts: string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof Error, 'expected an Error');
    for (const p of parts) assert.ok(e.message.includes(p), `message ${JSON.stringify(e.message)} lacks ${JSON.stringify(p)}`);
    return true;
  });
}

describe('fp16 conversion', () => {
  test('known bit patterns decode', () => {
    assert.equal(halfToFloat(0x3c00), 1);
    assert.equal(halfToFloat(0xc100), -2.5);
    assert.equal(halfToFloat(0x7bff), 65504);
    assert.equal(halfToFloat(0x0001), 2 ** -24);
    assert.equal(halfToFloat(0x03ff), 1023 * 2 ** -24);
    assert.equal(halfToFloat(0x0400), 2 ** -14);
    assert.equal(halfToFloat(0x3555), 0.333251953125);
    assert.equal(halfToFloat(0x7c00), Infinity);
    assert.equal(halfToFloat(0xfc00), -Infinity);
    assert.ok(Number.isNaN(halfToFloat(0x7e00)));
    assert.ok(Number.isNaN(halfToFloat(0xfc01)));
    assert.ok(Object.is(halfToFloat(0x8000), -0));
    assert.ok(Object.is(halfToFloat(0x8001), -(2 ** -24)));
  });

  test('known values encode', () => {
    assert.equal(floatToHalf(1), 0x3c00);
    assert.equal(floatToHalf(-2.5), 0xc100);
    assert.equal(floatToHalf(65504), 0x7bff);
    assert.equal(floatToHalf(2 ** -24), 0x0001);
    assert.equal(floatToHalf(2 ** -14), 0x0400);
    assert.equal(floatToHalf(Infinity), 0x7c00);
    assert.equal(floatToHalf(-Infinity), 0xfc00);
    const nan = floatToHalf(NaN);
    assert.equal(nan & 0x7c00, 0x7c00);
    assert.notEqual(nan & 0x3ff, 0);
    assert.equal(floatToHalf(-0), 0x8000);
    assert.equal(floatToHalf(0), 0);
    assert.equal(floatToHalf(1e-10), 0); // underflow
    assert.equal(floatToHalf(1e6), 0x7c00); // overflow
    assert.equal(floatToHalf(-1e6), 0xfc00);
  });

  test('rounds to nearest, ties to even', () => {
    assert.equal(floatToHalf(1 + 2 ** -11), 0x3c00); // tie between 1 and 1+2^-10 -> even (1)
    assert.equal(floatToHalf(1 + 3 * 2 ** -11), 0x3c02); // tie -> even (1+2^-9)
    assert.equal(floatToHalf(1 + 2 ** -11 + 2 ** -20), 0x3c01); // above the tie -> up
    assert.equal(floatToHalf(2049), 0x6800); // 2048 (even)
    assert.equal(floatToHalf(2051), 0x6802); // 2052 (even)
    assert.equal(floatToHalf(65519), 0x7bff); // below the midpoint to 65536
    assert.equal(floatToHalf(65520), 0x7c00); // tie between 65504 and 65536 -> even -> inf
    assert.equal(floatToHalf(2 ** -25), 0x0000); // tie between 0 and min subnormal -> 0
    assert.equal(floatToHalf(1.5 * 2 ** -25), 0x0001);
    assert.equal(floatToHalf(3 * 2 ** -25), 0x0002); // tie between 1 and 2 subnormal units -> 2
    assert.equal(floatToHalf(5 * 2 ** -25), 0x0002); // tie between 2 and 3 -> 2
    assert.equal(floatToHalf(2 ** -14 - 2 ** -25), 0x0400); // carries into the smallest normal
    assert.equal(floatToHalf(-(1 + 3 * 2 ** -11)), 0xbc02);
  });

  test('every fp16 value round-trips through float', () => {
    for (let h = 0; h < 65536; h++) {
      const f = halfToFloat(h);
      if (Number.isNaN(f)) continue;
      assert.equal(floatToHalf(f), h, `0x${h.toString(16)}`);
    }
  });
});

describe('bf16 conversion', () => {
  test('known bit patterns', () => {
    assert.equal(bf16ToFloat(0x3f80), 1);
    assert.equal(bf16ToFloat(0xc020), -2.5);
    assert.equal(bf16ToFloat(0x7f80), Infinity);
    assert.equal(bf16ToFloat(0xff80), -Infinity);
    assert.ok(Number.isNaN(bf16ToFloat(0x7fc0)));
    assert.equal(bf16ToFloat(0x0001), 2 ** -133); // smallest subnormal
    assert.equal(floatToBf16(1), 0x3f80);
    assert.equal(floatToBf16(-2.5), 0xc020);
    assert.equal(floatToBf16(Infinity), 0x7f80);
    assert.equal(floatToBf16(2 ** -133), 0x0001);
    const nan = floatToBf16(NaN);
    assert.equal(nan & 0x7f80, 0x7f80);
    assert.notEqual(nan & 0x7f, 0);
    // A NaN whose payload lies only in the low 16 bits must stay NaN.
    const f = new Float32Array(new Uint32Array([0x7f800001]).buffer)[0]!;
    assert.ok(Number.isNaN(bf16ToFloat(floatToBf16(f))));
  });

  test('rounds to nearest, ties to even', () => {
    assert.equal(floatToBf16(1 + 2 ** -8), 0x3f80); // tie -> even
    assert.equal(floatToBf16(1 + 3 * 2 ** -8), 0x3f82); // tie -> even
    assert.equal(floatToBf16(1 + 2 ** -8 + 2 ** -20), 0x3f81);
    assert.equal(floatToBf16(3.4028234663852886e38), 0x7f80); // FLT_MAX rounds up to inf
  });

  test('every bf16 value round-trips through float', () => {
    for (let b = 0; b < 65536; b++) {
      const f = bf16ToFloat(b);
      if (Number.isNaN(f)) continue;
      assert.equal(floatToBf16(f), b);
    }
  });
});

describe('safetensors write/read', () => {
  test('F32 round trip is exact, header layout follows the spec', () => {
    const file = path.join(tmp, 'f32.safetensors');
    const a = randn(6 * 5, 1);
    const b = randn(7, 2);
    writeSafetensors(
      file,
      [
        { name: 'a', dtype: 'F32', shape: [6, 5], data: a },
        { name: 'b.bias', dtype: 'F32', shape: [7], data: b },
        { name: 'scalar', dtype: 'F32', shape: [], data: new Float32Array([3.5]) },
        { name: 'empty', dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
      ],
      { format: 'pt' },
    );
    const bytes = fs.readFileSync(file);
    const n = Number(bytes.readBigUInt64LE(0));
    assert.equal(n % 8, 0);
    const headerText = bytes.subarray(8, 8 + n).toString('utf8');
    assert.match(headerText, / *$/);
    const header = JSON.parse(headerText);
    assert.deepEqual(header.__metadata__, { format: 'pt' });
    assert.deepEqual(header.a, { dtype: 'F32', shape: [6, 5], data_offsets: [0, 120] });
    assert.deepEqual(header['b.bias'].data_offsets, [120, 148]);
    assert.deepEqual(header.scalar.data_offsets, [148, 152]);
    assert.equal(bytes.length, 8 + n + 152);
    const f = openSafetensors(file);
    assert.deepEqual(f.names(), ['a', 'b.bias', 'scalar', 'empty']);
    assert.deepEqual(f.metadata, { format: 'pt' });
    assert.deepEqual(f.info('a').shape, [6, 5]);
    assert.equal(f.info('a').dtype, 'F32');
    assert.deepEqual(f.get('a'), a);
    assert.deepEqual(f.get('b.bias'), b);
    assert.deepEqual(f.get('scalar'), new Float32Array([3.5]));
    assert.equal(f.get('empty').length, 0);
    assert.deepEqual(f.getFloat64('b.bias'), Float64Array.from(b));
    // getInto a subarray of a larger buffer
    const big = new Float32Array(100);
    f.getInto('b.bias', big.subarray(10, 17));
    assert.deepEqual(big.subarray(10, 17), b);
    assert.equal(big[9], 0);
    assert.equal(big[17], 0);
    assert.equal(readSafetensorsHeader(file).tensors.size, 4);
    // no temp files left behind
    assert.deepEqual(fs.readdirSync(tmp).filter((x) => x.includes('.tmp-')), []);
  });

  test('F16 and BF16 round trip within their rounding', () => {
    const file = path.join(tmp, 'half.safetensors');
    const x = randn(1000, 3, 4);
    const exact = new Float32Array([1, -2.5, 65504, 2 ** -24, 0, 0.5, -1024]);
    writeSafetensors(file, [
      { name: 'h', dtype: 'F16', shape: [10, 100], data: x },
      { name: 'b', dtype: 'BF16', shape: [1000], data: x },
      { name: 'hx', dtype: 'F16', shape: [7], data: exact },
      { name: 'bx', dtype: 'BF16', shape: [7], data: exact.map((v) => (v === 65504 || v === 2 ** -24 ? 1 : v)) },
    ]);
    const f = openSafetensors(file);
    assert.equal(f.info('h').dtype, 'F16');
    assert.equal(f.info('b').dtype, 'BF16');
    const h = f.get('h');
    const b = f.get('b');
    for (let i = 0; i < x.length; i++) {
      const v = x[i]!;
      assert.ok(Math.abs(h[i]! - v) <= Math.max(Math.abs(v) * 2 ** -11, 2 ** -25), `f16 ${i}`);
      assert.ok(Math.abs(b[i]! - v) <= Math.abs(v) * 2 ** -8, `bf16 ${i}`);
      assert.equal(h[i], halfToFloat(floatToHalf(v)));
      assert.equal(b[i], bf16ToFloat(floatToBf16(v)));
    }
    assert.deepEqual(f.get('hx'), exact);
    assert.deepEqual([...f.get('bx')], [1, -2.5, 1, 1, 0, 0.5, -1024]);
    const raw = f.getBytes('hx');
    assert.deepEqual([...new Uint16Array(raw.buffer, raw.byteOffset, 2)], [0x3c00, 0xc100]);
  });

  test('large F16 tensor is converted across read chunks', () => {
    const file = path.join(tmp, 'large.safetensors');
    const n = 4_500_000; // 9 MB of F16: more than one 8 MB chunk
    const x = new Float32Array(n);
    for (let i = 0; i < n; i++) x[i] = (i % 2048) - 1024;
    writeSafetensors(file, [
      { name: 'pre', dtype: 'F32', shape: [3], data: new Float32Array([1, 2, 3]) },
      { name: 'big', dtype: 'F16', shape: [n], data: x },
    ]);
    const got = openSafetensors(file).get('big');
    assert.deepEqual(got, x);
  });

  test('I32 write/read and int dtypes', () => {
    const file = path.join(tmp, 'int.safetensors');
    const ids = new Int32Array([0, -1, 2147483647, -2147483648, 42]);
    writeSafetensors(file, [
      { name: 'ids', dtype: 'I32', shape: [5], data: ids },
      { name: 'fromFloat', dtype: 'I32', shape: [2], data: new Float32Array([3, -7]) },
    ]);
    const f = openSafetensors(file);
    assert.deepEqual(f.getInt('ids'), ids);
    assert.deepEqual(f.getInt('fromFloat'), new Int32Array([3, -7]));
    throwsWith(() => f.get('ids'), file, '"ids"', 'I32');
    throwsWith(
      () => writeSafetensors(path.join(tmp, 'bad-int.safetensors'), [{ name: 'x', dtype: 'I32', shape: [1], data: new Float32Array([1.5]) }]),
      'bad-int.safetensors',
      '"x"',
    );
    assert.ok(!fs.existsSync(path.join(tmp, 'bad-int.safetensors')));
  });

  test('reads F64, I64, U8, BOOL, I16 written by other tools', () => {
    const f64 = new Float64Array([1.25, -3, 1e300]);
    const i64 = new BigInt64Array([5n, -6n, 2147483647n]);
    const u8 = new Uint8Array([0, 1, 255, 0, 0, 0, 0, 0]);
    const i16 = new Int16Array([-300, 300, 0, 0]);
    const data = Buffer.concat([
      Buffer.from(f64.buffer),
      Buffer.from(i64.buffer),
      Buffer.from(u8.subarray(0, 3)),
      Buffer.from([1, 0]),
      Buffer.from(i16.buffer, 0, 4),
    ]);
    const file = rawFile(
      'mixed.safetensors',
      {
        d: { dtype: 'F64', shape: [3], data_offsets: [0, 24] },
        l: { dtype: 'I64', shape: [3], data_offsets: [24, 48] },
        u: { dtype: 'U8', shape: [3], data_offsets: [48, 51] },
        m: { dtype: 'BOOL', shape: [2], data_offsets: [51, 53] },
        s: { dtype: 'I16', shape: [2], data_offsets: [53, 57] },
      },
      data,
    );
    const f = openSafetensors(file);
    assert.deepEqual(f.getFloat64('d'), f64);
    assert.deepEqual(f.get('d'), new Float32Array([1.25, -3, Infinity]));
    assert.deepEqual(f.getInt('l'), new Int32Array([5, -6, 2147483647]));
    assert.deepEqual(f.getInt('u'), new Int32Array([0, 1, 255]));
    assert.deepEqual(f.getInt('m'), new Int32Array([1, 0]));
    assert.deepEqual(f.getInt('s'), new Int32Array([-300, 300]));
    throwsWith(() => f.getInt('d'), file, '"d"', 'F64');
    throwsWith(() => f.get('nope'), file, '"nope"');

    const big = rawFile(
      'i64big.safetensors',
      { ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] } },
      new Uint8Array(new BigInt64Array([1n, 2n ** 40n]).buffer),
    );
    throwsWith(() => openSafetensors(big).getInt('ids'), big, '"ids"', 'int32', String(2n ** 40n));
  });

  test('write validation', () => {
    const file = path.join(tmp, 'w.safetensors');
    throwsWith(
      () => writeSafetensors(file, [{ name: 'a', dtype: 'F32', shape: [2, 2], data: new Float32Array(3) }]),
      file,
      '"a"',
      '4 elements',
    );
    throwsWith(
      () =>
        writeSafetensors(file, [
          { name: 'a', dtype: 'F32', shape: [1], data: new Float32Array(1) },
          { name: 'a', dtype: 'F32', shape: [1], data: new Float32Array(1) },
        ]),
      file,
      '"a"',
      'twice',
    );
    throwsWith(
      () => writeSafetensors(file, [{ name: 'a', dtype: 'F8' as 'F32', shape: [1], data: new Float32Array(1) }]),
      file,
      '"a"',
      'F8',
    );
    assert.ok(!fs.existsSync(file));
  });
});

describe('safetensors rejects corrupt files', () => {
  const ok = { w: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] } };
  const data16 = new Uint8Array(16);

  test('file shorter than 8 bytes', () => {
    const file = path.join(tmp, 'short.safetensors');
    fs.writeFileSync(file, Buffer.from([1, 2, 3]));
    throwsWith(() => openSafetensors(file), file, '8-byte');
  });

  test('missing file', () => {
    const file = path.join(tmp, 'does-not-exist.safetensors');
    throwsWith(() => openSafetensors(file), file, 'ENOENT');
  });

  test('header length larger than the file', () => {
    const file = rawFile('hlen.safetensors', ok, data16, 5000n);
    throwsWith(() => openSafetensors(file), file, '5000', 'exceeds the file size');
  });

  test('absurd header length', () => {
    const file = rawFile('absurd.safetensors', ok, data16, 2n ** 62n);
    throwsWith(() => openSafetensors(file), file, 'absurd');
  });

  test('invalid JSON and non-object header', () => {
    const f1 = rawFile('badjson.safetensors', '{"w": {', data16);
    throwsWith(() => openSafetensors(f1), f1, 'not valid JSON');
    const f2 = rawFile('array.safetensors', '[1, 2]', data16);
    throwsWith(() => openSafetensors(f2), f2, 'must be a JSON object');
    const f3 = rawFile('entry.safetensors', { w: 5 }, data16);
    throwsWith(() => openSafetensors(f3), f3, '"w"', 'must be an object');
    const f4 = rawFile('meta.safetensors', { __metadata__: { a: 1 }, ...ok }, data16);
    throwsWith(() => openSafetensors(f4), f4, '__metadata__', '"a"');
  });

  test('unknown dtypes', () => {
    const f1 = rawFile('q4.safetensors', { 'h.0.w': { dtype: 'Q4', shape: [2], data_offsets: [0, 1] } }, data16);
    throwsWith(() => openSafetensors(f1), f1, '"h.0.w"', 'unknown dtype "Q4"');
    const f2 = rawFile('f8.safetensors', { 'h.0.w': { dtype: 'F8_E4M3', shape: [4], data_offsets: [0, 4] } }, data16);
    const f = openSafetensors(f2); // a defined dtype: header is valid, but it cannot be read as float
    throwsWith(() => f.get('h.0.w'), f2, '"h.0.w"', 'F8_E4M3');
  });

  test('offsets that do not match shape * dtype size', () => {
    const file = rawFile('lie.safetensors', { w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 16] } }, data16);
    throwsWith(() => openSafetensors(file), file, '"w"', '16 bytes', 'needs 24');
  });

  test('offsets beyond the end of the file (truncated data section)', () => {
    const file = rawFile(
      'trunc.safetensors',
      { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, w: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } },
      data16,
    );
    throwsWith(() => openSafetensors(file), file, '"w"', 'past the end');
  });

  test('file truncated after opening', () => {
    const file = rawFile('later.safetensors', ok, data16);
    const f = openSafetensors(file);
    fs.truncateSync(file, fs.statSync(file).size - 4);
    throwsWith(() => f.get('w'), file, '"w"');
  });

  test('overlapping tensors', () => {
    const file = rawFile(
      'overlap.safetensors',
      { a: { dtype: 'F32', shape: [3], data_offsets: [0, 12] }, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } },
      data16,
    );
    throwsWith(() => openSafetensors(file), file, '"b"', '"a"', 'overlap');
  });

  test('bad shapes and offsets', () => {
    const f1 = rawFile('neg.safetensors', { w: { dtype: 'F32', shape: [-1, 4], data_offsets: [0, 16] } }, data16);
    throwsWith(() => openSafetensors(f1), f1, '"w"', 'non-negative integers');
    const f2 = rawFile('frac.safetensors', { w: { dtype: 'F32', shape: [1.5], data_offsets: [0, 6] } }, data16);
    throwsWith(() => openSafetensors(f2), f2, '"w"', 'non-negative integers');
    const f3 = rawFile('offs.safetensors', { w: { dtype: 'F32', shape: [4], data_offsets: [0] } }, data16);
    throwsWith(() => openSafetensors(f3), f3, '"w"', 'data_offsets');
    const f4 = rawFile('rev.safetensors', { w: { dtype: 'F32', shape: [0], data_offsets: [8, 4] } }, data16);
    throwsWith(() => openSafetensors(f4), f4, '"w"', 'end before begin');
    const f5 = rawFile('noshape.safetensors', { w: { dtype: 'F32', data_offsets: [0, 16] } }, data16);
    throwsWith(() => openSafetensors(f5), f5, '"w"', 'shape');
  });
});
