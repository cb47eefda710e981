/**
 * The model provider's operations: obfuscate a plain model into the two bundles (in memory
 * or on disk) and merge a fine-tuned pair back into a plain checkpoint.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import type { GPT2Weights } from '../model/weights.js';
import { KeyedRng } from '../tensor/rng.js';
import { maskSpecLabel, type MaskSpec } from '../linalg/masks.js';
import { deriveMasks, type Mode, type ObfuscationParams } from './masks.js';
import { obfuscate, deobfuscate, type DeltaReport } from './transform.js';
import type { RankChoice } from '../linalg/svd.js';
import { BundleError, InputError } from '../errors.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import { makeCheckVectors } from '../protocol/integrity.js';
import {
  writeAcceleratorBundle, writeEnclaveBundle, writeProviderKey, KEY_FORMAT, sha256,
  loadAcceleratorBundle, loadEnclaveBundle, loadProviderKey, checkBundlePair, keyFingerprint, checkKeyMatches, gpt2Tensors, type EnclaveBundle,
} from './bundle.js';
import type { LlamaObfuscatedTensors, ObfuscatedTensors, RotaryMasks } from './enclave_tensors.js';
import type { LlamaWeights } from '../model/llama.js';
import { deobfuscateLlama, deriveLlamaMasks, obfuscateLlama } from './llama_transform.js';
import type { GPT2Config } from '../model/config.js';

export interface ObfuscateOptions {
  mode: Mode;
  spec?: MaskSpec;
  twoSided?: boolean;
  headPermutation?: boolean;
  /** 32-byte secret; default: fresh from the OS CSPRNG */
  key?: Buffer;
  /** reproducible (NOT secret) key for tests and experiments */
  seed?: number;
  /**
   * the public checkpoint the model derives from: the accelerator gets it (masked), the
   * enclave the model's delta over it as U V of the chosen rank or energy
   */
  publicBase?: { weights: GPT2Weights; choice: RankChoice };
  onLayer?: (phase: 'masks' | 'weights', l: number) => void;
}

export interface ObfuscationResult<T extends ObfuscatedTensors | LlamaObfuscatedTensors = ObfuscatedTensors> {
  key: Buffer;
  params: ObfuscationParams;
  accelerator: AcceleratorWeights;
  enclave: EnclaveBundle<T>;
  /** public-base obfuscations: the delta's ranks and the energy the truncation left out */
  delta: DeltaReport | null;
}

/** The share of each linear's delta energy a public-base obfuscation keeps unless told otherwise. */
export const DEFAULT_DELTA_ENERGY = 0.9;

/** The SHA-256 that pins a public base: its configuration and its weights as float32. */
export function publicBaseSha256(w: GPT2Weights): string {
  const c = w.config;
  return sha256(Buffer.concat([
    Buffer.from(JSON.stringify([c.n_layer, c.n_head, c.n_embd, c.n_ctx, c.vocab_size, c.layer_norm_epsilon])),
    Buffer.from(w.params.buffer, w.params.byteOffset, w.params.byteLength),
  ]));
}

/** Refuses a public base that cannot be the model's: another architecture. */
export function checkPublicBase(model: GPT2Weights, base: GPT2Weights, where: string): void {
  for (const k of ['n_layer', 'n_head', 'n_embd', 'n_ctx', 'vocab_size', 'layer_norm_epsilon'] as const) {
    if (model.config[k] !== base.config[k]) throw new InputError(`the public base ${where} has ${k} = ${base.config[k]}, the model ${model.config[k]}: a model derives only from a base of its own shape`);
  }
}

/** Refuses a public base whose hash is not the one a bundle pinned. */
export function checkPinnedBase(base: GPT2Weights, pinned: string | undefined, where: string): void {
  if (pinned === undefined) throw new BundleError(`these bundles were made without a public base; ${where} is not needed`);
  const got = publicBaseSha256(base);
  if (got !== pinned) throw new BundleError(`the public base ${where} has SHA-256 ${got.slice(0, 16)}..., the bundles pin ${pinned.slice(0, 16)}... (another checkpoint)`);
}

