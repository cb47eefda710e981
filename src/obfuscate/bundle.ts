/**
 * On-disk bundles. The provider transform writes three directories:
 *   accelerator/  manifest.json + weights.safetensors   obfuscated linears only: safe to hand to the cloud
 *   enclave/      manifest.json + tensors.safetensors   the TEE's part (delivered encrypted to an attested enclave)
 *   provider/     secret.json                           the 256-bit mask key: never leaves the provider
 * The enclave manifest pins the SHA-256 of the accelerator manifest, which pins the weights' SHA-256.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync, chmodSync, renameSync } from 'node:fs';
import path from 'node:path';
import type { GPT2Config } from '../model/config.js';
import { isLlama, validateConfig, validateLlamaConfig, type LlamaConfig } from '../model/config.js';
import { openSafetensors, writeSafetensors, type SafetensorsFile, type TensorToWrite } from '../io/safetensors.js';
import type { DeltaTensors, LlamaObfuscatedTensors, ObfuscatedTensors, RotaryMasks } from './enclave_tensors.js';
import { CHECK_VECTORS, type CheckVectors, type LinearCheck } from '../protocol/integrity.js';
import { ALL_LINEARS, LINEARS, linearDims, type BlockLinearName, type LinearName } from '../model/block.js';
import { blockLinearDims, blockLinearNames } from '../model/family.js';
import { layerLinearNames, linearTensors, type AcceleratorWeights } from '../protocol/linears.js';
import type { Mode, ObfuscationParams } from './masks.js';
import { parseMaskSpec } from '../linalg/masks.js';
import { POOLINGS, type Pooling } from '../model/kernels.js';
import { BundleError } from '../errors.js';

export const ACC_FORMAT = 'obfuscatune-accelerator/1';
export const ENC_FORMAT = 'obfuscatune-enclave/1';
export const KEY_FORMAT = 'obfuscatune-provider-key/1';

export interface AcceleratorManifest {
  format: string;
  mode: Mode;
  n_layer: number;
  n_embd: number;
  linears: { layer: number; name: BlockLinearName; din: number; dout: number }[];
  weights: { file: string; sha256: string; bytes: number };
  /** fingerprint of the mask key the bundle was made with (keyFingerprint); absent in older bundles */
  key_fingerprint?: string;
  /** the public base these weights are (masked), pinned by publicBaseSha256; absent: the model itself */
  public_base_sha256?: string;
}

export interface ProviderKey {
  format: string;
  key_hex: string;
  mode: Mode;
  spec: string;
  two_sided: boolean;
  head_permutation: boolean;
  config: GPT2Config;
  accelerator_manifest_sha256: string;
  /** Llama family: how q and k are masked around rotary */
  rotary_masks?: RotaryMasks;
}

export const sha256 = (b: Uint8Array | string): string => createHash('sha256').update(b).digest('hex');

/**
 * A public fingerprint of a mask key (SHA-256 of a domain label and the key: it tells keys
 * apart and reveals nothing of the key). Both bundle manifests carry it, so a key can be
 * matched with its bundles before anything is written.
 */
export function keyFingerprint(key: Uint8Array): string {
  return createHash('sha256').update('obfuscatune mask key fingerprint\0').update(key).digest('hex').slice(0, 32);
}

function writeJson(file: string, obj: unknown, mode?: number): string {
  const text = JSON.stringify(obj, null, 2) + '\n';
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, text, mode !== undefined ? { mode } : undefined);
  renameSync(tmp, file);
  if (mode !== undefined) chmodSync(file, mode);
  return text;
}

function readJson<T>(file: string, what: string): T {
  if (!existsSync(file)) throw new BundleError(`${what}: ${file} not found`);
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as T;
  } catch (e) {
    throw new BundleError(`${what}: ${file} is not valid JSON (${(e as Error).message})`);
  }
}

/** A bundle's data file, checked: inside the bundle directory, present, and of the SHA-256 that the manifest `mfile` pins. */
function pinnedFile(dir: string, file: string, sha: string, what: string, mfile: string): string {
  const f = path.join(dir, file);
  if (path.dirname(path.resolve(f)) !== path.resolve(dir)) throw new BundleError(`${what}: the data file must be inside the bundle directory`);
  if (!existsSync(f)) throw new BundleError(`${what}: ${f} not found`);
  if (sha256(readFileSync(f)) !== sha) throw new BundleError(`${what}: ${f} does not match the SHA-256 in ${mfile} (corrupt or replaced)`);
  return f;
}

