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
import { validateConfig } from '../model/config.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import type { EnclaveTensors } from './transform.js';
import { LINEARS, linearDims, type LinearName } from '../model/block.js';
import type { AcceleratorWeights, ObfLinear } from '../protocol/linears.js';
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
  linears: { layer: number; name: LinearName; din: number; dout: number }[];
  weights: { file: string; sha256: string; bytes: number };
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
}

export const sha256 = (b: Uint8Array | string): string => createHash('sha256').update(b).digest('hex');

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

/** Writes the accelerator bundle; returns the SHA-256 of its manifest. */
export function writeAcceleratorBundle(dir: string, acc: AcceleratorWeights, mode: Mode, d: number): string {
  mkdirSync(dir, { recursive: true });
  const tensors: TensorToWrite[] = [];
  const linears: AcceleratorManifest['linears'] = [];
  acc.layers.forEach((layer, l) => {
    for (const name of LINEARS) {
      const L = layer[name];
      tensors.push({ name: `h.${l}.${name}.weight`, dtype: 'F32', shape: [L.din, L.dout], data: L.w });
      tensors.push({ name: `h.${l}.${name}.bias`, dtype: 'F32', shape: [L.dout], data: L.b });
      linears.push({ layer: l, name, din: L.din, dout: L.dout });
    }
  });
  const wfile = path.join(dir, 'weights.safetensors');
  writeSafetensors(wfile, tensors, { format: ACC_FORMAT });
  const bytes = readFileSync(wfile);
  const manifest: AcceleratorManifest = {
    format: ACC_FORMAT, mode, n_layer: acc.n_layer, n_embd: d, linears,
    weights: { file: 'weights.safetensors', sha256: sha256(bytes), bytes: bytes.length },
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
  const wfile = path.join(dir, manifest.weights.file);
  if (path.dirname(path.resolve(wfile)) !== path.resolve(dir)) throw new BundleError('accelerator bundle: weights file must be inside the bundle directory');
  if (!existsSync(wfile)) throw new BundleError(`accelerator bundle: ${wfile} not found`);
  const bytes = readFileSync(wfile);
  if (sha256(bytes) !== manifest.weights.sha256) throw new BundleError(`accelerator bundle: ${wfile} does not match the SHA-256 in ${mfile} (corrupt or replaced)`);
  const st = openSafetensors(wfile);
  const d = manifest.n_embd;
  const layers: Record<LinearName, ObfLinear>[] = [];
  for (let l = 0; l < manifest.n_layer; l++) {
    const rec = {} as Record<LinearName, ObfLinear>;
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d);
      const wn = `h.${l}.${name}.weight`, bn = `h.${l}.${name}.bias`;
      for (const [n, shape] of [[wn, [din, dout]], [bn, [dout]]] as const) {
        if (!st.has(n)) throw new BundleError(`accelerator bundle: ${wfile} lacks tensor "${n}"`);
        const got = st.info(n).shape;
        if (got.join(',') !== shape.join(',')) throw new BundleError(`accelerator bundle: tensor "${n}" has shape [${got}], expected [${shape}]`);
      }
      rec[name] = { w: st.get(wn), b: st.get(bn), din, dout };
    }
    layers.push(rec);
  }
  return { manifest, manifestSha256: sha256(text), weights: { n_layer: manifest.n_layer, layers } };
}

export interface EnclaveBundle {
  mode: Mode;
  config: GPT2Config;
  tensors: EnclaveTensors;
  /** mask spec label ("1", "10", "naive", ...) and two-sidedness, for reports */
  spec: string;
  twoSided: boolean;
  /** SHA-256 of the accelerator manifest this enclave bundle was made with */
  acceleratorManifestSha256: string;
  cls?: { numLabels: number; labels?: string[]; pooling?: Pooling };
  padTokenId?: number;
}

/** Which tensors each mode's enclave needs at run time, with their shapes. */
export function requiredEnclaveTensors(b: Pick<EnclaveBundle, 'mode' | 'config' | 'twoSided' | 'cls'>): Record<string, number[]> {
  const { n_layer: L, n_embd: d, n_ctx: T, vocab_size: V } = b.config;
  const H = b.config.n_head;
  const dh = d / H;
  const req: Record<string, number[]> = {
    wte: [V, d], wpe: [T, d], ln1w: [L, d], ln1b: [L, d], ln2w: [L, d], ln2b: [L, d],
    hA: [L, H, dh, dh], hAinvT: [L, H, dh, dh], hB: [L, H, dh, dh], hBinv: [L, H, dh, dh], headPerm: [L, H], pi: [L, 4 * d],
  };
  if (b.mode === 'sealed') {
    Object.assign(req, { u: [d], G: [d, d], headBias: [d], Q: [d, d] });
  } else {
    Object.assign(req, { lnfw: [d], lnfb: [d], R1: [L, d, d], R2: [L, d, d] });
    if (b.twoSided) Object.assign(req, { RoInv: [L, d, d], RpInv: [L, d, d] });
  }
  if (b.cls) req.score = [b.cls.numLabels, d];
  return req;
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
}

