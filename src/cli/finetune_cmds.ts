/** CLI: fine-tuning through the split, evaluation and generation of fine-tuned runs. */
import { Command } from 'commander';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import type { GPT2Weights } from '../model/weights.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { readJsonl, labelSet, encodeRecords, type Task } from '../io/jsonl.js';
import { buildSession, exportRun, mergedPlainModel } from '../train/session.js';
import { runFinetune, evaluate, latestCheckpoint } from '../train/finetune.js';
import {
  RunSpecError, RUN_SPEC_FILE, RESUMABLE_CHANGES, parseRunSpec, resumeRunSpec, readRunSpec, writeRunSpec, checkRunSpecForModel, toFinetuneConfig, toSessionOptions, mixingOf,
  type RunSpec, type RunSpecInput,
} from '../train/run_spec.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { progressBar } from './progress.js';
import { parseIntArg, refuseNonEmpty } from './model_args.js';
import { addRunSpecOptions, runSpecInputOf } from './run_spec_args.js';
import type { TrainMode, Method } from '../enclave/split_model.js';
import { BundleError, InputError } from '../errors.js';
import { recordSession } from '../attacks/record.js';
import { addRecordViewOptions, recorderOptionsOf } from './record_view_args.js';

export interface RunConfig {
  format: 'obfuscatune-run/1';
  model: string;
  task: Task;
  method: Method;
  mode: TrainMode;
  kappa: string | null;
  /** per-call token mixing (null: off) */
  token_mixing?: MixingConfig | null;
  labels: string[];
  max_len: number;
  pad_token_id: number;
  /** the run's data (absolute paths; absent in runs of earlier versions) */
  train?: string;
  eval?: string | null;
}

export function readRunConfig(runDir: string): RunConfig {
  const f = path.join(runDir, 'config.json');
  if (!existsSync(f)) throw new BundleError(`${runDir} is not a fine-tuning run directory (no config.json)`);
  const c = JSON.parse(readFileSync(f, 'utf8')) as RunConfig;
  if (c.format !== 'obfuscatune-run/1') throw new BundleError(`${f}: not a run configuration`);
  return c;
}

/** The spec input of `finetune`'s flags: the run-spec flags, `--method local` and `--naive`. */
function finetuneSpecInput(o: Record<string, unknown>): RunSpecInput {
  const input = runSpecInputOf(o) as Record<string, unknown>;
  if (o.method === 'local') {
    if (o.mode !== undefined && o.mode !== 'local') throw new RunSpecError('mode', 'command line', `--method local is local full fine-tuning (mode local); it conflicts with mode ${JSON.stringify(o.mode)}`);
    input.method = 'full';
    input.mode = 'local';
  }
  if (o.naive) {
    if (o.kappa !== undefined) throw new RunSpecError('kappa', 'command line', 'give --kappa or --naive, not both');
    input.kappa = 'naive';
  }
  return input as RunSpecInput;
}

/** What a run writes into its directory (removed by a fresh run with --force). */
const RUN_OUTPUTS = ['checkpoints', 'final', 'merged', 'accelerator-state', 'metrics.jsonl', 'summary.json', 'config.json', RUN_SPEC_FILE];