/** Writes the accelerator bundle; returns the SHA-256 of its manifest. */
export function writeAcceleratorBundle(dir: string, acc: AcceleratorWeights, mode: Mode, d: number, keyFp?: string, publicBaseSha?: string): string {
  mkdirSync(dir, { recursive: true });
  const linears = acc.layers.flatMap((layer, l) => layerLinearNames(layer).map((name) => ({ layer: l, name, din: layer[name]!.din, dout: layer[name]!.dout })));
  const wfile = path.join(dir, 'weights.safetensors');
  writeSafetensors(wfile, linearTensors(acc, 'h'), { format: ACC_FORMAT });
  const bytes = readFileSync(wfile);
  const manifest: AcceleratorManifest = {
    format: ACC_FORMAT, mode, n_layer: acc.n_layer, n_embd: d, linears,
    weights: { file: 'weights.safetensors', sha256: sha256(bytes), bytes: bytes.length },
    ...(keyFp ? { key_fingerprint: keyFp } : {}),
    ...(publicBaseSha ? { public_base_sha256: publicBaseSha } : {}),
  };
  return sha256(writeJson(path.join(dir, 'manifest.json'), manifest));
}

export interface LoadedAccelerator {
  manifest: AcceleratorManifest;
  manifestSha256: string;
  weights: AcceleratorWeights;
}

export function loadAcceleratorBundle(dir: string): LoadedAccelerator {
  const mfile = path.join(dir, 'manifest.json');
  if (!existsSync(mfile)) throw new BundleError(`accelerator bundle: ${mfile} not found (is ${dir} an accelerator bundle?)`);
  const text = readFileSync(mfile);
  const manifest = readJson<AcceleratorManifest>(mfile, 'accelerator bundle');
  if (manifest.format !== ACC_FORMAT) throw new BundleError(`accelerator bundle: ${mfile} has format "${manifest.format}", expected "${ACC_FORMAT}"`);
  const wfile = pinnedFile(dir, manifest.weights.file, manifest.weights.sha256, 'accelerator bundle', mfile);
  const st = openSafetensors(wfile);
  const d = manifest.n_embd;
  const layers: AcceleratorWeights['layers'] = [];
  for (let l = 0; l < manifest.n_layer; l++) {
    const rec: AcceleratorWeights['layers'][number] = {};
    // the manifest lists each linear with its dimensions (older bundles: GPT-2's four)
    const listed = Array.isArray(manifest.linears) ? manifest.linears.filter((x) => x.layer === l) : LINEARS.map((name) => ({ name, din: linearDims(name, d)[0], dout: linearDims(name, d)[1] }));
    if (listed.length === 0) throw new BundleError(`accelerator bundle: ${mfile} lists no linear of layer ${l}`);
    for (const { name, din, dout } of listed) {
      if (!ALL_LINEARS.includes(name) || rec[name]) throw new BundleError(`accelerator bundle: ${mfile} lists an unknown or repeated linear "${String(name)}" in layer ${l}`);
      if (!Number.isInteger(din) || !Number.isInteger(dout) || din <= 0 || dout <= 0) throw new BundleError(`accelerator bundle: ${mfile} gives h.${l}.${name} the dimensions ${din} x ${dout}`);
      const wn = `h.${l}.${name}.weight`, bn = `h.${l}.${name}.bias`;
      for (const [n, shape] of [[wn, [din, dout]], [bn, [dout]]] as const) {
        if (!st.has(n)) throw new BundleError(`accelerator bundle: ${wfile} lacks tensor "${n}"`);
        const got = st.info(n).shape;
        if (got.join(',') !== shape.join(',') && !(n === bn && got.join(',') === '0')) throw new BundleError(`accelerator bundle: tensor "${n}" has shape [${got}], expected [${shape}]`);
      }
      rec[name] = { w: st.get(wn), b: st.get(bn), din, dout };
    }
    layers.push(rec);
  }
  return { manifest, manifestSha256: sha256(text), weights: { n_layer: manifest.n_layer, layers } };
}

