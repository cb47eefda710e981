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
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import type { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { gpt2Tokenizer, tokenizerFor } from '../model/tokenizer.js';
import { generate, type KVCache } from '../model/transformer.js';
import { labelSet, encodeRecords, makeBatch, type Record_ } from '../io/jsonl.js';
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
}

export interface Datasets {
  train: Record_[];
  eval: Record_[];
}

/** gRPC statuses of accelerator calls after which a job waits for the accelerator and resumes from its last checkpoint. */
const RECOVERABLE_CODES: ReadonlySet<number> = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED]);
const MAX_RECOVERIES = 5;

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
      if (e instanceof Cancelled) {
        this.job.state = 'cancelled';
        this.job.error = e.message;
        this.ctx.log(`job ${e.message} at step ${this.job.step}`);
      } else {
        this.job.state = 'failed';
        this.job.error = (e as Error).message;
        this.ctx.log(`job failed: ${(e as Error).message}`);
      }
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

  private buildModel(labels: string[], rng: Rng): SplitModel {
    const b = this.ctx.bundle;
    const spec = this.job.spec;
    return new SplitModel({
      mode: b.mode, method: spec.method, task: spec.task, config: b.config, tensors: b.tensors, link: this.ctx.link, twoSided: b.twoSided,
      lora: spec.lora ?? undefined, numLabels: spec.task === 'cls' ? labels.length : undefined, padTokenId: gpt2Tokenizer.eotId, rng,
      pooling: b.cls?.pooling ?? spec.pooling ?? undefined,
      classifierInit: spec.task === 'cls' ? freshClassifier(labels.length, b.config.n_embd, spec.seed) : undefined,
      mixing: mixingOf(spec),
    });
  }

  /** Waits for the accelerator and checks it serves the bundle this enclave expects. */
  private async acceleratorReady(timeoutMs: number): Promise<void> {
    const expected = this.ctx.bundle.acceleratorManifestSha256;
    const got = (await this.ctx.link.waitForReady(timeoutMs)).manifest_sha256;
    if (!got) throw new BundleError('the accelerator has no bundle loaded (the provider must upload it)');
    if (got !== expected) throw new BundleError(`the accelerator serves bundle ${got.slice(0, 12)}..., the provider's enclave bundle expects ${expected.slice(0, 12)}...`);
  }

  /** The job's labels, encoded datasets and loop configuration. */
  private prepare() {
    const { job, ctx } = this;
    const spec = job.spec;
    const tok = tokenizerFor(ctx.bundle.config.vocab_size);
    const labels = spec.task === 'cls' ? labelSet(ctx.data.train, 'training data') : [];
    if (spec.task === 'cls' && ctx.data.eval.length) {
      const extra = labelSet(ctx.data.eval, 'evaluation data').filter((l) => !labels.includes(l));
      if (extra.length) throw new InputError(`evaluation data has labels not in the training data: ${extra.join(', ')}`);
    }
    const train = encodeRecords(ctx.data.train, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'training data' });
    const evalSet = ctx.data.eval.length ? encodeRecords(ctx.data.eval, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'evaluation data' }) : null;
    const cfg = toFinetuneConfig(spec, ctx.bundle.acceleratorManifestSha256.slice(0, 16));
    return { tok, labels, train, evalSet, cfg };
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
    await this.acceleratorReady(120_000);
    const { tok, labels, train, evalSet, cfg } = this.prepare();
    const rng = new Rng(this.job.spec.seed);
    const model = this.buildModel(labels, rng);
    await runFinetune(model, train, evalSet, cfg, this.runDir, tok.eotId, { resume: true, rng });
    this.ctx.log('restored the finished job\'s model from its final checkpoint');
    return (this.model = model);
  }

  private async run(resume: boolean): Promise<void> {
    const { job, ctx } = this;
    const spec = job.spec;
    const { tok, labels, train, evalSet, cfg } = this.prepare();
    job.labels = labels;
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
      await this.acceleratorReady(120_000);
      const rng = new Rng(spec.seed);
      this.model = this.buildModel(labels, rng);
      const failuresBefore = ctx.link.failures;
      try {
        if (!doResume) {
          // a fresh start: the accelerator reloads the bundle's weights (a previous job or an
          // interrupted one may have trained them); the probe checks them with the integrity vectors
          const rep = await ctx.link.call({ op: 'checkpoint_load', tag: BUNDLE_WEIGHTS_TAG });
          if (rep.op !== 'ack') throw new BundleError(`the accelerator could not reload the bundle's weights: ${rep.op === 'error' ? rep.message : rep.op}`);
          await this.model.verifyAccelerator(new Rng(randomInt(2 ** 31)));
        }
        const summary = await runFinetune(this.model, train, evalSet, cfg, this.runDir, tok.eotId, {
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

  /** The owner's inference on the fine-tuned model: labels (cls) or greedy completions with the KV cache (lm). */
  async infer(texts: unknown, maxTokens: unknown): Promise<unknown> {
    const m = await this.finished('(run a job first)');
    if (!Array.isArray(texts) || texts.length === 0 || texts.length > 256 || !texts.every((t) => typeof t === 'string')) throw new InputError('infer needs 1-256 texts');
    const tok = tokenizerFor(m.config.vocab_size);
    const maxLen = Math.min(this.job.spec.max_len, m.config.n_ctx);
    const labels = this.job.labels;
    if (m.task === 'cls') {
      const set = encodeRecords(texts.map((t) => ({ text: t, label: labels[0] })), tok, { task: 'cls', maxLen, labels, source: 'infer' });
      const b = makeBatch(set.items, 'cls', tok.eotId);
      const r = await m.forward(b.tokens, b.B, b.T, b.targets, false);
      return { predictions: Array.from(r.predictions!).map((i) => labels[i]) };
    }
    const maxNew = Math.max(1, Math.min(64, Number(maxTokens ?? 20)));
    const generator = { config: m.config, forwardCached: (c: KVCache, t: ArrayLike<number>) => m.forwardCached(c, t) };
    const completions: string[] = [];
    for (const t of texts as string[]) {
      // the prompt's last tokens, leaving room for the completion within the job's length
      const ids = tok.encode(t).slice(-Math.max(1, maxLen - maxNew));
      if (ids.length === 0) ids.push(tok.eotId);
      completions.push(tok.decode(await generate(generator, ids, { maxNewTokens: maxNew, stopToken: tok.eotId })));
    }
    return { completions };
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
