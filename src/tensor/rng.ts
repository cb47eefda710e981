import { randomBytes, createCipheriv, createHash, type Cipher } from 'node:crypto';

/** Uniform, normal and integer draws on top of a 32-bit source. */
export abstract class RandomSource {
  protected spare: number | null = null;

  /** Next uniform 32-bit unsigned integer. */
  abstract nextU32(): number;

  /** Uniform in [0, 1) with 53 bits. */
  uniform(): number {
    const hi = this.nextU32() >>> 5;
    const lo = this.nextU32() >>> 6;
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.uniform() * n);
  }

  /** Standard normal (Box-Muller, caching the second value). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.uniform();
    const v = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  fillNormal(out: Float32Array | Float64Array, std = 1, mean = 0): void {
    for (let i = 0; i < out.length; i++) out[i] = mean + std * this.normal();
  }

  /**
   * Normal(0, std^2) values from 32-bit uniforms (Box-Muller on pairs): half the draws of
   * fillNormal and no 53-bit uniforms, for noise that needs no more resolution (shields).
   */
  fillNormal32(out: Float32Array, std = 1): void {
    for (let i = 0; i < out.length; i += 2) {
      const r = std * Math.sqrt(-2 * Math.log((this.nextU32() + 0.5) / 4294967296)), a = (2 * Math.PI * this.nextU32()) / 4294967296;
      out[i] = r * Math.cos(a);
      if (i + 1 < out.length) out[i + 1] = r * Math.sin(a);
    }
  }

  /** In-place Fisher-Yates shuffle. */
  shuffle<T>(a: T[] | Int32Array | Uint32Array): void {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const t = a[i];
      a[i] = a[j];
      a[j] = t as never;
    }
  }
}

/**
 * Cryptographic stream: the ChaCha20 keystream of a 256-bit key. Used for every secret
 * (masks, permutations): the key comes from the OS CSPRNG, or, for reproducible tests, is
 * derived from a seed with `KeyedRng.fromSeed`. Sub-streams (`derive`) give independent
 * generators per layer, so a mask can be regenerated without replaying the others.
 */
export class KeyedRng extends RandomSource {
  private cipher: Cipher;
  private buf: Uint32Array = new Uint32Array(0);
  private pos = 0;
  private static readonly ZEROS = Buffer.alloc(16384);

  constructor(readonly key: Buffer) {
    super();
    if (key.length !== 32) throw new Error('KeyedRng needs a 32-byte key');
    this.cipher = createCipheriv('chacha20', key, Buffer.alloc(16));
  }

  static secure(): KeyedRng {
    return new KeyedRng(randomBytes(32));
  }

  /** A deterministic key from a public seed: reproducible, NOT secret. */
  static fromSeed(seed: number | string): KeyedRng {
    return new KeyedRng(createHash('sha256').update(`obfuscatune-seed:${seed}`).digest());
  }

  /** An independent generator for a named purpose (key = SHA-256(key || label)). */
  derive(label: string): KeyedRng {
    return new KeyedRng(createHash('sha256').update(this.key).update('\0').update(label).digest());
  }

  nextU32(): number {
    if (this.pos >= this.buf.length) {
      let bytes: Uint8Array = this.cipher.update(KeyedRng.ZEROS);
      if (bytes.byteOffset % 4 !== 0) bytes = Uint8Array.from(bytes);
      this.buf = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
      this.pos = 0;
    }
    return this.buf[this.pos++];
  }
}

/**
 * Deterministic PRNG (xoshiro128**, seeded through splitmix32) for initialisation,
 * shuffling, dropout and sampling. Not for secrets: masks use `KeyedRng`.
 */
export class Rng extends RandomSource {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number | Uint32Array) {
    super();
    if (typeof seed === 'number') {
      let x = seed >>> 0;
      const next = () => {
        x = (x + 0x9e3779b9) >>> 0;
        let z = x;
        z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
        z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
        return (z ^ (z >>> 16)) >>> 0;
      };
      // mix the high part of large seeds too
      const hi = Math.floor(seed / 2 ** 32) >>> 0;
      x ^= Math.imul(hi, 0x27d4eb2f) >>> 0;
      [this.s0, this.s1, this.s2, this.s3] = [next(), next(), next(), next()];
    } else {
      if (seed.length < 4) throw new Error('Rng state needs 4 words');
      [this.s0, this.s1, this.s2, this.s3] = [seed[0] >>> 0, seed[1] >>> 0, seed[2] >>> 0, seed[3] >>> 0];
    }
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** Next uniform 32-bit unsigned integer. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (this.s1 << 9) >>> 0;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    this.s0 >>>= 0; this.s1 >>>= 0; this.s2 >>>= 0; this.s3 >>>= 0;
    return result;
  }

  /** Serialisable state (for exact resume). */
  state(): number[] {
    return [this.s0, this.s1, this.s2, this.s3, this.spare ?? NaN];
  }

  setState(s: number[]): void {
    [this.s0, this.s1, this.s2, this.s3] = [s[0] >>> 0, s[1] >>> 0, s[2] >>> 0, s[3] >>> 0];
    this.spare = typeof s[4] === 'number' && Number.isFinite(s[4]) ? s[4] : null;
  }

  static fromState(s: number[]): Rng {
    const r = new Rng(new Uint32Array(s.slice(0, 4)));
    r.setState([r.s0, r.s1, r.s2, r.s3, s[4]]);
    return r;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
