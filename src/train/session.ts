/**
 * Assembles a fine-tuning session: the provider transform (or bundles), the accelerator
 * behind a link, the enclave's SplitModel, and the datasets tokenised in the enclave.
 * Also exports what a run produces and merges it back into a plain checkpoint.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { GPT2Weights } from '../model/weights.js';
import { isLlama, type GPT2Config } from '../model/config.js';
import { isPeftAdapterDir, readPeftAdapter, type ImportedAdapter } from '../model/peft.js';
import { BundleError, InputError } from '../errors.js';
import { Layout, ParamLayout } from '../model/params.js';
import { KeyedRng, Rng } from '../tensor/rng.js';
import { parseMaskSpec } from '../linalg/masks.js';
import { obfuscateWeights, resolveKey, resolveParams, type ObfuscateOptions, type ObfuscationResult } from '../obfuscate/provider.js';
import { deriveMasks } from '../obfuscate/masks.js';
import { deobfuscate } from '../obfuscate/transform.js';
import type { LlamaEnclaveTensors, PlainEnclaveTensors, RotaryMasks } from '../obfuscate/enclave_tensors.js';
import { gpt2Linears, type AcceleratorWeights } from '../protocol/linears.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink, type AcceleratorLink } from '../protocol/link.js';
import { SplitModel, plainSplitParts, foldLayerNorms, PLAIN_ENCLAVE_PARAMS, PLAIN_LINEAR_PARAMS, type SplitModelOptions } from '../enclave/split_model.js';
import { openSafetensors, writeSafetensors } from '../io/safetensors.js';
import { LoraAdapters, adapterName, adapterTensors, parseLoraTargets, type LoraConfig, type LoraTarget } from '../model/lora.js';
import type { Pooling } from '../model/kernels.js';
import { sgemm } from '../tensor/gemm.js';
import { llamaAdapters, type LlamaWeights } from '../model/llama.js';
import { llamaDims } from '../model/llama_block.js';
import { deobfuscateLlama, deriveLlamaMasks, foldRmsGains, fromPlainLlamaParts, obfuscateLlama, plainLlamaParts, type LlamaModelMasks } from '../obfuscate/llama_transform.js';
import { makeCheckVectors } from '../protocol/integrity.js';

/** The split model's own settings, and how the session splits the model and where the accelerator runs. */
export interface SessionOptions extends Pick<SplitModelOptions, 'mode' | 'method' | 'task' | 'twoSided' | 'lora' | 'numLabels' | 'mixing'> {
  /** mask condition number ("1", "10", "naive"); ignored for local */
  kappa?: string;
  labels?: string[];
  /** classification: pooling of a fresh head (a head already in the model keeps its own) */
  pooling?: Pooling;
  padTokenId: number;
  seed: number;
  /** mask key seed (reproducible masks); default: a fresh secret key */
  maskSeed?: number;
  /** local full fine-tuning of the layer-norm-folded model with frozen norms (sealed's plain twin) */
  foldedBaseline?: boolean;
  /**
   * the public base the model derives from (split modes): the accelerator gets the masked
   * base, the enclave the truncated delta. Its local twin is plain training of
   * `factoredModel(model, publicBase, mode)`.
   */
  publicBase?: ObfuscateOptions['publicBase'];
  /** seed of the mixing's randomness (tests: reproducible; default a fresh secret key) */
  mixingSeed?: number;
  /** where the in-process accelerator keeps its checkpoints */
  acceleratorStateDir?: string;
  /** serialise every boundary message (proves the wire format; slower) */
  serialize?: boolean;
  /** custom link factory (a network transport); default: in-process */
  link?: (acc: AcceleratorWeights) => AcceleratorLink;
  /** Llama family: how q and k are masked around rotary (default full per-head masks) */
  rotaryMasks?: RotaryMasks;
}

export interface Session {
  model: SplitModel;
  rng: Rng;
  link: AcceleratorLink;
  accelerator: Accelerator | null;
  obfuscation: ObfuscationResult | null;
  /** the plain model the session started from (after folding for the folded baseline) */
  base: GPT2Weights | LlamaWeights;
  modelId: string;
  /** a Llama-family session: its masks (null in local mode) */
  llama?: { masks: LlamaModelMasks | null };
}

