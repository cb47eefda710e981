/**
 * The enclave service's fine-tuning job: builds the split model from the provider's bundle
 * and the owner's records, runs the fine-tuning loop against the accelerator, seals every
 * checkpoint, waits out an accelerator that went away (and resumes from the last sealed
 * checkpoint), and afterwards serves the owner's inference and the provider's update.
 */
import path from 'node:path';
import { readFileSync, rmSync } from 'node:fs';
import { randomInt } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { loadAcceleratorBundle, type EnclaveBundle } from '../obfuscate/bundle.js';
import type { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { gpt2Tokenizer, tokenizerFor } from '../model/tokenizer.js';
import type { KVCache } from '../model/transformer.js';
import { trainLabels, encodeRecords, recordsOf, datasetWarnings, type JsonObject, type Record_ } from '../io/jsonl.js';
import { classify, complete, inferenceInput } from '../train/predict.js';
import { SplitModel } from '../enclave/split_model.js';
import { Rng } from '../tensor/rng.js';
import { runFinetune, type FinetuneSummary, type EvalMetrics } from '../train/finetune.js';
import { adapterTensors } from '../model/lora.js';
import { freshClassifier } from '../train/session.js';
import { mixingOf, parseRunSpec, toFinetuneConfig, type RunSpec } from '../train/run_spec.js';
import { writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { BundleError, InputError, IntegrityError, ObfuscatuneError, StateError, TransportError, findCause } from '../errors.js';
import type { SealedStore } from './enclave_store.js';
import { BUNDLE_WEIGHTS_TAG } from './protocol.js';
import { recordBundleRun } from '../attacks/record.js';
import type { RecorderOptions } from '../protocol/view.js';

export interface JobState {
  /** the job's run spec (parseJobSpec: the owner's settings, the bundle's mode and masks) */
  spec: RunSpec;
  state: 'running' | 'done' | 'failed' | 'cancelled';
  step: number;
  loss: number | null;
  eval: EvalMetrics | null;
  error: string | null;
  summary: Omit<FinetuneSummary, 'losses'> | null;
  labels: string[];
  recoveries: number;
  /** training loss of every step so far (aggregate metrics: the owner's to see) */
  losses: number[];
  /** notes on the owner's data for this job (labels an LM job ignores, classes without a record) */
  warnings?: string[];
}

/** The owner's records as uploaded (JSON objects); a job reads them with its spec's field names (jobData). */
export interface Datasets {
  train: JsonObject[];
  eval: JsonObject[];
}

/** The records of a job's data in its terms (spec's fields), its labels and warnings; a malformed record is refused by its number. */
export function jobData(spec: RunSpec, data: Datasets): { train: Record_[]; eval: Record_[]; labels: string[]; warnings: string[] } {
  const train = recordsOf(data.train, spec, 'training data');
  const ev = recordsOf(data.eval, spec, 'evaluation data');
  const labels = spec.task === 'cls' ? trainLabels(train, ev, 'training data', 'evaluation data') : [];
  return { train, eval: ev, labels, warnings: datasetWarnings(train, spec.task, labels, 'training data') };
}

/** gRPC statuses of accelerator calls after which a job waits for the accelerator and resumes from its last checkpoint. */
const RECOVERABLE_CODES: ReadonlySet<number> = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED]);
const MAX_RECOVERIES = 5;
/** Texts or records per `infer` command (the owner's client sends a file in batches of it). */
export const MAX_INFER = 256;

export function newJob(spec: RunSpec): JobState {
  return { spec, state: 'running', step: 0, loss: null, eval: null, error: null, summary: null, labels: [], recoveries: 0, losses: [] };
}

/** A job read back from the sealed state: its spec is validated again by this version. */
export function recoveredJob(job: JobState): JobState {
  try {
    job.spec = parseRunSpec(job.spec, 'the sealed job state');
  } catch (e) {
    // a job stored by an earlier version, in a shape this one does not read
    if (job.state === 'running') job.state = 'failed';
    job.error ??= (e as Error).message;
  }
  return job;
}

