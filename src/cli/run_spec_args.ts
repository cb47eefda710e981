/**
 * The command-line flags of a run specification (`finetune`, `owner finetune`): one flag per
 * setting, the defaults shown from RUN_SPEC_DEFAULTS. A flag that is not given is left out of
 * the spec input, so the spec's default applies (and `--resume` can tell what was given).
 * Values go to `parseRunSpec` as given (numbers converted), which refuses the invalid ones.
 */
import type { Command } from 'commander';
import { RUN_SPEC_DEFAULTS, BUNDLE_FIELDS, MIXING_FIELDS, mixingOf, parseMixingSettings, type RunSpecInput } from '../train/run_spec.js';
import type { MixingConfig } from '../enclave/mixing.js';

interface Flag {
  /** commander flag ("--max-len <n>"; no value: a switch) */
  flag: string;
  /** setting ("max_len", "lora.rank") */
  field: string;
  help: string;
  numeric?: boolean;
  /** a "--no-..." switch: sets the setting to false (commander reports true when it is not given) */
  negate?: boolean;
}

const FLAGS: Flag[] = [
  { flag: '--task <task>', field: 'task', help: 'lm (causal LM) or cls (sequence classification)' },
  { flag: '--method <method>', field: 'method', help: 'lora (adapters in the enclave) or full' },
  { flag: '--mode <mode>', field: 'mode', help: 'sealed, paper, or local (no split)' },
  { flag: '--kappa <k>', field: 'kappa', help: 'mask condition number (>= 1; 1 = orthogonal) or naive; split modes only; none: 1' },
  { flag: '--two-sided', field: 'two_sided', help: 'paper mode: mask the projection outputs too' },
  { flag: '--mask-seed <n>', field: 'mask_seed', help: 'derive the masks from a seed (reproducible, NOT secret); none: the run\'s --seed', numeric: true },
  { flag: '--token-mixing <on|off>', field: 'token_mixing', help: 'per-call token mixing of what crosses to the accelerator (Defence 1)' },
  { flag: '--mixing-kappa <k>', field: 'mixing_kappa', help: 'token mixing: condition number of each call\'s mixing matrix', numeric: true },
  { flag: '--mixing-block <n>', field: 'mixing_block', help: 'token mixing: real rows per block of a block-diagonal mixing (0 = one block)', numeric: true },
  { flag: '--no-mixing-shields', field: 'mixing_shields', help: 'token mixing: no shield rows (cheaper; the sent rows then span only the real rows)', negate: true },
  { flag: '--steps <n>', field: 'steps', help: 'optimisation steps', numeric: true },
  { flag: '--batch <n>', field: 'batch', help: 'examples per step', numeric: true },
  { flag: '--max-len <n>', field: 'max_len', help: 'truncate examples to this many tokens (counted in the summary)', numeric: true },
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
  { flag: '--targets <list>', field: 'lora.targets', help: 'LoRA targets: q,k,v,proj,fc,mlp-proj (or qkv, mlp), and wte (the token embedding; classification)' },
];

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
 * Adds one flag per setting (without a commander default). `bundle: false` leaves out the
 * settings fixed by the provider's bundle (the enclave's jobs).
 */
export function addRunSpecOptions(cmd: Command, o: { bundle: boolean; help?: Record<string, string>; only?: readonly string[] }): Command {
  for (const f of FLAGS) {
    if (!o.bundle && (BUNDLE_FIELDS as readonly string[]).includes(f.field)) continue;
    if (o.only && !o.only.includes(f.field)) continue;
    const d = defaultOf(f.field);
    const text = o.help?.[f.field] ?? f.help;
    if (!f.flag.includes('<')) cmd.option(f.flag, text);
    else if (f.numeric) cmd.option(f.flag, `${text} (default ${showDefault(d)})`, numberOrText);
    else cmd.option(f.flag, `${text} (default ${showDefault(d)})`);
  }
  return cmd;
}

/** The spec input of the flags given (a flag not given is absent). */
export function runSpecInputOf(opts: Record<string, unknown>, only?: readonly string[]): RunSpecInput {
  const out: Record<string, unknown> = {};
  for (const f of FLAGS) {
    if (only && !only.includes(f.field)) continue;
    const v = opts[keyOf(f.flag)];
    if (v === undefined || (f.negate && v === true)) continue;
    const [a, b] = f.field.split('.');
    if (b) out[a] = { ...((out[a] as object | undefined) ?? {}), [b]: v };
    else out[a] = v;
  }
  return out as RunSpecInput;
}

/** The token-mixing flags alone (split inference and generation). */
export function addMixingOptions(cmd: Command): Command {
  return addRunSpecOptions(cmd, { bundle: true, only: MIXING_FIELDS });
}

/** The token mixing the flags ask for (null: off); invalid values are refused as a run spec's. */
export function mixingOptionsOf(opts: Record<string, unknown>): MixingConfig | null {
  return mixingOf(parseMixingSettings(runSpecInputOf(opts, MIXING_FIELDS), 'command line'));
}
