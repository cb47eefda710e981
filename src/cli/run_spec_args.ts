/**
 * The command-line flags of a run specification (`finetune`, `owner finetune`): one flag per
 * setting, the defaults shown from RUN_SPEC_DEFAULTS. A flag that is not given is left out of
 * the spec input, so the spec's default applies (and `--resume` can tell what was given).
 * Values go to `parseRunSpec` as given (numbers converted), which refuses the invalid ones.
 */
import type { Command } from 'commander';
import { readFileSync } from 'node:fs';
import YAML from 'yaml';
import { RUN_SPEC_DEFAULTS, BUNDLE_FIELDS, MIXING_FIELDS, RunSpecError, checkRunSpecInput, mergeRunSpecInputs, mixingOf, parseMixingSettings, type RunSpecInput } from '../train/run_spec.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { PEFT_TARGET_MODULES, parseTargetModules } from '../model/peft.js';
import { parseLoraTargets } from '../model/lora.js';
import { InputError } from '../errors.js';

interface Flag {
  /** commander flag ("--max-len <n>"; no value: a switch) */
  flag: string;
  /** setting ("max_len", "lora.rank") */
  field: string;
  help: string;
  numeric?: boolean;
  /** turns the value into the setting's (PEFT's module names into targets) */
  map?: (v: string) => unknown;
}

