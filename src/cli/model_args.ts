/** Shared resolution of `--model` arguments: a checkpoint directory or a preset name. */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { getPreset, presetNames } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { loadCheckpoint } from '../model/checkpoint.js';
import { InvalidArgumentError } from 'commander';
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
