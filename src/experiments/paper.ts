/**
 * `obfuscatune experiment paper`: the paper's experiments in one command. For every dataset
 * and base model: fine-tuning with identical seeds and hyper-parameters under local,
 * sealed, paper kappa 1 and paper naive (LoRA and full), evaluated on the test split;
 * plus the fidelity-vs-kappa table, the enclave-share table and the overhead table.
 * Results accumulate in report/results.json (resumable: finished rows are skipped) and
 * report/index.html is rebuilt at the end.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint } from '../model/checkpoint.js';
import type { GPT2Weights } from '../model/weights.js';
import { Llama, type LlamaWeights } from '../model/llama.js';
import { checkpointModelType, isLlamaArch, loadLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { GPT2 } from '../model/gpt2.js';
import { gpt2Tokenizer } from '../model/tokenizer.js';
import { readJsonl, labelSet, encodeRecords, type Record_, type Task } from '../io/jsonl.js';
import { buildSession } from '../train/session.js';
import { runFinetune, evaluate } from '../train/finetune.js';
import {
  RUN_SPEC_DEFAULTS, canonical, mergeRunSpecInputs, parseRunSpec, toFinetuneConfig, toSessionOptions, writeRunSpec, type RunSpec, type RunSpecInput,
} from '../train/run_spec.js';
import { runFidelity, type FidelityRow } from './fidelity.js';
import { parseMaskSpec } from '../linalg/masks.js';
import { shareTable, type ShareRow } from '../obfuscate/share.js';
import { benchFinetuneOne } from '../bench/finetune.js';
import { corpusFromJsonl, unigramLoss } from '../train/pretrain.js';
import type { TrainMode, Method } from '../enclave/split_model.js';
import { renderSvg, panelLineSpec, groupedBarSpec, ordinalPointSpec, curveGap } from '../report/charts.js';
import { page, table } from '../report/html.js';
import { InputError, IntegrityError, ObfuscatuneError, findCause } from '../errors.js';

export interface ResultRow extends Pick<RunSpec, 'method' | 'mode' | 'kappa' | 'steps'> {
  dataset: string;
  model: string;
  metric: 'accuracy' | 'perplexity';
  value: number;
  loss: number;
  seconds: number;
  losses: number[];
  /** why a run produced no metric (divergence) */
  error?: string;
  /** the dataset's departures from the common recipe, if any */
  recipe?: Partial<Recipe>;
  /** the run's settings (absent in rows of earlier versions) */
  spec?: RunSpec;
}

export interface Results {
  rows: ResultRow[];
  fidelity: (FidelityRow & { model: string; mode: string })[];
  share: ShareRow[];
  overhead: Record<string, unknown>[];
  baselines: { dataset: string; metric: string; value: number; kind: string }[];
  /** the test metric of each dataset and model before any step (the fresh head; every mode and method starts from the same function) */
  before?: { dataset: string; model: string; metric: 'accuracy' | 'perplexity'; value: number; loss: number }[];
  meta: Record<string, unknown>;
}

export interface ExperimentOptions {
  models: string[];
  datasets: string[];
  dataDir: string;
  out: string;
  quick: boolean;
  /** fine-tuning steps per run (default: 100 of 16 examples for classification, 25 of 8 x 128 tokens for the language model) */
  steps?: number;
  methods?: Method[];
  /** fine-tuning rows only (for runs split across processes); a later full run adds the tables and the report */
  rowsOnly?: boolean;
  /** per-dataset departures from the common recipe (default DATASET_RECIPES) */
  recipes?: Record<string, Partial<Recipe>>;
  onProgress?: (done: number, total: number, label: string) => void;
  log?: (s: string) => void;
}

/**
 * What a dataset's runs do beyond mode and method (identical across modes): a partial RunSpec
 * per method, merged over the runner's settings (steps, batch, max_len, warm-up: runSettings)
 * and the RunSpec defaults.
 */
