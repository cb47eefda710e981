/**
 * LoRA adapters in the Hugging Face PEFT directory format: `adapter_config.json` plus
 * `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them for a GPT-2 model.
 *
 * PEFT adapts modules: GPT-2's Conv1D linears (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
 * `mlp.c_proj`; weight W [in, out], so PEFT treats them as fan_in_fan_out) and the token
 * embedding `wte`. A linear's adapter is `lora_A.weight` [R, in] and `lora_B.weight` [out, R],
 * its update W += s (B A)^T; the embedding's is `lora_embedding_A` [R, V] and `lora_embedding_B`
 * [d, R], wte += s (B A)^T; s = alpha / R (alpha / sqrt(R) with use_rslora), R and alpha per
 * module from rank_pattern / alpha_pattern when a pattern matches, else r and lora_alpha. A
 * classifier trained alongside is a module to save, stored whole as `score.weight` [K, d].
 *
 * Here q, k and v are separate targets within the fused c_attn [C, 3C]. Export writes one
 * c_attn adapter whose A stacks the sections' A^T (rank n r for n sections) and whose B is
 * block-diagonal (section i's B^T in rows of its output third and columns of its rank block,
 * zeros elsewhere), with rank_pattern / alpha_pattern c_attn = n r / n alpha so s is unchanged:
 * (B A)^T = sum over sections of A_i B_i, placed in the section's columns, exactly the model
 * here. Import splits a c_attn adapter back: into its sections when the file says it was
 * stacked here (metadata `obfuscatune.c_attn`), otherwise into q, k and v each with the whole A
 * (rank R) and its third of B, the same update. Targets of different ranks or scales share one
 * rank (the largest; smaller adapters padded with zeros) and one scale (the first module's;
 * another module's B is multiplied by its scale over that one).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { BundleError, InputError } from '../errors.js';
import { LORA_TARGETS, LoraAdapters, targetDims, type LoraConfig, type LoraTarget } from './lora.js';
import type { GPT2Config } from './config.js';
import { readJson } from './checkpoint.js';

export const PEFT_CONFIG_FILE = 'adapter_config.json';
export const PEFT_WEIGHTS_FILE = 'adapter_model.safetensors';
const PREFIX = 'base_model.model.';
const STACKED_META = 'obfuscatune.c_attn';

type Module = 'attn.c_attn' | 'attn.c_proj' | 'mlp.c_fc' | 'mlp.c_proj' | 'wte';
const SECTIONS = ['q', 'k', 'v'] as const;
const MODULE_OF: Partial<Record<LoraTarget, Module>> = { q: 'attn.c_attn', k: 'attn.c_attn', v: 'attn.c_attn', proj: 'attn.c_proj', fc: 'mlp.c_fc', 'mlp-proj': 'mlp.c_proj', wte: 'wte' };
/** The GPT-2 module a target adapts (the Llama family's gate and up have none here). */
function moduleOf(t: LoraTarget): Module {
  const m = MODULE_OF[t];
  if (!m) throw new BundleError(`PEFT export: the target "${t}" is not a GPT-2 module (PEFT adapters are written for GPT-2 models)`);
  return m;
}
const LINEAR_MODULES: Module[] = ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'];

/** PEFT `target_modules` names for GPT-2 and the targets here they adapt. */
export const PEFT_TARGET_MODULES: Record<string, LoraTarget[]> = {
  c_attn: ['q', 'k', 'v'], 'attn.c_attn': ['q', 'k', 'v'],
  c_proj: ['proj', 'mlp-proj'], 'attn.c_proj': ['proj'], 'mlp.c_proj': ['mlp-proj'],
  c_fc: ['fc'], 'mlp.c_fc': ['fc'],
  wte: ['wte'], 'transformer.wte': ['wte'],
  'all-linear': ['q', 'k', 'v', 'proj', 'fc', 'mlp-proj'],
};

/** `--target-modules c_attn,c_proj,...` (PEFT's names) as targets here. */
export function parseTargetModules(s: string): LoraTarget[] {
  const out = new Set<LoraTarget>();
  for (const m of s.split(',').map((x) => x.trim()).filter(Boolean)) {
    const t = PEFT_TARGET_MODULES[m];
    if (!t) throw new InputError(`unknown PEFT target module "${m}" for GPT-2; use any of ${Object.keys(PEFT_TARGET_MODULES).join(', ')}`);
    t.forEach((x) => out.add(x));
  }
  if (out.size === 0) throw new InputError('no target modules given');
  return LORA_TARGETS.filter((t) => out.has(t));
}

