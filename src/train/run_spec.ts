/**
 * The run specification: every setting of a fine-tuning run, with its default, in one place.
 *
 * Every entry point builds one and validates it with `parseRunSpec` before any work (no model
 * loaded, no file written): `obfuscatune finetune` (from its flags, or from the run directory's
 * `run_spec.json` on `--resume`), `owner finetune` (the client validates and sends it; the
 * enclave's `start_finetune` parses it again with the same function, the mask settings taken
 * from the provider's bundle), `npm start`, and the experiment runner (a recipe is a partial
 * spec merged over these defaults). The training loop and the session builder take
 * projections of it (`toFinetuneConfig`, `toSessionOptions`).
 *
 * Settings use the names of `run_spec.json` and of the enclave's job spec; the command-line
 * flags are the same names with dashes (`max_len` is `--max-len`; the LoRA settings are
 * `--rank`, `--alpha`, `--dropout`, `--targets`). docs/fine-tuning.md has the table.
 */
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { InputError } from '../errors.js';
import { checkLoraTask, parseLoraTargets, type LoraConfig } from '../model/lora.js';
import { maskSpecLabel, parseMaskSpec } from '../linalg/masks.js';
import { POOLINGS, type Pooling } from '../model/kernels.js';
import type { FinetuneConfig } from './finetune.js';
import type { SessionOptions } from './session.js';
import { MIXING_SCHEMES, SHIELD_POLICIES, type MixingConfig } from '../enclave/mixing.js';

// ---------------------------------------------------------------- settings and defaults
export const RUN_SPEC_DEFAULTS = {
  // what is trained, and how it is split
  task: 'lm',                 // 'lm': causal language model | 'cls': sequence classification
  method: 'lora',             // 'lora': adapters in the enclave, base model frozen | 'full': every weight
  mode: 'sealed',             // 'sealed' (rotated residual basis) | 'paper' (explicit masks) | 'local' (no split: the baseline)
  kappa: null,                // mask condition number (>= 1) or 'naive' (paper; sealed's per-head masks); null: 1 (orthogonal); not for local
  two_sided: false,           // paper mode: mask the projection outputs too
  mask_seed: null,            // derive the masks from this seed (reproducible, NOT secret); null: the run's seed; not for local
  rotary_masks: 'full',       // Llama family: 'full' per-head q/k masks unmasked in the enclave before rotary | 'blocks' (commute with it)
  token_mixing: null,         // 'on': per-call token mixing of every accelerator call (Defence 1, docs/security.md) | 'off'; null: on in the split modes, off for local
  mixing_scheme: 'butterfly', //   'butterfly': P of permutations and small blocks, cheap | 'dense': one dense P per call (O(n^3) to draw)
  mixing_kappa: 10,           //   condition number of each call's mixing matrix P (>= 1; 1: orthogonal)
  mixing_block: 0,            //   rows per block of P (0: butterfly 16; dense: one block over the call's rows)
  mixing_rounds: 0,           //   butterfly rounds (0: 1, and 2 where shields fill the width)
  mixing_shields: 'first-layer', // shield rows up to the width: 'first-layer' (layer 0's qkv input; other calls up to one block), 'all', 'none'
  // data
  max_len: 128,               // tokens per example; longer examples are truncated (counted in the summary)
  text_field: 'text',         // the records' field names (JSONL): the text,
  prompt_field: 'prompt',     //   the prompt and
  completion_field: 'completion', // the completion (loss on the completion only),
  label_field: 'label',       //   the class label (task cls)
  // optimisation
  steps: 100,                 // optimisation steps
  batch: 8,                   // examples per step
  lr: 1e-3,                   // peak learning rate
  warmup: 10,                 // linear warm-up steps (then cosine decay)
  min_lr_frac: 0.1,           // cosine floor, as a fraction of the peak
  clip: 1.0,                  // global gradient-norm clip over both sides (0: off)
  weight_decay: 0,            // weight decay of both optimisers
  enclave_optimizer: 'adamw', // optimiser of the enclave's tensors (adapters, embeddings, head, norms): 'adamw' | 'sgd'
  momentum: 0.9,              // SGD momentum (the accelerator's linears in full fine-tuning; the enclave with 'sgd')
  adam_eps: 1e-8,             // AdamW epsilon
  seed: 1,                    // data order, fresh classifier and adapters, dropout
  // evaluation and checkpoints
  eval_every: 0,              // evaluate every n steps (0: only at the end)
  eval_batches: 0,            // cap on evaluation batches (0: the whole set)
  checkpoint_every: 50,       // checkpoint every n steps (0: only at the end)
  // the model
  pooling: null,              // classification, a fresh head: 'last' | 'mean' token state; null: the model's own head's, else 'last'
  freeze_norms: false,        // full: fold the layer norms into the linears and freeze them (sealed mode's plain twin)
  lora: {                     // method lora only
    rank: 8,                  //   adapter rank r
    alpha: 16,                //   the update is scaled by alpha / r
    dropout: 0,               //   dropout on the adapter input, in [0, 1)
    targets: ['q', 'v'],      //   q, k, v, proj, fc, mlp-proj (qkv, mlp: groups), wte (token embedding; cls only)
  },
} as const;