export interface JobContext {
  bundle: EnclaveBundle;
  data: Datasets;
  link: GrpcAcceleratorLink;
  store: SealedStore;
  /** writes the service's sealed state (called after every change of the job) */
  persist(): Promise<void>;
  log(line: string): void;
  recordView?: RecordViewOptions;
}

/** `enclave serve --record-view FILE --record-view-accelerator DIR`: the view of a job, for tests and measurements. */
export interface RecordViewOptions {
  file: string;
  /** the accelerator bundle directory (what the accelerator was handed) */
  accelerator: string;
  options?: RecorderOptions;
}

/** Thrown from the step hook to stop a job the owner (or, by contract, the provider) cancelled. */
class Cancelled extends StateError {}

export class JobRunner {
  model: SplitModel | null = null;
  private running: Promise<void> | null = null;
  private cancelReason: string | null = null;

  constructor(readonly job: JobState, private readonly ctx: JobContext) {}

  get runDir(): string {
    return path.join(this.ctx.store.privateDir, 'run');
  }

  /** Starts the job in the background; a failure is recorded in the job state. */
  start(resume: boolean): void {
    this.running = this.run(resume).catch((e) => {
      const cancelled = e instanceof Cancelled;
      this.job.state = cancelled ? 'cancelled' : 'failed';
      this.job.error = (e as Error).message;
      this.ctx.log(cancelled ? `job ${e.message} at step ${this.job.step}` : `job failed: ${(e as Error).message}`);
      return this.ctx.persist();
    });
  }

  async idle(): Promise<void> {
    await this.running;
  }

  /** Stops the running job after its current step; resolves once it stopped (state 'cancelled'). */
  async cancel(reason: string): Promise<void> {
    this.cancelReason = reason;
    await this.running;
  }

  /** Waits for the accelerator, checks it serves the bundle this enclave expects, and builds the job's split model. */
  private async readyModel(labels: string[]): Promise<{ model: SplitModel; rng: Rng }> {
    const b = this.ctx.bundle;
    const spec = this.job.spec;
    const expected = b.acceleratorManifestSha256;
    const got = (await this.ctx.link.waitForReady(120_000)).manifest_sha256;
    if (!got) throw new BundleError('the accelerator has no bundle loaded (the provider must upload it)');
    if (got !== expected) throw new BundleError(`the accelerator serves bundle ${got.slice(0, 12)}..., the provider's enclave bundle expects ${expected.slice(0, 12)}...`);
    const rng = new Rng(spec.seed);
    return {
      rng,
      model: new SplitModel({
        mode: b.mode, method: spec.method, task: spec.task, config: b.config, tensors: b.tensors, link: this.ctx.link, twoSided: b.twoSided,
        lora: spec.lora ?? undefined, numLabels: spec.task === 'cls' ? labels.length : undefined, padTokenId: gpt2Tokenizer.eotId, rng,
        pooling: b.cls?.pooling ?? spec.pooling ?? undefined,
        classifierInit: spec.task === 'cls' ? freshClassifier(labels.length, b.config.n_embd, spec.seed) : undefined,
        mixing: mixingOf(spec),
      }),
    };
  }

