/**
 * Llama-family checkpoints in the Hugging Face layout (`LlamaForCausalLM`, `MistralForCausalLM`,
 * `Qwen2ForCausalLM`, and their `...ForSequenceClassification`): config.json plus
 * model.safetensors or shards, `nn.Linear` weights `[out, in]` in F32, F16 or BF16, names with
 * or without the `model.` prefix. q/k/v (and gate/up) are fused on load and split on save.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { validateLlamaConfig, type LlamaConfig, type RopeScaling } from './config.js';
import { LlamaLayout, LLAMA_KINDS, type LlamaKind, type LlamaWeights } from './llama.js';
import { llamaDims } from './llama_block.js';
import {
  checkpointDir, readJson, readConfigObject, openWeights, byBareName, filesOf, checkTiedHead, padTokenOf, labelConfig, expectShape,
  readFloat, listNames, checkFinite, writeWeights, fmtShape, TORCH_DTYPE, type SaveDtype,
} from './checkpoint.js';
import type { ClassifierHead } from './weights.js';
import type { TensorToWrite } from '../io/safetensors.js';
import { sharedFloat32 } from '../tensor/shared.js';
import { BundleError, InputError } from '../errors.js';

export type LlamaArch = 'llama' | 'mistral' | 'qwen2';
const ARCH_CLASS: Record<LlamaArch, string> = { llama: 'Llama', mistral: 'Mistral', qwen2: 'Qwen2' };
const PREFIX = 'model.';

/** The model_type of a checkpoint directory's config.json (undefined when absent). */
export function checkpointModelType(dirOrFile: string): unknown {
  const file = path.join(checkpointDir(dirOrFile), 'config.json');
  if (!fs.existsSync(file)) return undefined;
  return (readJson(file) as Record<string, unknown> | null)?.['model_type'];
}

export function isLlamaArch(t: unknown): t is LlamaArch {
  return t === 'llama' || t === 'mistral' || t === 'qwen2';
}