/**
 * Settings that a resumed run may change (`--resume` with a different value): they decide
 * how long the run goes on and what it reports, not what a step computes. A new `steps`
 * moves the end of the cosine schedule, so the steps after the checkpoint follow the new one.
 */
export const RESUMABLE_CHANGES = ['steps', 'eval_every', 'eval_batches', 'checkpoint_every'] as const;

/** Settings fixed by the provider's bundle in the enclave service (a job cannot choose them). */
export const BUNDLE_FIELDS = ['mode', 'kappa', 'two_sided', 'mask_seed', 'rotary_masks', 'freeze_norms'] as const;

export const RUN_SPEC_FILE = 'run_spec.json';

export const TASKS = ['lm', 'cls'] as const;
export const METHODS = ['lora', 'full'] as const;
export const MODES = ['sealed', 'paper', 'local'] as const;
export const OPTIMIZERS = ['adamw', 'sgd'] as const;
export const TOKEN_MIXING = ['off', 'on'] as const;

// ---------------------------------------------------------------- the error
/** A run specification refused: which setting, where it came from, and why. */
export class RunSpecError extends InputError {
  readonly issues: { field: string; reason: string }[];
  constructor(readonly field: string, readonly source: string, readonly reason: string, more: { field: string; reason: string }[] = []) {
    const issues = [{ field, reason }, ...more];
    super(`invalid run spec (${source}): ${issues.map((i) => `${i.field}: ${i.reason}`).join('; ')}`);
    this.name = 'RunSpecError';
    this.issues = issues;
  }
}

// ---------------------------------------------------------------- the schema
function show(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'bigint') return String(v);
  if (v === undefined) return 'nothing';
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

type Issue = { input?: unknown };
const must = (what: string) => (iss: Issue) => `must be ${what}, got ${show(iss.input)}`;

function int(min: 0 | 1) {
  const error = must(min === 1 ? 'a positive integer' : 'an integer >= 0');
  return z.number({ error }).int({ error }).min(min, { error });
}

function num(what: string, ok: (x: number) => boolean) {
  const error = must(what);
  return z.number({ error }).refine(ok, { error });
}

function oneOf<const T extends readonly [string, ...string[]]>(values: T) {
  return z.enum(values, { error: must(`one of ${values.join(', ')}`) });
}

const bool = () => z.boolean({ error: must('true or false') });

const fieldName = () => z.string({ error: must('a field name') }).min(1, { error: must('a non-empty field name') });

const D = RUN_SPEC_DEFAULTS;

const targetsSchema = z.union([z.string(), z.array(z.string())], { error: must('a list of LoRA targets ("q,v" or ["q", "v"])') }).transform((v, ctx) => {
  try {
    return parseLoraTargets(Array.isArray(v) ? v.join(',') : v, 'any');
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message, input: v });
    return z.NEVER;
  }
});

const kappaSchema = z.union([z.string(), z.number()], { error: must('a number >= 1 or "naive"') }).nullable().transform((v, ctx) => {
  if (v === null) return null;
  try {
    return maskSpecLabel(parseMaskSpec(String(v)));
  } catch {
    ctx.addIssue({ code: 'custom', message: must('a number >= 1 or "naive"')({ input: v }), input: v });
    return z.NEVER;
  }
});