export function writeEnclaveBundle(dir: string, b: EnclaveBundle): void {
  mkdirSync(dir, { recursive: true });
  const tensors: TensorToWrite[] = [...b.tensors.entries()].map(([name, data]) => ({ name, dtype: 'F32', shape: [data.length], data }));
  const tfile = path.join(dir, 'tensors.safetensors');
  writeSafetensors(tfile, tensors, { format: ENC_FORMAT });
  const manifest: EnclaveManifest = {
    format: ENC_FORMAT, mode: b.mode, spec: b.spec, two_sided: b.twoSided, config: b.config,
    accelerator_manifest_sha256: b.acceleratorManifestSha256,
    cls: b.cls ? { num_labels: b.cls.numLabels, labels: b.cls.labels, pooling: b.cls.pooling ?? 'last' } : null,
    pad_token_id: b.padTokenId ?? null,
    tensors: { file: 'tensors.safetensors', sha256: sha256(readFileSync(tfile)) },
  };
  writeJson(path.join(dir, 'manifest.json'), manifest);
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
  const config = validateConfig(m.config, `enclave bundle ${mfile}`);
  const tfile = path.join(dir, m.tensors.file);
  if (path.dirname(path.resolve(tfile)) !== path.resolve(dir)) throw new BundleError('enclave bundle: tensor file must be inside the bundle directory');
  if (!existsSync(tfile)) throw new BundleError(`enclave bundle: ${tfile} not found`);
  if (sha256(readFileSync(tfile)) !== m.tensors.sha256) throw new BundleError(`enclave bundle: ${tfile} does not match the SHA-256 in ${mfile}`);
  const st = openSafetensors(tfile);
  const tensors: EnclaveTensors = new Map();
  for (const name of st.names()) tensors.set(name, st.get(name));
  const b: EnclaveBundle = {
    mode: m.mode, config, tensors, spec: m.spec, twoSided: m.two_sided,
    acceleratorManifestSha256: m.accelerator_manifest_sha256,
    cls: m.cls ? { numLabels: m.cls.num_labels, labels: m.cls.labels, pooling: bundlePooling(m.cls.pooling, mfile) } : undefined,
    padTokenId: m.pad_token_id ?? undefined,
  };
  requiredEnclaveTensors(b); // shapes are checked by the Enclave constructor
  return b;
}

/** Refuses a pair of bundles that were not made together. */
export function checkBundlePair(enc: EnclaveBundle, acc: LoadedAccelerator): void {
  if (enc.acceleratorManifestSha256 !== acc.manifestSha256) {
    throw new BundleError(`bundle mismatch: the enclave bundle expects accelerator manifest ${enc.acceleratorManifestSha256.slice(0, 16)}..., got ${acc.manifestSha256.slice(0, 16)}... (bundles from different obfuscation runs)`);
  }
  if (enc.mode !== acc.manifest.mode) throw new BundleError(`bundle mismatch: enclave bundle is ${enc.mode} mode, accelerator bundle is ${acc.manifest.mode} mode`);
  if (enc.config.n_layer !== acc.manifest.n_layer || enc.config.n_embd !== acc.manifest.n_embd) throw new BundleError('bundle mismatch: model dimensions differ');
}

export function writeProviderKey(dir: string, k: ProviderKey): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeJson(path.join(dir, 'secret.json'), k, 0o600);
}

export function loadProviderKey(dir: string): { key: Buffer; params: ObfuscationParams; info: ProviderKey } {
  const file = dir.endsWith('.json') ? dir : path.join(dir, 'secret.json');
  const k = readJson<ProviderKey>(file, 'provider key');
  if (k.format !== KEY_FORMAT) throw new BundleError(`provider key: ${file} has format "${k.format}", expected "${KEY_FORMAT}"`);
  if (!/^[0-9a-f]{64}$/.test(k.key_hex)) throw new BundleError(`provider key: ${file} does not hold a 256-bit hex key`);
  return {
    key: Buffer.from(k.key_hex, 'hex'),
    params: { mode: k.mode, spec: parseMaskSpec(k.spec), twoSided: k.two_sided, headPermutation: k.head_permutation },
    info: k,
  };
}