export function modelFingerprint(w: GPT2Weights | LlamaWeights): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(w.config));
  const p = w.params;
  // hash a strided sample: fast and still specific to the weights
  const step = Math.max(1, Math.floor(p.length / 65536));
  const sample = new Float32Array(Math.ceil(p.length / step));
  for (let i = 0, j = 0; i < p.length; i += step, j++) sample[j] = p[i];
  h.update(Buffer.from(sample.buffer));
  return h.digest('hex').slice(0, 16);
}

/** The fresh classification head of a session seeded `seed` (every mode, and the enclave service, draw the same). */
export function freshClassifier(numLabels: number, d: number, seed: number): Float32Array {
  const weight = new Float32Array(numLabels * d);
  new Rng(seed + 7).fillNormal(weight, 0.02);
  return weight;
}

export function buildSession(w0: GPT2Weights | LlamaWeights, o: SessionOptions): Session {
  if (!isLlama(w0.config) && o.rotaryMasks) throw new InputError('rotary masks apply to Llama-family models only');
  const p = isLlama(w0.config) ? llamaParts(withHead(w0 as LlamaWeights, o), o) : gpt2Parts(withHead(w0 as GPT2Weights, o), o);
  const rng = new Rng(o.seed);
  const accelerator = o.link ? null : new Accelerator(p.accelerator, { stateDir: o.acceleratorStateDir });
  const link = accelerator ? new InProcessLink(accelerator, { serialize: o.serialize }) : o.link!(p.accelerator);
  const model = new SplitModel({
    mode: o.mode, method: o.method, task: o.task, config: p.base.config, tensors: p.tensors, link, twoSided: o.twoSided,
    lora: o.lora, numLabels: o.numLabels, pooling: p.base.cls?.pooling, padTokenId: o.padTokenId, freezeNorms: o.foldedBaseline, rng,
    mixing: o.mixing, mixingRng: o.mixingSeed !== undefined ? KeyedRng.fromSeed(`mixing:${o.mixingSeed}`) : undefined,
  });
  return { model, link, accelerator, rng, obfuscation: null, base: p.base, modelId: modelFingerprint(w0), ...p.extra };
}

/** The model with a fresh classification head where the task needs one it lacks (before obfuscation: every mode starts from the same one). */
function withHead<W extends GPT2Weights | LlamaWeights>(w: W, o: SessionOptions): W {
  if (o.task !== 'cls' || !o.numLabels || w.cls?.numLabels === o.numLabels) return w;
  const weight = freshClassifier(o.numLabels, w.config.n_embd, o.seed);
  return { ...w, cls: { numLabels: o.numLabels, weight, labels: o.labels, pooling: o.pooling ?? 'last' } };
}

/** A session's split of its model: what the accelerator and the enclave hold, and what the family adds to the session. */
interface SplitParts {
  /** the plain model the session starts from (after folding for the folded baseline) */
  base: GPT2Weights | LlamaWeights;
  accelerator: AcceleratorWeights;
  tensors: SplitModelOptions['tensors'];
  extra: Partial<Pick<Session, 'obfuscation' | 'llama'>>;
}

/** A Llama-family model's split: the family's transform (or plain parts); the split model is the same. */
function llamaParts(w0: LlamaWeights, o: SessionOptions): SplitParts {
  if (o.publicBase) throw new InputError('--public-base serves GPT-2 models for now; a Llama-family model is obfuscated whole');
  const w = o.foldedBaseline ? foldRmsGains(w0) : w0;
  if (o.mode === 'local') return { base: w, ...plainLlamaParts(w), extra: { llama: { masks: null } } };
  const params = resolveParams({ mode: o.mode, spec: parseMaskSpec(o.kappa ?? '1'), twoSided: o.twoSided });
  const key = resolveKey({ mode: o.mode, seed: o.maskSeed });
  const masks = deriveLlamaMasks(w.config, key, params, o.rotaryMasks ?? 'full');
  const r = obfuscateLlama(w, masks);
  r.enclave.chk = makeCheckVectors(r.accelerator, new KeyedRng(key).derive('integrity'));
  return { base: w, accelerator: r.accelerator, tensors: r.enclave, extra: { llama: { masks } } };
}

function gpt2Parts(w0: GPT2Weights, o: SessionOptions): SplitParts {
  if (o.mode === 'local' && o.publicBase) throw new InputError('local mode has no accelerator to hold a public base: train factoredModel(model, base, mode) instead');
  const w = o.foldedBaseline ? foldLayerNorms(w0) : w0;
  if (o.mode === 'local') return { base: w, ...plainSplitParts(w), extra: {} };
  const obf = obfuscateWeights(w, { mode: o.mode, spec: parseMaskSpec(o.kappa ?? '1'), twoSided: o.twoSided, seed: o.maskSeed, publicBase: o.publicBase });
  return { base: w, accelerator: obf.accelerator, tensors: obf.enclave.tensors, extra: { obfuscation: obf } };
}