  /** The job's labels, encoded datasets and loop configuration. */
  private prepare() {
    const { job, ctx } = this;
    const spec = job.spec;
    const tok = tokenizerFor(ctx.bundle.config.vocab_size);
    const d = jobData(spec, ctx.data);
    const labels = d.labels;
    const train = encodeRecords(d.train, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'training data' });
    const evalSet = d.eval.length ? encodeRecords(d.eval, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'evaluation data' }) : null;
    const cfg = toFinetuneConfig(spec, ctx.bundle.acceleratorManifestSha256.slice(0, 16));
    return { tok, labels, train, evalSet, cfg, warnings: d.warnings };
  }

  /**
   * A finished job read back after a restart has no model in memory: it is rebuilt from the
   * job's final checkpoint (kept until the provider fetched the update), the accelerator's
   * weights with it, so inference and the provider's update work as before the restart.
   */
  private async restoreModel(): Promise<SplitModel> {
    const latest = this.ctx.store.latestCheckpoint();
    if (!latest) throw new StateError('the finished job\'s checkpoint is gone: its model cannot be restored');
    await this.ctx.store.unsealCheckpoint(latest, this.runDir);
    const { tok, labels, train, evalSet, cfg } = this.prepare();
    const { model, rng } = await this.readyModel(labels);
    await runFinetune(model, train, evalSet, cfg, this.runDir, tok.eotId, { resume: true, rng });
    this.ctx.log('restored the finished job\'s model from its final checkpoint');
    return (this.model = model);
  }

  private async run(resume: boolean): Promise<void> {
    const { job, ctx } = this;
    const spec = job.spec;
    const { tok, labels, train, evalSet, cfg, warnings } = this.prepare();
    job.labels = labels;
    job.warnings = warnings;
    for (let attempt = 0; ; attempt++) {
      const sealedLatest = ctx.store.latestCheckpoint();
      const doResume = (resume || attempt > 0) && sealedLatest !== null;
      if (doResume) {
        const dir = await ctx.store.unsealCheckpoint(sealedLatest!, this.runDir);
        // the losses up to the checkpoint come from the checkpoint itself (sealed in one write
        // with the model state), so a kill between it and the job-state write leaves no gap
        const st = JSON.parse(readFileSync(path.join(dir, 'state.json'), 'utf8')) as { step: number; losses: number[] };
        job.losses = st.losses.slice(0, st.step);
        job.step = st.step;
        job.loss = job.losses[job.losses.length - 1] ?? null;
      } else {
        rmSync(this.runDir, { recursive: true, force: true });
        job.losses = [];
        job.step = 0;
      }
      const { model, rng } = await this.readyModel(labels);
      this.model = model;
      // the view of a job from its fresh start (a resumed one would lack its first steps)
      const recording = ctx.recordView && !doResume ? recordBundleRun(model, ctx.link, ctx.bundle, loadAcceleratorBundle(ctx.recordView.accelerator).weights, 'finetune', {
        ...ctx.recordView.options, modelId: ctx.bundle.acceleratorManifestSha256.slice(0, 16), modelPath: null, padTokenId: tok.eotId, labels: spec.task === 'cls' ? labels : undefined,
      }) : null;
      const failuresBefore = ctx.link.failures;
      try {
        if (!doResume) {
          // a fresh start: the accelerator reloads the bundle's weights (a previous job or an
          // interrupted one may have trained them); the probe checks them with the integrity vectors
          const rep = await ctx.link.call({ op: 'checkpoint_load', tag: BUNDLE_WEIGHTS_TAG });
          if (rep.op !== 'ack') throw new BundleError(`the accelerator could not reload the bundle's weights: ${rep.op === 'error' ? rep.message : rep.op}`);
          await model.verifyAccelerator(new Rng(randomInt(2 ** 31)));
        }
        const summary = await runFinetune(model, train, evalSet, cfg, this.runDir, tok.eotId, {
          resume: doResume, rng,
          onStep: (m) => {
            job.step = m.step;
            job.loss = m.loss;
            job.losses.length = Math.min(job.losses.length, m.step - 1);
            job.losses.push(m.loss);
            if (this.cancelReason) throw new Cancelled(this.cancelReason);
          },
          onEval: (_s, e) => { job.eval = e; },
          onCheckpoint: async (name, dir) => {
            await ctx.store.sealCheckpoint(name, dir);
            await ctx.persist();
          },
        });
        const { losses, ...rest } = summary;
        job.summary = { ...rest, first_loss: losses[0] } as unknown as JobState['summary'];
        job.eval = summary.eval;
        job.state = 'done';
        if (recording) {
          const { header } = recording.save(ctx.recordView!.file);
          ctx.link.observers.splice(ctx.link.observers.indexOf(recording.recorder.observer), 1);
          ctx.log(`recorded the accelerator's view of the job: ${ctx.recordView!.file} (${header.events} tensors)`);
        }
        await ctx.persist();
        ctx.log(`job done: ${spec.steps} steps, eval ${JSON.stringify(summary.eval)}`);
        return;
      } catch (e) {
        if (e instanceof Cancelled) throw e;
        const failure = this.recoverableFailure(e, failuresBefore);
        if (!failure || attempt + 1 > MAX_RECOVERIES) throw e;
        job.recoveries++;
        ctx.log(`the accelerator failed (${failure.message.split('\n')[0]}); waiting for it and resuming from the last checkpoint (attempt ${attempt + 1})`);
      }
    }
  }

  /**
   * The transport failure behind a failed attempt, when it is one to wait out (the accelerator
   * down, restarting or too slow: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED), else null.
   * Found by type in the error's cause chain; for an untyped error the link's own record of a
   * transport failure during this attempt stands in. An integrity failure is never waited out.
   */
  private recoverableFailure(e: unknown, failuresBefore: number): TransportError | null {
    if (findCause(e, IntegrityError)) return null;
    const link = this.ctx.link;
    const failure = findCause(e, TransportError)
      ?? (!(e instanceof ObfuscatuneError) && link.failures > failuresBefore ? link.lastFailure : null);
    return failure && RECOVERABLE_CODES.has(failure.code) ? failure : null;
  }

  private async finished(what: string): Promise<SplitModel> {
    if (this.job.state !== 'done') throw new StateError(`no finished job ${what}`);
    if (this.model) return this.model;
    this.restoring ??= this.restoreModel().finally(() => { this.restoring = null; });
    return this.restoring;
  }

  private restoring: Promise<SplitModel> | null = null;

  /**
   * The owner's inference on the fine-tuned model, of 1-MAX_INFER texts or records (JSON
   * objects, read with the job's field names): the labels and their probabilities (cls), or
   * greedy completions with the KV cache (lm).
   */
  async infer(texts: unknown, maxTokens: unknown, records?: unknown): Promise<unknown> {
    const m = await this.finished('(run a job first)');
    const list = records ?? texts;
    const what = records !== undefined ? 'records (JSON objects)' : 'texts';
    if (!Array.isArray(list) || list.length === 0 || list.length > MAX_INFER) throw new InputError(`infer needs 1-${MAX_INFER} ${what}`);
    let inputs: string[];
    if (records !== undefined) {
      if (!list.every((r) => typeof r === 'object' && r !== null && !Array.isArray(r))) throw new InputError('infer: every record must be a JSON object');
      inputs = recordsOf(list as JsonObject[], this.job.spec, 'infer', { inference: true }).map((r) => inferenceInput(r, m.task));
    } else {
      if (!list.every((t) => typeof t === 'string')) throw new InputError('infer: every text must be a string');
      inputs = list as string[];
    }
    const tok = tokenizerFor(m.config.vocab_size);
    const maxLen = Math.min(this.job.spec.max_len, m.config.n_ctx);
    const labels = this.job.labels;
    if (m.task === 'cls') return { labels, ...(await classify(m, inputs, tok, { labels, maxLen, batch: this.job.spec.batch })) };
    const maxNewTokens = Math.max(1, Math.min(64, Number(maxTokens ?? 20)));
    const generator = { config: m.config, forwardCached: (c: KVCache, t: ArrayLike<number>) => m.forwardCached(c, t) };
    return { completions: await complete(generator, inputs, tok, { maxLen, maxNewTokens }) };
  }

  /** The provider's update: the enclave's trained tensors and the adapters (safetensors, base64). */
  async exportUpdate(): Promise<unknown> {
    const m = await this.finished('to export');
    const file = path.join(this.ctx.store.privateDir, 'export.safetensors');
    const t: TensorToWrite[] = [...m.trainedTensors()].map(([name, data]) => ({ name: `enclave.${name}`, dtype: 'F32', shape: [data.length], data }));
    if (m.adapters) t.push(...adapterTensors(m.adapters));
    writeSafetensors(file, t, { mode: m.mode, method: m.method, task: m.task, ...(m.adapters ? { rank: String(m.adapters.config.rank), alpha: String(m.adapters.config.alpha), targets: m.adapters.config.targets.join(',') } : {}) });
    const data = readFileSync(file).toString('base64');
    rmSync(file, { force: true });
    return { update: data, method: m.method, mode: m.mode, task: m.task, labels: this.job.labels, pooling: m.task === 'cls' ? m.pooling : undefined, summary: this.job.summary };
  }
}