const FLAGS: Flag[] = [
  { flag: '--task <task>', field: 'task', help: 'lm (causal LM) or cls (sequence classification)' },
  { flag: '--method <method>', field: 'method', help: 'lora (adapters in the enclave) or full' },
  { flag: '--mode <mode>', field: 'mode', help: 'sealed, paper, or local (no split)' },
  { flag: '--kappa <k>', field: 'kappa', help: 'mask condition number (>= 1; 1 = orthogonal) or naive; split modes only; none: 1' },
  { flag: '--two-sided', field: 'two_sided', help: 'paper mode: mask the projection outputs too' },
  { flag: '--mask-seed <n>', field: 'mask_seed', help: 'derive the masks from a seed (reproducible, NOT secret); none: the run\'s --seed', numeric: true },
  { flag: '--rotary-masks <full|blocks>', field: 'rotary_masks', help: 'Llama family: full per-head q/k masks (unmasked in the enclave before rotary) or rotation-and-scale blocks that commute with it' },
  { flag: '--token-mixing <on|off>', field: 'token_mixing', help: 'per-call token mixing of what crosses to the accelerator (Defence 1); default: on for split fine-tuning and generation, off for mode local, fidelity and bench' },
  { flag: '--mixing-scheme <scheme>', field: 'mixing_scheme', help: 'token mixing: butterfly (permutations and small blocks, cheap) or dense (one dense matrix per call)' },
  { flag: '--mixing-kappa <k>', field: 'mixing_kappa', help: 'token mixing: condition number of each call\'s mixing matrix', numeric: true },
  { flag: '--mixing-block <n>', field: 'mixing_block', help: 'token mixing: rows per block (0 = butterfly 16, dense one block)', numeric: true },
  { flag: '--mixing-rounds <n>', field: 'mixing_rounds', help: 'token mixing: butterfly rounds, each a fresh permutation and a pass over every row (0 = 1, 2 where shields fill the width)', numeric: true },
  { flag: '--mixing-shields <where>', field: 'mixing_shields', help: 'token mixing: shield rows up to the width on first-layer (layer 0\'s qkv input), all or none of the calls' },
  { flag: '--steps <n>', field: 'steps', help: 'optimisation steps', numeric: true },
  { flag: '--batch <n>', field: 'batch', help: 'examples per step', numeric: true },
  { flag: '--max-len <n>', field: 'max_len', help: 'truncate examples to this many tokens (counted in the summary)', numeric: true },
  { flag: '--text-field <name>', field: 'text_field', help: 'the records\' text field' },
  { flag: '--prompt-field <name>', field: 'prompt_field', help: 'the records\' prompt field' },
  { flag: '--completion-field <name>', field: 'completion_field', help: 'the records\' completion field (the loss is on it only)' },
  { flag: '--label-field <name>', field: 'label_field', help: 'the records\' label field (task cls)' },
  { flag: '--lr <x>', field: 'lr', help: 'peak learning rate', numeric: true },
  { flag: '--warmup <n>', field: 'warmup', help: 'warm-up steps', numeric: true },
  { flag: '--min-lr-frac <x>', field: 'min_lr_frac', help: 'cosine floor as a fraction of the peak', numeric: true },
  { flag: '--clip <x>', field: 'clip', help: 'global gradient-norm clip (0 = off)', numeric: true },
  { flag: '--weight-decay <x>', field: 'weight_decay', help: 'weight decay', numeric: true },
  { flag: '--enclave-optimizer <name>', field: 'enclave_optimizer', help: 'optimiser of enclave-side parameters: adamw or sgd' },
  { flag: '--momentum <x>', field: 'momentum', help: 'SGD momentum (accelerator-side full fine-tuning)', numeric: true },
  { flag: '--adam-eps <x>', field: 'adam_eps', help: 'AdamW epsilon', numeric: true },
  { flag: '--seed <n>', field: 'seed', help: 'seed (data order, initialisation, dropout)', numeric: true },
  { flag: '--eval-every <n>', field: 'eval_every', help: 'evaluate every n steps (0 = only at the end)', numeric: true },
  { flag: '--eval-batches <n>', field: 'eval_batches', help: 'cap on evaluation batches (0 = all)', numeric: true },
  { flag: '--checkpoint-every <n>', field: 'checkpoint_every', help: 'checkpoint every n steps (0 = only at the end)', numeric: true },
  { flag: '--pooling <how>', field: 'pooling', help: 'classification: pool the last token (as HF GPT2ForSequenceClassification) or the mean of the tokens (a fresh head only); none: the model\'s head\'s, else last' },
  { flag: '--freeze-norms', field: 'freeze_norms', help: 'full fine-tuning: fold the layer norms into the linears and freeze them (sealed mode\'s plain twin)' },
  { flag: '--rank <r>', field: 'lora.rank', help: 'LoRA rank', numeric: true },
  { flag: '--alpha <a>', field: 'lora.alpha', help: 'LoRA alpha', numeric: true },
  { flag: '--dropout <p>', field: 'lora.dropout', help: 'LoRA dropout', numeric: true },
  { flag: '--targets <list>', field: 'lora.targets', help: 'LoRA targets: q,k,v,proj,fc,mlp-proj (or qkv, mlp), and wte (the token embedding; classification)', map: targetsOrText },
  // Hugging Face PEFT's names for the same settings
  { flag: '--lora-r <r>', field: 'lora.rank', help: 'PEFT\'s name of --rank', numeric: true },
  { flag: '--lora-alpha <a>', field: 'lora.alpha', help: 'PEFT\'s name of --alpha', numeric: true },
  { flag: '--lora-dropout <p>', field: 'lora.dropout', help: 'PEFT\'s name of --dropout', numeric: true },
  { flag: '--target-modules <list>', field: 'lora.targets', help: `--targets in PEFT's GPT-2 module names: ${Object.keys(PEFT_TARGET_MODULES).join(', ')} (c_attn: q,k,v; c_proj: both projections)`, map: parseTargetModules },
];

/** The targets when the text names them; otherwise the text, for the spec to refuse with its own message. */
function targetsOrText(v: string): unknown {
  try {
    return parseLoraTargets(v, 'any');
  } catch {
    return v;
  }
}

/** A number when the text is one; otherwise the text, for the spec to refuse with its own message. */
function numberOrText(v: string): number | string {
  const n = Number(v);
  return v.trim() !== '' && !Number.isNaN(n) ? n : v;
}

function defaultOf(field: string): unknown {
  return field.split('.').reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], RUN_SPEC_DEFAULTS);
}

function showDefault(v: unknown): string {
  return Array.isArray(v) ? v.join(',') : v === null ? 'none' : String(v);
}

