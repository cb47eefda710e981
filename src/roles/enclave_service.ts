/**
 * `obfuscatune enclave serve`: the TEE program. It attests to a fresh HPKE key, receives the
 * provider's enclave bundle and the owner's records encrypted to that key, runs the owner's
 * fine-tuning job through the accelerator (enclave_job.ts), answers each party encrypted to
 * that party under the policy (enclave_policy.ts), and keeps its persistent state sealed
 * (enclave_store.ts), so a restarted enclave resumes where it stopped. The gRPC wiring is
 * enclave_server.ts.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { EnclaveAttestor } from '../tee/attest.js';
import type { TeePlatform } from '../tee/platform.js';
import { sealTo, sealedFromJson, sealedToJson, publicKeyFromBase64 } from '../tee/hpke.js';
import { ReplayCache } from '../tee/replay.js';
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { parseJsonl } from '../io/jsonl.js';
import { parseJobSpec, checkRunSpecForModel } from '../train/run_spec.js';
import { BundleError, InputError, PolicyError, StateError, TransportError } from '../errors.js';
import { COMMAND_AAD, chunkAad, replyAad, unpackFiles, type UploadChunk, type SealedCommand } from './protocol.js';
import { SealedStore, type PackedFile } from './enclave_store.js';
import { JobRunner, newJob, recoveredJob, type Datasets, type JobState } from './enclave_job.js';
import { authorize, checkUploader, type Parties, type Role } from './enclave_policy.js';

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

const MAX_RECORDS = 1_000_000;
export const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;

export class EnclaveService {
  private attestor!: EnclaveAttestor;
  private sessions = new Map<string, Uint8Array>();
  private replay = new ReplayCache({ ttlMs: 10 * 60_000, maxEntries: 100_000 });
  bundle: EnclaveBundle | null = null;
  private bundleFiles: PackedFile[] | null = null;
  private parties: Parties = { provider: null, owner: null };
  private data: Datasets = { train: [], eval: [] };
  private runner: JobRunner | null = null;
  private readonly link: GrpcAcceleratorLink;
  private readonly store: SealedStore;
  private readonly log: (l: string) => void;

  private constructor(readonly o: EnclaveServeOptions) {
    this.link = new GrpcAcceleratorLink(o.accelerator, { deadlineMs: 300_000 });
    this.store = new SealedStore(o.platform, o.stateDir, o.privateDir ?? mkdtempSync(path.join(os.tmpdir(), 'obf-enclave-')));
    this.log = o.log ?? ((l) => console.error(`enclave: ${l}`));
  }

  static async create(o: EnclaveServeOptions): Promise<EnclaveService> {
    const s = new EnclaveService(o);
    s.attestor = await EnclaveAttestor.create(o.platform);
    await s.recover();
    return s;
  }

  get job(): JobState | null {
    return this.runner?.job ?? null;
  }

  get privateDir(): string {
    return this.store.privateDir;
  }

  private persist(): Promise<void> {
    return this.store.save({ provider: this.parties.provider, owner: this.parties.owner, job: this.job, data: this.data }, this.bundleFiles);
  }

  private async recover(): Promise<void> {
    const saved = await this.store.load();
    if (!saved) return;
    const meta = saved.meta as { provider: string | null; owner: string | null; data: Datasets; job: JobState | null };
    this.parties = { provider: meta.provider, owner: meta.owner };
    this.data = meta.data;
    if (saved.bundleFiles) this.installBundle(saved.bundleFiles);
    if (meta.job) this.runner = this.newRunner(recoveredJob(meta.job));
    this.log(`recovered sealed state: bundle ${this.bundle ? 'yes' : 'no'}, ${this.data.train.length} training records, job ${this.job?.state ?? 'none'}`);
    if (this.runner && this.job!.state === 'running') {
      if (!this.bundle) throw new BundleError('the sealed state has a running job but no bundle');
      this.job!.recoveries++;
      this.runner.start(true);
    }
  }

  private newRunner(job: JobState): JobRunner {
    const svc = this;
    return new JobRunner(job, {
      // the bundle installed when the job runs (a job is only started with one)
      get bundle() { return svc.bundle!; },
      get data() { return svc.data; },
      link: this.link, store: this.store, persist: () => this.persist(), log: this.log,
    });
  }

  private installBundle(files: PackedFile[]): void {
    this.bundle = this.store.installBundle(files);
    this.bundleFiles = files;
  }

  // ------------------------------------------------------------------ requests
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
    checkUploader(first.kind, first.sender, this.parties);
    if (first.kind === 'bundle') {
      if (this.job?.state === 'running') throw new StateError('a job is running');
      this.installBundle(unpackFiles(Buffer.concat(plain)));
      this.parties.provider = first.sender;
      await this.persist();
      this.log(`installed the provider's ${this.bundle!.mode}-mode bundle`);
      return { ok: true, kind: 'bundle', mode: this.bundle!.mode };
    }
    if (first.name !== 'train' && first.name !== 'eval') throw new InputError(`unknown dataset split "${first.name}"`);
    if (plain.length > MAX_RECORDS) throw new InputError('too many records');
    const recs = parseJsonl(plain.map((p) => new TextDecoder().decode(p).replace(/\n/g, ' ')).join('\n'), `encrypted ${first.name} upload`);
    this.data[first.name] = recs;
    this.parties.owner = first.sender;
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
    const role = authorize(cmd.op, req.sender, this.parties);
    const result = await this.execute(cmd.op, cmd, role);
    const sealed = await sealTo(publicKeyFromBase64(req.sender), new TextEncoder().encode(JSON.stringify(result)), transcript, replyAad(cmd.id));
    return { sealed: sealedToJson(sealed) };
  }

  private async execute(op: string, cmd: Record<string, unknown>, role: Role): Promise<unknown> {
    switch (op) {
      case 'status': return this.status(role);
      case 'start_finetune': return this.startFinetune(cmd.spec);
      case 'infer': return this.finishedRunner().infer(cmd.texts, cmd.max_tokens);
      case 'fetch_update': return this.finishedRunner().exportUpdate();
    }
    throw new InputError(`unknown command "${op}"`);
  }

  private status(role: Role): unknown {
    const j = this.job;
    return {
      bundle: this.bundle ? { mode: this.bundle.mode, n_layer: this.bundle.config.n_layer, n_embd: this.bundle.config.n_embd } : null,
      records: { train: this.data.train.length, eval: this.data.eval.length },
      job: j ? { state: j.state, step: j.step, steps: j.spec.steps, loss: j.loss, eval: j.eval, error: j.error, recoveries: j.recoveries, summary: j.summary, losses: j.losses } : null,
      integrity_checks: this.runner?.model?.integrity?.checks ?? 0,
      accelerator_traffic: { messages: this.link.stats.messages, bytes: this.link.stats.bytes },
      role,
    };
  }

  private async startFinetune(raw: unknown): Promise<unknown> {
    if (!this.bundle) throw new BundleError('no model bundle installed yet');
    if (this.data.train.length === 0) throw new StateError('no training data uploaded yet');
    if (this.job?.state === 'running') throw new StateError('a job is already running');
    // the same validation as every entry point, before any work
    const b = this.bundle;
    const spec = parseJobSpec(raw, { mode: b.mode, kappa: b.spec, two_sided: b.twoSided }, 'start_finetune');
    checkRunSpecForModel(spec, { n_ctx: b.config.n_ctx, headPooling: b.cls ? b.cls.pooling ?? 'last' : null }, 'start_finetune');
    this.runner = this.newRunner(newJob(spec));
    rmSync(this.runner.runDir, { recursive: true, force: true });
    this.store.clearCheckpoints();
    await this.persist();
    this.runner.start(false);
    return { started: true };
  }

  private finishedRunner(): JobRunner {
    if (!this.runner) throw new StateError('no finished job (run a job first)');
    return this.runner;
  }

  async idle(): Promise<void> {
    await this.runner?.idle();
  }

  async close(): Promise<void> {
    await this.link.close();
  }
}