/** Module key inside the Hugging Face model (`transformer.h.3.attn.c_attn`, `transformer.wte`). */
function moduleKey(layer: number, m: Module): string {
  return m === 'wte' ? 'transformer.wte' : `transformer.h.${layer}.${m}`;
}

/** [in, out] of a module for a model config */
function moduleDims(m: Module, c: GPT2Config): [number, number] {
  const d = c.n_embd;
  return m === 'attn.c_attn' ? [d, 3 * d] : m === 'wte' ? [c.vocab_size, d] : targetDims(m === 'attn.c_proj' ? 'proj' : m === 'mlp.c_fc' ? 'fc' : 'mlp-proj', d);
}

/** out[j * rows + i] = scale * a[i * cols + j]: a [rows, cols] transposed */
function transpose(a: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = scale * a[i * cols + j];
  return out;
}

export interface PeftExportOptions {
  task: 'lm' | 'cls';
  /** the base model's directory or hub name */
  baseModel: string;
  /** the trained classifier [K, d] (classification) */
  score?: Float32Array;
}

/** Writes adapters (and a classifier) as a PEFT LoRA adapter directory. */
export function writePeftAdapter(dir: string, ad: LoraAdapters, o: PeftExportOptions): void {
  const { rank: r, alpha, dropout, targets } = ad.config;
  const d = ad.d;
  const sections = SECTIONS.filter((s) => targets.includes(s));
  const n = sections.length;
  const tensors: TensorToWrite[] = [];
  const put = (name: string, shape: number[], data: Float32Array) => tensors.push({ name: PREFIX + name, dtype: 'F32', shape, data });
  // an adapter's A [din, r] and B [r, dout] as PEFT's [r, din] and [dout, r]
  const pair = (a: string, b: string, v: { A: Float32Array; B: Float32Array; din: number; dout: number }) => {
    put(a, [r, v.din], transpose(v.A, v.din, r));
    put(b, [v.dout, r], transpose(v.B, r, v.dout));
  };
  const emb = ad.embedding();
  if (emb) pair('transformer.wte.lora_embedding_A', 'transformer.wte.lora_embedding_B', emb);
  for (let l = 0; l < ad.nLayer; l++) {
    if (n) {
      // A [n r, C]: the sections' A^T stacked; B [3C, n r]: block-diagonal
      const A = new Float32Array(n * r * d);
      const B = new Float32Array(3 * d * n * r);
      sections.forEach((s, i) => {
        const v = ad.get(l, s)!;
        A.set(transpose(v.A, d, r), i * r * d);
        const sec = SECTIONS.indexOf(s);
        for (let j = 0; j < r; j++) for (let c = 0; c < d; c++) B[(sec * d + c) * n * r + i * r + j] = v.B[j * d + c];
      });
      put(`${moduleKey(l, 'attn.c_attn')}.lora_A.weight`, [n * r, d], A);
      put(`${moduleKey(l, 'attn.c_attn')}.lora_B.weight`, [3 * d, n * r], B);
    }
    for (const t of ['proj', 'fc', 'mlp-proj'] as const) {
      const v = ad.get(l, t);
      if (v) pair(`${moduleKey(l, moduleOf(t))}.lora_A.weight`, `${moduleKey(l, moduleOf(t))}.lora_B.weight`, v);
    }
  }
  if (o.task === 'cls' && o.score) put('score.weight', [o.score.length / d, d], o.score);
  const modules = [...new Set(targets.map(moduleOf).map((m) => (m === 'attn.c_attn' ? 'c_attn' : m === 'mlp.c_fc' ? 'c_fc' : m)))];
  const config = {
    peft_type: 'LORA', task_type: o.task === 'cls' ? 'SEQ_CLS' : 'CAUSAL_LM', base_model_name_or_path: o.baseModel, revision: null, inference_mode: true,
    r, lora_alpha: alpha, lora_dropout: dropout, target_modules: modules, exclude_modules: null, fan_in_fan_out: true, bias: 'none', use_rslora: false,
    modules_to_save: o.task === 'cls' && o.score ? ['score'] : null, init_lora_weights: true, layers_to_transform: null, layers_pattern: null,
    rank_pattern: n > 1 ? { c_attn: n * r } : {}, alpha_pattern: n > 1 ? { c_attn: n * alpha } : {}, use_dora: false, lora_bias: false,
  };
  fs.mkdirSync(dir, { recursive: true });
  writeSafetensors(path.join(dir, PEFT_WEIGHTS_FILE), tensors, { format: 'pt', ...(n ? { [STACKED_META]: sections.join(',') } : {}) });
  fs.writeFileSync(path.join(dir, PEFT_CONFIG_FILE), JSON.stringify(config, null, 2) + '\n');
}

