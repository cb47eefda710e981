/** CLI: fine-tuning through the split, evaluation and generation of fine-tuned runs. */
import { Command } from 'commander';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint, readHFConfig, saveCheckpoint } from '../model/checkpoint.js';
import { writePeftAdapter, type ImportedAdapter } from '../model/peft.js';
import type { GPT2Weights } from '../model/weights.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { readJsonl, trainLabels, encodeRecords, datasetWarnings, DEFAULT_FIELDS, type DataFields, type EncodedSet, type Task } from '../io/jsonl.js';
import { classifiedLine } from '../train/predict.js';
import { parseLoraTargets } from '../model/lora.js';
import { buildSession, exportRun, mergedLlamaModel, mergedPlainModel, readAdapter } from '../train/session.js';
import { runFinetune, evaluate, latestCheckpoint, type EvalMetrics } from '../train/finetune.js';
import {
  RunSpecError, RUN_SPEC_FILE, RESUMABLE_CHANGES, parseRunSpec, resumeRunSpec, readRunSpec, writeRunSpec, checkRunSpecForModel, toFinetuneConfig, toSessionOptions, mixingOf,
  type RunSpecInput,
} from '../train/run_spec.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { progressBar } from './progress.js';
import { loadPlainModel, parseIntArg, refuseNonEmpty, isLlamaDir, copyTokenizer } from './model_args.js';
import { loadLlamaCheckpoint, saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { hasCheckpointTokenizer, loadCheckpointTokenizer } from '../model/hf_tokenizer.js';
import { addFieldOptions, addRunSpecOptions, recipeAndFlags, runSpecInputOf } from './run_spec_args.js';
import { emit } from './output.js';
import type { TrainMode, Method } from '../enclave/split_model.js';
import { BundleError, InputError } from '../errors.js';
import { recordSession } from '../attacks/record.js';
import { addRecordViewOptions, recorderOptionsOf } from './record_view_args.js';
import { addAdapterCommands } from './adapter_cmds.js';

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
  /** the adapter the run started from (--init-adapter) */
  init_adapter?: string;
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

/**
 * `--init-adapter`: the adapter's LoRA settings (and task, for a saved classifier) become the
 * spec's; a flag given that contradicts them is refused.
 */
function withInitAdapter(input: RunSpecInput, imp: ImportedAdapter, file: string): RunSpecInput {
  const l = imp.adapters.config;
  const given = (input.lora ?? {}) as Record<string, unknown>;
  const bad = (field: string, reason: string) => new RunSpecError(field, 'command line', `--init-adapter ${file}: ${reason}`);
  if (input.method !== undefined && input.method !== 'lora') throw bad('method', `a LoRA adapter starts method lora, not ${input.method}`);
  if (given.rank !== undefined && given.rank !== l.rank) throw bad('lora.rank', `the adapter has rank ${l.rank}, not ${String(given.rank)}`);
  if (given.alpha !== undefined && Math.abs(Number(given.alpha) / l.rank - l.alpha / l.rank) > 1e-6 * (l.alpha / l.rank)) throw bad('lora.alpha', `the adapter has alpha ${l.alpha} (rank ${l.rank}), not ${String(given.alpha)}`);
  if (given.targets !== undefined) {
    const t = Array.isArray(given.targets) ? given.targets.join(',') : String(given.targets);
    if (parseLoraTargets(t).join(',') !== l.targets.join(',')) throw bad('lora.targets', `the adapter adapts ${l.targets.join(',')}, not ${t}`);
  }
  if (imp.task && input.task !== undefined && input.task !== imp.task) throw bad('task', `the adapter is for task ${imp.task}, not ${input.task}`);
  return { ...input, method: 'lora', task: input.task ?? imp.task, lora: { ...given, rank: l.rank, alpha: l.alpha, targets: l.targets, dropout: (given.dropout as number | undefined) ?? l.dropout } } as RunSpecInput;
}

/** What a run writes into its directory (removed by a fresh run with --force). */
const RUN_OUTPUTS = ['checkpoints', 'final', 'merged', 'accelerator-state', 'metrics.jsonl', 'summary.json', 'config.json', RUN_SPEC_FILE];

/** The model and data files of a run: the flags, or on --resume the run's own (a different one given is refused). */
function runFiles(o: { model?: string; train?: string; eval?: string; resume?: boolean }, runDir: string): { model: string; train: string; eval: string | null } {
  if (!o.resume) {
    if (!o.model || !o.train) throw new InputError('finetune needs --model DIR and --train FILE (or --resume with the --out of a run)');
    return { model: o.model, train: o.train, eval: o.eval ?? null };
  }
  const rc = readRunConfig(runDir);
  const stored = { model: rc.model, train: rc.train ?? null, eval: rc.eval ?? null };
  const pick = (flag: string, given: string | undefined, was: string | null, what: string): string | null => {
    if (given === undefined) return was;
    if (was !== null && path.resolve(given) !== was) throw new InputError(`--resume: ${flag} ${given} is not the run's ${what} ${was} (${path.join(runDir, 'config.json')})`);
    if (was === null && flag === '--eval') throw new InputError(`--resume: the run has no evaluation set; ${flag} cannot add one`);
    return given;
  };
  const model = pick('--model', o.model, stored.model, 'model');
  const train = pick('--train', o.train, stored.train, 'training data');
  if (!model || !train) throw new InputError(`--resume: ${path.join(runDir, 'config.json')} does not name the run's model and training data; give --model and --train`);
  return { model, train, eval: pick('--eval', o.eval, stored.eval, 'evaluation set') };
}

export function addFinetuneCommands(program: Command): void {
  addRecordViewOptions(addRunSpecOptions(program
    .command('finetune')
    .description('fine-tune through the enclave/accelerator split (or locally), with checkpoints and exact resume; the settings form a run spec (docs/fine-tuning.md)')
    .option('--model <dir>', 'plain Hugging Face checkpoint, GPT-2 or Llama family (the provider\'s model; with --resume: the run\'s)')
    .option('--train <file>', 'training JSONL ({"text"}, {"prompt","completion"} or {"text","label"}; with --resume: the run\'s)')
    .option('--eval <file>', 'evaluation JSONL (with --resume: the run\'s)'), { help: { method: 'lora (adapters in the enclave), full, or local (= --mode local --method full)' } })
    .option('--naive', 'naive Gaussian masks (= --kappa naive)')
    .option('--init-adapter <dir>', 'start from a LoRA adapter: a PEFT adapter directory (its classifier too), a run\'s final/ or adapters file; the rank, alpha and targets are the adapter\'s')
    .option('--resume', `continue the run in --out from its latest checkpoint with the settings in its ${RUN_SPEC_FILE} (no flags to repeat; only ${RESUMABLE_CHANGES.map((k) => `--${k.replace(/_/g, '-')}`).join(', ')} may change)`)
    .option('--serialize', 'send every boundary message through the binary codec')
    .requiredOption('--out <dir>', 'run directory')
    .option('--force', 'start a fresh run in a non-empty --out: the previous run\'s checkpoints and outputs there are deleted')
    .option('--json', 'print the summary as JSON'))
    .action(async (o) => {
      const runDir: string = o.out;
      const recOpts = recorderOptionsOf(o);
      if (!o.resume) refuseNonEmpty(runDir, o.force, 'finetune (a fresh run; --resume continues the run there)');
      // the whole spec is validated before any work: nothing is loaded or written before this
      const { source, input } = recipeAndFlags(o, finetuneSpecInput(o));
      let given = input;
      let init: ImportedAdapter | null = null;
      if (o.initAdapter) {
        if (o.resume) throw new InputError('--init-adapter starts a fresh run; --resume continues from the run\'s checkpoint (with its adapters)');
        if (!o.model) throw new InputError('--init-adapter needs --model DIR');
        if (isLlamaDir(o.model)) throw new InputError('--init-adapter serves GPT-2 models for now; a Llama-family run starts from fresh adapters');
        init = readAdapter(o.initAdapter, readHFConfig(o.model).config);
        given = withInitAdapter(given, init, o.initAdapter);
      }
      if (o.resume && !latestCheckpoint(runDir)) throw new InputError(`--resume: no checkpoint in ${path.join(runDir, 'checkpoints')}`);
      const stored = o.resume ? readRunSpec(runDir) : null;
      if (o.resume && !stored) console.error(`note: ${runDir} has no ${RUN_SPEC_FILE} (a run of an earlier version): its settings are taken from the flags`);
      const spec = stored ? resumeRunSpec(stored, given, source, path.join(runDir, RUN_SPEC_FILE)) : parseRunSpec(given, source);
      const files = runFiles(o, runDir);
      const { task, method, mode } = spec;
      const trainRecs = readJsonl(files.train, spec);
      const evalRecs = files.eval ? readJsonl(files.eval, spec) : null;
      const labels = task === 'cls' ? trainLabels(trainRecs, evalRecs, files.train, files.eval ?? 'the evaluation set') : [];
      for (const w of datasetWarnings(trainRecs, task, labels, files.train)) console.error(`warning: ${w}`);
      const llama = isLlamaDir(files.model);
      if (!llama && spec.rotary_masks !== 'full') throw new InputError(`rotary_masks ${spec.rotary_masks} applies to Llama-family models; ${files.model} is a GPT-2 checkpoint`);
      const llamaBase = llama ? loadLlamaCheckpoint(files.model) : null;
      let base = llamaBase ?? loadCheckpoint(files.model);
      if (init?.score) {
        if (task !== 'cls' || init.numLabels !== labels.length) throw new InputError(`--init-adapter ${o.initAdapter}: its classifier has ${init.numLabels} labels, ${files.train} has ${labels.length}${task !== 'cls' ? ' (and the task is lm)' : ''}`);
        base = { ...base, cls: { numLabels: labels.length, weight: init.score, labels, pooling: 'last' } };
      }
      // a head the model brings is kept when it has as many labels (buildSession)
      const head = task === 'cls' && base.cls && base.cls.numLabels === labels.length ? base.cls.pooling ?? 'last' : null;
      checkRunSpecForModel(spec, { n_ctx: base.config.n_ctx, headPooling: head }, source);
      const tok = llama && hasCheckpointTokenizer(files.model) ? loadCheckpointTokenizer(files.model) : tokenizerFor(base.config.vocab_size);
      if (llama && recOpts) throw new InputError('--record-view serves GPT-2 models for now');
      const train = encodeRecords(trainRecs, tok, { task, maxLen: spec.max_len, labels, source: files.train });
      const evalSet = evalRecs ? encodeRecords(evalRecs, tok, { task, maxLen: spec.max_len, labels, source: files.eval! }) : null;
      // --force: what a previous run wrote goes (only now, everything checked), so nothing of it mixes with this one
      if (!o.resume && o.force) for (const f of RUN_OUTPUTS) rmSync(path.join(runDir, f), { recursive: true, force: true });
      mkdirSync(runDir, { recursive: true });
      const padId = tok.eotId;
      const session = buildSession(base, toSessionOptions(spec, {
        padTokenId: padId, numLabels: task === 'cls' ? labels.length : undefined, labels, acceleratorStateDir: path.join(runDir, 'accelerator-state'), serialize: o.serialize, llama,
      }));
      if (init) session.model.adapters!.params.set(init.adapters.params);
      const recording = recOpts ? recordSession(session, { ...recOpts, padTokenId: padId, modelPath: files.model, spec: spec.kappa ?? '1', twoSided: spec.two_sided, labels }) : null;
      const cfg = toFinetuneConfig(spec, session.modelId);
      const runCfg: RunConfig = {
        format: 'obfuscatune-run/1', model: path.resolve(files.model), task, method, mode, kappa: spec.kappa, token_mixing: mixingOf(spec), labels, max_len: spec.max_len, pad_token_id: padId,
        train: path.resolve(files.train), eval: files.eval ? path.resolve(files.eval) : null, ...(o.initAdapter ? { init_adapter: path.resolve(o.initAdapter) } : {}),
      };
      writeFileSync(path.join(runDir, 'config.json'), JSON.stringify(runCfg, null, 2) + '\n');
      writeRunSpec(runDir, spec);
      if (train.truncated || (evalSet?.truncated ?? 0)) console.error(`note: truncated ${train.truncated} training and ${evalSet?.truncated ?? 0} evaluation records to ${spec.max_len} tokens`);
      const bar = progressBar(spec.steps, `finetune ${mode}/${method}`, 'loss {loss} | {tps} tok/s');
      let toks = 0, ms = 0;
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
      if (llamaBase) {
        const m = mergedLlamaModel(session);
        saveLlamaCheckpoint(path.join(runDir, 'merged'), { ...m, cls: m.cls ? { ...m.cls, labels } : undefined, padTokenId: task === 'cls' ? padId : m.padTokenId }, { arch: llamaBase.arch });
        copyTokenizer(files.model, path.join(runDir, 'merged'));
      }
      const merged = llamaBase ? null : mergedPlainModel(session);
      if (merged && session.model.adapters) {
        writePeftAdapter(path.join(runDir, 'final', 'peft'), session.model.adapters, { task, baseModel: path.resolve(files.model), score: merged.cls?.weight });
        if (merged.cls?.pooling === 'mean') console.error('note: final/peft: this classifier pools the mean of the tokens; Hugging Face\'s GPT2ForSequenceClassification pools the last one');
      }
      if (merged) saveCheckpoint(path.join(runDir, 'merged'), { ...merged, cls: merged.cls ? { ...merged.cls, labels } : undefined, padTokenId: task === 'cls' ? padId : merged.padTokenId });
      const { losses, ...rest } = summary;
      const out = { ...rest, token_mixing: mixingOf(spec), first_loss: losses[0] ?? null, model: path.resolve(files.model), labels: task === 'cls' ? labels : undefined };
      writeFileSync(path.join(runDir, 'summary.json'), JSON.stringify(out, null, 2) + '\n');
      const e = summary.eval;
      emit(out, [
        `${mode}/${method}${spec.kappa ? ` (kappa ${spec.kappa})` : ''}${spec.token_mixing === 'on' ? ', token mixing' : ''}: ${spec.steps} steps, last training loss ${summary.train_loss_last.toFixed(4)}, ${summary.tokens_per_second.toFixed(0)} tokens/s`,
        ...(e ? [`eval: ${metricsText(e)} on ${e.examples} examples`] : []),
        `run directory ${runDir} (${RUN_SPEC_FILE}: the resolved recipe, loadable with --config; metrics.jsonl, summary.json, checkpoints/, final/${session.model.adapters ? ' with the PEFT adapter final/peft/' : ''}, merged/)`,
      ]);
    });

  addFieldOptions(program
    .command('eval')
    .description('score a model on a JSONL dataset (a merged classifier: accuracy, per-class counts, loss, with majority and uniform baselines; an LM: loss, perplexity), or a plain model on a text file')
    .option('--model <dir>', 'plain or merged checkpoint (a classifier when it has a head): with --data, or with --text')
    .option('--run <dir>', 'a fine-tuning run directory: its merged model, field names and length (with --data)')
    .option('--data <file>', 'JSONL dataset to score (the formats of finetune --train)')
    .option('--text <file>', 'UTF-8 text: perplexity of --model')
    .option('--base <dir>', 'with --data: also score this model (e.g. the one before fine-tuning) as the before-training row')
    .option('--predictions <file>', 'with --data: write one JSON line per record (classification: prediction, probabilities, label)')
    .option('--max-len <n>', 'tokens per example with --model --data (default: the run\'s, else 128, at most the context)', parseIntArg('--max-len'))
    .option('--seq <n>', 'tokens per window (--text)', parseIntArg('--seq'), 64)
    .option('--batch <n>', 'batch size', parseIntArg('--batch'), 8)
    .option('--json', 'print JSON'), 'the run\'s')
    .action(async (o) => {
      if (o.data) {
        if (!o.run === !o.model) throw new InputError('eval --data FILE needs --model DIR (a plain or merged checkpoint) or --run DIR, not both');
        const r = await evalDataset(o);
        emit(r, formatEval(r));
        return;
      }
      if (o.run) throw new InputError('eval --run needs --data FILE');
      if (!o.model || !o.text) throw new InputError('give --model DIR with --data FILE or --text FILE, or --run DIR --data FILE');
      const { evaluateLM } = await import('../train/lm.js');
      const { model, tokenizer } = loadPlainModel(o.model);
      const tok = tokenizer();
      const bar = progressBar(1, 'eval', '');
      const e = await evaluateLM(model, Int32Array.from(tok.encode(readFileSync(o.text, 'utf8'))), o.seq, o.batch, Infinity, (i, n) => bar.track(i, n));
      bar.stop();
      emit(e, `loss ${e.loss.toFixed(4)}, perplexity ${e.perplexity.toFixed(2)} over ${e.tokens} tokens`);
    });

  addAdapterCommands(program);
}

interface ClassCounts { label: string; count: number; correct: number; predicted: number }

/** Metrics of one model on encoded records, with per-class counts and (cls) each record's prediction line. */
async function scoreSet(w: GPT2Weights, set: EncodedSet, o: { task: Task; labels: string[]; padId: number; batch: number; what: string; truth?: (i: number) => string | undefined }) {
  const s = buildSession(w, { mode: 'local', method: 'full', task: o.task, numLabels: o.task === 'cls' ? o.labels.length : undefined, labels: o.labels, padTokenId: o.padId, seed: 0 });
  const K = o.labels.length;
  const perClass: ClassCounts[] = o.labels.map((label) => ({ label, count: 0, correct: 0, predicted: 0 }));
  const lines: Record<string, unknown>[] = [];
  const bar = progressBar(Math.ceil(set.items.length / o.batch), o.what);
  let done = 0;
  const e = await evaluate(s.model, set, o.batch, o.padId, 0, (items, r) => {
    bar.update(++done);
    if (o.task !== 'cls') return;
    items.forEach((x, j) => {
      const p = r.predictions![j];
      perClass[x.label].count++;
      perClass[p].predicted++;
      if (p === x.label) perClass[p].correct++;
      lines.push(classifiedLine(x.index!, o.labels[p], o.labels, r.probs!.subarray(j * K, (j + 1) * K), o.truth?.(x.index!)));
    });
  });
  bar.stop();
  return { metrics: e, perClass, lines };
}

/** `eval --data`: the model (merged run or checkpoint) on a JSONL dataset, with baselines. */
async function evalDataset(o: Record<string, string | number | undefined>) {
  const runDir = o.run as string | undefined;
  const rc = runDir ? readRunConfig(runDir) : null;
  const w = runDir ? loadRunModel(runDir) : loadCheckpoint(o.model as string);
  const task: Task = rc?.task ?? (w.cls ? 'cls' : 'lm');
  // a head's names (Hugging Face's LABEL_i when it has none: then the data's labels are class indices)
  const names = w.cls?.labels && !w.cls.labels.every((l, i) => l === `LABEL_${i}`) ? w.cls.labels : null;
  const labels = task === 'cls' ? rc?.labels ?? names ?? Array.from({ length: w.cls!.numLabels }, (_, i) => String(i)) : [];
  const given = runSpecInputOf(o) as Partial<DataFields>;
  const spec = runDir ? readRunSpec(runDir) : null;
  const fields = Object.fromEntries((Object.keys(DEFAULT_FIELDS) as (keyof DataFields)[]).map((k) => [k, given[k] ?? spec?.[k] ?? DEFAULT_FIELDS[k]])) as unknown as DataFields;
  const data = o.data as string;
  const recs = readJsonl(data, fields);
  for (const warning of datasetWarnings(recs, task, [], data)) console.error(`warning: ${warning} (the model has no classifier head)`);
  const maxLen = Math.min(w.config.n_ctx, (o.maxLen as number | undefined) ?? rc?.max_len ?? 128);
  const padId = rc?.pad_token_id ?? w.padTokenId ?? tokenizerFor(w.config.vocab_size).eotId;
  const set = encodeRecords(recs, tokenizerFor(w.config.vocab_size), { task, maxLen, labels, source: data });
  const batch = o.batch as number;
  const { metrics, perClass, lines } = await scoreSet(w, set, { task, labels, padId, batch, what: 'eval', truth: (i) => recs[i].label });
  if (o.predictions) writeFileSync(o.predictions as string, lines.map((l) => JSON.stringify(l) + '\n').join(''));
  let before: EvalMetrics | null = null;
  if (o.base) {
    const b = loadCheckpoint(o.base as string);
    if (task === 'cls' && b.cls?.numLabels !== labels.length) throw new InputError(`--base ${o.base} has no classifier of ${labels.length} labels: a before-training row of a classifier needs its head (an LM base: score an LM)`);
    before = (await scoreSet(b, set, { task, labels, padId, batch, what: 'eval --base' })).metrics;
  } else if (rc?.eval && path.resolve(data) === rc.eval && existsSync(path.join(runDir!, 'summary.json'))) {
    // the run measured its model before training on this very file
    before = (JSON.parse(readFileSync(path.join(runDir!, 'summary.json'), 'utf8')) as { eval_before?: EvalMetrics | null }).eval_before ?? null;
  }
  const res: Record<string, unknown> = { model: runDir ? path.join(runDir, 'merged') : o.model, data, task, ...metrics, truncated: set.truncated, dropped: set.dropped };
  if (task === 'cls') {
    const majority = perClass.reduce((a, c) => (c.count > a.count ? c : a));
    const n = metrics.examples;
    const prior = -perClass.reduce((a, c) => a + (c.count ? (c.count / n) * Math.log(c.count / n) : 0), 0);
    Object.assign(res, { per_class: perClass, baselines: { majority: { label: majority.label, accuracy: majority.count / n }, uniform: { loss: Math.log(labels.length) }, prior: { loss: prior } } });
  }
  res.before_training = before;
  if (o.predictions) res.predictions = o.predictions;
  return res;
}

function formatEval(r: Record<string, unknown>): string {
  const out = [`${metricsText(r as unknown as EvalMetrics)} on ${r.examples} examples${r.truncated ? ` (${r.truncated} truncated)` : ''}`];
  if (r.before_training) out.push(`before training: ${metricsText(r.before_training as EvalMetrics)}`);
  if (r.task === 'cls') {
    const b = r.baselines as { majority: { label: string; accuracy: number }; uniform: { loss: number }; prior: { loss: number } };
    out.push(`majority class "${b.majority.label}": accuracy ${(100 * b.majority.accuracy).toFixed(2)}%; uniform guess: loss ${b.uniform.loss.toFixed(4)}; label frequencies: loss ${b.prior.loss.toFixed(4)}`);
    out.push('class: examples, correct, predicted');
    for (const c of r.per_class as ClassCounts[]) out.push(`  ${c.label}: ${c.count}, ${c.correct}, ${c.predicted}`);
  }
  if (r.predictions) out.push(`predictions: ${r.predictions}`);
  return out.join('\n');
}

function metricsText(e: { loss: number; accuracy?: number; perplexity?: number }): string {
  return `loss ${e.loss.toFixed(4)}${e.accuracy !== undefined ? `, accuracy ${(100 * e.accuracy).toFixed(2)}%` : ''}${e.perplexity !== undefined ? `, perplexity ${e.perplexity.toFixed(2)}` : ''}`;
}

/** The merged plain model of a fine-tuning run. */
export function loadRunModel(runDir: string): GPT2Weights {
  readRunConfig(runDir);
  const dir = path.join(runDir, 'merged');
  if (!existsSync(dir)) throw new BundleError(`${runDir} has no merged model (was the run finished?)`);
  return loadCheckpoint(dir);
}