export function resolveParams(o: ObfuscateOptions): ObfuscationParams {
  const spec = o.spec ?? { kind: 'kappa', kappa: 1 };
  if (o.twoSided && o.mode !== 'paper') throw new Error('--two-sided applies to paper mode only');
  return { mode: o.mode, spec, twoSided: o.twoSided ?? false, headPermutation: o.headPermutation ?? true };
}

export function resolveKey(o: ObfuscateOptions): Buffer {
  if (o.key) {
    if (o.key.length !== 32) throw new Error('the mask key must be 32 bytes');
    return o.key;
  }
  return o.seed !== undefined ? KeyedRng.fromSeed(o.seed).key : randomBytes(32);
}

/** In-memory provider transform. The accelerator manifest hash is filled in when written. */
export function obfuscateWeights(w: GPT2Weights, o: ObfuscateOptions): ObfuscationResult {
  const params = resolveParams(o);
  const key = resolveKey(o);
  const masks = deriveMasks(w.config, key, params, (l) => o.onLayer?.('masks', l));
  const pub = o.publicBase;
  if (pub) checkPublicBase(w, pub.weights, '');
  const { accelerator, enclave, deltaReport } = obfuscate(w, masks, (l) => o.onLayer?.('weights', l), pub ? { base: pub.weights, choice: pub.choice } : undefined);
  const r = withChecks(w, key, params, accelerator, enclave);
  r.enclave.publicBase = pub && deltaReport ? {
    sha256: publicBaseSha256(pub.weights), choice: pub.choice.rank !== undefined ? `rank ${pub.choice.rank}` : `energy ${pub.choice.energy}`,
    ranks: deltaReport.ranks, residualEnergy: deltaReport.total > 0 ? deltaReport.residual / deltaReport.total : 0,
  } : undefined;
  return { ...r, delta: deltaReport };
}

/** The result of a transform, with the secret Freivalds vectors the enclave checks every accelerator reply with. */
function withChecks<T extends ObfuscatedTensors | LlamaObfuscatedTensors>(w: GPT2Weights | LlamaWeights, key: Buffer, params: ObfuscationParams, accelerator: AcceleratorWeights, tensors: T): ObfuscationResult<T> {
  tensors.chk = makeCheckVectors(accelerator, new KeyedRng(key).derive('integrity'));
  return {
    key, params, accelerator, delta: null,
    enclave: {
      mode: params.mode, config: w.config, tensors, spec: maskSpecLabel(params.spec), twoSided: params.twoSided, acceleratorManifestSha256: '',
      cls: w.cls ? { numLabels: w.cls.numLabels, labels: w.cls.labels, pooling: w.cls.pooling } : undefined, padTokenId: w.padTokenId,
    },
  };
}

/**
 * The plain model a public-base obfuscation in `mode` stands for: the base plus the
 * truncated delta U V (in sealed mode the delta of the layer-norm-folded weights), the
 * model's own embeddings, norms and biases. Local training of it is what split training of
 * the public-base bundles equals.
 */
export function factoredModel(w: GPT2Weights, publicBase: NonNullable<ObfuscateOptions['publicBase']>, mode: Mode): GPT2Weights {
  const r = obfuscateWeights(w, { mode, seed: 0, publicBase });
  return deobfuscate(w, r.accelerator, r.enclave.tensors, deriveMasks(w.config, r.key, r.params));
}

/** What writeObfuscation writes into its directory. */
export const BUNDLE_DIRS = ['accelerator', 'enclave', 'provider'];

/** Writes out/accelerator, out/enclave and out/provider (the secret key). */
export function writeObfuscation(out: string, r: ObfuscationResult<ObfuscatedTensors | LlamaObfuscatedTensors>): { acceleratorSha256: string } {
  const fp = keyFingerprint(r.key);
  const acceleratorSha256 = writeAcceleratorBundle(path.join(out, 'accelerator'), r.accelerator, r.params.mode, r.enclave.config.n_embd, fp, r.enclave.publicBase?.sha256);
  r.enclave.acceleratorManifestSha256 = acceleratorSha256;
  r.enclave.keyFingerprint = fp;
  writeEnclaveBundle(path.join(out, 'enclave'), r.enclave);
  writeProviderKey(path.join(out, 'provider'), {
    format: KEY_FORMAT, key_hex: r.key.toString('hex'), mode: r.params.mode, spec: maskSpecLabel(r.params.spec),
    two_sided: r.params.twoSided, head_permutation: r.params.headPermutation, config: r.enclave.config,
    accelerator_manifest_sha256: acceleratorSha256,
    ...('family' in r.enclave.tensors ? { rotary_masks: r.enclave.tensors.rotary } : {}),
  });
  return { acceleratorSha256 };
}

