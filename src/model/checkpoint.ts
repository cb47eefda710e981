/**
 * Loading and saving GPT-2 models in the Hugging Face directory layout:
 * `config.json` plus `model.safetensors` (or shards listed in `model.safetensors.index.json`).
 *
 * Loading accepts checkpoints written by `transformers` (`GPT2Model`, `GPT2LMHeadModel`,
 * `GPT2ForSequenceClassification`): names with or without the `transformer.` prefix, with or
 * without the tied `lm_head.weight`, with or without the legacy `attn.bias`/`attn.masked_bias`
 * buffers, in F32, F16 or BF16.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { validateConfig, type GPT2Config } from './config.js';
import { ParamLayout, hfTensorList, type ParamKind } from './params.js';
import type { ClassifierHead, GPT2Weights } from './weights.js';
import { POOLINGS, type Pooling } from './kernels.js';
import { openSafetensors, writeFileAtomic, writeSafetensors, type SafetensorsFile, type TensorToWrite } from '../io/safetensors.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { BundleError, InputError } from '../errors.js';

export type SaveDtype = 'F32' | 'F16' | 'BF16';

export interface SaveOptions {
  /** Storage dtype of the weights (default F32). */
  dtype?: SaveDtype;
  /** Prefix transformer tensor names with `transformer.` (default true, as `GPT2LMHeadModel` does). */
  prefix?: boolean;
  /** Also write `lm_head.weight` (a copy of wte; GPT-2 ties them). Default false. */
  lmHead?: boolean;
  /** Write the legacy `h.N.attn.bias` ([1,1,n_ctx,n_ctx] lower-triangular ones) and `h.N.attn.masked_bias` buffers. Default false. */
  attnBias?: boolean;
  /** When set, split into `model-0000i-of-0000n.safetensors` shards of at most this many data bytes (a larger tensor gets its own shard) plus `model.safetensors.index.json`. */
  shardBytes?: number;
  /** Extra config.json keys (e.g. tokenizer ids). Must not contradict the architecture keys. */
  extraConfig?: Record<string, unknown>;
}

export interface LoadOptions {
  /** true: require a classification head (`score.weight`); false: ignore one if present; unset: load it when present. */
  expectLabels?: boolean;
}

const CONFIG_FILE = 'config.json';
const SINGLE_FILE = 'model.safetensors';
const INDEX_FILE = 'model.safetensors.index.json';
const SHARD_RE = /^model-\d+-of-\d+\.safetensors$/;
const PREFIX = 'transformer.';
const ACTIVATIONS = new Set(['gelu_new', 'gelu_pytorch_tanh']);
export const TORCH_DTYPE: Record<SaveDtype, string> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };

// ---------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------

/** Directory of a checkpoint given the directory itself or a file inside it. */
export function checkpointDir(p: string): string {
  try {
    if (fs.statSync(p).isDirectory()) return p;
  } catch {
    throw new BundleError(`${p}: checkpoint directory or file does not exist`);
  }
  return path.dirname(p);
}