// ------------------------------------------------------------------ import

const absent = (what: string) => z.union([z.null(), z.undefined(), z.literal(false)], { error: `${what} is not supported here` }).optional();
const peftConfigSchema = z.looseObject({
  peft_type: z.literal('LORA', { error: 'must be "LORA" (only LoRA adapters load here)' }),
  task_type: z.string().nullable().optional(),
  base_model_name_or_path: z.string().nullable().optional(),
  r: z.number().int().min(1, 'must be a positive integer'),
  lora_alpha: z.number().positive('must be a positive number'),
  lora_dropout: z.number().min(0).lt(1, 'must be in [0, 1)').default(0),
  target_modules: z.union([z.string(), z.array(z.string())]).nullable().optional(),
  fan_in_fan_out: z.boolean().optional(),
  bias: z.literal('none', { error: 'must be "none" (trained biases are not supported)' }).default('none'),
  use_rslora: z.boolean().default(false),
  modules_to_save: z.array(z.string()).nullable().optional(),
  layers_to_transform: z.union([z.number().int().min(0), z.array(z.number().int().min(0))]).nullable().optional(),
  rank_pattern: z.record(z.string(), z.number().int().min(1)).nullable().optional(),
  alpha_pattern: z.record(z.string(), z.number().positive()).nullable().optional(),
  use_dora: absent('use_dora (DoRA)'),
  lora_bias: absent('lora_bias'),
  layer_replication: absent('layer_replication'),
  trainable_token_indices: absent('trainable_token_indices'),
  target_parameters: z.union([z.null(), z.undefined(), z.array(z.string()).max(0)], { error: 'target_parameters is not supported here' }).optional(),
});
type PeftConfig = z.infer<typeof peftConfigSchema>;

export interface ImportedAdapter {
  adapters: LoraAdapters;
  /** the classifier saved with the adapter [K, d] */
  score?: Float32Array;
  numLabels?: number;
  /** from task_type (SEQ_CLS, CAUSAL_LM) or the saved classifier */
  task?: 'lm' | 'cls';
  baseModel?: string;
}

/** Whether a path is a PEFT adapter directory (one with adapter_config.json). */
export function isPeftAdapterDir(p: string): boolean {
  return fs.existsSync(path.join(p, PEFT_CONFIG_FILE));
}

function readPeftConfig(dir: string): PeftConfig {
  const file = path.join(dir, PEFT_CONFIG_FILE);
  if (!fs.existsSync(file)) throw new BundleError(`${dir} is not a PEFT adapter directory (no ${PEFT_CONFIG_FILE})`);
  const r = peftConfigSchema.safeParse(readJson(file));
  if (!r.success) {
    const iss = r.error.issues[0];
    throw new BundleError(`${file}: ${iss.path.length ? `"${iss.path.join('.')}" ` : ''}${iss.message}`);
  }
  return r.data;
}

/** PEFT's pattern lookup: the first key k with `(.*\.)?(k)$` matching the module key, else none */
function patternValue<T>(pattern: Record<string, T> | null | undefined, key: string): T | undefined {
  for (const [k, v] of Object.entries(pattern ?? {})) if (new RegExp(`^(?:.*\\.)?(?:${k})$`).test(key)) return v;
  return undefined;
}

/** The modules PEFT's target_modules (and layers_to_transform) select in this model; names matching nothing are refused. */
function targetedModules(c: PeftConfig, cfg: GPT2Config, file: string): Set<string> {
  const all: [number, Module][] = [[-1, 'wte'], ...Array.from({ length: cfg.n_layer }, (_, l) => LINEAR_MODULES.map((m): [number, Module] => [l, m])).flat()];
  const tm = c.target_modules;
  let match: (key: string, m: Module) => boolean;
  if (tm === null || tm === undefined) throw new BundleError(`${file}: "target_modules" is missing`);
  if (tm === 'all-linear') match = (_k, m) => m !== 'wte';
  else if (typeof tm === 'string') {
    let re: RegExp;
    try {
      re = new RegExp(`^(?:${tm})$`);
    } catch (e) {
      throw new BundleError(`${file}: "target_modules" ${JSON.stringify(tm)} is not a valid pattern (${(e as Error).message})`);
    }
    match = (k) => re.test(k);
  } else {
    for (const t of tm) {
      if (!all.some(([l, m]) => { const k = moduleKey(l, m); return k === t || k.endsWith(`.${t}`); })) {
        throw new BundleError(`${file}: target module "${t}" is not one GPT-2 adapts here (${Object.keys(PEFT_TARGET_MODULES).filter((x) => x !== 'all-linear').join(', ')})`);
      }
    }
    match = (k) => tm.some((t) => k === t || k.endsWith(`.${t}`));
  }
  const layers = c.layers_to_transform;
  const inLayers = (l: number) => layers === null || layers === undefined || l < 0 || (Array.isArray(layers) ? layers.includes(l) : layers === l);
  const out = new Set(all.filter(([l, m]) => inLayers(l) && match(moduleKey(l, m), m)).map(([l, m]) => moduleKey(l, m)));
  if (!out.size) throw new BundleError(`${file}: "target_modules" ${JSON.stringify(tm)} selects no module of this GPT-2`);
  return out;
}