/**
 * The provider transform of a Llama-family model in memory (as obfuscateWeights; `rotary`:
 * how q and k are masked around the position rotations, default full per-head masks).
 */
export function obfuscateLlamaWeights(w: LlamaWeights, o: ObfuscateOptions & { rotary?: RotaryMasks }): ObfuscationResult<LlamaObfuscatedTensors> {
  if (o.publicBase) throw new InputError('--public-base serves GPT-2 models for now; a Llama-family model is obfuscated whole');
  const params = resolveParams(o);
  const key = resolveKey(o);
  const masks = deriveLlamaMasks(w.config, key, params, o.rotary ?? 'full', (l) => o.onLayer?.('masks', l));
  const { accelerator, enclave } = obfuscateLlama(w, masks, (l) => o.onLayer?.('weights', l));
  return withChecks(w, key, params, accelerator, enclave);
}

/** Provider side: regenerate the masks from the key and recover a plain model. */
export function deobfuscateDirs(base: GPT2Weights, accDir: string, encDir: string, keyDir: string, publicBase?: { weights: GPT2Weights; dir: string }): GPT2Weights {
  const { acc, enc, key, params } = loadForMerge(base.config, accDir, encDir, keyDir, publicBase);
  const masks = deriveMasks(base.config, key, params);
  return deobfuscate(base, acc.weights, gpt2Tensors(enc.tensors, 'deobfuscate of a GPT-2 model'), masks);
}

/** Provider side, Llama family: the masks from the key (and the bundle's rotary option), then the plain model. */
export function deobfuscateLlamaDirs(base: LlamaWeights, accDir: string, encDir: string, keyDir: string): LlamaWeights {
  const { acc, enc, key, params } = loadForMerge(base.config, accDir, encDir, keyDir);
  if (!('family' in enc.tensors)) throw new BundleError(`${encDir} is a GPT-2 bundle; the base ${base.config.n_layer}-layer model is of the Llama family`);
  return deobfuscateLlama(base, acc.weights, enc.tensors, deriveLlamaMasks(base.config, key, params, enc.tensors.rotary));
}

/** The bundles and key of a merge, checked against each other and the base model's config. */
function loadForMerge(c: GPT2Config, accDir: string, encDir: string, keyDir: string, publicBase?: { weights: GPT2Weights; dir: string }) {
  const acc = loadAcceleratorBundle(accDir);
  const enc = loadEnclaveBundle(encDir);
  if (publicBase) checkPinnedBase(publicBase.weights, enc.publicBase?.sha256, publicBase.dir);
  const { key, params, info, file } = loadProviderKey(keyDir);
  checkKeyMatches(key, file, [{ what: `accelerator bundle ${accDir}`, fingerprint: acc.manifest.key_fingerprint }, { what: `enclave bundle ${encDir}`, fingerprint: enc.keyFingerprint }]);
  if (info.mode !== enc.mode || info.mode !== acc.manifest.mode) throw new Error(`mode mismatch: key is ${info.mode}, enclave ${enc.mode}, accelerator ${acc.manifest.mode}`);
  for (const k of ['n_layer', 'n_head', 'n_embd', 'n_ctx', 'vocab_size'] as const) {
    if (c[k] !== enc.config[k]) throw new Error(`the base model's ${k} (${c[k]}) differs from the bundle's (${enc.config[k]})`);
  }
  // no pin of the accelerator manifest against the key's: a fine-tuned bundle has new weights (its format was checked)
  return { acc, enc, key, params };
}

export { loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair, sha256 };