/** commander's camelCase key of a flag */
function keyOf(flag: string): string {
  return flag.split(' ')[0].replace(/^--(no-)?/, '').replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

/**
 * Adds one flag per setting (without a commander default) and `--config`. `bundleNote` is
 * added to the help of the settings fixed by the provider's bundle (the enclave's jobs).
 */
export function addRunSpecOptions(cmd: Command, o: { bundleNote?: string; help?: Record<string, string>; only?: readonly string[] } = {}): Command {
  if (!o.only) cmd.option('--config <file>', 'a recipe: run-spec settings in a YAML or JSON file (a run\'s run_spec.json is one); the flags given override it');
  for (const f of FLAGS) {
    if (o.only && !o.only.includes(f.field)) continue;
    const d = defaultOf(f.field);
    const text = (o.help?.[f.field] ?? f.help) + (o.bundleNote && (BUNDLE_FIELDS as readonly string[]).includes(f.field) ? `; ${o.bundleNote}` : '');
    if (!f.flag.includes('<')) cmd.option(f.flag, text);
    else if (f.numeric) cmd.option(f.flag, `${text} (default ${showDefault(d)})`, numberOrText);
    else cmd.option(f.flag, `${text} (default ${showDefault(d)})`);
  }
  return cmd;
}

/** Only the flags of the records' field names (a command that reads a dataset outside a run's spec: eval). */
export function addFieldOptions(cmd: Command, defaults: string): Command {
  for (const f of FLAGS) if (f.field.endsWith('_field')) cmd.option(f.flag, `${f.help} (default: ${defaults}, else ${showDefault(defaultOf(f.field))})`);
  return cmd;
}

/** The spec input of the flags given (a flag not given is absent; two names of one setting must agree); `only`: these settings. */
export function runSpecInputOf(opts: Record<string, unknown>, only?: readonly string[]): RunSpecInput {
  const out: Record<string, unknown> = {};
  const by = new Map<string, [string, unknown]>();
  for (const f of FLAGS) {
    if (only && !only.includes(f.field)) continue;
    const given = opts[keyOf(f.flag)];
    if (given === undefined) continue;
    const v = f.map ? f.map(String(given)) : given;
    const name = f.flag.split(' ')[0];
    const was = by.get(f.field);
    if (was && JSON.stringify(was[1]) !== JSON.stringify(v)) throw new RunSpecError(f.field, 'command line', `${was[0]} ${JSON.stringify(opts[keyOf(was[0])])} and ${name} ${JSON.stringify(given)} disagree`);
    by.set(f.field, [name, v]);
    const [a, b] = f.field.split('.');
    if (b) out[a] = { ...((out[a] as object | undefined) ?? {}), [b]: v };
    else out[a] = v;
  }
  return out as RunSpecInput;
}

/**
 * A recipe file: run-spec settings as YAML or JSON (by the extension .json; anything else is
 * read as YAML, which includes JSON), each setting checked with the spec's schema (errors
 * name the file and the setting). `refuse`: settings the command decides itself.
 */
export function readRecipe(file: string, refuse: string[] = []): RunSpecInput {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new InputError(`--config ${file}: cannot read the recipe (${(e as Error).message})`);
  }
  let v: unknown;
  const json = /\.json$/i.test(file);
  try {
    v = json ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new RunSpecError('(spec)', file, `not valid ${json ? 'JSON' : 'YAML'} (${(e as Error).message.split('\n')[0]})`);
  }
  const recipe = checkRunSpecInput(v ?? {}, file);
  for (const k of refuse) if (k in recipe) throw new RunSpecError(k, file, `is not a recipe setting here (the command decides ${refuse.join(', ')})`);
  return { ...recipe };
}

/** The spec input of a command: its --config recipe (if any), then the flags given. */
export function recipeAndFlags(opts: Record<string, unknown>, flags: RunSpecInput): { input: RunSpecInput; source: string } {
  if (typeof opts.config !== 'string') return { input: flags, source: 'command line' };
  return { input: mergeRunSpecInputs(readRecipe(opts.config), flags), source: `${opts.config} and the command line` };
}

/** The token-mixing flags alone (split inference and generation). */
export function addMixingOptions(cmd: Command): Command {
  return addRunSpecOptions(cmd, { only: MIXING_FIELDS });
}

/** The token mixing the flags ask for (null: off); invalid values are refused as a run spec's. */
export function mixingOptionsOf(opts: Record<string, unknown>, dflt: 'on' | 'off'): MixingConfig | null {
  return mixingOf(parseMixingSettings(runSpecInputOf(opts, MIXING_FIELDS), 'command line', dflt));
}