export interface EnclaveBundle<T extends ObfuscatedTensors | LlamaObfuscatedTensors = ObfuscatedTensors | LlamaObfuscatedTensors> {
  mode: Mode;
  config: GPT2Config;
  /** the family's tensors (Llama-family ones with a Llama config) */
  tensors: T;
  /** mask spec label ("1", "10", "naive", ...) and two-sidedness, for reports */
  spec: string;
  twoSided: boolean;
  /** SHA-256 of the accelerator manifest this enclave bundle was made with */
  acceleratorManifestSha256: string;
  cls?: { numLabels: number; labels?: string[]; pooling?: Pooling };
  padTokenId?: number;
  /** fingerprint of the mask key (keyFingerprint); absent in older bundles */
  keyFingerprint?: string;
  /** public-base bundles: the base's pin, how the delta was cut, its rank per linear, the energy left out */
  publicBase?: PublicBaseInfo;
}

export interface PublicBaseInfo {
  sha256: string;
  choice: string;
  ranks: Record<LinearName, number>[];
  residualEnergy: number;
}

type ShapeKeys = Pick<EnclaveBundle, 'mode' | 'config' | 'twoSided' | 'cls' | 'publicBase'>;

/** A Llama-family bundle's tensors by name, with shapes (docs/obfuscation.md, "Llama family"). */
function llamaShapes(b: ShapeKeys, c: LlamaConfig): Record<string, number[]> {
  const { n_layer: L, n_embd: C, vocab_size: V, n_head: NH, n_kv_head: NKV } = c, hd = C / NH, LCC = [L, C, C];
  const q = [L, NH, hd, hd], kv = [L, NKV, hd, hd];
  return {
    wte: [V, C], ...(c.tie_word_embeddings ? {} : { head: [V, C] }), ln1w: [L, C], ln2w: [L, C],
    qM: q, qMinv: q, kM: kv, kMinv: kv, vM: kv, vMinv: kv, headPerm: [L, NKV], pi: [L, c.intermediate_size],
    ...(b.mode === 'sealed' ? { Q: [C, C], G: [C, C] } : { lnfw: [C], R1: LCC, R2: LCC, ...(b.twoSided ? { RoInv: LCC, RpInv: LCC } : {}) }),
    ...(b.cls ? { score: [b.cls.numLabels, C] } : {}),
  };
}

/**
 * Every tensor of a mode's bundle by its name on disk, with its shape: the typed fields
 * (permutations are int32), with `chk` the secret vectors chk.{layer}.{linear}.{r,s,w,v,c},
 * and a public-base bundle's delta delta.{layer}.{linear}.{U,V,b} (U, V only at rank > 0).
 */
function enclaveShapes(b: ShapeKeys, chk: boolean): Map<string, number[]> {
  const { n_layer: L, n_embd: d, n_ctx: T, vocab_size: V, n_head: H } = b.config;
  const Ld = [L, d], Ldd = [L, d, d], heads = [L, H, d / H, d / H], K = CHECK_VECTORS;
  const shapes = new Map(Object.entries(isLlama(b.config) ? llamaShapes(b, b.config) : {
    wte: [V, d], wpe: [T, d], ln1w: Ld, ln1b: Ld, ln2w: Ld, ln2b: Ld,
    hA: heads, hAinvT: heads, hB: heads, hBinv: heads, headPerm: [L, H], pi: [L, 4 * d],
    ...(b.mode === 'sealed' ? { u: [d], G: [d, d], headBias: [d], Q: [d, d] } : { lnfw: [d], lnfb: [d], R1: Ldd, R2: Ldd }),
    ...(b.mode === 'paper' && b.twoSided ? { RoInv: Ldd, RpInv: Ldd } : {}),
    ...(b.cls ? { score: [b.cls.numLabels, d] } : {}),
  }));
  for (let l = 0; chk && l < L; l++) {
    for (const name of blockLinearNames(b.config)) {
      const [din, dout] = blockLinearDims(b.config, name);
      for (const [k, shape] of Object.entries({ r: [dout, K], s: [din, K], w: [din, K], v: [dout, K], c: [K] })) shapes.set(`chk.${l}.${name}.${k}`, shape);
    }
  }
  b.publicBase?.ranks.forEach((ranks, l) => {
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d), r = ranks[name];
      if (r > 0) shapes.set(`delta.${l}.${name}.U`, [din, r]).set(`delta.${l}.${name}.V`, [r, dout]);
      shapes.set(`delta.${l}.${name}.b`, [dout]);
    }
  });
  return shapes;
}

/** A chk.{layer}.{linear}.{part} (or delta.*) name's place in the check vectors (or the delta). */
function checkPart(name: string): [number, LinearName, keyof LinearCheck] {
  const [, l, linear, part] = name.split('.');
  return [Number(l), linear as LinearName, part as keyof LinearCheck];
}

