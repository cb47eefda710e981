/**
 * `obfuscatune enclave serve`: the TEE program. It attests to a fresh HPKE key, receives the
 * provider's enclave bundle and the owner's records encrypted to that key, fine-tunes through
 * the accelerator (gRPC) with every reply integrity-checked, answers each party encrypted to
 * that party under the policy in docs/deployment.md, and keeps its persistent state sealed
 * (bundle, data, job, checkpoints), so a restarted enclave resumes where it stopped.
 *
 * Storage model: `--state-dir` is host-visible storage: only sealed blobs go there. The run
 * directory (plain checkpoints while training) lives in the enclave's private memory-backed
 * temp space, which a confidential VM encrypts.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { EnclaveAttestor } from '../tee/attest.js';
import type { TeePlatform } from '../tee/platform.js';
import { sealTo, sealedFromJson, sealedToJson, publicKeyFromBase64 } from '../tee/hpke.js';
import { ReplayCache } from '../tee/replay.js';
import { sealBlob, unsealBlob } from '../tee/seal.js';
import { loadEnclaveBundle } from '../obfuscate/bundle.js';
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { widenServerWindow, widenSessionWindows } from '../rpc/grpc.js';
import { gpt2Tokenizer, tokenizerFor } from '../model/tokenizer.js';
import { parseJsonl, labelSet, encodeRecords, makeBatch, type Record_ } from '../io/jsonl.js';
import { SplitModel } from '../enclave/split_model.js';
import { Rng } from '../tensor/rng.js';
import { runFinetune, type FinetuneSummary, type EvalMetrics } from '../train/finetune.js';
import { adapterTensors } from '../model/lora.js';
import { freshClassifier } from '../train/session.js';
import { parseJobSpec, parseRunSpec, checkRunSpecForModel, toFinetuneConfig, type RunSpec } from '../train/run_spec.js';
import { writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { BundleError, InputError, IntegrityError, ObfuscatuneError, PolicyError, StateError, TransportError, findCause } from '../errors.js';
import { serviceError } from '../rpc/status.js';
import {
  ENCLAVE_SERVICE, COMMAND_AAD, chunkAad, replyAad, enclaveServerOptions, packFiles, unpackFiles,
  type UploadChunk, type SealedCommand,
} from './protocol.js';


export interface EnclaveServeOptions {
  platform: TeePlatform;
  stateDir: string;
  accelerator: string;
  host?: string;
  port?: number;
  /** private (memory-backed) scratch space; default: a fresh temp dir */
  privateDir?: string;
  log?: (line: string) => void;
}

/** What the owner's `start_finetune` carries: a run spec without the settings of the provider's bundle. */
export type { JobSpec } from '../train/run_spec.js';

interface JobState {
  /** the job's run spec (parseJobSpec: the owner's settings, the bundle's mode and masks) */
  spec: RunSpec;
  state: 'running' | 'done' | 'failed';
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

type Role = 'provider' | 'owner';

/** Which party may ask for what (docs/deployment.md). */
export const POLICY: Record<string, Role[]> = {
  status: ['provider', 'owner'],
  start_finetune: ['owner'],
  infer: ['owner'],
  fetch_update: ['provider'],
};

const MAX_RECORDS = 1_000_000;
const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;
/** gRPC statuses of accelerator calls after which a job waits for the accelerator and resumes from its last checkpoint. */
const RECOVERABLE_CODES: ReadonlySet<number> = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED]);

export class EnclaveService {
  private attestor!: EnclaveAttestor;
  private sessions = new Map<string, Uint8Array>();
  private replay = new ReplayCache({ ttlMs: 10 * 60_000, maxEntries: 100_000 });
  bundle: EnclaveBundle | null = null;
  private bundleFiles: { name: string; data: Uint8Array }[] | null = null;
  private providerKey: string | null = null;
  private ownerKey: string | null = null;
  private data: { train: Record_[]; eval: Record_[] } = { train: [], eval: [] };
  job: JobState | null = null;
  private model: SplitModel | null = null;
  private link: GrpcAcceleratorLink;
  readonly privateDir: string;
  private running: Promise<void> | null = null;
  private log: (l: string) => void;