/** Writes the run's trained parts: adapters (HF-PEFT-like names) and the enclave's trained tensors. */
export function exportRun(dir: string, s: Session, extra: Record<string, unknown>): void {
  mkdirSync(dir, { recursive: true });
  const ad = s.model.adapters;
  if (ad) {
    writeSafetensors(path.join(dir, 'adapters.safetensors'), adapterTensors(ad), {
      format: 'obfuscatune-lora/1', mode: s.model.mode, rank: String(ad.config.rank), alpha: String(ad.config.alpha), targets: ad.config.targets.join(','),
    });
  }
  const trained = s.model.trainedTensors();
  if (trained.size) {
    writeSafetensors(path.join(dir, 'enclave-trained.safetensors'), [...trained].map(([name, data]) => ({ name, dtype: 'F32' as const, shape: [data.length], data })), { format: 'obfuscatune-enclave-trained/1' });
  }
  writeFileSync(path.join(dir, 'export.json'), JSON.stringify({ mode: s.model.mode, method: s.model.method, task: s.model.task, ...extra }, null, 2) + '\n');
}

/**
 * Plain weights with LoRA adapters folded in: each target's weight W[din, ld] (from its
 * column `off`) += scale * A B. `at` names each target's weight, row length and first column.
 */
function mergeLowRank<K extends string, W extends { layout: Layout<K>; params: Float32Array }>(
  w: W, ad: LoraAdapters, at: Partial<Record<LoraTarget, [NoInfer<K>, number, number]>>, family: string,
): W {
  const p = Float32Array.from(w.params), r = ad.config.rank;
  for (const v of ad.views) {
    const t = at[v.target];
    if (!t) throw new InputError(`LoRA target "${v.target}" has no ${family} weight`);
    const M = v.target === 'wte' ? w.layout.view(p, t[0]) : w.layout.layer(p, t[0], v.layer);
    sgemm(false, false, v.din, v.dout, r, ad.scale, v.A, r, v.B, v.dout, 1, M.subarray(t[2]), t[1]);
  }
  return { ...w, params: p };
}

/** Folds LoRA adapters into plain weights (local and paper modes: the adapters act on plain tensors). */
export function mergeAdaptersPlain(w: GPT2Weights, ad: LoraAdapters): GPT2Weights {
  const d = w.config.n_embd;
  // the embedding update: GPT-2 ties wte to the output layer, which a classifier does not use
  return mergeLowRank(w, ad, {
    q: ['qkvw', 3 * d, 0], k: ['qkvw', 3 * d, d], v: ['qkvw', 3 * d, 2 * d], proj: ['attprojw', d, 0], fc: ['fcw', 4 * d, 0], 'mlp-proj': ['fcprojw', d, 0], wte: ['wte', d, 0],
  }, 'GPT-2');
}

/**
 * The plain model a session has trained so far (provider side: uses the masks). Adapters and
 * full fine-tuning updates are merged; sealed mode's folded layer norms are unfolded.
 */
export function mergedPlainModel(s: Session): GPT2Weights {
  const m = s.model;
  if (!s.accelerator) throw new Error('merging needs the in-process accelerator (or its exported state)');
  if (s.llama) throw new InputError('this merge serves GPT-2 sessions; use mergedLlamaModel');
  const enc = m.allTensors();
  if ('family' in enc) throw new BundleError('internal: Llama-family tensors in a GPT-2 session');
  const acc = s.accelerator.weights, base = s.base as GPT2Weights;
  const obf = s.obfuscation!;
  const w = enc.mode === 'local' ? fromPlainParts(base, acc, enc) : deobfuscate(base, acc, enc, deriveMasks(base.config, obf.key, obf.params));
  return m.adapters ? mergeAdaptersPlain(w, m.adapters) : w; // adapters are plain in every mode
}