export interface EnclaveManifest {
  format: string;
  mode: Mode;
  spec: string;
  two_sided: boolean;
  config: GPT2Config;
  accelerator_manifest_sha256: string;
  cls: { num_labels: number; labels?: string[]; pooling?: Pooling } | null;
  pad_token_id: number | null;
  tensors: { file: string; sha256: string };
  key_fingerprint?: string;
  public_base?: { sha256: string; choice: string; ranks: Record<LinearName, number>[]; residual_energy: number };
  /** Llama family: how q and k are masked around rotary */
  rotary_masks?: RotaryMasks;
}

export function writeEnclaveBundle(dir: string, b: EnclaveBundle): void {
  mkdirSync(dir, { recursive: true });
  const { chk, ...fields } = b.tensors as ObfuscatedTensors;
  const tensors: TensorToWrite[] = [...enclaveShapes(b, chk !== null)].map(([name, shape]) => {
    const [l, linear, part] = checkPart(name);
    const data = name.startsWith('chk.') ? chk![l][linear]![part]
      : name.startsWith('delta.') ? (b.tensors as ObfuscatedTensors).delta![l][linear][part as 'U' | 'V' | 'b'] : (fields as unknown as Record<string, Float32Array | Int32Array>)[name];
    return { name, dtype: data instanceof Int32Array ? 'I32' : 'F32', shape, data };
  });
  const tfile = path.join(dir, 'tensors.safetensors');
  writeSafetensors(tfile, tensors, { format: ENC_FORMAT });
  const manifest: EnclaveManifest = {
    format: ENC_FORMAT, mode: b.mode, spec: b.spec, two_sided: b.twoSided, config: b.config,
    accelerator_manifest_sha256: b.acceleratorManifestSha256,
    cls: b.cls ? { num_labels: b.cls.numLabels, labels: b.cls.labels, pooling: b.cls.pooling ?? 'last' } : null,
    pad_token_id: b.padTokenId ?? null,
    tensors: { file: 'tensors.safetensors', sha256: sha256(readFileSync(tfile)) },
    ...(b.keyFingerprint ? { key_fingerprint: b.keyFingerprint } : {}),
    ...(b.publicBase ? { public_base: { sha256: b.publicBase.sha256, choice: b.publicBase.choice, ranks: b.publicBase.ranks, residual_energy: b.publicBase.residualEnergy } } : {}),
    ...('family' in b.tensors ? { rotary_masks: b.tensors.rotary } : {}),
  };
  writeJson(path.join(dir, 'manifest.json'), manifest);
}

/**
 * A bundle file's tensor, checked: present, of `shape` (or flat with as many values, as older
 * bundles store them) and finite; the rows of headPerm and pi permutations (int32 on disk,
 * float32 in older bundles).
 */
function readTensor(st: SafetensorsFile, what: string, name: string, shape: number[]): Float32Array | Int32Array {
  if (!st.has(name)) throw new BundleError(`${what} lacks tensor "${name}"`);
  const { shape: got, numel, dtype } = st.info(name);
  if (numel !== shape.reduce((a, x) => a * x, 1) || (got.length !== 1 && got.join(',') !== shape.join(','))) {
    throw new BundleError(`${what}: tensor "${name}" has shape [${got.join(', ')}], expected [${shape.join(', ')}]`);
  }
  if (name !== 'headPerm' && name !== 'pi') {
    const x = st.get(name);
    for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) throw new BundleError(`${what}: tensor "${name}" contains a non-finite value at ${i}: refusing to run`);
    return x;
  }
  const x = dtype === 'F32' ? st.get(name) : st.getInt(name);
  const [rows, width] = shape, seen = new Uint8Array(width);
  for (let r = 0; r < rows; r++, seen.fill(0)) {
    for (let j = 0; j < width; j++) {
      const v = x[r * width + j];
      if (!Number.isInteger(v) || v < 0 || v >= width || seen[v]) throw new BundleError(`${what}: tensor "${name}" row ${r} is not a permutation of 0..${width - 1}`);
      seen[v] = 1;
    }
  }
  return Int32Array.from(x);
}

