/** CLI: `obfuscatune attack <name> --view FILE ...`, the attacks on a recorded accelerator view. */
import { Command } from 'commander';
import { existsSync } from 'node:fs';
import { loadCheckpoint } from '../model/checkpoint.js';
import type { GPT2Weights } from '../model/weights.js';
import { loadView, loadTruth, checkView, type LoadedView, type ViewTruth } from '../protocol/view.js';
import type { AttackProgress, AttackResult } from '../attacks/common.js';
import { weightAlignmentAttack } from '../attacks/weight_alignment.js';
import { decodePublicBaseAttack } from '../attacks/decode.js';
import { frequencyAttack } from '../attacks/frequency.js';
import { knownPlaintextAttack } from '../attacks/known_plaintext.js';
import { mlpPermutationAttack } from '../attacks/mlp_permutation.js';
import { labelRecoveryAttack } from '../attacks/label_recovery.js';
import { unmixAttack } from '../attacks/unmix.js';
import { numberList, parseFloatArg, parseIntArg } from './model_args.js';
import { ViewError } from '../errors.js';
import { emit } from './output.js';
import { progressBar } from './progress.js';

interface Common { view: string; truth?: string; mode?: string; json?: boolean }

/** The view and its truth file (`needed`: refused when it is not found, for attacks that score with it). */
function open(o: Common, needed: true): { view: LoadedView; truth: ViewTruth };
function open(o: Common): { view: LoadedView; truth: ViewTruth | null };
function open(o: Common, needed = false): { view: LoadedView; truth: ViewTruth | null } {
  const view = loadView(o.view);
  checkView(view, { mode: o.mode });
  const tf = o.truth ?? `${o.view}.truth.json`;
  if (needed && !o.truth && !existsSync(tf)) throw new ViewError(`scoring needs the view's truth file (${tf} not found; give --truth FILE)`);
  return { view, truth: o.truth || existsSync(tf) ? loadTruth(tf, view) : null };
}

function publicModel(dir: string, view: LoadedView): GPT2Weights {
  const w = loadCheckpoint(dir);
  checkView(view, { config: w.config, what: `the public model ${dir}` });
  return w;
}

/** Runs an attack with its progress on stderr (`attack NAME: done/total ...`), then prints the result. */
async function attackWith(name: string, attack: (onProgress: AttackProgress) => AttackResult | Promise<AttackResult>): Promise<void> {
  const bar = progressBar(1, `attack ${name}`, '{label}');
  let units = 1;
  const r = await attack((done, total, label) => bar.track(done, (units = total), label));
  bar.update(units, { label: 'done' });
  bar.stop();
  const pct = (x: number) => (Number.isFinite(x) ? `${(100 * x).toFixed(2)}%` : 'n/a');
  emit(r, [
    `${r.attack} (${r.setting}, ${r.mode} mode, kappa ${r.kappa}, defence ${r.defence}): ${r.metric} ${pct(r.value)} (baseline ${pct(r.baseline)}) over ${r.observed_batches} observed batches`,
    ...Object.entries(r.details ?? {}).filter(([, v]) => typeof v === 'number').map(([k, v]) => `  ${k}: ${Number.isInteger(v) ? v : (v as number).toFixed(4)}`),
  ]);
}

function common(c: Command): Command {
  return c
    .requiredOption('--view <file>', 'a view recorded with --record-view')
    .option('--truth <file>', 'its scoring key (default: VIEW.truth.json)')
    .option('--mode <mode>', 'refuse a view of another mode (sealed|paper)')
    .option('--json', 'print the result as one JSON object');
}