export type Recipe = Record<Method, RunSpecInput>;

/**
 * LoRA: AdamW (eps 1e-6). Full fine-tuning: SGD for the enclave's tensors too (the
 * accelerator's linears always use SGD-momentum), and every mode starts from the
 * layer-norm-folded (same-function) model with frozen norms, which sealed mode implies;
 * with SGD all modes then take the same steps.
 */
export const COMMON_RECIPE: Recipe = {
  lora: { lr: 1.5e-3, adam_eps: 1e-6 },
  full: { lr: 0.01, adam_eps: 1e-6, enclave_optimizer: 'sgd', freeze_norms: true },
};

/**
 * Per-dataset departures from the common recipe, with the reason. food-reviews: the frozen
 * base models' features hardly separate its classes (a logistic-regression probe of the
 * mean-pooled final states, scripts/feature_probe.mjs, reaches 63-68% against a 65.8%
 * majority class), so both methods must train the token embedding: LoRA adds an adapter on
 * wte, full fine-tuning trains the enclave's tensors with AdamW (SGD barely moves the
 * embedding rows); a mean-pooled head and a rate of 3e-3 for both (docs/results.md).
 */
export const DATASET_RECIPES: Record<string, Partial<Recipe>> = {
  'food-reviews': {
    lora: { pooling: 'mean', lora: { targets: ['wte', 'q', 'v'] }, lr: 3e-3 },
    full: { pooling: 'mean', lr: 3e-3, enclave_optimizer: 'adamw' },
  },
};

/** A row's recipe as stored by an earlier version ({pooling, loraTargets, lr: {lora, full}, fullEnclaveOptimizer}), in today's shape. */
function rowRecipe(r: ResultRow): Partial<Recipe> | undefined {
  const x = r.recipe as Record<string, unknown> | undefined;
  if (!x || !('loraTargets' in x || 'fullEnclaveOptimizer' in x || ('lr' in x && typeof x.lr === 'object'))) return r.recipe;
  const lr = (x.lr ?? {}) as Partial<Record<Method, number>>;
  const lora: Record<string, unknown> = {}, full: Record<string, unknown> = {};
  if (x.pooling !== undefined) lora.pooling = full.pooling = x.pooling;
  if (x.loraTargets !== undefined) lora.lora = { targets: x.loraTargets };
  if (lr.lora !== undefined) lora.lr = lr.lora;
  if (lr.full !== undefined) full.lr = lr.full;
  if (x.fullEnclaveOptimizer !== undefined) full.enclave_optimizer = x.fullEnclaveOptimizer;
  return { lora, full } as Partial<Recipe>;
}

const CONFIGS: { mode: TrainMode; kappa: string | null }[] = [
  { mode: 'local', kappa: null },
  { mode: 'sealed', kappa: '1' },
  { mode: 'paper', kappa: '1' },
  { mode: 'paper', kappa: 'naive' },
];

interface DatasetMeta {
  name: string;
  task: Task;
  labels?: string[];
}

function loadDataset(dir: string, name: string, quick: boolean): { meta: DatasetMeta; train: Record_[]; test: Record_[] } {
  const d = path.join(dir, name);
  const mf = path.join(d, 'meta.json');
  if (!existsSync(mf)) throw new Error(`dataset ${name}: ${mf} not found`);
  let meta: DatasetMeta;
  try {
    meta = JSON.parse(readFileSync(mf, 'utf8')) as DatasetMeta;
  } catch (e) {
    throw new Error(`dataset ${name}: ${mf} is not valid JSON (${(e as Error).message})`);
  }
  if (meta.task !== 'cls' && meta.task !== 'lm') throw new Error(`dataset ${name}: unknown task "${meta.task}"`);
  let train = readJsonl(path.join(d, 'train.jsonl'));
  let test = readJsonl(path.join(d, 'test.jsonl'));
  if (meta.task === 'cls') {
    const a = labelSet(train, `${name}/train.jsonl`), b = labelSet(test, `${name}/test.jsonl`);
    if (a.join('\u0000') !== b.join('\u0000')) throw new Error(`dataset ${name}: the label sets of train and test differ`);
  }
  if (quick) {
    train = train.slice(0, 96);
    // a quick test set holds only labels the quick training set has (the head has no others)
    const seen = new Set(train.map((r) => r.label));
    test = (meta.task === 'cls' ? test.filter((r) => seen.has(r.label)) : test).slice(0, 48);
  }
  return { meta, train, test };
}