/** The model and data files of a run: the flags, or on --resume the run's own (a different one given is refused). */
function runFiles(o: { model?: string; train?: string; eval?: string; resume?: boolean }, runDir: string): { model: string; train: string; eval: string | null } {
  if (!o.resume) {
    if (!o.model || !o.train) throw new Error('finetune needs --model DIR and --train FILE (or --resume with the --out of a run)');
    return { model: o.model, train: o.train, eval: o.eval ?? null };
  }
  const rc = readRunConfig(runDir);
  const stored = { model: rc.model, train: rc.train ?? null, eval: rc.eval ?? null };
  const pick = (flag: string, given: string | undefined, was: string | null, what: string): string | null => {
    if (given === undefined) return was;
    if (was !== null && path.resolve(given) !== was) throw new Error(`--resume: ${flag} ${given} is not the run's ${what} ${was} (${path.join(runDir, 'config.json')})`);
    if (was === null && flag === '--eval') throw new Error(`--resume: the run has no evaluation set; ${flag} cannot add one`);
    return given;
  };
  const model = pick('--model', o.model, stored.model, 'model');
  const train = pick('--train', o.train, stored.train, 'training data');
  if (!model || !train) throw new Error(`--resume: ${path.join(runDir, 'config.json')} does not name the run's model and training data; give --model and --train`);
  return { model, train, eval: pick('--eval', o.eval, stored.eval, 'evaluation set') };
}