const loraSchema = z.strictObject({
  rank: int(1).default(D.lora.rank),
  alpha: num('a number > 0', (x) => x > 0).default(D.lora.alpha),
  dropout: num('a number in [0, 1)', (x) => x >= 0 && x < 1).default(D.lora.dropout),
  targets: targetsSchema.default(() => [...D.lora.targets]),
}, { error: must('an object of LoRA settings (rank, alpha, dropout, targets)') });

/** One schema per setting (no cross-setting rules); the whole spec adds those. */
const FIELDS = {
  task: oneOf(TASKS).default(D.task),
  method: oneOf(METHODS).default(D.method),
  mode: oneOf(MODES).default(D.mode),
  kappa: kappaSchema.default(D.kappa),
  two_sided: bool().default(D.two_sided),
  mask_seed: int(0).nullable().default(D.mask_seed),
  rotary_masks: oneOf(['full', 'blocks'] as const).default(D.rotary_masks as 'full'),
  token_mixing: oneOf(TOKEN_MIXING).nullable().default(D.token_mixing),
  mixing_scheme: oneOf(MIXING_SCHEMES).default(D.mixing_scheme),
  mixing_kappa: num('a finite number >= 1', (x) => Number.isFinite(x) && x >= 1).default(D.mixing_kappa),
  mixing_block: int(0).refine((x) => x !== 1, { error: must('an integer >= 0 other than 1 (a block of one row mixes nothing)') }).default(D.mixing_block),
  mixing_rounds: int(0).default(D.mixing_rounds),
  // true and false: the settings of earlier runs (shields everywhere, none)
  mixing_shields: z.preprocess((v) => (v === true ? 'all' : v === false ? 'none' : v), oneOf(SHIELD_POLICIES)).default(D.mixing_shields),
  max_len: int(1).default(D.max_len),
  text_field: fieldName().default(D.text_field),
  prompt_field: fieldName().default(D.prompt_field),
  completion_field: fieldName().default(D.completion_field),
  label_field: fieldName().default(D.label_field),
  steps: int(1).default(D.steps),
  batch: int(1).default(D.batch),
  lr: num('a number > 0', (x) => x > 0).default(D.lr),
  warmup: int(0).default(D.warmup),
  min_lr_frac: num('a number in [0, 1]', (x) => x >= 0 && x <= 1).default(D.min_lr_frac),
  clip: num('a number >= 0 (0: off)', (x) => x >= 0).default(D.clip),
  weight_decay: num('a number >= 0', (x) => x >= 0).default(D.weight_decay),
  enclave_optimizer: oneOf(OPTIMIZERS).default(D.enclave_optimizer),
  momentum: num('a number in [0, 1)', (x) => x >= 0 && x < 1).default(D.momentum),
  adam_eps: num('a number in (0, 1)', (x) => x > 0 && x < 1).default(D.adam_eps),
  seed: int(0).default(D.seed),
  eval_every: int(0).default(D.eval_every),
  eval_batches: int(0).default(D.eval_batches),
  checkpoint_every: int(0).default(D.checkpoint_every),
  pooling: z.enum(POOLINGS as readonly Pooling[] as [Pooling, ...Pooling[]], { error: must(`one of ${POOLINGS.join(', ')} (or null)`) }).nullable().default(D.pooling),
  freeze_norms: bool().default(D.freeze_norms),
  lora: loraSchema.nullable().optional(),
};

type Parsed = z.output<z.ZodObject<typeof FIELDS>>;

/**
 * A run specification with every setting filled in (what `run_spec.json` holds); `kappa` is
 * the mask spec label ("1", "10", "naive"), null exactly in mode local.
 */
export type RunSpec = Omit<Parsed, 'token_mixing' | 'lora'> & {
  token_mixing: 'off' | 'on';
  /** the adapters' settings; null exactly for method full */
  lora: LoraConfig | null;
};