  private constructor(readonly o: EnclaveServeOptions) {
    this.link = new GrpcAcceleratorLink(o.accelerator, { deadlineMs: 300_000 });
    this.privateDir = o.privateDir ?? mkdtempSync(path.join(os.tmpdir(), 'obf-enclave-'));
    this.log = o.log ?? ((l) => console.error(`enclave: ${l}`));
    mkdirSync(path.join(o.stateDir, 'checkpoints'), { recursive: true });
  }

  static async create(o: EnclaveServeOptions): Promise<EnclaveService> {
    const s = new EnclaveService(o);
    s.attestor = await EnclaveAttestor.create(o.platform);
    await s.recover();
    return s;
  }

  // ------------------------------------------------------------------ sealed persistence
  private async persist(): Promise<void> {
    const meta = {
      provider: this.providerKey, owner: this.ownerKey, job: this.job ? { ...this.job, state: this.job.state } : null,
      data: this.data,
    };
    const files: { name: string; data: Uint8Array }[] = [{ name: 'meta.json', data: new TextEncoder().encode(JSON.stringify(meta)) }];
    if (this.bundleFiles) files.push({ name: 'bundle.bin', data: packFiles(this.bundleFiles) });
    const blob = await sealBlob(this.o.platform, 'enclave-state', packFiles(files));
    const f = path.join(this.o.stateDir, 'state.sealed');
    writeFileSync(`${f}.tmp`, blob);
    renameSync(`${f}.tmp`, f);
  }

  private async recover(): Promise<void> {
    const f = path.join(this.o.stateDir, 'state.sealed');
    if (!existsSync(f)) return;
    const files = unpackFiles(await unsealBlob(this.o.platform, 'enclave-state', readFileSync(f)));
    const meta = JSON.parse(new TextDecoder().decode(files.find((x) => x.name === 'meta.json')!.data));
    this.providerKey = meta.provider;
    this.ownerKey = meta.owner;
    this.data = meta.data;
    const b = files.find((x) => x.name === 'bundle.bin');
    if (b) this.installBundle(unpackFiles(b.data));
    this.job = meta.job;
    if (this.job) {
      try {
        this.job.spec = parseRunSpec(this.job.spec, 'the sealed job state');
      } catch (e) {
        // a job stored by an earlier version, in a shape this one does not read
        if (this.job.state === 'running') this.job.state = 'failed';
        this.job.error ??= (e as Error).message;
      }
    }
    this.log(`recovered sealed state: bundle ${this.bundle ? 'yes' : 'no'}, ${this.data.train.length} training records, job ${this.job?.state ?? 'none'}`);
    if (this.job && this.job.state === 'running') {
      this.job.recoveries++;
      this.startJob(true);
    }
  }

  private installBundle(files: { name: string; data: Uint8Array }[]): void {
    const dir = path.join(this.privateDir, 'bundle');
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    for (const f of files) writeFileSync(path.join(dir, f.name), f.data);
    this.bundle = loadEnclaveBundle(dir);
    this.bundleFiles = files;
  }

  // ------------------------------------------------------------------ gRPC handlers
  async attest(req: { nonce?: unknown }): Promise<unknown> {
    const r = await this.attestor.handle(req as { nonce: string });
    this.sessions.set(r.transcriptId, r.transcript);
    return r.response;
  }

  private session(id: unknown): Uint8Array {
    const t = typeof id === 'string' ? this.sessions.get(id) : undefined;
    if (!t) throw new PolicyError('unknown attestation session (attest first)');
    return t;
  }