/** A Llama-family config from HF config.json fields; a field that is wrong or not supported is named in the error. */
export function llamaConfigFromHF(raw: Record<string, unknown>, file: string): { config: LlamaConfig; arch: LlamaArch } {
  const arch = raw['model_type'];
  if (!isLlamaArch(arch)) throw new BundleError(`${file}: model_type ${JSON.stringify(arch)} is not a Llama-family type (llama, mistral, qwen2)`);
  const need = (k: string): number => {
    const v = raw[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) throw new BundleError(`${file}: "${k}" must be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  };
  const act = raw['hidden_act'] ?? 'silu';
  if (act !== 'silu') throw new BundleError(`${file}: hidden_act ${JSON.stringify(act)} is not supported (only silu)`);
  if (arch === 'llama' && raw['attention_bias'] === true) throw new BundleError(`${file}: attention_bias=true (biases on q, k, v and o_proj) is not supported`);
  if (raw['mlp_bias'] === true) throw new BundleError(`${file}: mlp_bias=true is not supported`);
  if (raw['use_sliding_window'] === true) throw new BundleError(`${file}: use_sliding_window=true is not supported (sliding-window attention is not implemented)`);
  const n_ctx = need('max_position_embeddings');
  const sw = raw['sliding_window'];
  if (arch === 'mistral' && sw !== undefined && sw !== null && !(typeof sw === 'number' && sw >= n_ctx)) {
    throw new BundleError(`${file}: sliding_window=${JSON.stringify(sw)} is not supported (sliding-window attention is not implemented; null or >= max_position_embeddings=${n_ctx} is)`);
  }
  const n_embd = need('hidden_size'), n_head = need('num_attention_heads');
  const hdRaw = raw['head_dim'];
  if (hdRaw !== undefined && hdRaw !== null && hdRaw !== n_embd / n_head) throw new BundleError(`${file}: head_dim=${JSON.stringify(hdRaw)} differs from hidden_size / num_attention_heads = ${n_embd / n_head} (not supported)`);
  const kv = raw['num_key_value_heads'];
  const config: LlamaConfig = {
    family: 'llama', n_layer: need('num_hidden_layers'), n_head, n_embd, n_ctx, vocab_size: need('vocab_size'),
    n_kv_head: kv === undefined || kv === null ? n_head : need('num_key_value_heads'),
    intermediate_size: need('intermediate_size'),
    layer_norm_epsilon: (raw['rms_norm_eps'] ?? 1e-6) as number,
    rope_theta: (raw['rope_theta'] ?? 10000) as number,
    rope_scaling: ropeScaling(raw['rope_scaling'], file),
    tie_word_embeddings: (raw['tie_word_embeddings'] ?? false) as boolean,
    qkv_bias: arch === 'qwen2',
  };
  if (typeof config.tie_word_embeddings !== 'boolean') throw new BundleError(`${file}: tie_word_embeddings must be true or false, got ${JSON.stringify(raw['tie_word_embeddings'])}`);
  try {
    validateLlamaConfig(config, file);
  } catch (e) {
    throw new BundleError((e as Error).message, { cause: e });
  }
  return { config, arch };
}

function ropeScaling(v: unknown, file: string): RopeScaling | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'object' || Array.isArray(v)) throw new BundleError(`${file}: rope_scaling must be an object or null, got ${JSON.stringify(v)}`);
  const o = v as Record<string, unknown>;
  const type = o['rope_type'] ?? o['type'];
  const num = (k: string) => o[k] as number;
  if (type === 'default') return null;
  if (type === 'linear') return { type, factor: num('factor') };
  if (type === 'llama3') {
    return { type, factor: num('factor'), low_freq_factor: num('low_freq_factor'), high_freq_factor: num('high_freq_factor'), original_max_position_embeddings: num('original_max_position_embeddings') };
  }
  throw new BundleError(`${file}: rope_scaling type ${JSON.stringify(type)} is not supported (linear, llama3)`);
}

/** HF tensors of one layout kind and layer: name, [out, in] shape, and where its rows go in the fused [in, out] weight. */
interface Part { name: string; shape: number[]; col: number }

function parts(kind: LlamaKind, l: number, c: LlamaConfig): Part[] {
  const { C, KV, I } = llamaDims(c);
  const p = (s: string) => `layers.${l}.${s}`;
  switch (kind) {
    case 'wte': return [{ name: 'embed_tokens.weight', shape: [c.vocab_size, C], col: -1 }];
    case 'ln1w': return [{ name: p('input_layernorm.weight'), shape: [C], col: -1 }];
    case 'ln2w': return [{ name: p('post_attention_layernorm.weight'), shape: [C], col: -1 }];
    case 'lnfw': return [{ name: 'norm.weight', shape: [C], col: -1 }];
    case 'qkvw': return [{ name: p('self_attn.q_proj.weight'), shape: [C, C], col: 0 }, { name: p('self_attn.k_proj.weight'), shape: [KV, C], col: C }, { name: p('self_attn.v_proj.weight'), shape: [KV, C], col: C + KV }];
    case 'qkvb': return c.qkv_bias ? [{ name: p('self_attn.q_proj.bias'), shape: [C], col: 0 }, { name: p('self_attn.k_proj.bias'), shape: [KV], col: C }, { name: p('self_attn.v_proj.bias'), shape: [KV], col: C + KV }] : [];
    case 'ow': return [{ name: p('self_attn.o_proj.weight'), shape: [C, C], col: 0 }];
    case 'guw': return [{ name: p('mlp.gate_proj.weight'), shape: [I, C], col: 0 }, { name: p('mlp.up_proj.weight'), shape: [I, C], col: I }];
    case 'downw': return [{ name: p('mlp.down_proj.weight'), shape: [C, I], col: 0 }];
    case 'head': return c.tie_word_embeddings ? [] : [{ name: 'lm_head.weight', shape: [c.vocab_size, C], col: -1 }];
  }
}

/** Every (kind, layer) slot with its HF parts. */
function slots(lay: LlamaLayout): { kind: LlamaKind; layer: number; parts: Part[]; dst: (buf: Float32Array) => Float32Array }[] {
  const c = lay.config;
  const out = [];
  for (const kind of LLAMA_KINDS) {
    const e = lay.entries[kind];
    const layers = e.perLayer ? Array.from({ length: c.n_layer }, (_, l) => l) : [-1];
    for (const l of layers) out.push({ kind, layer: l, parts: parts(kind, l, c), dst: (buf: Float32Array) => (l >= 0 ? lay.layer(buf, kind, l) : lay.view(buf, kind)) });
  }
  return out;
}

/** The fused weight's row length (its dout) for a linear kind; 0 for tensors stored as they are. */
function fusedWidth(kind: LlamaKind, c: LlamaConfig): number {
  const { C, W, I } = llamaDims(c);
  return kind === 'qkvw' ? W : kind === 'ow' || kind === 'downw' ? C : kind === 'guw' ? 2 * I : 0;
}

/** Loads a Llama-family checkpoint directory (or a .safetensors / index file inside it). */
export function loadLlamaCheckpoint(p: string, opts: { expectLabels?: boolean } = {}): LlamaWeights & { arch: LlamaArch } {
  const dir = checkpointDir(p);
  const { file: cfgFile, raw } = readConfigObject(dir, '');
  const { config, arch } = llamaConfigFromHF(raw, cfgFile);
  const stored = openWeights(p, dir);
  const byName = byBareName(stored, PREFIX);
  const layout = new LlamaLayout(config);
  const params = sharedFloat32(layout.total);
  const all = slots(layout);
  const wanted = new Set(all.flatMap((s) => s.parts.map((q) => q.name)));
  // a sequence-classification checkpoint has no LM head (its rows stay zero, and are not saved back)
  if (!config.tie_word_embeddings && byName.has('score.weight') && !byName.has('lm_head.weight')) wanted.delete('lm_head.weight');
  const files = () => filesOf(stored);
  const missing = [...wanted].filter((n) => !byName.has(n));
  if (missing.length) throw new BundleError(`${files()}: missing ${missing.length} tensor(s) for a ${config.n_layer}-layer ${ARCH_CLASS[arch]} model: ${listNames(missing)}`);
  const extra = [...byName.keys()].filter((n) => !wanted.has(n) && n !== 'lm_head.weight' && n !== 'score.weight' && !/^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/.test(n));
  if (extra.length) {
    const beyond = extra.find((n) => Number(/^layers\.(\d+)\./.exec(n)?.[1] ?? -1) >= config.n_layer);
    const hint = beyond ? ` ("${beyond}" belongs to a layer beyond num_hidden_layers=${config.n_layer})` : extra.some((n) => /\.(q|k|v)_proj\.bias$/.test(n)) ? ' (q/k/v biases in a model type without them)' : '';
    throw new BundleError(`${files()}: unexpected tensor(s) ${listNames(extra)}${hint}`);
  }
  for (const s of all) for (const q of s.parts) if (wanted.has(q.name)) expectShape(byName.get(q.name)!, q.name, q.shape);
  for (const s of all) {
    if (s.parts.some((q) => !wanted.has(q.name))) continue;
    const dst = s.dst(params);
    const W = fusedWidth(s.kind, config);
    for (const q of s.parts) {
      const src = byName.get(q.name)!;
      if (q.col < 0) { readFloat(src, dst); continue; }
      const t = readFloat(src, new Float32Array(q.shape.reduce((a, b) => a * b, 1)));
      if (q.shape.length === 1) { dst.set(t, q.col); continue; }
      // nn.Linear [out, in] -> the fused [in, W] at column q.col
      const [out, inp] = q.shape;
      for (let o = 0; o < out; o++) for (let i = 0; i < inp; i++) dst[i * W + q.col + o] = t[o * inp + i];
    }
  }
  const lm = config.tie_word_embeddings ? byName.get('lm_head.weight') : undefined;
  // a tied checkpoint may still store the head: it must be the embedding
  if (lm) checkTiedHead(lm, byName.get('embed_tokens.weight')!, layout.view(params, 'wte'), config.n_embd, `${cfgFile} sets tie_word_embeddings=true`);
  const w: LlamaWeights & { arch: LlamaArch } = { config, layout, params, arch };
  const score = byName.get('score.weight');
  if (opts.expectLabels === true && !score) throw new BundleError(`${files()}: no classification head (tensor "score.weight") found`);
  if (score && opts.expectLabels !== false) {
    const shape = score.file.info(score.stored).shape;
    if (shape.length !== 2 || shape[1] !== config.n_embd || shape[0]! < 2) throw new BundleError(`${score.file.path}: tensor "${score.stored}" has shape ${fmtShape(shape)}, expected [num_labels, ${config.n_embd}]`);
    const cls: ClassifierHead = { numLabels: shape[0]!, weight: readFloat(score, new Float32Array(shape[0]! * config.n_embd)) };
    const id2label = raw['id2label'] as Record<string, unknown> | undefined;
    if (id2label && typeof id2label === 'object') cls.labels = Array.from({ length: cls.numLabels }, (_, i) => String(id2label[String(i)] ?? `LABEL_${i}`));
    w.cls = cls;
  }
  const pad = padTokenOf(raw, cfgFile, config.vocab_size);
  if (pad !== undefined) w.padTokenId = pad;
  return w;
}

/** config.json as transformers writes it for this model. */
export function llamaConfigJson(w: LlamaWeights, arch: LlamaArch, dtype: SaveDtype, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const c = w.config;
  const j: Record<string, unknown> = {
    ...extra,
    model_type: arch,
    architectures: [`${ARCH_CLASS[arch]}${w.cls ? 'ForSequenceClassification' : 'ForCausalLM'}`],
    hidden_size: c.n_embd, intermediate_size: c.intermediate_size, num_hidden_layers: c.n_layer,
    num_attention_heads: c.n_head, num_key_value_heads: c.n_kv_head, max_position_embeddings: c.n_ctx, vocab_size: c.vocab_size,
    rms_norm_eps: c.layer_norm_epsilon, rope_theta: c.rope_theta,
    rope_scaling: c.rope_scaling ? { ...c.rope_scaling, rope_type: c.rope_scaling.type } : null,
    tie_word_embeddings: c.tie_word_embeddings, hidden_act: 'silu', torch_dtype: TORCH_DTYPE[dtype],
  };
  if (arch === 'llama') Object.assign(j, { attention_bias: false, mlp_bias: false });
  if (arch === 'qwen2') j['use_sliding_window'] = false;
  if (arch === 'mistral') j['sliding_window'] = null;
  if (c.qkv_bias !== (arch === 'qwen2')) throw new InputError(`a model ${c.qkv_bias ? 'with' : 'without'} q/k/v biases cannot be saved as model_type ${arch}`);
  if (w.cls) Object.assign(j, labelConfig(w.cls));
  if (w.padTokenId !== undefined) j['pad_token_id'] = w.padTokenId;
  return j;
}

/** The HF tensors of a parameter buffer (names with the `model.` prefix, nn.Linear [out, in]; copies where split). */
export function llamaHFTensors(lay: LlamaLayout, buf: Float32Array): { name: string; shape: number[]; data: Float32Array }[] {
  const out = [];
  for (const s of slots(lay)) {
    const src = s.dst(buf);
    const W = fusedWidth(s.kind, lay.config);
    for (const q of s.parts) {
      let data: Float32Array;
      if (q.col < 0) data = src;
      else if (q.shape.length === 1) data = src.subarray(q.col, q.col + q.shape[0]!);
      else {
        const [rows, inp] = q.shape;
        data = new Float32Array(rows * inp);
        for (let o = 0; o < rows; o++) for (let i = 0; i < inp; i++) data[o * inp + i] = src[i * W + q.col + o];
      }
      out.push({ name: q.name === 'lm_head.weight' ? q.name : PREFIX + q.name, shape: q.shape, data });
    }
  }
  return out;
}

/** Saves in the HF layout (model. prefix, nn.Linear [out, in], q/k/v and gate/up split). */
export function saveLlamaCheckpoint(dir: string, w: LlamaWeights, opts: { dtype?: SaveDtype; arch?: LlamaArch; shardBytes?: number; extraConfig?: Record<string, unknown> } = {}): void {
  const dtype = opts.dtype ?? 'F32';
  const arch = opts.arch ?? (w.config.qkv_bias ? 'qwen2' : 'llama');
  const json = llamaConfigJson(w, arch, dtype, opts.extraConfig);
  const headless = !!w.cls && !w.config.tie_word_embeddings && w.layout.view(w.params, 'head').every((v) => v === 0);
  const tensors: TensorToWrite[] = llamaHFTensors(w.layout, w.params).filter((t) => !(headless && t.name === 'lm_head.weight')).map((t) => {
    checkFinite(dir, t.name, t.data, dtype);
    return { ...t, dtype };
  });
  if (w.cls) tensors.push({ name: 'score.weight', dtype, shape: [w.cls.numLabels, w.config.n_embd], data: w.cls.weight });
  fs.mkdirSync(dir, { recursive: true });
  writeWeights(dir, tensors, json, opts.shardBytes);
}