function conflicts(s: Parsed, given: { lora: boolean }): { field: string; reason: string; input: unknown }[] {
  const out: { field: string; reason: string; input: unknown }[] = [];
  const add = (field: string, reason: string, input: unknown) => out.push({ field, reason, input });
  if (s.mode === 'local') {
    if (s.kappa !== null) add('kappa', `a mask spec is for the split modes (paper, sealed), not for mode local, got ${show(s.kappa)}`, s.kappa);
    if (s.mask_seed !== null) add('mask_seed', `mode local has no masks, got ${show(s.mask_seed)}`, s.mask_seed);
    if (s.token_mixing === 'on') add('token_mixing', 'mixes what crosses to the accelerator: split modes only (paper, sealed), not mode local', s.token_mixing);
  }
  if (s.two_sided && s.mode !== 'paper') add('two_sided', `applies to mode paper only, not ${s.mode}`, s.two_sided);
  if (s.method === 'full' && given.lora) add('lora', 'LoRA settings apply to method lora, not full', s.lora);
  if (s.method === 'lora' && s.freeze_norms) add('freeze_norms', 'applies to method full (LoRA does not train the norms)', s.freeze_norms);
  if (s.task === 'lm' && s.pooling !== null) add('pooling', `applies to task cls (classification), not lm, got ${show(s.pooling)}`, s.pooling);
  if (s.method === 'lora') {
    const targets = s.lora?.targets ?? [...D.lora.targets];
    try {
      checkLoraTask({ targets }, s.task);
    } catch (e) {
      add('lora.targets', (e as Error).message, targets);
    }
  }
  return out;
}

const objectError = { error: (iss: z.core.$ZodRawIssue) => (iss.code === 'invalid_type' ? must('an object of run settings')(iss) : undefined) };
/** The settings one by one, without the rules between them (a recipe: part of a spec). */
const PartialSchema = z.strictObject(FIELDS, objectError);

/** The schema of a run specification: settings, defaults, and the rules between settings. */
export const RunSpecSchema = z.strictObject(FIELDS, objectError).transform((s, ctx): RunSpec => {
  const bad = conflicts(s, { lora: s.lora !== null && s.lora !== undefined });
  for (const b of bad) ctx.addIssue({ code: 'custom', path: b.field.split('.'), message: b.reason, input: b.input });
  if (bad.length) return z.NEVER;
  return {
    ...s,
    kappa: s.mode === 'local' ? null : s.kappa ?? maskSpecLabel({ kind: 'kappa', kappa: 1 }),
    token_mixing: s.token_mixing ?? (s.mode === 'local' ? 'off' : 'on'),
    lora: s.method === 'lora' ? (s.lora ?? loraSchema.parse({})) : null,
  };
});

/** What a caller may give: any subset of the settings (missing ones take their defaults). */
export type RunSpecInput = z.input<typeof RunSpecSchema>;

function errorOf(issues: readonly z.core.$ZodIssue[], source: string): RunSpecError {
  const list = issues.map((i) => {
    if (i.code === 'unrecognized_keys') {
      const at = i.path.map(String);
      const known = at.length ? Object.keys(loraSchema.shape) : Object.keys(FIELDS);
      return { field: [...at, i.keys[0]].join('.'), reason: `is not a setting of ${at.length ? 'LoRA' : 'a run'} (${known.join(', ')})` };
    }
    return { field: i.path.length ? i.path.map(String).join('.') : '(spec)', reason: i.message };
  });
  return new RunSpecError(list[0].field, source, list[0].reason, list.slice(1));
}

/**
 * Fills the defaults of a run specification and refuses invalid or conflicting settings
 * with a RunSpecError naming the setting and `source` (where the spec came from).
 */
export function parseRunSpec(input: unknown, source: string): RunSpec {
  const r = RunSpecSchema.safeParse(input);
  if (!r.success) throw errorOf(r.error.issues, source);
  return r.data;
}

/**
 * Checks each setting of a partial spec (a recipe file) on its own, naming the setting and
 * `source`; the rules between settings apply when the whole spec is parsed.
 */
export function checkRunSpecInput(input: unknown, source: string): RunSpecInput {
  const r = PartialSchema.safeParse(input);
  if (!r.success) throw errorOf(r.error.issues, source);
  return input as RunSpecInput;
}

/** Partial specs merged left to right (later settings win; the LoRA settings merge too). */
export function mergeRunSpecInputs(...parts: (RunSpecInput | RunSpec | undefined)[]): RunSpecInput {
  const out: Record<string, unknown> = {};
  for (const p of parts) {
    if (!p) continue;
    for (const [k, v] of Object.entries(p)) {
      if (v === undefined) continue;
      if (k === 'lora' && v !== null && out.lora) out.lora = { ...(out.lora as object), ...(v as object) };
      else out[k] = v;
    }
  }
  return out as RunSpecInput;
}

