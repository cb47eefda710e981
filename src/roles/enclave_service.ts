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
import { EnclaveAttestor, provePeer } from '../tee/attest.js';
import type { TeePlatform } from '../tee/platform.js';
import { sealTo, sealedFromJson, sealedToJson, publicKeyFromBase64 } from '../tee/hpke.js';
import { ReplayCache } from '../tee/replay.js';
import { signingPublicKeyFromBase64, verifySignature } from '../tee/signing.js';
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { parseJsonObjects } from '../io/jsonl.js';
import { parseJobSpec, checkRunSpecForModel } from '../train/run_spec.js';
import { BundleError, InputError, PolicyError, SessionError, StateError, TransportError } from '../errors.js';
import {
  chunkAad, commandAad, replyAad, unpackFiles, chunkSignedBytes, commandSignedBytes, padReply, type UploadChunk, type SealedCommand,
} from './protocol.js';
import { SealedStore, type PackedFile } from './enclave_store.js';
import { JobRunner, jobData, newJob, recoveredJob, type Datasets, type JobState, type RecordViewOptions } from './enclave_job.js';
import { authorize, checkUploader, releasesMetrics, type Role } from './enclave_policy.js';
import { bundleDigest, checkJobAllowed, roleOf, verifyContract, type Contract } from './contract.js';

export interface EnclaveServeOptions {
  platform: TeePlatform;
  stateDir: string;
  accelerator: string;
  host?: string;
  port?: number;
  /** private (memory-backed) scratch space; default: a fresh temp dir */
  privateDir?: string;
  log?: (line: string) => void;
  /** lifetime of an attestation session (default SESSION_TTL_MS) */
  sessionTtlMs?: number;
  /** sessions held at once; the oldest is dropped beyond it (default MAX_SESSIONS) */
  maxSessions?: number;
  /** the replay window of commands and uploads (default REPLAY_WINDOW_MS) */
  replayWindowMs?: number;
  /** clock, ms since the epoch (tests) */
  now?: () => number;
  /**
   * tests and measurements: record the accelerator's view of the next fine-tuning job to
   * `file` (saved when the job is done); `accelerator` is the accelerator bundle handed over
   */
  recordView?: RecordViewOptions;
}

/** An attestation session lives 30 minutes; clients attest again after that (EnclaveClient does so by itself). */
export const SESSION_TTL_MS = 30 * 60_000;
/** At most this many sessions are held (a few KB each); a flood of handshakes drops the oldest. */
export const MAX_SESSIONS = 4096;
/** Requests older than this (by their signed timestamp) are refused; ids are remembered as long. */
export const REPLAY_WINDOW_MS = 10 * 60_000;

/** What the owner's `start_finetune` carries: a run spec without the settings of the provider's bundle. */
export type { JobSpec } from '../train/run_spec.js';

const MAX_RECORDS = 1_000_000;
/** what every chunk of an upload shares with its first */
const UPLOAD_FIELDS = ['total', 'kind', 'name', 'upload_id', 'sender', 'reply_key', 'session', 'ts'] as const;
export const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;

/** The provider's view of a job's summary: aggregates only (no first or last step's loss). */
function aggregateSummary(summary: unknown): unknown {
  const s = summary as { eval?: unknown; seconds?: unknown; steps?: unknown } | null;
  return s ? { eval: s.eval, seconds: s.seconds, steps: s.steps } : null;
}

export class EnclaveService {
  private attestor!: EnclaveAttestor;
  /** session id -> transcript and expiry; insertion order is creation order */
  private sessions = new Map<string, { transcript: Uint8Array; expires: number }>();
  private readonly replay: ReplayCache;
  private readonly now: () => number;
  bundle: EnclaveBundle | null = null;
  private bundleFiles: PackedFile[] | null = null;
  private bundleSha256: string | null = null;
  private contract: Contract | null = null;
  private contractSha256: string | null = null;
  /** fine-tuning jobs started under the contract */
  private jobsStarted = 0;
  /** whether the provider fetched the update of the latest finished job */
  private updateFetched = true;
  private data: Datasets = { train: [], eval: [] };
  private runner: JobRunner | null = null;
  private readonly link: GrpcAcceleratorLink;
  private readonly store: SealedStore;
  private readonly log: (l: string) => void;