  async upload(chunks: UploadChunk[]): Promise<unknown> {
    if (chunks.length === 0) throw new InputError('empty upload');
    const first = chunks[0];
    const transcript = this.session(first.session);
    const total = first.total;
    if (!Number.isInteger(total) || total !== chunks.length) throw new InputError(`upload incomplete: ${chunks.length} of ${total} chunks`);
    const plain: Uint8Array[] = [];
    let bytes = 0;
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i];
      if (c.index !== i || c.total !== total || c.kind !== first.kind || c.name !== first.name || c.upload_id !== first.upload_id || c.sender !== first.sender || c.session !== first.session) {
        throw new InputError(`upload chunk ${i} does not belong to this upload`);
      }
      const p = await this.attestor.open(sealedFromJson(c.sealed), transcript, chunkAad(c));
      bytes += p.length;
      if (bytes > MAX_UPLOAD_BYTES) throw new TransportError('upload too large', grpc.status.RESOURCE_EXHAUSTED);
      plain.push(p);
    }
    this.replay.check(`upload:${first.upload_id}`);
    if (first.kind === 'bundle') {
      if (this.providerKey && this.providerKey !== first.sender) throw new PolicyError('a bundle from another provider is already installed');
      if (this.job?.state === 'running') throw new StateError('a job is running');
      this.installBundle(unpackFiles(Buffer.concat(plain)));
      this.providerKey = first.sender;
      await this.persist();
      this.log(`installed the provider's ${this.bundle!.mode}-mode bundle`);
      return { ok: true, kind: 'bundle', mode: this.bundle!.mode };
    }
    if (first.name !== 'train' && first.name !== 'eval') throw new InputError(`unknown dataset split "${first.name}"`);
    if (this.ownerKey && this.ownerKey !== first.sender) throw new PolicyError('another data owner has already uploaded data');
    if (first.sender === this.providerKey) throw new PolicyError('the provider cannot act as the data owner');
    if (plain.length > MAX_RECORDS) throw new InputError('too many records');
    const recs = parseJsonl(plain.map((p) => new TextDecoder().decode(p).replace(/\n/g, ' ')).join('\n'), `encrypted ${first.name} upload`);
    this.data[first.name] = recs;
    this.ownerKey = first.sender;
    await this.persist();
    this.log(`received ${recs.length} encrypted ${first.name} records`);
    return { ok: true, kind: 'dataset', name: first.name, records: recs.length };
  }

  async command(req: SealedCommand): Promise<unknown> {
    const transcript = this.session(req.session);
    const text = new TextDecoder().decode(await this.attestor.open(sealedFromJson(req.sealed), transcript, COMMAND_AAD));
    let cmd: { id: string; ts: number; op: string; [k: string]: unknown };
    try {
      cmd = JSON.parse(text);
    } catch (e) {
      throw new InputError('malformed command', { cause: e });
    }
    if (typeof cmd.id !== 'string' || typeof cmd.ts !== 'number' || typeof cmd.op !== 'string') throw new InputError('malformed command');
    this.replay.check(cmd.id, cmd.ts);
    const role: Role | null = req.sender === this.providerKey ? 'provider' : req.sender === this.ownerKey ? 'owner' : null;
    const allowed = POLICY[cmd.op];
    if (!allowed) throw new InputError(`unknown command "${cmd.op}"`);
    if (!role || !allowed.includes(role)) throw new PolicyError(`policy: "${cmd.op}" is not allowed for ${role ?? 'an unknown party'}`);
    const result = await this.execute(cmd.op, cmd, role);
    const sealed = await sealTo(publicKeyFromBase64(req.sender), new TextEncoder().encode(JSON.stringify(result)), transcript, replyAad(cmd.id));
    return { sealed: sealedToJson(sealed) };
  }

  private async execute(op: string, cmd: Record<string, unknown>, role: Role): Promise<unknown> {
    switch (op) {
      case 'status': {
        const j = this.job;
        return {
          bundle: this.bundle ? { mode: this.bundle.mode, n_layer: this.bundle.config.n_layer, n_embd: this.bundle.config.n_embd } : null,
          records: { train: this.data.train.length, eval: this.data.eval.length },
          job: j ? { state: j.state, step: j.step, steps: j.spec.steps, loss: j.loss, eval: j.eval, error: j.error, recoveries: j.recoveries, summary: j.summary, losses: j.losses } : null,
          integrity_checks: this.model?.integrity?.checks ?? 0,
          accelerator_traffic: { messages: this.link.stats.messages, bytes: this.link.stats.bytes },
          role,
        };
      }
      case 'start_finetune': {
        if (!this.bundle) throw new BundleError('no model bundle installed yet');
        if (this.data.train.length === 0) throw new StateError('no training data uploaded yet');
        if (this.job?.state === 'running') throw new StateError('a job is already running');
        // the same validation as every entry point, before any work
        const b = this.bundle;
        const spec = parseJobSpec(cmd.spec, { mode: b.mode, kappa: b.spec, two_sided: b.twoSided }, 'start_finetune');
        checkRunSpecForModel(spec, { n_ctx: b.config.n_ctx, headPooling: b.cls ? b.cls.pooling ?? 'last' : null }, 'start_finetune');
        this.job = { spec, state: 'running', step: 0, loss: null, eval: null, error: null, summary: null, labels: [], recoveries: 0, losses: [] };
        rmSync(path.join(this.privateDir, 'run'), { recursive: true, force: true });
        for (const f of readdirSync(path.join(this.o.stateDir, 'checkpoints'))) rmSync(path.join(this.o.stateDir, 'checkpoints', f), { force: true });
        await this.persist();
        this.startJob(false);
        return { started: true };
      }
      case 'infer': return this.infer(cmd);
      case 'fetch_update': {
        if (this.job?.state !== 'done' || !this.model) throw new StateError('no finished job to export');
        const m = this.model;
        const file = path.join(this.privateDir, 'export.safetensors');
        const t: TensorToWrite[] = [...m.trainedTensors()].map(([name, data]) => ({ name: `enclave.${name}`, dtype: 'F32', shape: [data.length], data }));
        if (m.adapters) t.push(...adapterTensors(m.adapters));
        writeSafetensors(file, t, { mode: m.mode, method: m.method, task: m.task, ...(m.adapters ? { rank: String(m.adapters.config.rank), alpha: String(m.adapters.config.alpha), targets: m.adapters.config.targets.join(',') } : {}) });
        const data = readFileSync(file).toString('base64');
        rmSync(file, { force: true });
        return { update: data, method: m.method, mode: m.mode, task: m.task, labels: this.job.labels, pooling: m.task === 'cls' ? m.pooling : undefined, summary: this.job.summary };
      }
    }
    throw new InputError(`unknown command "${op}"`);
  }

  private async infer(cmd: Record<string, unknown>): Promise<unknown> {
    if (!this.model || this.job?.state !== 'done') throw new StateError('no fine-tuned model yet (run a job first)');
    const m = this.model;
    const texts = cmd.texts;
    if (!Array.isArray(texts) || texts.length === 0 || texts.length > 256 || !texts.every((t) => typeof t === 'string')) throw new InputError('infer needs 1-256 texts');
    const tok = tokenizerFor(m.config.vocab_size);
    const maxLen = this.job.spec.max_len;
    if (m.task === 'cls') {
      const set = encodeRecords(texts.map((t) => ({ text: t, label: this.job!.labels[0] })), tok, { task: 'cls', maxLen, labels: this.job.labels, source: 'infer' });
      const b = makeBatch(set.items, 'cls', tok.eotId);
      const r = await m.forward(b.tokens, b.B, b.T, b.targets, false);
      return { predictions: Array.from(r.predictions!).map((i) => this.job!.labels[i]) };
    }
    const maxNew = Math.min(64, Number(cmd.max_tokens ?? 20));
    const out: string[] = [];
    for (const t of texts as string[]) {
      const ids = tok.encode(t);
      const gen: number[] = [];
      for (let k = 0; k < maxNew; k++) {
        const seq = [...ids, ...gen].slice(-Math.min(maxLen, m.config.n_ctx));
        const T = seq.length;
        const r = await m.forward(Int32Array.from(seq), 1, T, new Int32Array(T).fill(-1), false);
        const V = m.config.vocab_size;
        const p = r.probs!.subarray((T - 1) * V, T * V);
        let best = 0;
        for (let i = 1; i < V; i++) if (p[i] > p[best]) best = i;
        if (best === tok.eotId) break;
        gen.push(best);
      }
      out.push(tok.decode(gen));
    }
    return { completions: out };
  }

  // ------------------------------------------------------------------ the job
  private buildModel(spec: RunSpec, labels: string[], rng: Rng): SplitModel {
    const b = this.bundle!;
    return new SplitModel({
      mode: b.mode, method: spec.method, task: spec.task, config: b.config, tensors: b.tensors, link: this.link, twoSided: b.twoSided,
      lora: spec.lora ?? undefined, numLabels: spec.task === 'cls' ? labels.length : undefined, padTokenId: gpt2Tokenizer.eotId, rng,
      pooling: b.cls?.pooling ?? spec.pooling ?? undefined,
      classifierInit: spec.task === 'cls' ? freshClassifier(labels.length, b.config.n_embd, spec.seed) : undefined,
    });
  }

  private startJob(resume: boolean): void {
    this.running = this.runJob(resume).catch((e) => {
      if (this.job) {
        this.job.state = 'failed';
        this.job.error = (e as Error).message;
      }
      this.log(`job failed: ${(e as Error).message}`);
      return this.persist();
    });
  }

  /** Waits for the accelerator and checks it serves the bundle this enclave expects. */
  private async acceleratorReady(timeoutMs: number): Promise<void> {
    const got = (await this.link.waitForReady(timeoutMs)).manifest_sha256;
    if (got && this.bundle && got !== this.bundle.acceleratorManifestSha256) {
      throw new BundleError(`the accelerator serves bundle ${got.slice(0, 12)}..., the provider's enclave bundle expects ${this.bundle.acceleratorManifestSha256.slice(0, 12)}...`);
    }
    if (!got) throw new BundleError('the accelerator has no bundle loaded (the provider must upload it)');
  }

  private async runJob(resume: boolean): Promise<void> {
    const job = this.job!;
    const spec = job.spec;
    const tok = tokenizerFor(this.bundle!.config.vocab_size);
    const labels = spec.task === 'cls' ? labelSet(this.data.train, 'training data') : [];
    if (spec.task === 'cls' && this.data.eval.length) {
      const extra = labelSet(this.data.eval, 'evaluation data').filter((l) => !labels.includes(l));
      if (extra.length) throw new InputError(`evaluation data has labels not in the training data: ${extra.join(', ')}`);
    }
    job.labels = labels;
    const train = encodeRecords(this.data.train, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'training data' });
    const evalSet = this.data.eval.length ? encodeRecords(this.data.eval, tok, { task: spec.task, maxLen: spec.max_len, labels, source: 'evaluation data' }) : null;
    const runDir = path.join(this.privateDir, 'run');
    const cfg = toFinetuneConfig(spec, this.bundle!.acceleratorManifestSha256.slice(0, 16));
    let attempt = 0;
    for (;;) {
      const sealedLatest = this.latestSealed();
      const doResume = (resume || attempt > 0) && sealedLatest !== null;
      if (doResume) await this.unsealCheckpoint(sealedLatest!, runDir);
      else rmSync(runDir, { recursive: true, force: true });
      await this.acceleratorReady(120_000);
      const rng = new Rng(spec.seed);
      this.model = this.buildModel(spec, labels, rng);
      const failuresBefore = this.link.failures;
      try {
        const summary = await runFinetune(this.model, train, evalSet, cfg, runDir, tok.eotId, {
          resume: doResume, rng,
          onStep: (m) => {
            job.step = m.step;
            job.loss = m.loss;
            job.losses.length = m.step - 1;
            job.losses.push(m.loss);
          },
          onEval: (_s, e) => { job.eval = e; },
          onCheckpoint: (name, dir) => this.sealCheckpoint(name, dir),
        });
        const { losses, ...rest } = summary;
        job.summary = { ...rest, first_loss: losses[0] } as unknown as JobState['summary'];
        job.eval = summary.eval;
        job.state = 'done';
        await this.persist();
        this.log(`job done: ${spec.steps} steps, eval ${JSON.stringify(summary.eval)}`);
        return;
      } catch (e) {
        const failure = this.recoverableFailure(e, failuresBefore);
        if (!failure || attempt >= 5) throw e;
        attempt++;
        job.recoveries++;
        this.log(`the accelerator failed (${failure.message.split('\n')[0]}); waiting for it and resuming from the last checkpoint (attempt ${attempt})`);
      }
    }
  }

  /**
   * The transport failure behind a failed attempt, when it is one to wait out (the accelerator
   * down, restarting or too slow: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED), else null.
   * Found by type in the error's cause chain; the training loop reports a failed step as an
   * untyped error without its cause, so for such an error the link's own record of a transport
   * failure during this attempt stands in. An integrity failure is never waited out.
   */
  private recoverableFailure(e: unknown, failuresBefore: number): TransportError | null {
    if (findCause(e, IntegrityError)) return null;
    const failure = findCause(e, TransportError)
      ?? (!(e instanceof ObfuscatuneError) && this.link.failures > failuresBefore ? this.link.lastFailure : null);
    return failure && RECOVERABLE_CODES.has(failure.code) ? failure : null;
  }

  private latestSealed(): string | null {
    const dir = path.join(this.o.stateDir, 'checkpoints');
    const names = readdirSync(dir).filter((n) => /^step-\d{7}\.sealed$/.test(n)).sort();
    return names.length ? path.join(dir, names[names.length - 1]) : null;
  }

  private async sealCheckpoint(name: string, dir: string): Promise<void> {
    const files = readdirSync(dir).map((f) => ({ name: f, data: readFileSync(path.join(dir, f)) }));
    const blob = await sealBlob(this.o.platform, 'checkpoint', packFiles(files));
    const dest = path.join(this.o.stateDir, 'checkpoints', `${name}.sealed`);
    writeFileSync(`${dest}.tmp`, blob);
    renameSync(`${dest}.tmp`, dest);
    // keep the two most recent
    const all = readdirSync(path.join(this.o.stateDir, 'checkpoints')).filter((n) => /^step-\d{7}\.sealed$/.test(n)).sort();
    for (const old of all.slice(0, -2)) rmSync(path.join(this.o.stateDir, 'checkpoints', old), { force: true });
    if (this.job) await this.persist();
  }

  private async unsealCheckpoint(file: string, runDir: string): Promise<void> {
    const name = path.basename(file, '.sealed');
    const files = unpackFiles(await unsealBlob(this.o.platform, 'checkpoint', readFileSync(file)));
    const dir = path.join(runDir, 'checkpoints', name);
    rmSync(path.join(runDir, 'checkpoints'), { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    for (const f of files) writeFileSync(path.join(dir, f.name), f.data);
  }

  async idle(): Promise<void> {
    await this.running;
  }

  async close(): Promise<void> {
    await this.link.close();
  }
}

/** Starts the gRPC server of an EnclaveService. */
export async function serveEnclave(o: EnclaveServeOptions): Promise<{ service: EnclaveService; port: number; close(): Promise<void> }> {
  const service = await EnclaveService.create(o);
  const server = new grpc.Server(enclaveServerOptions());
  widenServerWindow(server);
  const wrap = (fn: (req: unknown) => Promise<unknown>) => (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
    fn(call.request).then((v) => cb(null, v), (e: unknown) => cb(serviceError(e)));
  };
  server.addService(ENCLAVE_SERVICE, {
    Attest: wrap((r) => service.attest(r as { nonce?: unknown })),
    Command: wrap((r) => service.command(r as SealedCommand)),
    Health: wrap(async () => ({ status: 'SERVING', job: service.job?.state ?? null })),
    Upload: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const chunks: UploadChunk[] = [];
      let bytes = 0;
      let failed = false;
      call.on('data', (c: UploadChunk) => {
        bytes += JSON.stringify(c).length;
        if (bytes > MAX_UPLOAD_BYTES * 1.5 && !failed) {
          failed = true;
          cb(serviceError(new TransportError('upload too large', grpc.status.RESOURCE_EXHAUSTED)));
        }
        if (!failed) chunks.push(c);
      });
      call.on('end', () => {
        if (failed) return;
        service.upload(chunks).then((v) => cb(null, v), (e: unknown) => cb(serviceError(e)));
      });
      call.on('error', () => { failed = true; });
    },
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${o.host ?? '127.0.0.1'}:${o.port ?? 0}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  widenSessionWindows(server);
  return {
    service, port,
    close: async () => {
      await new Promise<void>((r) => server.tryShutdown(() => r()));
      await service.close();
    },
  };
}