interface FoundModule { layer: number; module: Module; A?: string; B?: string }

/**
 * Reads a PEFT LoRA adapter directory for a model of config `cfg`: the adapters (one rank and
 * scale, see the file comment) and the saved classifier. Anything it cannot represent exactly
 * (another PEFT method, DoRA, trained biases, other modules) is refused by name.
 */
export function readPeftAdapter(dir: string, cfg: GPT2Config): ImportedAdapter {
  const c = readPeftConfig(dir);
  const cfgFile = path.join(dir, PEFT_CONFIG_FILE);
  const wfile = path.join(dir, PEFT_WEIGHTS_FILE);
  if (!fs.existsSync(wfile)) {
    throw new BundleError(`${dir}: no ${PEFT_WEIGHTS_FILE}${fs.existsSync(path.join(dir, 'adapter_model.bin')) ? ' (only safetensors adapters load here; save with safe_serialization=True)' : ''}`);
  }
  const st = openSafetensors(wfile);
  const targeted = targetedModules(c, cfg, cfgFile);
  const saved = new Set(c.modules_to_save ?? []);
  for (const m of saved) if (m !== 'score' && m !== 'classifier') throw new BundleError(`${cfgFile}: modules_to_save "${m}" is not supported (only the classifier "score")`);
  const found = new Map<string, FoundModule>();
  let scoreName: string | undefined;
  for (const name of st.names()) {
    const k = name.startsWith(PREFIX) ? name.slice(PREFIX.length) : name;
    let m: RegExpMatchArray | null;
    if ((m = k.match(/^transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight$/)) || (m = k.match(/^transformer\.(wte)\.lora_embedding_([AB])$/))) {
      const [layer, module, ab] = m.length === 4 ? [Number(m[1]), m[2] as Module, m[3]] : [-1, 'wte' as Module, m[2]];
      if (layer >= cfg.n_layer) throw new BundleError(`${wfile}: tensor ${name} is for layer ${layer}, the model has ${cfg.n_layer}`);
      const key = moduleKey(layer, module);
      if (!targeted.has(key)) throw new BundleError(`${wfile}: tensor ${name} adapts ${key}, which target_modules in ${PEFT_CONFIG_FILE} does not select`);
      const f = found.get(key) ?? { layer, module };
      f[ab as 'A' | 'B'] = name;
      found.set(key, f);
    } else if (/^score(\.modules_to_save)?\.weight$/.test(k)) scoreName = name;
    else if (k !== 'transformer.wte.base_layer.weight') throw new BundleError(`${wfile}: unexpected tensor ${name} (not a LoRA weight of a GPT-2 module adapted here, nor the classifier)`);
  }
  for (const key of targeted) {
    const f = found.get(key);
    if (!f?.A || !f.B) throw new BundleError(`${wfile}: no ${key.endsWith('wte') ? 'lora_embedding' : 'lora'}_${f?.A ? 'B' : 'A'} for ${key}, which target_modules selects`);
  }
  const shapeOf = (n: string) => st.info(n).shape;
  const same = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((x, i) => x === b[i]);
  const stacked = st.metadata[STACKED_META]?.split(',').filter(Boolean) as LoraTarget[] | undefined;
  if (stacked && (!stacked.length || stacked.some((s) => !(SECTIONS as readonly string[]).includes(s)))) throw new BundleError(`${wfile}: metadata ${STACKED_META} "${st.metadata[STACKED_META]}" is not a list of q, k, v`);

  // every module's part: per target, its A [R, in] and B [out, R] slices, rank and scale
  interface Part { layer: number; target: LoraTarget; rank: number; scale: number; A: (i: number, j: number) => number; B: (j: number, o: number) => number }
  const parts: Part[] = [];
  for (const f of found.values()) {
    const key = moduleKey(f.layer, f.module);
    const R = patternValue(c.rank_pattern, key) ?? c.r;
    const alpha = patternValue(c.alpha_pattern, key) ?? c.lora_alpha;
    const [din, dout] = moduleDims(f.module, cfg);
    for (const [n, want] of [[f.A!, [R, din]], [f.B!, [dout, R]]] as const) {
      if (!same(shapeOf(n), want)) throw new BundleError(`${wfile}: shape mismatch: ${n} is [${shapeOf(n).join(', ')}], expected [${want.join(', ')}] (rank ${R} from ${PEFT_CONFIG_FILE}, ${key} of this model [${din}, ${dout}])`);
    }
    const A = st.get(f.A!);
    const B = st.get(f.B!);
    const scale = c.use_rslora ? alpha / Math.sqrt(R) : alpha / R;
    if (f.module !== 'attn.c_attn') {
      const target = (Object.keys(MODULE_OF) as LoraTarget[]).find((t) => MODULE_OF[t] === f.module)!;
      parts.push({ layer: f.layer, target, rank: R, scale, A: (i, j) => A[j * din + i], B: (j, o) => B[o * R + j] });
      continue;
    }
    const d = cfg.n_embd;
    if (stacked) {
      if (R % stacked.length) throw new BundleError(`${wfile}: ${key} has rank ${R}, not a multiple of the ${stacked.length} stacked sections (${stacked.join(',')})`);
      const rs = R / stacked.length;
      const secOf = stacked.map((s) => SECTIONS.indexOf(s as (typeof SECTIONS)[number]));
      for (let o = 0; o < 3 * d; o++) for (let j = 0; j < R; j++) {
        if (B[o * R + j] !== 0 && Math.floor(o / d) !== secOf[Math.floor(j / rs)]) throw new BundleError(`${wfile}: ${f.B} is not block-diagonal over the stacked sections ${stacked.join(',')} (metadata ${STACKED_META})`);
      }
      stacked.forEach((s, i) => {
        const sec = secOf[i];
        parts.push({ layer: f.layer, target: s, rank: rs, scale, A: (x, j) => A[(i * rs + j) * d + x], B: (j, o) => B[(sec * d + o) * R + i * rs + j] });
      });
    } else {
      SECTIONS.forEach((s, sec) => parts.push({ layer: f.layer, target: s, rank: R, scale, A: (x, j) => A[j * d + x], B: (j, o) => B[(sec * d + o) * R + j] }));
    }
  }
  const rank = Math.max(...parts.map((p) => p.rank));
  const scale = parts[0].scale;
  const targets = LORA_TARGETS.filter((t) => parts.some((p) => p.target === t));
  const lora: LoraConfig = { rank, alpha: scale * rank, dropout: c.lora_dropout, targets };
  const ad = new LoraAdapters(lora, cfg.n_layer, cfg.n_embd, cfg.vocab_size);
  for (const p of parts) {
    const v = ad.get(p.layer, p.target)!;
    const ratio = p.scale / scale;
    for (let i = 0; i < v.din; i++) for (let j = 0; j < p.rank; j++) v.A[i * rank + j] = p.A(i, j);
    for (let j = 0; j < p.rank; j++) for (let o = 0; o < v.dout; o++) v.B[j * v.dout + o] = ratio * p.B(j, o);
  }
  const out: ImportedAdapter = { adapters: ad, baseModel: c.base_model_name_or_path ?? undefined };
  if (saved.has('score') && !scoreName) throw new BundleError(`${wfile}: modules_to_save names "score" but the file has no score weight`);
  if (scoreName) {
    const sh = shapeOf(scoreName);
    if (sh.length !== 2 || sh[1] !== cfg.n_embd || sh[0] < 1) throw new BundleError(`${wfile}: shape mismatch: ${scoreName} is [${sh.join(', ')}], expected [labels, ${cfg.n_embd}]`);
    out.score = st.get(scoreName);
    out.numLabels = sh[0];
  }
  const tt = c.task_type;
  if (tt !== null && tt !== undefined && tt !== 'SEQ_CLS' && tt !== 'CAUSAL_LM') throw new BundleError(`${cfgFile}: task_type "${tt}" is not supported (SEQ_CLS or CAUSAL_LM)`);
  out.task = tt === 'SEQ_CLS' ? 'cls' : tt === 'CAUSAL_LM' ? 'lm' : out.score ? 'cls' : undefined;
  if (out.task === 'lm' && out.score) throw new BundleError(`${cfgFile}: task_type CAUSAL_LM with a saved classifier`);
  return out;
}