export function addAttackCommands(program: Command): void {
  const attack = program.command('attack').description('attacks on a recorded accelerator view (docs/security.md): what a curious accelerator recovers, against a guess without the view');

  common(attack.command('weight-alignment')
    .description('public-base setting: align the accelerator bundle with the public checkpoint; recover Q / R, the head masks, the MLP permutation and the provider\'s plain weights'))
    .requiredOption('--public <dir>', 'the public checkpoint the provider fine-tuned')
    .option('--provider <dir>', 'the provider\'s true model, for scoring (default: the truth file\'s)')
    .action((o: Common & { public: string; provider?: string }) => {
      const { view, truth } = open(o);
      const pub = publicModel(o.public, view);
      const provDir = o.provider ?? truth?.model ?? null;
      const prov = provDir ? loadCheckpoint(provDir) : null;
      if (prov) checkView(view, { config: prov.config, what: `the provider model ${provDir}` });
      return attackWith('weight-alignment', (p) => weightAlignmentAttack(view, pub, truth, prov, p));
    });

  common(attack.command('decode-public-base')
    .description('public-base setting: with what weight-alignment recovers, decode the owner\'s tokens from the first-layer rows (nearest token and position)'))
    .requiredOption('--public <dir>', 'the public checkpoint the provider fine-tuned')
    .requiredOption('--corpus <file>', 'a public JSONL corpus (the baseline guess: its most frequent token)')
    .option('--max-batches <n>', 'decode at most this many batches', parseIntArg('--max-batches'))
    .action((o: Common & { public: string; corpus: string; maxBatches?: number }) => {
      const { view, truth: t } = open(o, true);
      const pub = publicModel(o.public, view);
      return attackWith('decode-public-base', (onProgress) => decodePublicBaseAttack(view, pub, t, { corpus: o.corpus, maxBatches: o.maxBatches, onProgress }));
    });

  common(attack.command('frequency')
    .description('secret-model setting: cluster repeated first-layer rows and map them to tokens by frequency rank per position against a public corpus'))
    .requiredOption('--corpus <file>', 'a public JSONL corpus of the owner\'s domain')
    .option('--counts <list>', 'numbers of observed batches to report', '1,10,100')
    .action((o: Common & { corpus: string; counts: string }) => {
      const { view, truth: t } = open(o, true);
      const counts = numberList(o.counts, '--counts', 'a positive integer', (n) => Number.isInteger(n) && n >= 1);
      return attackWith('frequency', (onProgress) => frequencyAttack(view, t, { corpus: o.corpus, counts, onProgress }));
    });

  common(attack.command('known-plaintext')
    .description('the attacker knows some of the owner\'s records: learn row -> token and the first layer\'s linear structure from them, decode the rest'))
    .option('--known-fraction <x>', 'share of the records the attacker knows', parseFloatArg('--known-fraction'), 0.1)
    .option('--seed <n>', 'which records are known', parseIntArg('--seed'), 1)
    .action((o: Common & { knownFraction: number; seed: number }) => {
      const { view, truth: t } = open(o, true);
      return attackWith('known-plaintext', (onProgress) => knownPlaintextAttack(view, t, { knownFraction: o.knownFraction, seed: o.seed, onProgress }));
    });

  common(attack.command('label-recovery')
    .description('classification fine-tuning: cluster the last layer\'s output gradients (one direction per label) and name the clusters by a public label prior'))
    .requiredOption('--corpus <file>', 'a public labelled JSONL corpus of the owner\'s task')
    .option('--seed <n>', 'k-means seed', parseIntArg('--seed'), 1)
    .action((o: Common & { corpus: string; seed: number }) => {
      const { view, truth: t } = open(o, true);
      return attackWith('label-recovery', () => labelRecoveryAttack(view, t, { corpus: o.corpus, seed: o.seed }));
    });

  common(attack.command('unmix')
    .description('public-base setting, against token mixing: FastICA on each call\'s rows, the dictionary attack (is a public first-layer row in the span of the call\'s rows?) and the intersection of consecutive calls\' row spaces'))
    .requiredOption('--public <dir>', 'the public checkpoint (its alignment gives the residual basis; its first-layer rows are the dictionary)')
    .requiredOption('--corpus <file>', 'a public JSONL corpus (the prior that fills guesses; the baseline)')
    .option('--max-batches <n>', 'attack at most this many batches', parseIntArg('--max-batches'), 8)
    .option('--positions <n>', 'candidate positions 0..n-1 (default: min(n_ctx, 64))', parseIntArg('--positions'))
    .action((o: Common & { public: string; corpus: string; maxBatches: number; positions?: number }) => {
      const { view, truth: t } = open(o, true);
      const pub = publicModel(o.public, view);
      return attackWith('unmix', (onProgress) => unmixAttack(view, pub, t, { corpus: o.corpus, maxBatches: o.maxBatches, positions: o.positions, onProgress }));
    });

  common(attack.command('mlp-permutation')
    .description('public-base setting: match the permuted MLP hidden units to the public model\'s by activation statistics'))
    .requiredOption('--public <dir>', 'the public checkpoint')
    .requiredOption('--corpus <file>', 'a public JSONL corpus to run the public model on')
    .action(async (o: Common & { public: string; corpus: string }) => {
      const { view, truth } = open(o);
      const pub = publicModel(o.public, view);
      return attackWith('mlp-permutation', (onProgress) => mlpPermutationAttack(view, pub, truth, { corpus: o.corpus, onProgress }));
    });
}