/** The plain Llama-family model a session has trained so far (provider side: uses the masks). */
export function mergedLlamaModel(s: Session): LlamaWeights {
  if (!s.llama || !s.accelerator) throw new InputError('merging a Llama-family model needs its in-process session');
  const enc = s.model.allTensors() as LlamaEnclaveTensors;
  const base = s.base as LlamaWeights, acc = s.accelerator.weights;
  const w = enc.mode === 'local' ? fromPlainLlamaParts(base, acc, enc) : deobfuscateLlama(base, acc, enc, s.llama.masks!);
  return s.model.adapters ? mergeLlamaAdapters(w, s.model.adapters) : w;
}

/** Folds LoRA adapters into plain Llama-family weights. */
export function mergeLlamaAdapters(w: LlamaWeights, ad: LoraAdapters): LlamaWeights {
  const { C, KV, W, I } = llamaDims(w.config);
  return mergeLowRank(w, ad, {
    q: ['qkvw', W, 0], k: ['qkvw', W, C], v: ['qkvw', W, C + KV], proj: ['ow', C, 0], gate: ['guw', 2 * I, 0], up: ['guw', 2 * I, I], 'mlp-proj': ['downw', C, 0], wte: ['wte', C, 0],
  }, 'Llama-family');
}

function fromPlainParts(base: GPT2Weights, acc0: AcceleratorWeights, enc: PlainEnclaveTensors): GPT2Weights {
  const acc = gpt2Linears(acc0);
  const lay = new ParamLayout(base.config);
  const p = new Float32Array(lay.total);
  acc.layers.forEach((L, l) => {
    for (const [k, [wn, bn]] of Object.entries(PLAIN_LINEAR_PARAMS)) {
      lay.layer(p, wn, l).set(L[k as keyof typeof PLAIN_LINEAR_PARAMS].w);
      lay.layer(p, bn, l).set(L[k as keyof typeof PLAIN_LINEAR_PARAMS].b);
    }
  });
  for (const k of PLAIN_ENCLAVE_PARAMS) lay.view(p, k).set(enc[k]);
  return { config: base.config, layout: lay, params: p, cls: base.cls && enc.score ? { ...base.cls, weight: Float32Array.from(enc.score) } : base.cls, padTokenId: base.padTokenId };
}

/** Loads an adapters file written by exportRun. */
export function loadAdapters(file: string, nLayer: number, d: number, vocab: number, config?: GPT2Config): LoraAdapters {
  if (!existsSync(file)) throw new Error(`adapter file ${file} not found`);
  const st = openSafetensors(file);
  const meta = st.metadata;
  let targets: LoraTarget[];
  try {
    targets = parseLoraTargets(meta.targets ?? '', config && isLlama(config) ? 'llama' : 'gpt2');
  } catch (e) {
    throw new Error(`adapter file ${file}: ${(e as Error).message}`);
  }
  const cfg: LoraConfig = { rank: Number(meta.rank), alpha: Number(meta.alpha), dropout: 0, targets };
  const ad = config && isLlama(config) ? llamaAdapters(cfg, config) : new LoraAdapters(cfg, nLayer, d, vocab);
  for (const v of ad.views) {
    st.getInto(`${adapterName(v)}.lora_A`, v.A);
    st.getInto(`${adapterName(v)}.lora_B`, v.B);
  }
  return ad;
}


/**
 * An adapter to merge or start from: a PEFT adapter directory, a run's `final/` directory, or
 * an adapters file written by exportRun.
 */
export function readAdapter(p: string, cfg: GPT2Config): ImportedAdapter {
  if (!existsSync(p)) throw new BundleError(`adapter ${p} not found`);
  if (!statSync(p).isDirectory()) return { adapters: loadAdapters(p, cfg.n_layer, cfg.n_embd, cfg.vocab_size) };
  if (isPeftAdapterDir(p)) return readPeftAdapter(p, cfg);
  const f = path.join(p, 'adapters.safetensors');
  if (existsSync(f)) return { adapters: loadAdapters(f, cfg.n_layer, cfg.n_embd, cfg.vocab_size) };
  throw new BundleError(`${p} is neither a PEFT adapter directory (adapter_config.json) nor a directory with adapters.safetensors`);
}

/** Plain weights with an adapter folded in and its classifier, if it has one, as the head. */
export function mergeAdapter(w: GPT2Weights, a: ImportedAdapter): GPT2Weights {
  const m = mergeAdaptersPlain(w, a.adapters);
  if (!a.score) return m;
  const keep = w.cls?.numLabels === a.numLabels ? w.cls : undefined;
  return { ...m, cls: { numLabels: a.numLabels!, weight: Float32Array.from(a.score), labels: keep?.labels, pooling: keep?.pooling ?? 'last' } };
}