export function readJson(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new BundleError(code === 'ENOENT' ? `${file}: file not found` : `${file}: cannot read (${code ?? (e as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new BundleError(`${file}: invalid JSON (${(e as Error).message})`);
  }
}

/** A JSON file that must hold an object. */
export function readJsonObject(file: string): Record<string, unknown> {
  const json = readJson(file);
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new BundleError(`${file}: must contain a JSON object`);
  return json as Record<string, unknown>;
}

/** The JSON object of a checkpoint directory's config.json and its path (`kind` names the model in errors). */
export function readConfigObject(dir: string, kind: string): { file: string; raw: Record<string, unknown> } {
  const file = path.join(dir, CONFIG_FILE);
  if (!fs.existsSync(file)) throw new BundleError(`${file}: missing config.json; a Hugging Face ${kind}checkpoint directory needs one`);
  return { file, raw: readJsonObject(file) };
}

/** Reads and validates a Hugging Face GPT-2 `config.json` (from a directory or a file inside it). */
export function readHFConfig(dirOrFile: string): { config: GPT2Config; raw: Record<string, unknown> } {
  const { file, raw } = readConfigObject(checkpointDir(dirOrFile), 'GPT-2 ');

  if (raw['model_type'] !== undefined && raw['model_type'] !== 'gpt2') {
    const llama = ['llama', 'mistral', 'qwen2'].includes(raw['model_type'] as string);
    throw new BundleError(`${file}: model_type is ${JSON.stringify(raw['model_type'])}, only "gpt2" is supported here` +
      (llama ? ' (Llama-family checkpoints are taken by init, train and generate; fine-tuning and inference through the split do not take them yet)' : ''));
  }
  const act = raw['activation_function'];
  if (act !== undefined && !(typeof act === 'string' && ACTIVATIONS.has(act))) {
    throw new BundleError(
      `${file}: activation_function ${JSON.stringify(act)} is not supported (only the tanh GELU: gelu_new, gelu_pytorch_tanh)`,
    );
  }
  // Options that change the forward pass and are not implemented.
  if (raw['scale_attn_weights'] === false) throw new BundleError(`${file}: scale_attn_weights=false is not supported`);
  if (raw['scale_attn_by_inverse_layer_idx'] === true) {
    throw new BundleError(`${file}: scale_attn_by_inverse_layer_idx=true is not supported`);
  }

  const nPos = raw['n_positions'] ?? raw['n_ctx'];
  const eps = raw['layer_norm_epsilon'] ?? 1e-5;
  const config = {
    n_layer: raw['n_layer'],
    n_head: raw['n_head'],
    n_embd: raw['n_embd'],
    n_ctx: nPos,
    vocab_size: raw['vocab_size'],
    layer_norm_epsilon: eps,
  } as GPT2Config;
  if (raw['n_positions'] === undefined && raw['n_ctx'] === undefined) {
    throw new BundleError(`${file}: missing "n_positions" (or "n_ctx")`);
  }
  for (const k of ['n_layer', 'n_head', 'n_embd', 'vocab_size'] as const) {
    if (raw[k] === undefined) throw new BundleError(`${file}: missing "${k}"`);
  }
  validateConfig(config, file);
  const nInner = raw['n_inner'];
  if (nInner !== undefined && nInner !== null && nInner !== 4 * config.n_embd) {
    throw new BundleError(`${file}: n_inner=${JSON.stringify(nInner)} is not supported (must be null or 4*n_embd=${4 * config.n_embd})`);
  }
  return { config, raw };
}

/** config.json contents for a model, in the form `transformers` writes. */
export function hfConfigJson(w: GPT2Weights, extra?: Record<string, unknown>, dtype: SaveDtype = 'F32'): Record<string, unknown> {
  const c = w.config;
  const arch: Record<string, unknown> = {
    model_type: 'gpt2',
    architectures: [w.cls ? 'GPT2ForSequenceClassification' : 'GPT2LMHeadModel'],
    n_layer: c.n_layer,
    n_head: c.n_head,
    n_embd: c.n_embd,
    n_positions: c.n_ctx,
    n_ctx: c.n_ctx,
    vocab_size: c.vocab_size,
    layer_norm_epsilon: c.layer_norm_epsilon,
    activation_function: 'gelu_new',
    n_inner: null,
  };
  if (w.cls) {
    Object.assign(arch, labelConfig(w.cls));
    // HF's GPT2ForSequenceClassification pools the last token and ignores this key; a
    // mean-pooled head is recorded so that this project loads it back as it was trained
    if (w.cls.pooling && w.cls.pooling !== 'last') arch['obfuscatune_pooling'] = w.cls.pooling;
  }
  if (w.padTokenId !== undefined) arch['pad_token_id'] = w.padTokenId;
  const out: Record<string, unknown> = {};
  if (c.vocab_size === 50257) {
    out['bos_token_id'] = 50256;
    out['eos_token_id'] = 50256;
  }
  for (const [k, v] of Object.entries(extra ?? {})) {
    if (k in arch && JSON.stringify(arch[k]) !== JSON.stringify(v)) {
      throw new InputError(`extra config key "${k}"=${JSON.stringify(v)} contradicts the model (${JSON.stringify(arch[k])})`);
    }
    out[k] = v;
  }
  Object.assign(out, arch);
  out['torch_dtype'] = TORCH_DTYPE[dtype];
  return out;
}

/** config.json's num_labels, id2label and label2id of a classifier (LABEL_i where it has no names). */
export function labelConfig(cls: ClassifierHead): Record<string, unknown> {
  const names = Array.from({ length: cls.numLabels }, (_, i) => cls.labels?.[i] ?? `LABEL_${i}`);
  return { num_labels: names.length, id2label: Object.fromEntries(names.map((s, i) => [String(i), s])), label2id: Object.fromEntries(names.map((s, i) => [s, i])) };
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

export interface Source {
  file: SafetensorsFile;
  /** Name as stored in the file. */
  stored: string;
}

/** Opens every safetensors file of a checkpoint; returns them keyed by stored tensor name. */
export function openWeights(p: string, dir: string): Map<string, Source> {
  let files: SafetensorsFile[];
  const isFile = fs.statSync(p).isFile();
  const single = path.join(dir, SINGLE_FILE);
  const index = path.join(dir, INDEX_FILE);
  if (isFile && p.endsWith('.safetensors')) {
    files = [openSafetensors(p)];
  } else if (isFile && !p.endsWith('.json')) {
    throw new BundleError(`${p}: not a .safetensors file; only safetensors checkpoints are supported`);
  } else if (isFile && path.basename(p) !== CONFIG_FILE) {
    return openIndexed(p, dir);
  } else if (fs.existsSync(single)) {
    files = [openSafetensors(single)];
  } else if (fs.existsSync(index)) {
    return openIndexed(index, dir);
  } else {
    const entries = fs.readdirSync(dir);
    const legacy = entries.filter((f) => /^pytorch_model.*\.bin$/.test(f) || /\.(bin|pt|pth|ckpt)$/.test(f));
    if (legacy.length > 0) {
      throw new BundleError(
        `${path.join(dir, legacy[0]!)}: PyTorch pickle checkpoints are not supported, only safetensors. Convert it with ` +
          `python -c "from transformers import AutoModel; AutoModel.from_pretrained('${dir}').save_pretrained('${dir}', safe_serialization=True)" ` +
          `(or load it with torch and save the state dict with safetensors.torch.save_file)`,
      );
    }
    throw new BundleError(`${single}: not found (and no ${INDEX_FILE}); expected a Hugging Face safetensors checkpoint in ${dir}`);
  }
  const out = new Map<string, Source>();
  for (const f of files) for (const n of f.names()) out.set(n, { file: f, stored: n });
  return out;
}

function openIndexed(indexFile: string, dir: string): Map<string, Source> {
  const json = readJson(indexFile);
  const wm = (json as Record<string, unknown> | null)?.['weight_map'];
  if (wm === null || typeof wm !== 'object' || Array.isArray(wm)) {
    throw new BundleError(`${indexFile}: missing "weight_map" object`);
  }
  const weightMap = wm as Record<string, unknown>;
  const shards = new Map<string, string>(); // shard file name -> first tensor listed for it
  for (const [name, f] of Object.entries(weightMap)) {
    if (typeof f !== 'string' || f.length === 0) {
      throw new BundleError(`${indexFile}: tensor "${name}" maps to ${JSON.stringify(f)}, expected a file name`);
    }
    if (path.isAbsolute(f) || f.split(/[\\/]/).includes('..')) {
      throw new BundleError(`${indexFile}: tensor "${name}" maps to "${f}", which is outside the checkpoint directory`);
    }
    if (!shards.has(f)) shards.set(f, name);
  }
  if (shards.size === 0) throw new BundleError(`${indexFile}: "weight_map" is empty`);
  const out = new Map<string, Source>();
  for (const [shard, firstName] of shards) {
    const sp = path.join(dir, shard);
    if (!fs.existsSync(sp)) {
      throw new BundleError(`${indexFile}: shard "${shard}" (holding tensor "${firstName}") is missing: ${sp} not found`);
    }
    const f = openSafetensors(sp);
    for (const n of f.names()) {
      const prev = out.get(n);
      if (prev) throw new BundleError(`${sp}: tensor "${n}" is also in ${prev.file.path} (duplicate tensor across shards)`);
      out.set(n, { file: f, stored: n });
    }
  }
  for (const [name, f] of Object.entries(weightMap)) {
    const src = out.get(name);
    if (!src) throw new BundleError(`${path.join(dir, f as string)}: tensor "${name}" listed in ${indexFile} is not in the shard`);
    if (path.resolve(src.file.path) !== path.resolve(path.join(dir, f as string))) {
      throw new BundleError(`${indexFile}: tensor "${name}" is listed in "${f}" but stored in ${src.file.path}`);
    }
  }
  return out;
}

export const fmtShape = (s: number[]) => `[${s.join(', ')}]`;

export function expectShape(src: Source, name: string, expected: number[]): void {
  const got = src.file.info(src.stored).shape;
  if (got.length === expected.length && got.every((d, i) => d === expected[i])) return;
  const transposed = got.length === 2 && expected.length === 2 && got[0] === expected[1] && got[1] === expected[0];
  throw new BundleError(
    `${src.file.path}: tensor "${src.stored}" has shape ${fmtShape(got)}, expected ${fmtShape(expected)} for ${name}` +
      (transposed ? ' (transposed: nn.Linear layout instead of GPT-2 Conv1D?)' : ''),
  );
}

export function readFloat(src: Source, out: Float32Array): Float32Array {
  const { dtype } = src.file.info(src.stored);
  if (dtype !== 'F32' && dtype !== 'F16' && dtype !== 'BF16' && dtype !== 'F64') {
    throw new BundleError(`${src.file.path}: tensor "${src.stored}" has unsupported dtype ${dtype} (supported: F32, F16, BF16)`);
  }
  src.file.getInto(src.stored, out);
  for (let i = 0; i < out.length; i++) {
    const v = out[i]!;
    if (v - v !== 0) {
      throw new BundleError(`${src.file.path}: tensor "${src.stored}" contains ${v} at element ${i} (non-finite weights)`);
    }
  }
  return out;
}

/** Relative rounding error of a stored float dtype (with some slack). */
export const relTol = (dtype: string): number => (dtype === 'BF16' ? 2 ** -7 : dtype === 'F16' ? 2 ** -10 : 1e-6);

/** Max number of names quoted in an error listing. */
const LIST_MAX = 5;
export const listNames = (names: string[]) =>
  names.slice(0, LIST_MAX).map((n) => `"${n}"`).join(', ') + (names.length > LIST_MAX ? `, ... (${names.length} in all)` : '');

/** The stored tensors by name without `prefix`; a name stored both with and without it is refused. */
export function byBareName(stored: Map<string, Source>, prefix: string): Map<string, Source> {
  const byName = new Map<string, Source>();
  for (const [n, src] of stored) {
    const bare = n.startsWith(prefix) ? n.slice(prefix.length) : n;
    const prev = byName.get(bare);
    if (prev) throw new BundleError(`${src.file.path}: tensor "${n}" duplicates "${prev.stored}" in ${prev.file.path}`);
    byName.set(bare, src);
  }
  return byName;
}

/** The files the tensors come from, for errors. */
export const filesOf = (stored: Map<string, Source>) => [...new Set([...stored.values()].map((s) => s.file.path))].join(', ');

/** A stored LM head of a tied model must be the token embedding `wte` (within both copies' rounding). */
export function checkTiedHead(lm: Source, wteSrc: Source, wte: Float32Array, C: number, why: string): void {
  expectShape(lm, 'lm_head.weight', [wte.length / C, C]);
  const head = readFloat(lm, new Float32Array(wte.length));
  const rel = Math.max(relTol(lm.file.info(lm.stored).dtype), relTol(wteSrc.file.info(wteSrc.stored).dtype));
  const i = head.findIndex((a, j) => !(Math.abs(a - wte[j]!) <= 1e-6 + rel * Math.abs(wte[j]!)));
  if (i >= 0) throw new BundleError(`${lm.file.path}: tensor "${lm.stored}" differs from ${wteSrc.stored} (element ${i}: ${head[i]} vs ${wte[i]}); ${why}`);
}

/** config.json's pad_token_id, checked against the vocabulary (undefined when absent or null). */
export function padTokenOf(raw: Record<string, unknown>, cfgFile: string, V: number): number | undefined {
  const pad = raw['pad_token_id'];
  if (pad === undefined || pad === null) return undefined;
  if (!(typeof pad === 'number' && Number.isInteger(pad) && pad >= 0 && pad < V)) {
    throw new BundleError(`${cfgFile}: pad_token_id ${JSON.stringify(pad)} is not a token id in [0, ${V})`);
  }
  return pad;
}

/**
 * Loads a Hugging Face GPT-2 checkpoint from a directory (or from a `.safetensors` /
 * `model.safetensors.index.json` file inside it; config.json is read from the same directory).
 */
export function loadCheckpoint(p: string, opts: LoadOptions = {}): GPT2Weights {
  const dir = checkpointDir(p);
  const { config, raw } = readHFConfig(dir);
  const cfgFile = path.join(dir, CONFIG_FILE);
  const stored = openWeights(p, dir);

  const byName = byBareName(stored, PREFIX);

  const layout = new ParamLayout(config);
  const params = sharedFloat32(layout.total);
  const list = hfTensorList(layout);

  const missing = list.filter((t) => !byName.has(t.name)).map((t) => t.name);
  if (missing.length > 0) {
    throw new BundleError(`${filesOf(stored)}: missing ${missing.length} tensor(s) for a ${config.n_layer}-layer GPT-2: ${listNames(missing)}`);
  }

  // Unexpected tensors (checked before reading any data); the legacy attention buffers are not.
  const known = new Set([...list.map((t) => t.name), 'lm_head.weight', 'score.weight']);
  const layerOf = (re: RegExp, name: string) => Number(re.exec(name)?.[1] ?? NaN);
  const unexpected = [...byName]
    .filter(([bare]) => !known.has(bare) && !(layerOf(/^h\.(\d+)\.attn\.(?:bias|masked_bias)$/, bare) < config.n_layer))
    .map(([, src]) => src);
  if (unexpected.length > 0) {
    const extraLayer = unexpected.find((s) => layerOf(/^(?:transformer\.)?h\.(\d+)\./, s.stored) >= config.n_layer);
    const hint = extraLayer ? ` ("${extraLayer.stored}" belongs to a layer beyond n_layer=${config.n_layer} in ${cfgFile})` : '';
    throw new BundleError(`${(extraLayer ?? unexpected[0]!).file.path}: unexpected tensor(s) ${listNames(unexpected.map((s) => s.stored))}${hint}`);
  }

  // Shapes, then data.
  for (const t of list) expectShape(byName.get(t.name)!, t.name, t.shape);
  for (const t of list) {
    const src = byName.get(t.name)!;
    const dst = t.layer >= 0 ? layout.layer(params, t.kind as ParamKind, t.layer) : layout.view(params, t.kind as ParamKind);
    readFloat(src, dst);
  }

  const lm = byName.get('lm_head.weight');
  if (lm) {
    const why = 'untied lm_head is not supported (GPT-2 ties the LM head to the token embedding)';
    checkTiedHead(lm, byName.get('wte.weight')!, layout.view(params, 'wte'), config.n_embd, why);
  }

  const w: GPT2Weights = { config, layout, params };

  // Classification head.
  const score = byName.get('score.weight');
  if (opts.expectLabels === true && !score) {
    throw new BundleError(`${filesOf(stored)}: no classification head (tensor "score.weight") found`);
  }
  if (score && opts.expectLabels !== false) {
    const shape = score.file.info(score.stored).shape;
    if (shape.length !== 2 || shape[1] !== config.n_embd || shape[0]! < 1) {
      throw new BundleError(
        `${score.file.path}: tensor "${score.stored}" has shape ${fmtShape(shape)}, expected [num_labels, ${config.n_embd}]`,
      );
    }
    const numLabels = shape[0]!;
    const cls: ClassifierHead = { numLabels, weight: readFloat(score, new Float32Array(numLabels * config.n_embd)) };
    const nl = raw['num_labels'];
    if (nl !== undefined && nl !== numLabels) {
      throw new BundleError(`${cfgFile}: num_labels=${JSON.stringify(nl)} but tensor "${score.stored}" in ${score.file.path} has ${numLabels} rows`);
    }
    const id2label = raw['id2label'];
    if (id2label !== undefined && id2label !== null) {
      if (typeof id2label !== 'object' || Array.isArray(id2label)) throw new BundleError(`${cfgFile}: id2label must be an object`);
      const entries = Object.entries(id2label as Record<string, unknown>).map(([k, v]) => {
        const i = Number(k);
        if (!Number.isInteger(i) || i < 0) throw new BundleError(`${cfgFile}: id2label key ${JSON.stringify(k)} is not a label index`);
        return [i, String(v)] as const;
      });
      entries.sort((a, b) => a[0] - b[0]);
      if (entries.length !== numLabels || entries.some(([i], j) => i !== j)) {
        throw new BundleError(
          `${cfgFile}: id2label has indices [${entries.map((e) => e[0]).join(', ')}] but tensor "${score.stored}" in ` +
            `${score.file.path} has ${numLabels} labels`,
        );
      }
      cls.labels = entries.map((e) => e[1]);
    }
    const pooling = raw['obfuscatune_pooling'];
    if (pooling !== undefined && pooling !== null) {
      if (!POOLINGS.includes(pooling as Pooling)) throw new BundleError(`${cfgFile}: obfuscatune_pooling=${JSON.stringify(pooling)} is not one of ${POOLINGS.join(', ')}`);
      cls.pooling = pooling as Pooling;
    }
    w.cls = cls;
  }

  const pad = padTokenOf(raw, cfgFile, config.vocab_size);
  if (pad !== undefined) w.padTokenId = pad;
  return w;
}

// ---------------------------------------------------------------------------
// Saving
// ---------------------------------------------------------------------------

const writeJson = (file: string, json: unknown) => writeFileAtomic(file, (write) => write(Buffer.from(JSON.stringify(json, null, 2) + '\n')));

const DTYPE_BYTES: Record<SaveDtype, number> = { F32: 4, F16: 2, BF16: 2 };
const F16_MAX = 65504;

export function checkFinite(dir: string, name: string, data: Float32Array, dtype: SaveDtype): void {
  const limit = dtype === 'F16' ? F16_MAX + 16 : Infinity; // values below 65520 round to 65504
  for (let i = 0; i < data.length; i++) {
    const v = data[i]!;
    if (!(Math.abs(v) < limit)) {
      throw new InputError(
        `${dir}: tensor "${name}" element ${i} = ${v} ` +
          (Number.isFinite(v) ? `overflows ${dtype}; save as F32 or BF16` : 'is not finite; refusing to save'),
      );
    }
  }
}

/**
 * Saves a model as a Hugging Face GPT-2 checkpoint directory (created if needed):
 * config.json plus model.safetensors, or shards + index when `shardBytes` is set.
 * Stale weight files from an earlier save in the other layout are removed.
 */
export function saveCheckpoint(dir: string, w: GPT2Weights, opts: SaveOptions = {}): void {
  const dtype = opts.dtype ?? 'F32';
  if (!(dtype in DTYPE_BYTES)) throw new InputError(`saveCheckpoint: unsupported dtype "${dtype}" (F32, F16, BF16)`);
  const prefix = (opts.prefix ?? true) ? PREFIX : '';
  const { config, layout, params } = w;
  validateConfig(config, `saveCheckpoint(${dir})`);
  if (params.length !== layout.total) {
    throw new InputError(`saveCheckpoint(${dir}): params has ${params.length} elements, layout needs ${layout.total}`);
  }
  if (opts.shardBytes !== undefined && !(Number.isSafeInteger(opts.shardBytes) && opts.shardBytes > 0)) {
    throw new InputError(`saveCheckpoint(${dir}): shardBytes must be a positive integer, got ${opts.shardBytes}`);
  }
  const config_ = hfConfigJson(w, opts.extraConfig, dtype);

  const tensors: TensorToWrite[] = [];
  const L = config.n_layer;
  const T = config.n_ctx;
  let tril: Float32Array | undefined;
  for (const t of hfTensorList(layout)) {
    const data = t.layer >= 0 ? layout.layer(params, t.kind, t.layer) : layout.view(params, t.kind);
    checkFinite(dir, prefix + t.name, data, dtype);
    tensors.push({ name: prefix + t.name, dtype, shape: t.shape, data });
  }
  if (opts.attnBias) {
    tril = new Float32Array(T * T);
    for (let i = 0; i < T; i++) for (let j = 0; j <= i; j++) tril[i * T + j] = 1;
    for (let l = 0; l < L; l++) {
      tensors.push({ name: `${prefix}h.${l}.attn.bias`, dtype: 'F32', shape: [1, 1, T, T], data: tril });
      tensors.push({ name: `${prefix}h.${l}.attn.masked_bias`, dtype: 'F32', shape: [], data: new Float32Array([-1e4]) });
    }
  }
  if (opts.lmHead) {
    tensors.push({ name: 'lm_head.weight', dtype, shape: [config.vocab_size, config.n_embd], data: layout.view(params, 'wte') });
  }
  if (w.cls) {
    const { numLabels, weight } = w.cls;
    if (!(Number.isInteger(numLabels) && numLabels > 0) || weight.length !== numLabels * config.n_embd) {
      throw new InputError(`saveCheckpoint(${dir}): classifier weight has ${weight.length} elements, expected ${numLabels} x ${config.n_embd}`);
    }
    checkFinite(dir, 'score.weight', weight, dtype);
    tensors.push({ name: 'score.weight', dtype, shape: [numLabels, config.n_embd], data: weight });
  }

  writeWeights(dir, tensors, config_, opts.shardBytes);
}

/**
 * Writes `tensors` and config.json into a checkpoint directory: model.safetensors, or shards
 * of at most `shardBytes` data bytes plus model.safetensors.index.json; stale weight files of
 * the other layout are removed.
 */
export function writeWeights(dir: string, tensors: TensorToWrite[], configJson: Record<string, unknown>, shardBytes?: number): void {
  fs.mkdirSync(dir, { recursive: true });
  const metadata = { format: 'pt' };
  const single = path.join(dir, SINGLE_FILE);
  const index = path.join(dir, INDEX_FILE);
  const oldShards = fs.readdirSync(dir).filter((f) => SHARD_RE.test(f));
  const writeConfig = () => writeJson(path.join(dir, CONFIG_FILE), configJson);

  if (shardBytes === undefined) {
    writeSafetensors(single, tensors, metadata);
    writeConfig();
    fs.rmSync(index, { force: true });
    for (const f of oldShards) fs.rmSync(path.join(dir, f), { force: true });
    return;
  }

  const bytesOf = (t: TensorToWrite) => t.data.length * (t.dtype === 'F32' || t.dtype === 'I32' ? 4 : 2);
  const groups: TensorToWrite[][] = [];
  let curBytes = 0;
  for (const t of tensors) {
    const b = bytesOf(t);
    if (groups.length === 0 || curBytes + b > shardBytes) {
      groups.push([]);
      curBytes = 0;
    }
    groups[groups.length - 1]!.push(t);
    curBytes += b;
  }
  const pad5 = (i: number) => String(i).padStart(5, '0');
  const names = groups.map((g, i) => `model-${pad5(i + 1)}-of-${pad5(groups.length)}.safetensors`);
  groups.forEach((g, i) => writeSafetensors(path.join(dir, names[i]!), g, metadata));
  const weightMap = groups.flatMap((g, i) => g.map((t) => [t.name, names[i]!] as const)).sort((a, b) => (a[0] < b[0] ? -1 : 1));
  const total = tensors.reduce((s, t) => s + bytesOf(t), 0);
  writeJson(index, { metadata: { total_size: total }, weight_map: Object.fromEntries(weightMap) });
  writeConfig();
  fs.rmSync(single, { force: true });
  for (const f of oldShards) if (!names.includes(f)) fs.rmSync(path.join(dir, f), { force: true });
}