/** The typed tensors of a bundle file, each checked once (see enclaveShapes). */
function readEnclaveTensors(st: SafetensorsFile, b: ShapeKeys, rotary: RotaryMasks | undefined): ObfuscatedTensors | LlamaObfuscatedTensors {
  const what = `enclave bundle (${b.mode} mode)`;
  const chk: CheckVectors | null = st.has('chk.0.qkv.r') ? Array.from({ length: b.config.n_layer }, () => ({}) as CheckVectors[number]) : null;
  const delta: DeltaTensors | null = b.publicBase ? b.publicBase.ranks.map((ranks) => Object.fromEntries(LINEARS.map((n) => [n, { rank: ranks[n], U: new Float32Array(0), V: new Float32Array(0), b: new Float32Array(0) }])) as DeltaTensors[number]) : null;
  const t: Record<string, unknown> = { mode: b.mode, RoInv: null, RpInv: null, chk, delta, ...(isLlama(b.config) ? { family: 'llama', head: null, rotary } : {}) };
  for (const [name, shape] of enclaveShapes(b, chk !== null)) {
    const x = readTensor(st, what, name, shape), [l, linear, part] = checkPart(name);
    if (name.startsWith('delta.')) delta![l][linear][part as 'U' | 'V' | 'b'] = x as Float32Array;
    else if (name.startsWith('chk.')) (chk![l][linear] ??= {} as LinearCheck)[part] = x as Float32Array;
    else t[name] = x;
  }
  return t as unknown as ObfuscatedTensors | LlamaObfuscatedTensors;
}

/**
 * The tensors of a trained update (`prefix` + a float tensor's name, as an enclave exports
 * them) in place of the bundle's, each checked like the bundle's own; a classifier may be new.
 */
export function withUpdate(b: EnclaveBundle, st: SafetensorsFile, prefix: string): ObfuscatedTensors | LlamaObfuscatedTensors {
  const shapes = enclaveShapes(b, false);
  const t: Record<string, unknown> = { ...b.tensors };
  for (const n of st.names().filter((x) => x.startsWith(prefix))) {
    const name = n.slice(prefix.length), d = b.config.n_embd;
    const shape = name === 'score' ? [st.info(n).numel / d, d] : name !== 'headPerm' && name !== 'pi' ? shapes.get(name) : undefined;
    if (!shape || !Number.isInteger(shape[0])) throw new BundleError(`the enclave's update has an unexpected tensor "${n}"`);
    t[name] = readTensor(st, "the enclave's update", n, shape);
  }
  return t as unknown as ObfuscatedTensors | LlamaObfuscatedTensors;
}

function bundlePooling(p: unknown, file: string): Pooling {
  if (p === undefined || p === null) return 'last';
  if (!POOLINGS.includes(p as Pooling)) throw new BundleError(`enclave bundle: ${file} has cls.pooling ${JSON.stringify(p)}, expected one of ${POOLINGS.join(', ')}`);
  return p as Pooling;
}

export function loadEnclaveBundle(dir: string): EnclaveBundle {
  const mfile = path.join(dir, 'manifest.json');
  const m = readJson<EnclaveManifest>(mfile, 'enclave bundle');
  if (m.format !== ENC_FORMAT) throw new BundleError(`enclave bundle: ${mfile} has format "${m.format}", expected "${ENC_FORMAT}"`);
  if (m.mode !== 'sealed' && m.mode !== 'paper') throw new BundleError(`enclave bundle: unknown mode "${m.mode}"`);
  const config = isLlama(m.config) ? validateLlamaConfig(m.config, `enclave bundle ${mfile}`) : validateConfig(m.config, `enclave bundle ${mfile}`);
  if (isLlama(config) && m.rotary_masks !== 'full' && m.rotary_masks !== 'blocks') throw new BundleError(`enclave bundle: ${mfile} is a Llama-family bundle without a valid rotary_masks ("full" or "blocks"), got ${JSON.stringify(m.rotary_masks)}`);
  const tfile = pinnedFile(dir, m.tensors.file, m.tensors.sha256, 'enclave bundle', mfile);
  const cls = m.cls ? { numLabels: m.cls.num_labels, labels: m.cls.labels, pooling: bundlePooling(m.cls.pooling, mfile) } : undefined;
  const publicBase = m.public_base ? publicBaseOf(m.public_base, config.n_layer, config.n_embd, mfile) : undefined;
  const head = { mode: m.mode, config, twoSided: m.two_sided, cls, publicBase };
  return {
    ...head, tensors: readEnclaveTensors(openSafetensors(tfile), head, m.rotary_masks), spec: m.spec,
    acceleratorManifestSha256: m.accelerator_manifest_sha256, padTokenId: m.pad_token_id ?? undefined,
    keyFingerprint: typeof m.key_fingerprint === 'string' ? m.key_fingerprint : undefined,
  };
}