/** Test accuracy of always answering the most common training label. */
export function majorityAccuracy(train: Record_[], test: Record_[]): number {
  const counts = new Map<string, number>();
  for (const r of train) counts.set(r.label!, (counts.get(r.label!) ?? 0) + 1);
  const top = [...counts].sort((a, b) => b[1] - a[1])[0][0];
  return test.filter((r) => r.label === top).length / test.length;
}

export function loadResults(file: string): Results {
  if (!existsSync(file)) return { rows: [], fidelity: [], share: [], overhead: [], baselines: [], before: [], meta: {} };
  return JSON.parse(readFileSync(file, 'utf8')) as Results;
}

const rowKey = (r: Pick<ResultRow, 'dataset' | 'model' | 'method' | 'mode' | 'kappa'>) => `${r.dataset}/${r.model}/${r.method}/${r.mode}/${r.kappa}`;

/**
 * Writes results atomically, keeping rows that another run (e.g. one per model, started
 * side by side on the same --out) added to the file since this one read it.
 */
function save(file: string, r: Results): void {
  const mine = new Set(r.rows.map(rowKey));
  for (const row of loadResults(file).rows) if (!mine.has(rowKey(row))) r.rows.push(row);
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(r, null, 1) + '\n');
  renameSync(tmp, file);
}

/**
 * Whether a run failed because training diverged: an integrity failure (an IntegrityError
 * in the cause chain) or non-finite values; any other typed error is a real failure. The
 * training loop (src/train/finetune.ts) still reports a failed step as an untyped Error
 * without its cause, so for an untyped error its text is read as a stopgap, until that
 * loop passes the cause on.
 */
function diverged(e: unknown): boolean {
  if (findCause(e, IntegrityError)) return true;
  if (e instanceof ObfuscatuneError) return false;
  return /non-finite|NaN|Infinity|integrity check failed/.test((e as Error)?.message ?? '');
}

/** The runner's settings of a dataset's runs (before the recipe): steps, batch, tokens per example, warm-up. */
function runSettings(task: Task, o: Pick<ExperimentOptions, 'quick' | 'steps'>, nCtx = Infinity): RunSpecInput {
  const steps = o.steps ?? (o.quick ? 6 : task === 'cls' ? 100 : 25);
  const maxLen = o.quick ? 16 : task === 'cls' ? 64 : 128;
  return { task, steps, batch: o.quick || task === 'lm' ? 8 : 16, max_len: Math.min(maxLen, nCtx), warmup: Math.max(1, Math.floor(steps / 20)), checkpoint_every: 0 };
}

/** The run spec of one row: the runner's settings, the common recipe, the dataset's own, then method, mode and masks. */
export function experimentSpec(task: Task, dataset: string, method: Method, c: { mode: TrainMode; kappa: string | null }, o: Pick<ExperimentOptions, 'quick' | 'steps' | 'recipes'>, model?: { name: string; nCtx: number }): RunSpec {
  const own = (o.recipes ?? DATASET_RECIPES)[dataset];
  const input = mergeRunSpecInputs(runSettings(task, o, model?.nCtx), COMMON_RECIPE[method], own?.[method], { method, mode: c.mode, kappa: c.kappa });
  return parseRunSpec(input, `experiment recipe of ${[dataset, model?.name, method, c.mode, c.kappa].filter((x) => x != null).join('/')}`);
}