/** JSON with sorted keys: equal for equal settings. */
export function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => (a < b ? -1 : 1))) : x));
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// ---------------------------------------------------------------- resume
/**
 * The spec of a resumed run: the stored one, with `changes` (e.g. the flags given with
 * --resume) applied where they are in RESUMABLE_CHANGES. A change of any other setting is
 * refused (naming the setting, the stored value and `storedIn`); a setting given with the
 * value the run already has is accepted.
 */
export function resumeRunSpec(stored: RunSpec, changes: unknown, source: string, storedIn: string): RunSpec {
  if (!isObject(changes)) return parseRunSpec(changes, source);
  const keep = `a resumed run keeps its settings (${storedIn}), except ${RESUMABLE_CHANGES.join(', ')}`;
  // a value that does not parse is left to the parse of the whole spec, which names the problem
  const mustKeep = (field: string, r: { success: boolean; data?: unknown }, was: unknown) => {
    if (r.success && canonical(r.data) !== canonical(was)) throw new RunSpecError(field, source, `${show(r.data)} differs from the run's ${show(was)}; ${keep}`);
  };
  for (const [k, v] of Object.entries(changes)) {
    if (v === undefined || (RESUMABLE_CHANGES as readonly string[]).includes(k) || !(k in FIELDS)) continue;
    if (k === 'lora') {
      if (v === null) continue;
      if (!stored.lora) throw new RunSpecError('lora', source, `the run has no LoRA (method ${stored.method}); ${keep}`);
      if (!isObject(v)) continue; // the parse below names the problem
      for (const [lk, lv] of Object.entries(v)) {
        const r = loraSchema.shape[lk as keyof typeof loraSchema.shape]?.safeParse(lv);
        if (r && lv !== undefined) mustKeep(`lora.${lk}`, r, stored.lora[lk as keyof LoraConfig]);
      }
      continue;
    }
    const r = FIELDS[k as keyof typeof FIELDS].safeParse(v);
    if (!(k === 'kappa' && r.data === null)) mustKeep(k, r, stored[k as keyof RunSpec]);
  }
  return parseRunSpec(mergeRunSpecInputs(stored, changes as RunSpecInput), source);
}

/** The stored spec of a run directory, or null when it has none (a run of an earlier version). */
export function readRunSpec(runDir: string): RunSpec | null {
  const f = path.join(runDir, RUN_SPEC_FILE);
  if (!existsSync(f)) return null;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(f, 'utf8'));
  } catch (e) {
    throw new RunSpecError('(spec)', f, `not valid JSON (${(e as Error).message})`);
  }
  return parseRunSpec(json, f);
}

/** Writes a run's spec beside its checkpoints (atomically). */
export function writeRunSpec(runDir: string, spec: RunSpec): void {
  const f = path.join(runDir, RUN_SPEC_FILE);
  writeFileSync(`${f}.tmp`, JSON.stringify(spec, null, 2) + '\n');
  renameSync(`${f}.tmp`, f);
}

// ---------------------------------------------------------------- the enclave's job
/** The part of a run spec that the data owner sends to the enclave (`start_finetune`). */
export type JobSpec = Omit<RunSpec, (typeof BUNDLE_FIELDS)[number]>;
export type JobSpecInput = Omit<RunSpecInput, (typeof BUNDLE_FIELDS)[number]>;

export function jobSpecOf(s: RunSpec): JobSpec {
  const job: Record<string, unknown> = { ...s };
  for (const k of BUNDLE_FIELDS) delete job[k];
  return job as JobSpec;
}

/** What the provider's enclave bundle fixes: the split mode and the masks. */
export interface BundleSettings {
  mode: 'sealed' | 'paper';
  kappa: string;
  two_sided: boolean;
  /** Llama family */
  rotary_masks?: 'full' | 'blocks';
}

/**
 * The enclave's view of a job: `parseRunSpec` of what the owner sent, with the settings of
 * the provider's bundle filled in. A bundle setting the owner gives is accepted only when it
 * is the bundle's.
 */
