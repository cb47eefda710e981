/** Shared resolution of `--model` arguments: a checkpoint directory or a preset name. */
import { copyFileSync, existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { getPreset, presetNames, LLAMA_PRESETS } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { Llama } from '../model/llama.js';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import { checkpointModelType, isLlamaArch, loadLlamaCheckpoint, saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { hasCheckpointTokenizer, loadCheckpointTokenizer } from '../model/hf_tokenizer.js';
import { tokenizerFor, type Tokenizer } from '../model/tokenizer.js';
import { InvalidArgumentError, type Command } from 'commander';
import type { GPT2Weights } from '../model/weights.js';
import type { RankChoice } from '../linalg/svd.js';
import { DEFAULT_DELTA_ENERGY } from '../obfuscate/provider.js';
import { InputError } from '../errors.js';

/** The directory holds a Llama-family checkpoint (its config.json's model_type). */
export function isLlamaDir(dir: string): boolean {
  return existsSync(join(dir, 'config.json')) && isLlamaArch(checkpointModelType(dir));
}

/** Copies a checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json) that exist. */
export function copyTokenizer(from: string, to: string): void {
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) if (existsSync(join(from, f))) copyFileSync(join(from, f), join(to, f));
}

/** A plain model of either family with the tokenizer that goes with it. */
export interface PlainModel { model: GPT2 | Llama; tokenizer: () => Tokenizer; save: (dir: string) => void }

/**
 * `--model` for the plain commands (init, train, generate): a GPT-2 or Llama-family checkpoint
 * directory (its own tokenizer.json when it has one, else GPT-2's BPE), or a preset of either
 * family with --random-init.
 */
export function loadPlainModel(spec: string, opts: { randomInit?: boolean; seed?: number } = {}): PlainModel {
  const llamaPreset = LLAMA_PRESETS[spec];
  const dirLlama = !opts.randomInit && existsSync(spec) && isLlamaArch(checkpointModelType(spec));
  if ((opts.randomInit && llamaPreset) || dirLlama) {
    const w = dirLlama ? loadLlamaCheckpoint(spec) : null;
    const model = w ? new Llama(w) : Llama.random({ ...llamaPreset! }, opts.seed ?? 1);
    return {
      model,
      tokenizer: () => (dirLlama && hasCheckpointTokenizer(spec) ? loadCheckpointTokenizer(spec) : tokenizerFor(model.config.vocab_size)),
      save: (dir) => {
        saveLlamaCheckpoint(dir, model.weights(), { arch: w?.arch });
        // the checkpoint's tokenizer goes with it
        if (dirLlama) copyTokenizer(spec, dir);
      },
    };
  }
  if (!opts.randomInit && !existsSync(spec)) {
    if (presetNames().includes(spec)) throw new InputError(`"${spec}" is a preset name, not a checkpoint directory; add --random-init to use a randomly initialised ${spec}`);
    throw new InputError(`model "${spec}" not found: give a Hugging Face GPT-2 checkpoint directory or a preset with --random-init`);
  }
  const model = opts.randomInit ? GPT2.random(getPreset(spec), opts.seed ?? 1) : new GPT2(loadCheckpoint(spec));
  return { model, tokenizer: () => tokenizerFor(model.config.vocab_size), save: (dir) => saveCheckpoint(dir, model.weights()) };
}

/** commander's parser of a numeric flag's value: a number that is `ok`, else refused as not `what`. */
const numberArg = (name: string, ok: (n: number) => boolean, what: string) => (v: string): number => {
  const n = Number(v);
  if (!ok(n)) throw new InvalidArgumentError(`${name} must be ${what}, got "${v}"`);
  return n;
};
export const parseIntArg = (name: string) => numberArg(name, Number.isInteger, 'an integer');
export const parseFloatArg = (name: string) => numberArg(name, Number.isFinite, 'a number');

/** A comma-separated list of numbers, each one `ok` or refused as `FLAG: "x" is not WHAT`; `skipEmpty`: "1,,2" is 1, 2. */
export function numberList(s: string, flag: string, what: string, ok: (n: number) => boolean, skipEmpty = false): number[] {
  return String(s).split(',').filter((x) => !skipEmpty || x.trim()).map((x) => {
    const n = Number(x.trim());
    if (!ok(n)) throw new InputError(`${flag}: "${x}" is not ${what}`);
    return n;
  });
}

/**
 * Refuses to write into an existing non-empty directory unless `force` (key material and
 * runs are never overwritten by accident). `only`: just these entries count (what the
 * command writes; other files there are left alone).
 */
export function refuseNonEmpty(dir: string, force: boolean | undefined, command: string, only?: string[]): void {
  if (force || !existsSync(dir)) return;
  if (!statSync(dir).isDirectory()) throw new InputError(`${command}: --out ${dir} exists and is not a directory`);
  const entries = readdirSync(dir).filter((e) => !only || only.includes(e));
  if (entries.length > 0) {
    throw new InputError(`${command}: --out ${dir} is not empty (${entries.slice(0, 4).join(', ')}${entries.length > 4 ? ', ...' : ''}); give an empty or new directory, or --force to write over it`);
  }
}

/** `--public-base DIR` with `--delta-rank R` or `--delta-energy E` (obfuscate, provider obfuscate). */
export function addPublicBaseOptions(cmd: Command): Command {
  return cmd
    .option('--public-base <dir>', 'the public checkpoint the model derives from: the accelerator gets it (masked, pinned by hash), the enclave the model\'s delta over it in low-rank form')
    .option('--delta-rank <r>', 'with --public-base: keep this rank of each linear\'s delta', parseIntArg('--delta-rank'))
    .option('--delta-energy <e>', `with --public-base: keep the smallest rank holding this share of each delta's squared norm (default ${DEFAULT_DELTA_ENERGY})`, parseFloatArg('--delta-energy'));
}

/** The public base of `addPublicBaseOptions`' flags, loaded; undefined without --public-base. */
export function publicBaseOf(o: { publicBase?: string; deltaRank?: number; deltaEnergy?: number }): { weights: GPT2Weights; choice: RankChoice; dir: string } | undefined {
  if (!o.publicBase) {
    if (o.deltaRank !== undefined || o.deltaEnergy !== undefined) throw new InputError('--delta-rank and --delta-energy need --public-base DIR');
    return undefined;
  }
  if (o.deltaRank !== undefined && o.deltaEnergy !== undefined) throw new InputError('give --delta-rank or --delta-energy, not both');
  if (o.deltaRank !== undefined && o.deltaRank < 0) throw new InputError(`--delta-rank must be >= 0, got ${o.deltaRank}`);
  if (o.deltaEnergy !== undefined && !(o.deltaEnergy > 0 && o.deltaEnergy <= 1)) throw new InputError(`--delta-energy must be in (0, 1], got ${o.deltaEnergy}`);
  if (!existsSync(o.publicBase)) throw new InputError(`--public-base ${o.publicBase} not found`);
  const choice: RankChoice = o.deltaRank !== undefined ? { rank: o.deltaRank } : { energy: o.deltaEnergy ?? DEFAULT_DELTA_ENERGY };
  return { weights: loadCheckpoint(o.publicBase), choice, dir: o.publicBase };
}
