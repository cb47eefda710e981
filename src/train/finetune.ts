/**
 * The fine-tuning loop shared by every mode: seeded shuffling, padded batches, warmup +
 * cosine schedule, global-norm clipping across both sides, periodic evaluation, metrics as
 * JSONL, checkpoints of both sides and exact resume.
 *
 * Global norm: the enclave adds the squared norms of its own gradients (adapters, embeddings,
 * head, norms) and the accelerator's report of its weight gradients (full method). For
 * orthogonal masks (kappa 1, sealed) the accelerator's norm equals the plain one, so the
 * clipping decision is exactly that of local training; for kappa > 1 it is not.
 */
import { appendFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import { Rng } from '../tensor/rng.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { AdamW, SGD, cosineSchedule, sumSquares, clipScale, type Optimizer, type OptimizerState } from './optim.js';
import { makeBatch, Sampler, type Encoded, type EncodedSet } from '../io/jsonl.js';
import type { SplitModel, ForwardResult } from '../enclave/split_model.js';
import type { RunSpec } from './run_spec.js';

/**
 * The loop's settings: those of the run's RunSpec (run_spec.ts has the defaults) and a
 * fingerprint of the base model, to refuse resuming onto another model.
 */
export type FinetuneConfig = Pick<RunSpec, 'task' | 'method' | 'mode' | 'kappa' | 'steps' | 'batch' | 'lr' | 'warmup' | 'min_lr_frac'
  | 'clip' | 'weight_decay' | 'enclave_optimizer' | 'momentum' | 'adam_eps' | 'seed' | 'eval_every' | 'eval_batches' | 'checkpoint_every'>
  & { modelId: string };

export interface StepMetrics {
  step: number;
  loss: number;
  lr: number;
  grad_norm: number;
  tokens: number;
  ms: number;
}

export interface EvalMetrics {
  loss: number;
  perplexity?: number;
  accuracy?: number;
  examples: number;
}

export interface FinetuneSummary extends Pick<RunSpec, 'task' | 'method' | 'mode' | 'kappa' | 'steps'> {
  eval: EvalMetrics | null;
  eval_before: EvalMetrics | null;
  train_loss_last: number;
  losses: number[];
  truncated: { train: number; eval: number };
  seconds: number;
  tokens_per_second: number;
  resumed_from: number | null;
}

export interface RunHooks {
  onStep?: (m: StepMetrics) => void;
  onEval?: (step: number, m: EvalMetrics) => void;
  /** after a checkpoint directory is complete (e.g. to seal it to persistent storage) */
  onCheckpoint?: (name: string, dir: string, step: number) => Promise<void>;
}

function makeOpt(n: number, cfg: FinetuneConfig): Optimizer {
  return cfg.enclave_optimizer === 'adamw' ? new AdamW(n, { weightDecay: cfg.weight_decay, eps: cfg.adam_eps }) : new SGD(n, { momentum: cfg.momentum, weightDecay: cfg.weight_decay });
}

/** The metrics of a model on a set; `onBatch` sees each batch's examples and forward result (per-example detail), and the batches done of the total. */
export async function evaluate(model: SplitModel, set: EncodedSet, batch: number, padId: number, maxBatches = 0, onBatch?: (items: Encoded[], r: ForwardResult, done: number, total: number) => void): Promise<EvalMetrics> {
  const all = Math.ceil(set.items.length / batch);
  const total = maxBatches > 0 ? Math.min(maxBatches, all) : all;
  let lossSum = 0;
  let count = 0;
  let correct = 0;
  let examples = 0;
  for (let n = 0; n < total; n++) {
    const items = set.items.slice(n * batch, (n + 1) * batch);
    const b = makeBatch(items, model.task, padId);
    const r = await model.forward(b.tokens, b.B, b.T, b.targets, false);
    lossSum += r.loss * r.count;
    count += r.count;
    correct += r.correct ?? 0;
    examples += b.B;
    onBatch?.(items, r, n + 1, total);
  }
  const loss = count > 0 ? lossSum / count : NaN;
  return model.task === 'lm' ? { loss, perplexity: Math.exp(loss), examples } : { loss, accuracy: correct / Math.max(1, examples), examples };
}

interface CheckpointState extends Pick<RunSpec, 'mode' | 'method' | 'task' | 'kappa'> {
  format: string;
  step: number;
  sampler: { epoch: number; pos: number };
  rng: number[];
  model_id: string;
  accelerator_digest: string | null;
  optimizers: Record<string, { kind: string; step: number }>;
  losses: number[];
  /** LoRA rank, alpha and targets (checked on resume; absent in older checkpoints) */
  lora?: string;
}

// /2: sealed full fine-tuning keeps its embeddings and final bias in the plain basis (/1:
// rotated); other runs' checkpoints are the same in both
const CKPT_FORMAT = 'obfuscatune-run-checkpoint/2';
const CKPT_FORMAT_V1 = 'obfuscatune-run-checkpoint/1';

/** what the adapters' layout depends on, as written in a checkpoint */
function loraKey(model: SplitModel): string | undefined {
  const c = model.adapters?.config;
  return c ? `rank ${c.rank}, alpha ${c.alpha}, targets ${c.targets.join(',')}` : undefined;
}

/** Latest complete checkpoint of a run directory, or null. */
export function latestCheckpoint(runDir: string): string | null {
  const dir = path.join(runDir, 'checkpoints');
  if (!existsSync(dir)) return null;
  const names = readdirSync(dir).filter((n) => /^step-\d{7}$/.test(n) && existsSync(path.join(dir, n, 'state.json'))).sort();
  return names.length ? path.join(dir, names[names.length - 1]) : null;
}

export async function runFinetune(model: SplitModel, train: EncodedSet, evalSet: EncodedSet | null, cfg: FinetuneConfig, runDir: string, padId: number, opts: RunHooks & { resume?: boolean; rng: Rng }): Promise<FinetuneSummary> {
  mkdirSync(path.join(runDir, 'checkpoints'), { recursive: true });
  const metricsFile = path.join(runDir, 'metrics.jsonl');
  // what the enclave trains, each part with its optimiser: its own tensors, and the adapters
  const part = (key: string, x: { params: Float32Array; grads: Float32Array }) => ({ key, p: x.params, g: x.grads, opt: makeOpt(x.params.length, cfg) });
  const parts = [part('enclave', model), ...(model.adapters ? [part('adapters', model.adapters)] : [])];
  let sampler = new Sampler(train.items.length, cfg.seed);
  let startStep = 0;
  let losses: number[] = [];

  if (opts.resume) {
    const ck = latestCheckpoint(runDir);
    if (!ck) throw new Error(`--resume: no checkpoint in ${path.join(runDir, 'checkpoints')}`);
    const st = JSON.parse(readFileSync(path.join(ck, 'state.json'), 'utf8')) as CheckpointState;
    if (st.format === CKPT_FORMAT_V1 && st.mode === 'sealed' && st.method === 'full') {
      throw new Error(`cannot resume: the checkpoint in ${ck} holds sealed full fine-tuning's embeddings in the rotated basis of an earlier version (this one trains them in the plain basis); start the run again`);
    }
    if (st.format !== CKPT_FORMAT && st.format !== CKPT_FORMAT_V1) throw new Error(`${ck}: not a run checkpoint`);
    if (st.lora !== undefined && st.lora !== loraKey(model)) throw new Error(`cannot resume: the checkpoint in ${ck} was made with LoRA ${st.lora}, this run has ${loraKey(model) ?? 'no LoRA'}`);
    for (const [k, want] of [['mode', cfg.mode], ['method', cfg.method], ['task', cfg.task], ['kappa', cfg.kappa], ['model_id', cfg.modelId]] as const) {
      if ((st as unknown as Record<string, unknown>)[k] !== want) throw new Error(`cannot resume: the checkpoint in ${ck} was made with ${k} ${JSON.stringify((st as unknown as Record<string, unknown>)[k])}, this run has ${JSON.stringify(want)}`);
    }
    const t = openSafetensors(path.join(ck, 'enclave.safetensors'));
    for (const { key, p, opt } of parts) {
      t.getInto(`${key}.params`, p);
      const bufs: Record<string, Float32Array> = {};
      for (const b of opt.kind === 'adamw' ? ['m', 'v'] : ['momentum']) if (t.has(`opt.${key}.${b}`)) bufs[b] = t.get(`opt.${key}.${b}`);
      opt.load({ kind: opt.kind, step: st.optimizers[key].step, buffers: bufs } as OptimizerState);
    }
    // the job's mixing key: the resumed steps mix as the uninterrupted run's would
    if (t.has('mixing.key')) {
      const k = t.getInt('mixing.key');
      if (k.byteLength !== 32) throw new Error(`cannot resume: the checkpoint in ${ck} has a mixing key of ${k.byteLength} bytes, expected 32`);
      model.mixingKey = Buffer.from(k.buffer, k.byteOffset, k.byteLength);
    }
    if (model.integrity) {
      const m = new Map<string, Float64Array>();
      for (const name of t.names()) if (name.startsWith('integrity.')) m.set(name.slice('integrity.'.length), t.getFloat64(name));
      model.integrity.load(m);
    }
    if (cfg.method === 'full') {
      const rep = await model.link.call({ op: 'checkpoint_load', tag: path.basename(ck) });
      if (rep.op === 'error') throw new Error(`cannot resume: the accelerator could not restore ${path.basename(ck)}: ${rep.message}`);
    }
    opts.rng.setState(Rng.fromState(st.rng).state());
    sampler = new Sampler(train.items.length, cfg.seed, st.sampler.epoch, st.sampler.pos);
    startStep = st.step;
    losses = st.losses.slice();
    // drop metrics written after the checkpoint, so the file matches an uninterrupted run
    if (existsSync(metricsFile)) {
      const lines = readFileSync(metricsFile, 'utf8').split('\n');
      const keep = lines.filter((line) => line && (JSON.parse(line) as { step: number }).step <= startStep);
      writeFileSync(metricsFile, keep.map((l) => l + '\n').join(''));
    }
  } else if (existsSync(metricsFile)) {
    rmSync(metricsFile);
  }

  const probeRng = new Rng(cfg.seed ^ 0x5eed);
  const saveCheckpoint = async (step: number) => {
    // never commit a checkpoint on top of an accelerator that did not apply the update
    if (cfg.method === 'full') await model.verifyAccelerator(probeRng);
    const name = `step-${String(step).padStart(7, '0')}`;
    const dir = path.join(runDir, 'checkpoints', name);
    const tmp = `${dir}.tmp`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    const f32 = (name: string, data: Float32Array): TensorToWrite => ({ name, dtype: 'F32', shape: [data.length], data });
    const tensors = parts.map(({ key, p }) => f32(`${key}.params`, p));
    const optimizers: CheckpointState['optimizers'] = {};
    for (const { key, opt } of parts) {
      const s = opt.state();
      optimizers[key] = { kind: s.kind, step: s.step };
      for (const [b, buf] of Object.entries(s.buffers)) tensors.push(f32(`opt.${key}.${b}`, buf));
    }
    const key = model.mixingKey;
    if (key) tensors.push({ name: 'mixing.key', dtype: 'I32', shape: [8], data: new Int32Array(Uint8Array.from(key).buffer) });
    if (model.integrity) for (const [k, v] of model.integrity.state()) tensors.push({ name: `integrity.${k}`, dtype: 'F64', shape: [v.length], data: v });
    writeSafetensors(path.join(tmp, 'enclave.safetensors'), tensors, { format: CKPT_FORMAT });
    let digest: string | null = null;
    if (cfg.method === 'full') {
      const rep = await model.link.call({ op: 'checkpoint_save', tag: name });
      if (rep.op !== 'ack') throw new Error(`the accelerator could not checkpoint: ${rep.op === 'error' ? rep.message : rep.op}`);
      digest = rep.text ?? null;
    }
    const st: CheckpointState = {
      format: CKPT_FORMAT, step, sampler: sampler.state(), rng: opts.rng.state(), mode: cfg.mode, method: cfg.method, task: cfg.task,
      kappa: cfg.kappa, model_id: cfg.modelId, accelerator_digest: digest, optimizers, losses, lora: loraKey(model),
    };
    writeFileSync(path.join(tmp, 'state.json'), JSON.stringify(st, null, 2) + '\n');
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    // keep the two most recent checkpoints
    const all = readdirSync(path.join(runDir, 'checkpoints')).filter((n) => /^step-\d{7}$/.test(n)).sort();
    for (const old of all.slice(0, -2)) rmSync(path.join(runDir, 'checkpoints', old), { recursive: true, force: true });
    await opts.onCheckpoint?.(name, dir, step);
    return name;
  };

  model.mixingEpoch('eval 0');
  const evalBefore = startStep === 0 && evalSet ? await evaluate(model, evalSet, cfg.batch, padId, cfg.eval_batches) : null;
  const latest = latestCheckpoint(runDir);
  let lastGood: string | null = latest ? path.basename(latest) : null;
  let lastEval: EvalMetrics | null = null;
  const t0 = performance.now();
  let tokens = 0;
  for (let step = startStep; step < cfg.steps; step++) {
    const ts = performance.now();
    const b = makeBatch(sampler.next(cfg.batch).map((i) => train.items[i]), cfg.task, padId);
    for (const x of parts) x.g.fill(0);
    // a failed step is aborted on both sides; nothing of it is saved
    const abort = async (why: string, cause?: unknown): Promise<never> => {
      try {
        await model.reset();
      } catch {
        // the accelerator may be the reason; the error below names the step either way
      }
      throw new Error(`training stopped at step ${step + 1}: ${why}; the last good checkpoint is ${lastGood ?? 'none (no checkpoint written yet)'}`, cause === undefined ? undefined : { cause });
    };
    let r: Awaited<ReturnType<SplitModel['forward']>>;
    let norm: number;
    model.mixingEpoch(`step ${step}`);
    try {
      r = await model.forward(b.tokens, b.B, b.T, b.targets, true);
      if (!Number.isFinite(r.loss)) throw new Error(`the loss became ${r.loss} (non-finite)`);
      await model.backward();
      norm = Math.sqrt(sumSquares(...parts.map((x) => x.g)) + (await model.acceleratorGradSq()));
      if (!Number.isFinite(norm)) throw new Error(`the gradient norm became ${norm} (non-finite)`);
    } catch (e) {
      return abort((e as Error).message, e);
    }
    const scale = clipScale(norm!, cfg.clip);
    const lr = cosineSchedule(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac);
    for (const x of parts) if (x.p.length) x.opt.step(x.p, x.g, lr, scale);
    await model.acceleratorUpdate(lr, cfg.momentum, scale);
    losses.push(r.loss);
    const stepTokens = cfg.task === 'lm' ? r.count : b.B * b.T;
    tokens += stepTokens;
    const m: StepMetrics = { step: step + 1, loss: r.loss, lr, grad_norm: norm, tokens: stepTokens, ms: performance.now() - ts };
    appendFileSync(metricsFile, JSON.stringify({ ...m, ms: undefined }) + '\n');
    opts.onStep?.(m);
    const last = step + 1 === cfg.steps;
    if (evalSet && cfg.eval_every > 0 && ((step + 1) % cfg.eval_every === 0 || last)) {
      model.mixingEpoch(`eval ${step + 1}`);
      lastEval = await evaluate(model, evalSet, cfg.batch, padId, cfg.eval_batches);
      appendFileSync(metricsFile, JSON.stringify({ step: step + 1, eval: lastEval }) + '\n');
      opts.onEval?.(step + 1, lastEval);
    }
    if ((cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every === 0) || last) {
      try {
        lastGood = await saveCheckpoint(step + 1);
      } catch (e) {
        return abort((e as Error).message, e);
      }
    }
  }
  model.mixingEpoch(`eval ${cfg.steps}`);
  if (evalSet && !lastEval) lastEval = await evaluate(model, evalSet, cfg.batch, padId, cfg.eval_batches);
  const seconds = (performance.now() - t0) / 1000;
  return {
    task: cfg.task, method: cfg.method, mode: cfg.mode, kappa: cfg.kappa, steps: cfg.steps,
    eval: lastEval, eval_before: evalBefore, train_loss_last: losses[losses.length - 1] ?? NaN, losses,
    truncated: { train: train.truncated, eval: evalSet?.truncated ?? 0 }, seconds, tokens_per_second: tokens / Math.max(seconds, 1e-9),
    resumed_from: opts.resume ? startStep : null,
  };
}