  private constructor(readonly o: EnclaveServeOptions) {
    // every connection to the accelerator proves, with evidence over its challenge, that it
    // comes from this attested enclave under the contract (the accelerator serves no one else)
    this.link = new GrpcAcceleratorLink(o.accelerator, {
      deadlineMs: 300_000,
      prove: async (challenge) => {
        if (!this.contractSha256) throw new PolicyError('no deployment contract yet: the accelerator serves only an enclave bound to its contract');
        return provePeer(o.platform, challenge, this.contractSha256);
      },
    });
    this.store = new SealedStore(o.platform, o.stateDir, o.privateDir ?? mkdtempSync(path.join(os.tmpdir(), 'obf-enclave-')));
    this.log = o.log ?? ((l) => console.error(`enclave: ${l}`));
    this.now = o.now ?? Date.now;
    this.replay = new ReplayCache({ ttlMs: o.replayWindowMs ?? REPLAY_WINDOW_MS, maxEntries: 100_000, now: this.now });
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

  /** Attestation sessions held now (bounded by maxSessions). */
  get sessionCount(): number {
    return this.sessions.size;
  }

  private persist(): Promise<void> {
    return this.store.save({
      contract: this.contract, job: this.job, data: this.data, jobs_started: this.jobsStarted, update_fetched: this.updateFetched,
    }, this.bundleFiles);
  }

  private async recover(): Promise<void> {
    const saved = await this.store.load();
    if (!saved) return;
    const meta = saved.meta as { contract?: unknown; data: Datasets; job: JobState | null; jobs_started?: number; update_fetched?: boolean };
    if (meta.contract) this.acceptContract(verifyContract(meta.contract, 'the sealed contract'));
    else this.log('the sealed state has no deployment contract (written by an earlier version): the parties submit one');
    this.data = meta.data;
    this.jobsStarted = meta.jobs_started ?? 0;
    this.updateFetched = meta.update_fetched ?? true;
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
      link: this.link, store: this.store, persist: () => this.persist(), log: this.log, recordView: this.o.recordView,
    });
  }

  private installBundle(files: PackedFile[]): void {
    this.bundle = this.store.installBundle(files);
    this.bundleFiles = files;
    this.bundleSha256 = bundleDigest(files);
  }

  private acceptContract(v: { contract: Contract; sha256: string }): void {
    this.contract = v.contract;
    this.contractSha256 = v.sha256;
    this.attestor.contractSha256 = v.sha256;
  }

  // ------------------------------------------------------------------ requests
  async attest(req: { nonce?: unknown }): Promise<unknown> {
    const r = await this.attestor.handle(req as { nonce: string });
    const now = this.now();
    // sessions expire in creation order: drop the expired ones, then the oldest beyond the bound
    for (const [id, s] of this.sessions) {
      if (s.expires > now && this.sessions.size < (this.o.maxSessions ?? MAX_SESSIONS)) break;
      this.sessions.delete(id);
    }
    this.sessions.set(r.transcriptId, { transcript: r.transcript, expires: now + (this.o.sessionTtlMs ?? SESSION_TTL_MS) });
    return r.response;
  }

  private session(id: unknown): Uint8Array {
    const s = typeof id === 'string' ? this.sessions.get(id) : undefined;
    if (!s) throw new SessionError('unknown attestation session (attest first; sessions expire)');
    if (s.expires <= this.now()) {
      this.sessions.delete(id as string);
      throw new SessionError('the attestation session expired (attest again)');
    }
    return s.transcript;
  }

  /** Checks that the request is signed by the key it names as `sender`, and that its reply key is a key. */
  private authenticate(r: { sender: unknown; reply_key: unknown; signature: unknown }, signed: () => Uint8Array, what: string): void {
    const pk = signingPublicKeyFromBase64(r.sender, `${what}: sender`);
    verifySignature(pk, signed(), r.signature, what);
    if (typeof r.reply_key !== 'string') throw new InputError(`${what}: reply_key missing`);
    publicKeyFromBase64(r.reply_key);
  }

  async upload(chunks: UploadChunk[]): Promise<unknown> {
    if (chunks.length === 0) throw new InputError('empty upload');
    const first = chunks[0];
    const transcript = this.session(first.session);
    const total = first.total;
    if (!Number.isInteger(total) || total !== chunks.length) throw new InputError(`upload incomplete: ${chunks.length} of ${total} chunks`);
    // who sent it, before anything else; then the replay rules on the signed id and time
    this.authenticate(first, () => chunkSignedBytes(first, transcript), 'upload chunk 0');
    if (typeof first.upload_id !== 'string' || typeof first.ts !== 'number') throw new InputError('upload: upload_id and ts required');
    this.replay.check(`upload:${first.upload_id}`, first.ts);
    checkUploader(first.kind, first.sender, this.contract?.body ?? null);
    if (this.job?.state === 'running') throw new StateError('a job is running');
    const plain: Uint8Array[] = [];
    let bytes = 0;
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i];
      if (c.index !== i || UPLOAD_FIELDS.some((k) => c[k] !== first[k])) throw new InputError(`upload chunk ${i} does not belong to this upload`);
      if (i > 0) this.authenticate(c, () => chunkSignedBytes(c, transcript), `upload chunk ${i}`);
      const p = await this.attestor.open(sealedFromJson(c.sealed), transcript, chunkAad(c));
      bytes += p.length;
      if (bytes > MAX_UPLOAD_BYTES) throw new TransportError('upload too large', grpc.status.RESOURCE_EXHAUSTED);
      plain.push(p);
    }
    const contract = this.contract!.body;
    if (first.kind === 'bundle') {
      const files = unpackFiles(Buffer.concat(plain));
      const digest = bundleDigest(files);
      if (digest !== contract.enclave_bundle_sha256) {
        throw new BundleError(`the bundle's digest ${digest.slice(0, 16)}... is not the contract's enclave bundle ${contract.enclave_bundle_sha256.slice(0, 16)}...`);
      }
      this.installBundle(files);
      if (this.bundle!.acceleratorManifestSha256 !== contract.accelerator_manifest_sha256) {
        throw new BundleError('the bundle expects another accelerator manifest than the contract names');
      }
      await this.persist();
      this.log(`installed the provider's ${this.bundle!.mode}-mode bundle ${digest.slice(0, 12)}`);
      return { ok: true, kind: 'bundle', mode: this.bundle!.mode, sha256: digest };
    }
    if (first.name !== 'train' && first.name !== 'eval') throw new InputError(`unknown dataset split "${first.name}"`);
    if (plain.length > MAX_RECORDS) throw new InputError('too many records');
    // the finished job's model is rebuilt from its checkpoint and this data after a restart
    if (this.job?.state === 'done' && !this.updateFetched) throw new StateError('the provider has not fetched the finished job\'s update yet: new data waits until then');
    // kept as sent: a job reads them with its own field names (jobData)
    const recs = parseJsonObjects(plain.map((p) => new TextDecoder().decode(p).replace(/\n/g, ' ')).join('\n'), `encrypted ${first.name} upload`).objects;
    this.data[first.name] = recs;
    await this.persist();
    this.log(`received ${recs.length} encrypted ${first.name} records`);
    return { ok: true, kind: 'dataset', name: first.name, records: recs.length };
  }

  async command(req: SealedCommand): Promise<unknown> {
    if (typeof req !== 'object' || req === null) throw new InputError('malformed command');
    const transcript = this.session(req.session);
    this.authenticate(req, () => commandSignedBytes(req, transcript), 'command');
    if (typeof req.id !== 'string' || req.id.length === 0 || req.id.length > 128 || typeof req.ts !== 'number') throw new InputError('malformed command: id and ts required');
    this.replay.check(req.id, req.ts);
    const text = new TextDecoder().decode(await this.attestor.open(sealedFromJson(req.sealed), transcript, commandAad(req.id)));
    let cmd: { op: string; [k: string]: unknown };
    try {
      cmd = JSON.parse(text);
    } catch (e) {
      throw new InputError('malformed command', { cause: e });
    }
    if (typeof cmd !== 'object' || cmd === null || typeof cmd.op !== 'string') throw new InputError('malformed command');
    const result = cmd.op === 'submit_contract'
      ? await this.submitContract(cmd.contract, req.sender)
      : await this.execute(cmd.op, cmd, authorize(cmd.op, req.sender, this.contract?.body ?? null));
    const sealed = await sealTo(publicKeyFromBase64(req.reply_key), padReply(cmd.op, JSON.stringify(result)), transcript, replyAad(req.id));
    return { sealed: sealedToJson(sealed) };
  }

  /**
   * Accepts the deployment contract once: signed by both parties it names, sent by one of
   * them. From then on every attestation report carries its hash. Sending the same contract
   * again is a no-op; another one is refused (a new deployment is a new enclave state).
   */
  private async submitContract(raw: unknown, sender: string): Promise<unknown> {
    const v = verifyContract(raw, 'submitted contract');
    if (!roleOf(v.contract.body, sender)) throw new PolicyError('policy: only a party the contract names may submit it');
    if (this.contractSha256 && this.contractSha256 !== v.sha256) throw new PolicyError(`policy: this enclave is bound to contract ${this.contractSha256.slice(0, 16)}... (a new contract needs a new enclave state)`);
    if (!this.contractSha256) {
      this.acceptContract(v);
      await this.persist();
      this.log(`accepted the deployment contract ${v.sha256.slice(0, 16)}... signed by provider ${v.contract.body.provider.slice(0, 8)}... and owner ${v.contract.body.owner.slice(0, 8)}...`);
    }
    return { accepted: true, contract_sha256: v.sha256 };
  }

  private async execute(op: string, cmd: Record<string, unknown>, role: Role): Promise<unknown> {
    switch (op) {
      case 'status': return this.status(role);
      case 'start_finetune': return this.startFinetune(cmd.spec);
      case 'cancel': return this.cancel(role);
      case 'infer': return this.finishedRunner().infer(cmd.texts, cmd.max_tokens, cmd.records);
      case 'fetch_update': {
        const up = await this.finishedRunner().exportUpdate() as Record<string, unknown>;
        this.updateFetched = true;
        await this.persist();
        return { ...up, summary: aggregateSummary(up.summary), bundle_sha256: this.bundleSha256, contract_sha256: this.contractSha256 };
      }
    }
    throw new InputError(`unknown command "${op}"`);
  }

  /** The job's metrics: the owner's in full; the provider's aggregates only (no per-step or per-example losses). */
  private status(role: Role): unknown {
    const j = this.job;
    const base = j && { state: j.state, step: j.step, steps: j.spec.steps, error: j.error };
    let job: unknown = base;
    if (j && releasesMetrics(this.contract!.body, role)) {
      job = role === 'owner'
        ? { ...base, loss: j.loss, eval: j.eval, recoveries: j.recoveries, summary: j.summary, losses: j.losses, labels: j.labels, warnings: j.warnings ?? [] }
        : { ...base, eval: j.eval, recoveries: j.recoveries, summary: aggregateSummary(j.summary) };
    }
    return {
      contract_sha256: this.contractSha256,
      bundle: this.bundle ? { mode: this.bundle.mode, n_layer: this.bundle.config.n_layer, n_embd: this.bundle.config.n_embd, sha256: this.bundleSha256 } : null,
      records: { train: this.data.train.length, eval: this.data.eval.length },
      job,
      jobs_started: this.jobsStarted,
      integrity_checks: this.runner?.model?.integrity?.checks ?? 0,
      accelerator_traffic: { messages: this.link.stats.messages, bytes: this.link.stats.bytes },
      role,
    };
  }

  private async startFinetune(raw: unknown): Promise<unknown> {
    if (!this.bundle) throw new BundleError('no model bundle installed yet');
    if (this.data.train.length === 0) throw new StateError('no training data uploaded yet');
    if (this.job?.state === 'running') throw new StateError('a job is already running');
    if (this.job?.state === 'done' && !this.updateFetched) throw new StateError('the provider has not fetched the update of the finished job yet (its checkpoints are kept until then)');
    // the same validation as every entry point, before any work; then the contract's limits
    const b = this.bundle;
    const spec = parseJobSpec(raw, { mode: b.mode, kappa: b.spec, two_sided: b.twoSided, ...('family' in b.tensors ? { rotary_masks: b.tensors.rotary } : {}) }, 'start_finetune');
    checkRunSpecForModel(spec, { n_ctx: b.config.n_ctx, headPooling: b.cls ? b.cls.pooling ?? 'last' : null }, 'start_finetune');
    checkJobAllowed(this.contract!.body, spec, this.jobsStarted);
    // the records in the job's terms (its field names), refused here by number when malformed
    const { warnings } = jobData(spec, this.data);
    this.runner = this.newRunner(newJob(spec));
    rmSync(this.runner.runDir, { recursive: true, force: true });
    this.store.clearCheckpoints();
    this.jobsStarted++;
    this.updateFetched = false;
    await this.persist();
    this.runner.start(false);
    return { started: true, job: this.jobsStarted, warnings };
  }

  private async cancel(role: Role): Promise<unknown> {
    if (this.job?.state !== 'running') throw new StateError('no job is running');
    await this.runner!.cancel(`cancelled by the ${role}`);
    return { cancelled: true, step: this.job.step };
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
