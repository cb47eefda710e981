/** Shared resolution of `--model` arguments: a checkpoint directory or a preset name. */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { getPreset, presetNames } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { loadCheckpoint } from '../model/checkpoint.js';
import { InvalidArgumentError, type Command } from 'commander';
import type { GPT2Weights } from '../model/weights.js';
import type { RankChoice } from '../linalg/svd.js';
import { DEFAULT_DELTA_ENERGY } from '../obfuscate/provider.js';
import { InputError } from '../errors.js';

export function loadModel(spec: string, opts: { randomInit?: boolean; seed?: number } = {}): GPT2 {
  if (opts.randomInit) {
    return GPT2.random(getPreset(spec), opts.seed ?? 1);
  }
  if (existsSync(spec)) return new GPT2(loadCheckpoint(spec));
  if (presetNames().includes(spec)) {
    throw new InputError(`"${spec}" is a preset name, not a checkpoint directory; add --random-init to use a randomly initialised ${spec}`);
  }
  throw new InputError(`model "${spec}" not found: give a Hugging Face GPT-2 checkpoint directory or a preset with --random-init`);
}

export function parseIntArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n)) throw new InvalidArgumentError(`${name} must be an integer, got "${v}"`);
    return n;
  };
}

export function parseFloatArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got "${v}"`);
    return n;
  };
}

/**
 * Refuses to write into an existing non-empty directory unless `force` (key material and
 * runs are never overwritten by accident).
 */
export function refuseNonEmpty(dir: string, force: boolean | undefined, command: string): void {
  if (force || !existsSync(dir)) return;
  if (!statSync(dir).isDirectory()) throw new InputError(`${command}: --out ${dir} exists and is not a directory`);
  const entries = readdirSync(dir);
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