/** A manifest's public_base, checked: a pin and a rank per linear within its dimensions. */
function publicBaseOf(p: NonNullable<EnclaveManifest['public_base']>, L: number, d: number, file: string): PublicBaseInfo {
  const bad = (why: string) => new BundleError(`enclave bundle: ${file} has a malformed public_base (${why})`);
  if (typeof p.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(p.sha256)) throw bad('sha256');
  if (!Array.isArray(p.ranks) || p.ranks.length !== L) throw bad(`ranks of ${L} layers expected`);
  for (const ranks of p.ranks) {
    for (const n of LINEARS) {
      const r = ranks?.[n], [din, dout] = linearDims(n, d);
      if (!Number.isInteger(r) || r < 0 || r > Math.min(din, dout)) throw bad(`rank of ${n}: ${JSON.stringify(r)}`);
    }
  }
  return { sha256: p.sha256, choice: String(p.choice), ranks: p.ranks, residualEnergy: Number(p.residual_energy) };
}

/** A bundle's tensors as GPT-2's (refuses a Llama-family bundle for what serves GPT-2 only). */
export function gpt2Tensors(t: ObfuscatedTensors | LlamaObfuscatedTensors, what: string): ObfuscatedTensors {
  if ('family' in t) throw new BundleError(`${what} serves GPT-2 models; this is a Llama-family bundle`);
  return t;
}

/** Refuses a pair of bundles that were not made together. */
export function checkBundlePair(enc: EnclaveBundle, acc: LoadedAccelerator): void {
  if (enc.acceleratorManifestSha256 !== acc.manifestSha256) {
    throw new BundleError(`bundle mismatch: the enclave bundle expects accelerator manifest ${enc.acceleratorManifestSha256.slice(0, 16)}..., got ${acc.manifestSha256.slice(0, 16)}... (bundles from different obfuscation runs)`);
  }
  if (enc.mode !== acc.manifest.mode) throw new BundleError(`bundle mismatch: enclave bundle is ${enc.mode} mode, accelerator bundle is ${acc.manifest.mode} mode`);
  if (enc.config.n_layer !== acc.manifest.n_layer || enc.config.n_embd !== acc.manifest.n_embd) throw new BundleError('bundle mismatch: model dimensions differ');
  if (enc.publicBase?.sha256 !== acc.manifest.public_base_sha256) {
    const pin = (x: string | undefined) => (x ? `public base ${x.slice(0, 16)}...` : 'no public base');
    throw new BundleError(`bundle mismatch: the enclave bundle pins ${pin(enc.publicBase?.sha256)}, the accelerator bundle ${pin(acc.manifest.public_base_sha256)}`);
  }
}

export function writeProviderKey(dir: string, k: ProviderKey): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeJson(path.join(dir, 'secret.json'), k, 0o600);
}

export function loadProviderKey(dir: string): { key: Buffer; params: ObfuscationParams; info: ProviderKey; file: string } {
  const file = dir.endsWith('.json') ? dir : path.join(dir, 'secret.json');
  const k = readJson<ProviderKey>(file, 'provider key');
  if (k.format !== KEY_FORMAT) throw new BundleError(`provider key: ${file} has format "${k.format}", expected "${KEY_FORMAT}"`);
  if (!/^[0-9a-f]{64}$/.test(k.key_hex)) throw new BundleError(`provider key: ${file} does not hold a 256-bit hex key`);
  return {
    key: Buffer.from(k.key_hex, 'hex'),
    params: { mode: k.mode, spec: parseMaskSpec(k.spec), twoSided: k.two_sided, headPermutation: k.head_permutation },
    info: k,
    file,
  };
}

/**
 * Refuses a mask key that did not make these bundles (the manifests' key fingerprints; older
 * bundles without one pass). Called before anything is derived or written with the key.
 */
export function checkKeyMatches(key: Uint8Array, keyFile: string, bundles: { what: string; fingerprint: string | undefined }[]): void {
  const fp = keyFingerprint(key);
  for (const b of bundles) {
    if (b.fingerprint !== undefined && b.fingerprint !== fp) {
      throw new BundleError(`the mask key in ${keyFile} did not make the ${b.what} (key fingerprint ${fp.slice(0, 12)}..., the bundle's ${b.fingerprint.slice(0, 12)}...): nothing was written`);
    }
  }
}