export function parseJobSpec(input: unknown, bundle: BundleSettings, source: string): RunSpec {
  if (!isObject(input)) return parseRunSpec(input, source);
  const fixed: Record<(typeof BUNDLE_FIELDS)[number], unknown> = { mode: bundle.mode, kappa: bundle.kappa, two_sided: bundle.two_sided, mask_seed: null, rotary_masks: bundle.rotary_masks ?? 'full', freeze_norms: false };
  for (const k of BUNDLE_FIELDS) {
    const v = input[k];
    if (v === undefined || v === null) continue;
    const r = FIELDS[k].safeParse(v);
    if (r.success && canonical(r.data) === canonical(fixed[k])) continue;
    throw new RunSpecError(k, source, `is the provider's choice, made when it obfuscated the model (its bundle has ${show(fixed[k])}), got ${show(v)}`);
  }
  return parseRunSpec({ ...input, ...fixed }, source);
}

// ---------------------------------------------------------------- against the model
/** Rules that need the model: the context length and the pooling of a head the model brings. */
export function checkRunSpecForModel(s: RunSpec, model: { n_ctx: number; headPooling: Pooling | null }, source: string): void {
  if (s.max_len > model.n_ctx) throw new RunSpecError('max_len', source, `exceeds the model's context of ${model.n_ctx}, got ${s.max_len}`);
  if (s.task === 'cls' && s.pooling !== null && model.headPooling !== null && s.pooling !== model.headPooling) {
    throw new RunSpecError('pooling', source, `the model's classifier pools ${model.headPooling} (a fresh head only takes another pooling), got ${show(s.pooling)}`);
  }
}

// ---------------------------------------------------------------- projections
/** The training loop's settings of a run. */
export function toFinetuneConfig(s: RunSpec, modelId: string): FinetuneConfig {
  return { ...s, modelId };
}

/** What a session needs beyond the spec: the tokenizer's pad id, the labels, where and how the accelerator runs. */
export type SessionContext = Pick<SessionOptions, 'padTokenId'> & Partial<Pick<SessionOptions, 'numLabels' | 'labels' | 'acceleratorStateDir' | 'serialize' | 'link'>> & {
  /** the model is of the Llama family (the rotary option applies) */
  llama?: boolean;
};

/** The session builder's settings of a run. */
export function toSessionOptions(s: RunSpec, ctx: SessionContext): SessionOptions {
  return {
    mode: s.mode, method: s.method, task: s.task, kappa: s.kappa ?? undefined, twoSided: s.two_sided, lora: s.lora ?? undefined,
    pooling: s.pooling ?? undefined, seed: s.seed, maskSeed: s.mask_seed ?? s.seed, foldedBaseline: s.freeze_norms, mixing: mixingOf(s), ...ctx,
    ...(ctx.llama ? { rotaryMasks: s.mode === 'local' ? undefined : s.rotary_masks } : {}),
  };
}

export const MIXING_FIELDS = ['token_mixing', 'mixing_scheme', 'mixing_kappa', 'mixing_block', 'mixing_rounds', 'mixing_shields'] as const;
export type MixingSettings = Pick<RunSpec, (typeof MIXING_FIELDS)[number]>;

/**
 * The token-mixing settings alone (split inference and generation), defaults filled, validated
 * like a run's; `token_mixing` unset takes `dflt` (on where the call goes through the split).
 */
export function parseMixingSettings(input: unknown, source: string, dflt: 'on' | 'off'): MixingSettings {
  const schema = z.strictObject(Object.fromEntries(MIXING_FIELDS.map((k) => [k, FIELDS[k]])) as Pick<typeof FIELDS, (typeof MIXING_FIELDS)[number]>);
  const r = schema.safeParse(input ?? {});
  if (!r.success) throw errorOf(r.error.issues, source);
  return { ...r.data, token_mixing: r.data.token_mixing ?? dflt };
}

/** The token mixing of a run (null: off). */
export function mixingOf(s: Pick<RunSpec, (typeof MIXING_FIELDS)[number]>): MixingConfig | null {
  return s.token_mixing === 'on' ? { scheme: s.mixing_scheme, kappa: s.mixing_kappa, block: s.mixing_block, rounds: s.mixing_rounds, shields: s.mixing_shields } : null;
}