export function addFinetuneCommands(program: Command): void {
  addRecordViewOptions(addRunSpecOptions(program
    .command('finetune')
    .description('fine-tune through the enclave/accelerator split (or locally), with checkpoints and exact resume; the settings form a run spec (docs/fine-tuning.md)')
    .option('--model <dir>', 'plain Hugging Face GPT-2 checkpoint (the provider\'s model; with --resume: the run\'s)')
    .option('--train <file>', 'training JSONL ({"text"}, {"prompt","completion"} or {"text","label"}; with --resume: the run\'s)')
    .option('--eval <file>', 'evaluation JSONL (with --resume: the run\'s)'), { bundle: true, help: { method: 'lora (adapters in the enclave), full, or local (= --mode local --method full)' } })
    .option('--naive', 'naive Gaussian masks (= --kappa naive)')
    .option('--resume', `continue the run in --out from its latest checkpoint with the settings in its ${RUN_SPEC_FILE} (no flags to repeat; only ${RESUMABLE_CHANGES.map((k) => `--${k.replace(/_/g, '-')}`).join(', ')} may change)`)
    .option('--serialize', 'send every boundary message through the binary codec')
    .requiredOption('--out <dir>', 'run directory')
    .option('--force', 'start a fresh run in a non-empty --out: the previous run\'s checkpoints and outputs there are deleted')
    .option('--json', 'print the summary as JSON'))
    .action(async (o) => {
      const runDir: string = o.out;
      const recOpts = recorderOptionsOf(o);
      if (!o.resume) {
        refuseNonEmpty(runDir, o.force, 'finetune (a fresh run; --resume continues the run there)');
        // --force: what a previous run wrote goes, so nothing of it mixes with this one
        if (o.force) for (const f of RUN_OUTPUTS) rmSync(path.join(runDir, f), { recursive: true, force: true });
      }
      // the whole spec is validated before any work: nothing is loaded or written before this
      const given = finetuneSpecInput(o);
      let spec: RunSpec;
      if (o.resume) {
        if (!latestCheckpoint(runDir)) throw new Error(`--resume: no checkpoint in ${path.join(runDir, 'checkpoints')}`);
        const stored = readRunSpec(runDir);
        if (stored) spec = resumeRunSpec(stored, given, 'command line', path.join(runDir, RUN_SPEC_FILE));
        else {
          console.error(`note: ${runDir} has no ${RUN_SPEC_FILE} (a run of an earlier version): its settings are taken from the flags`);
          spec = parseRunSpec(given, 'command line');
        }
      } else spec = parseRunSpec(given, 'command line');
      const files = runFiles(o, runDir);
      const { task, method, mode } = spec;
      const trainRecs = readJsonl(files.train);
      const evalRecs = files.eval ? readJsonl(files.eval) : null;
      let labels: string[] = [];
      if (task === 'cls') {
        labels = labelSet(trainRecs, files.train);
        if (evalRecs) {
          const ev = labelSet(evalRecs, files.eval!);
          const extra = ev.filter((l) => !labels.includes(l));
          if (extra.length) throw new InputError(`${files.eval} has labels not seen in ${files.train}: ${extra.join(', ')}`);
        }
      } else if (trainRecs.some((r) => r.label !== undefined)) {
        console.error(`warning: ${files.train} has labelled records, and the task is lm: the labels are ignored (classification is --task cls)`);
      }
      const base = loadCheckpoint(files.model);
      // a head the model brings is kept when it has as many labels (buildSession)
      const head = task === 'cls' && base.cls && base.cls.numLabels === labels.length ? base.cls.pooling ?? 'last' : null;
      checkRunSpecForModel(spec, { n_ctx: base.config.n_ctx, headPooling: head }, 'command line');
      const tok = tokenizerFor(base.config.vocab_size);
      const train = encodeRecords(trainRecs, tok, { task, maxLen: spec.max_len, labels, source: files.train });
      const evalSet = evalRecs ? encodeRecords(evalRecs, tok, { task, maxLen: spec.max_len, labels, source: files.eval! }) : null;
      mkdirSync(runDir, { recursive: true });
      const padId = tok.eotId;
      const session = buildSession(base, toSessionOptions(spec, {
        padTokenId: padId, numLabels: task === 'cls' ? labels.length : undefined, labels, acceleratorStateDir: path.join(runDir, 'accelerator-state'), serialize: o.serialize,
      }));
      const recording = recOpts ? recordSession(session, { ...recOpts, padTokenId: padId, modelPath: files.model, spec: spec.kappa ?? '1', twoSided: spec.two_sided, labels }) : null;
      const cfg = toFinetuneConfig(spec, session.modelId);
      const runCfg: RunConfig = {
        format: 'obfuscatune-run/1', model: path.resolve(files.model), task, method, mode, kappa: spec.kappa, token_mixing: mixingOf(spec), labels, max_len: spec.max_len, pad_token_id: padId,
        train: path.resolve(files.train), eval: files.eval ? path.resolve(files.eval) : null,
      };
      writeFileSync(path.join(runDir, 'config.json'), JSON.stringify(runCfg, null, 2) + '\n');
      writeRunSpec(runDir, spec);
      if (train.truncated || (evalSet?.truncated ?? 0)) console.error(`note: truncated ${train.truncated} training and ${evalSet?.truncated ?? 0} evaluation records to ${spec.max_len} tokens`);
      const bar = progressBar(spec.steps, `finetune ${mode}/${method}`, 'loss {loss} | {tps} tok/s');
      let toks = 0;
      let ms = 0;
      const summary = await runFinetune(session.model, train, evalSet, cfg, runDir, padId, {
        resume: o.resume, rng: session.rng,
        onStep: (m) => {
          toks += m.tokens;
          ms += m.ms;
          bar.update(m.step, { loss: m.loss.toFixed(4), tps: Math.round((toks / Math.max(ms, 1)) * 1000) });
        },
      });
      bar.stop();
      if (recording) {
        const { header, truthFile } = recording.save(o.recordView);
        console.error(`recorded the accelerator's view: ${o.recordView} (${header.events} tensors, ${(header.recorded_bytes / 2 ** 20).toFixed(1)} MiB${header.dropped_events ? `, ${header.dropped_events} left out by the filter` : ''}); scoring key ${truthFile}`);
      }
      exportRun(path.join(runDir, 'final'), session, { kappa: spec.kappa, token_mixing: mixingOf(spec), labels });
      // this process plays every party: it can also act as the provider and merge the update
      const merged = mergedPlainModel(session);
      saveCheckpoint(path.join(runDir, 'merged'), { ...merged, cls: merged.cls ? { ...merged.cls, labels } : undefined, padTokenId: task === 'cls' ? padId : merged.padTokenId });
      const { losses, ...rest } = summary;
      const out = { ...rest, token_mixing: mixingOf(spec), first_loss: losses[0] ?? null, model: path.resolve(files.model), labels: task === 'cls' ? labels : undefined };
      writeFileSync(path.join(runDir, 'summary.json'), JSON.stringify(out, null, 2) + '\n');
      if (o.json) console.log(JSON.stringify(out));
      else {
        const e = summary.eval;
        console.log(`${mode}/${method}${spec.kappa ? ` (kappa ${spec.kappa})` : ''}${spec.token_mixing === 'on' ? ', token mixing' : ''}: ${spec.steps} steps, last training loss ${summary.train_loss_last.toFixed(4)}, ${summary.tokens_per_second.toFixed(0)} tokens/s`);
        if (e) console.log(`eval: loss ${e.loss.toFixed(4)}${e.accuracy !== undefined ? `, accuracy ${(100 * e.accuracy).toFixed(2)}%` : ''}${e.perplexity !== undefined ? `, perplexity ${e.perplexity.toFixed(2)}` : ''} on ${e.examples} examples`);
        console.log(`run directory ${runDir} (${RUN_SPEC_FILE}, metrics.jsonl, summary.json, checkpoints/, final/, merged/)`);
      }
    });

  program
    .command('eval')
    .description('evaluate a plain model on a text file, or a fine-tuned run on a JSONL dataset')
    .option('--model <dir>', 'plain checkpoint directory (with --text)')
    .option('--text <file>', 'UTF-8 text: perplexity of --model')
    .option('--run <dir>', 'fine-tuning run directory (with --data)')
    .option('--data <file>', 'JSONL dataset to evaluate the run on')
    .option('--seq <n>', 'tokens per window (--text)', parseIntArg('--seq'), 64)
    .option('--batch <n>', 'batch size', parseIntArg('--batch'), 8)
    .option('--json', 'print JSON')
    .action(async (o) => {
      if (o.run) {
        if (!o.data) throw new InputError('eval --run needs --data FILE');
        const rc = readRunConfig(o.run);
        const w = loadRunModel(o.run);
        const tok = tokenizerFor(w.config.vocab_size);
        const set = encodeRecords(readJsonl(o.data), tok, { task: rc.task, maxLen: rc.max_len, labels: rc.labels, source: o.data });
        const s = buildSession(w, { mode: 'local', method: 'full', task: rc.task, numLabels: rc.task === 'cls' ? rc.labels.length : undefined, padTokenId: rc.pad_token_id, seed: 0 });
        const e = await evaluate(s.model, set, o.batch, rc.pad_token_id);
        const res = { run: o.run, data: o.data, task: rc.task, ...e, truncated: set.truncated };
        if (o.json) console.log(JSON.stringify(res));
        else console.log(`loss ${e.loss.toFixed(4)}${e.accuracy !== undefined ? `, accuracy ${(100 * e.accuracy).toFixed(2)}%` : ''}${e.perplexity !== undefined ? `, perplexity ${e.perplexity.toFixed(2)}` : ''} on ${e.examples} examples`);
        return;
      }
      if (!o.model || !o.text) throw new InputError('give --model DIR --text FILE, or --run DIR --data FILE');
      const { GPT2 } = await import('../model/gpt2.js');
      const { evaluateLM } = await import('../train/lm.js');
      const model = new GPT2(loadCheckpoint(o.model));
      const tok = tokenizerFor(model.config.vocab_size);
      const e = await evaluateLM(model, Int32Array.from(tok.encode(readFileSync(o.text, 'utf8'))), o.seq, o.batch);
      if (o.json) console.log(JSON.stringify(e));
      else console.log(`loss ${e.loss.toFixed(4)}, perplexity ${e.perplexity.toFixed(2)} over ${e.tokens} tokens`);
    });
}

/** The merged plain model of a fine-tuning run. */
export function loadRunModel(runDir: string): GPT2Weights {
  readRunConfig(runDir);
  const dir = path.join(runDir, 'merged');
  if (!existsSync(dir)) throw new BundleError(`${runDir} has no merged model (was the run finished?)`);
  return loadCheckpoint(dir);
}