export async function runPaperExperiments(o: ExperimentOptions): Promise<Results> {
  const log = o.log ?? (() => {});
  const methods = o.methods ?? ['lora', 'full'];
  const recipes = o.recipes ?? DATASET_RECIPES;
  const datasets = o.datasets.map((d) => loadDataset(o.dataDir, d, o.quick)); // all checked before any training
  // every row's run spec is validated before any work (no model loaded, nothing written)
  for (const ds of datasets) for (const method of methods) for (const c of CONFIGS) experimentSpec(ds.meta.task, ds.meta.name, method, c, o);
  const stepsFor = (task: Task) => runSettings(task, o).steps as number;
  const models = o.models.map((m) => {
    // either family; the rows tokenise with GPT-2's BPE (the bundled llama-small's tokenizer.json is that BPE)
    const w: GPT2Weights | LlamaWeights = isLlamaArch(checkpointModelType(m)) ? loadLlamaCheckpoint(m) : loadCheckpoint(m);
    if (w.config.vocab_size < gpt2Tokenizer.vocabSize) throw new Error(`model ${m}: its vocabulary (${w.config.vocab_size}) does not match the GPT-2 tokenizer (${gpt2Tokenizer.vocabSize})`);
    return { name: path.basename(path.resolve(m)), w };
  });
  mkdirSync(o.out, { recursive: true });
  const file = path.join(o.out, 'results.json');
  const res = loadResults(file);
  const total = datasets.length * models.length * (methods.length * CONFIGS.length + 1) + 3;
  let done = 0;
  const tick = (label: string) => o.onProgress?.(++done, total, label);
  // baselines
  res.baselines = datasets.map((ds) => {
    if (ds.meta.task === 'cls') return { dataset: ds.meta.name, metric: 'accuracy', value: majorityAccuracy(ds.train, ds.test), kind: 'majority class' };
    const tr = corpusFromJsonl([path.join(o.dataDir, ds.meta.name, 'train.jsonl')], gpt2Tokenizer).stream;
    const te = Int32Array.from(ds.test.flatMap((r) => [...gpt2Tokenizer.encode(r.text ?? ''), gpt2Tokenizer.eotId]));
    return { dataset: ds.meta.name, metric: 'perplexity', value: Math.exp(unigramLoss(tr, te, gpt2Tokenizer.vocabSize)), kind: 'unigram' };
  });
  for (const ds of datasets) {
    const task = ds.meta.task;
    const labels = task === 'cls' ? labelSet(ds.train, ds.meta.name) : [];
    const special = recipes[ds.meta.name];
    const metric = task === 'cls' ? 'accuracy' as const : 'perplexity' as const;
    const ctx = { numLabels: task === 'cls' ? labels.length : undefined, labels, padTokenId: gpt2Tokenizer.eotId };
    for (const m of models) {
      const maxLen = runSettings(task, o, m.w.config.n_ctx).max_len as number;
      const enc = (r: Record_[]) => encodeRecords(r, gpt2Tokenizer, { task, maxLen, labels, source: ds.meta.name });
      const trainSet = enc(ds.train), testSet = enc(ds.test);
      res.before ??= [];
      if (res.before.some((b) => b.dataset === ds.meta.name && b.model === m.name)) tick(`${ds.meta.name}/${m.name} before training (done)`);
      else {
        // the base model with the fresh head, scored as the rows are (local mode: the same function as every other)
        const spec = experimentSpec(task, ds.meta.name, methods[0], CONFIGS[0], o, { name: m.name, nCtx: m.w.config.n_ctx });
        const sess = buildSession(m.w, toSessionOptions(spec, ctx));
        const e = await evaluate(sess.model, testSet, spec.batch, gpt2Tokenizer.eotId, spec.eval_batches);
        res.before.push({ dataset: ds.meta.name, model: m.name, metric, value: e[metric]!, loss: e.loss });
        save(file, res);
        tick(`${ds.meta.name}/${m.name} before training`);
      }
      for (const method of methods) {
        for (const c of CONFIGS) {
          const key = `${ds.meta.name}/${m.name}/${method}/${c.mode}/${c.kappa}`;
          const prev = res.rows.findIndex((r) => rowKey(r) === key);
          if (prev >= 0) {
            if (canonical(rowRecipe(res.rows[prev])) === canonical(special)) {
              tick(`${key} (done)`);
              continue;
            }
            // a row made with another recipe is run again (and replaced)
            log(`${key}: the stored row used another recipe; running it again`);
            res.rows.splice(prev, 1);
          }
          const spec = experimentSpec(task, ds.meta.name, method, c, o, { name: m.name, nCtx: m.w.config.n_ctx });
          const runDir = path.join(o.out, 'runs', key.replace(/\//g, '_'));
          const t0 = performance.now();
          const sess = buildSession(m.w, toSessionOptions(spec, { ...ctx, acceleratorStateDir: path.join(runDir, 'accelerator-state') }));
          let out: Pick<ResultRow, 'value' | 'loss' | 'losses' | 'error'>;
          try {
            mkdirSync(runDir, { recursive: true });
            writeRunSpec(runDir, spec);
            const s = await runFinetune(sess.model, trainSet, testSet, toFinetuneConfig(spec, sess.modelId), runDir, gpt2Tokenizer.eotId, { rng: sess.rng });
            out = { value: s.eval![metric]!, loss: s.eval!.loss, losses: s.losses };
          } catch (e) {
            // naive masks can make training diverge (non-finite values, or replies that no
            // longer pass the integrity tolerance): that is a result, reported as such
            if (!diverged(e)) throw e;
            out = { value: NaN, loss: NaN, losses: [], error: (e as Error).message };
            log(`${key}: ${out.error}`);
          }
          res.rows.push({
            dataset: ds.meta.name, model: m.name, method, mode: c.mode, kappa: c.kappa, metric, steps: spec.steps, ...out,
            seconds: (performance.now() - t0) / 1000, ...(special ? { recipe: special } : {}), spec,
          });
          save(file, res);
          tick(key);
        }
      }
    }
  }
  if (o.rowsOnly) return res;
  // fidelity vs kappa (paper mode) and the sealed row, on the first model
  const fm = models[0];
  res.fidelity = [];
  for (const mode of ['paper', 'sealed'] as const) {
    const f = await runFidelity('family' in fm.w.config ? new Llama(fm.w as LlamaWeights) : new GPT2(fm.w as GPT2Weights), fm.name, { mode, specs: ['1', '10', '100', '1000', 'naive'].map(parseMaskSpec), tokens: o.quick ? 16 : 128, seed: 1 });
    for (const r of f.rows) res.fidelity.push({ ...r, model: fm.name, mode });
  }
  tick('fidelity');
  res.share = shareTable(512);
  tick('share');
  res.overhead = [];
  for (const mode of ['local', 'sealed', 'paper'] as const) {
    const r = await benchFinetuneOne({ model: o.quick ? 'gpt2-micro' : 'gpt2', method: 'lora', mode, batch: 4, seq: o.quick ? 8 : 64, steps: o.quick ? 1 : 3, rank: 8, transport: 'in-process' });
    res.overhead.push({ model: o.quick ? 'gpt2-micro' : 'gpt2', ...r });
  }
  tick('overhead');
  res.meta = { date: new Date().toISOString(), quick: o.quick, steps: { cls: stepsFor('cls'), lm: stepsFor('lm') }, models: o.models, datasets: o.datasets, command: 'obfuscatune ' + process.argv.slice(2).join(' ') };
  save(file, res);
  await writeReport(o.out, res);
  return res;
}

/** Writes OUT/index.html and OUT/results.md from results (`experiment paper --report-only` rebuilds them from OUT/results.json). */
export async function writeReport(out: string, res: Results): Promise<void> {
  writeFileSync(path.join(out, 'index.html'), await renderReport(res));
  writeFileSync(path.join(out, 'results.md'), markdownReport(res));
}

/** `experiment paper --report-only`: the report of OUT/results.json, without any run; returns that file. */
export async function rebuildReport(out: string): Promise<string> {
  const file = path.join(out, 'results.json');
  if (!existsSync(file)) throw new InputError(`--report-only: ${file} not found (run experiment paper first)`);
  await writeReport(out, loadResults(file));
  return file;
}

/** The rows by a key, in the order each key first appears. */
function groupBy<T>(xs: T[], key: (x: T) => string): Map<string, T[]> {
  const m = new Map<string, T[]>();
  for (const x of xs) m.set(key(x), [...(m.get(key(x)) ?? []), x]);
  return m;
}

/** The rows of each dataset, model and method. */
const runGroups = (res: Results) => groupBy(res.rows, (r) => `${r.dataset}|${r.model}|${r.method}`);

export function mainTable(res: Results): { head: string[]; rows: string[][] } {
  const head = ['dataset', 'model', 'method', 'metric', 'before training', 'local', 'sealed', 'paper k=1', 'paper naive', 'baseline'];
  const fmt = (r: Pick<ResultRow, 'value' | 'metric'> | undefined) => (!r || !Number.isFinite(r.value) ? (r ? 'diverged' : '-') : r.metric === 'accuracy' ? `${(100 * r.value).toFixed(2)}%` : r.value.toFixed(2));
  const rows: string[][] = [];
  for (const [k, rs] of runGroups(res)) {
    const [dataset, model, method] = k.split('|');
    const pick = (mode: string, kappa: string | null) => rs.find((r) => r.mode === mode && r.kappa === kappa);
    const b = res.baselines.find((x) => x.dataset === dataset);
    rows.push([dataset, model, method, rs[0].metric, fmt(res.before?.find((x) => x.dataset === dataset && x.model === model)), fmt(pick('local', null)), fmt(pick('sealed', '1')), fmt(pick('paper', '1')), fmt(pick('paper', 'naive')),
      b ? (b.metric === 'accuracy' ? `${(100 * b.value).toFixed(2)}% (${b.kind})` : `${b.value.toFixed(1)} (${b.kind})`) : '-']);
  }
  return { head, rows };
}

/** Difference to local per group: accuracy in points, perplexity in percent (the targets' units). */
export function gapTable(res: Results): { head: string[]; rows: string[][] } {
  const head = ['dataset', 'model', 'method', 'unit', 'sealed - local', 'paper k=1 - local', 'paper naive - local'];
  const rows: string[][] = [];
  for (const [k, rs] of runGroups(res)) {
    const [dataset, model, method] = k.split('|');
    const local = rs.find((r) => r.mode === 'local');
    if (!local || !Number.isFinite(local.value)) continue;
    const acc = local.metric === 'accuracy';
    const gap = (mode: string, kappa: string) => {
      const r = rs.find((x) => x.mode === mode && x.kappa === kappa);
      if (!r) return '-';
      if (!Number.isFinite(r.value)) return 'diverged';
      const v = acc ? 100 * (r.value - local.value) : (100 * (r.value - local.value)) / local.value;
      return `${v >= 0 ? '+' : ''}${v.toFixed(2)}`;
    };
    rows.push([dataset, model, method, acc ? 'accuracy points' : 'perplexity %', gap('sealed', '1'), gap('paper', '1'), gap('paper', 'naive')]);
  }
  return { head, rows };
}

/** The recipes each dataset's rows ran with (the common one unless a row records departures). */
export function recipeTable(res: Results): { head: string[]; rows: string[][] } {
  const seen = new Map<string, Partial<Recipe> | undefined>();
  for (const r of res.rows) {
    const own = rowRecipe(r);
    seen.set(`${r.dataset}\u0000${canonical(own)}`, own);
  }
  const D = RUN_SPEC_DEFAULTS;
  return {
    head: ['dataset', 'pooling', 'LoRA targets', 'LoRA lr', 'full: lr', 'full: enclave optimiser'],
    rows: [...seen].map(([k, own]) => {
      const lora = mergeRunSpecInputs(COMMON_RECIPE.lora, own?.lora), full = mergeRunSpecInputs(COMMON_RECIPE.full, own?.full);
      const targets = lora.lora?.targets ?? D.lora.targets;
      return [
        k.split('\u0000')[0] + (own ? ' (own recipe)' : ''), String(lora.pooling ?? 'last'), Array.isArray(targets) ? targets.join(',') : String(targets),
        String(lora.lr ?? D.lr), String(full.lr ?? D.lr), String(full.enclave_optimizer ?? D.enclave_optimizer),
      ];
    }),
  };
}

/** The report's tables (HTML and Markdown render the same ones). */
export function reportTables(res: Results): Record<keyof typeof TITLES, { head: string[]; rows: string[][] }> {
  return {
    main: mainTable(res),
    gap: gapTable(res),
    recipes: recipeTable(res),
    fidelity: {
      head: ['model', 'mode', 'kappa', 'max |err|', 'mean |err|', 'top-1 agreement'],
      rows: res.fidelity.map((f) => [f.model, f.mode, f.kappa, f.max_abs_logit_err.toExponential(2), f.mean_abs_logit_err.toExponential(2), `${(100 * f.top1_agreement).toFixed(1)}%`]),
    },
    share: {
      head: ['model', 'mode', 'enclave params', 'enclave FLOPs', 'enclave state', 'boundary / token'],
      rows: res.share.map((s) => [s.model, s.mode + (s.two_sided ? ' 2-sided' : ''), `${(100 * s.enclave_param_share).toFixed(2)}%`, `${(100 * s.enclave_flop_share).toFixed(2)}%`, `${(s.enclave_state_bytes / 1e6).toFixed(1)} MB`, `${(s.boundary_bytes_per_token / 1024).toFixed(0)} KiB`]),
    },
    overhead: {
      head: ['model', 'mode', 'step ms', 'integrity share', 'peak RSS MB'],
      rows: res.overhead.map((r) => [String(r.model), String(r.mode), Number(r.step_ms_median).toFixed(0), `${(100 * Number(r.integrity_share)).toFixed(1)}%`, String(r.peak_rss_mb)]),
    },
  };
}

const TITLES = {
  main: 'Test metric: local vs confidential fine-tuning',
  gap: 'Gap to local fine-tuning',
  recipes: 'Recipe per dataset (identical across modes; full fine-tuning: SGD-momentum 0.9 on the linears)',
  fidelity: 'Fidelity vs mask condition number',
  share: 'Enclave share (T = 512)',
  overhead: 'Overhead (LoRA step time)',
} as const;

/** The same tables as Markdown (report/results.md). */
export function markdownReport(res: Results): string {
  const t = reportTables(res);
  const md = (x: { head: string[]; rows: string[][] }) => [x.head, x.head.map(() => '---'), ...x.rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
  const parts = [`# ${String(res.meta.command ?? 'obfuscatune experiment paper')}`, '', `Generated ${String(res.meta.date ?? '')}.`];
  for (const k of Object.keys(TITLES) as (keyof typeof TITLES)[]) parts.push('', `## ${TITLES[k]}`, '', md(t[k]));
  return parts.join('\n') + '\n';
}

const MODE_LABELS = ['local', 'sealed', 'paper k=1', 'paper naive'];
const modeLabel = (r: Pick<ResultRow, 'mode' | 'kappa'>) => (r.mode === 'paper' ? `paper ${r.kappa === 'naive' ? 'naive' : `k=${r.kappa}`}` : r.mode);

/** Per panel of a method's loss chart: how far each confidential curve is from local's (coinciding ones named together). */
function lossNotes(rows: ResultRow[]): Record<string, string> {
  const notes: Record<string, string> = {};
  for (const [k, rs] of groupBy(rows, (r) => `${r.dataset} · ${r.model}`)) {
    const local = rs.find((r) => r.mode === 'local');
    if (!local) continue;
    const same: [string, number][] = [], apart: [string, number][] = [];
    for (const r of rs) {
      if (r === local) continue;
      const g = curveGap(r.losses, local.losses);
      (g.coincide ? same : apart).push([modeLabel(r), g.diff]);
    }
    const lines = same.length ? [`${same.map((x) => x[0]).join(', ')} coincide with local: max |diff| ${Math.max(...same.map((x) => x[1])).toExponential(1)}`] : [];
    for (const [m, d] of apart) lines.push(`${m}: max |diff| to local ${d.toPrecision(2)}`);
    notes[k] = lines.join('\n');
  }
  return notes;
}

export async function renderReport(res: Results): Promise<string> {
  const t = reportTables(res);
  const lossCharts: { title: string; html: string }[] = [];
  for (const method of ['lora', 'full'] as const) {
    const rows = res.rows.filter((r) => r.method === method && r.losses.length);
    if (!rows.length) continue;
    const curves = rows.flatMap((r) => r.losses.map((y, i) => ({ panel: `${r.dataset} · ${r.model}`, x: i + 1, y, series: modeLabel(r) })));
    lossCharts.push({
      title: `Training loss (${method === 'lora' ? 'LoRA' : 'full fine-tuning'}), local vs confidential`,
      html: await renderSvg(panelLineSpec(curves, { title: 'training loss per step (cross-entropy; one panel per dataset and model, own y scale)', x: 'step', y: 'loss', series: MODE_LABELS, notes: lossNotes(rows) })),
    });
  }
  const accRows = res.rows.filter((r) => r.metric === 'accuracy' && Number.isFinite(r.value));
  const acc = accRows.map((r) => ({ panel: `${r.dataset} (${r.method})`, x: r.model, bar: modeLabel(r), value: 100 * r.value }));
  const refs = [...new Set(acc.map((a) => a.panel))].flatMap((panel) => res.baselines.filter((b) => b.metric === 'accuracy' && panel.startsWith(`${b.dataset} (`)).map((b) => ({ panel, value: 100 * b.value, label: `- - ${b.kind} ${(100 * b.value).toFixed(1)}%` })));
  const fid = res.fidelity.map((f) => ({ x: f.kappa, y: Math.max(f.max_abs_logit_err, 1e-9), series: `${f.mode} mode` }));
  const tableOf = (k: keyof typeof TITLES) => ({ title: TITLES[k], html: table(t[k].head, t[k].rows) });
  const sections = [
    tableOf('main'), tableOf('gap'), tableOf('recipes'),
    ...lossCharts,
    ...(acc.length ? [{ title: 'Accuracy per dataset and method', html: await renderSvg(groupedBarSpec(acc, { title: 'test accuracy (%) per base model, one bar per mode', y: 'accuracy %', bars: MODE_LABELS, max: 100, refs })) }] : []),
    { title: TITLES.fidelity, html: (fid.length ? await renderSvg(ordinalPointSpec(fid, { title: `split vs plain logits, ${res.fidelity[0].model}`, x: 'mask condition number (kappa)', y: 'max |logit error|', order: ['1', '10', '100', '1000', 'naive'], logY: true })) : '') + table(t.fidelity.head, t.fidelity.rows) },
    tableOf('share'), tableOf('overhead'),
  ];
  return page('obfuscatune: the paper\'s experiments', sections, `Generated ${String(res.meta.date ?? '')} by: ${String(res.meta.command ?? '')}`);
}
