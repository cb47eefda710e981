/**
 * A command's result on stdout: with `--json` one JSON document and nothing else there
 * (notes, warnings and progress go to stderr), else text for people.
 */
import type { Command } from 'commander';
import YAML from 'yaml';
import { setProgressJson } from './progress.js';

let json = false;

/** Set from the action's `--json` before it runs: in JSON mode, console.log goes to stderr. */
export function setJsonOutput(on: boolean): void {
  json = on;
  setProgressJson(on);
  if (on) console.log = console.info = (...a: unknown[]) => console.error(...a);
}

/** `--json` on a command that prints a result. */
export function withJson(cmd: Command, what = 'print the result as JSON on stdout (notes and progress on stderr)'): Command {
  return cmd.option('--json', what);
}

/** Prints a command's result: JSON with --json; else `human` (by default the result as YAML). */
export function emit(result: unknown, human?: string | string[]): void {
  if (json) process.stdout.write(JSON.stringify(result) + '\n');
  else process.stdout.write((human === undefined ? YAML.stringify(result).trimEnd() : Array.isArray(human) ? human.join('\n') : human) + '\n');
}

/** Aligned text columns, each padded to its widest cell. */
export function textTable(head: string[], rows: string[][]): string[] {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [head, ...rows].map((r) => r.map((c, i) => c.padEnd(w[i])).join('  '));
}
