/**
 * The two client parties. The provider obfuscates its model, uploads the accelerator bundle
 * (obfuscated weights) to the accelerator and the enclave bundle, HPKE-encrypted to the
 * attested enclave key, to the enclave; later it fetches the fine-tuned update and merges it
 * with its secret mask key. The data owner encrypts each record to the enclave, starts the
 * job, reads metrics and runs inference. Both verify the enclave's attestation first.
 */
import { createHash, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { POOLINGS, type Pooling } from '../model/kernels.js';
import { newNonce, attestationRequest, verifyAttestation, sealToEnclave, type AttestedEnclave, type AttestationResponse } from '../tee/attest.js';
import { generateHpkeKeyPair, openWith, publicKeyToBase64, sealedFromJson, sealedToJson, type HpkeKeyPair } from '../tee/hpke.js';
import { generateSigningKeyPair, signBytes, signingKeyPairFromBase64, signingPrivateKeyToBase64, type SigningKeyPair } from '../tee/signing.js';
import { SimSoftwareVerifier, measureDirectory } from '../tee/sim.js';
import { fromBase64, toBase64, type EvidenceVerifier } from '../tee/platform.js';
import {
  ENCLAVE_SERVICE, ACC_ADMIN_SERVICE, EnclaveServiceClient, AccAdminClient, commandAad, chunkAad, replyAad, clientOptions, unary, clientStream,
  chunks, packFiles, readDirFiles, chunkSignedBytes, commandSignedBytes, adminSignedBytes, type AdminAuth, type UploadChunk, type UploadKind, type SealedCommand, type SealedReply,
} from './protocol.js';
import { classifiedLine, type Classified } from '../train/predict.js';
import { MAX_INFER } from './enclave_job.js';
import type { GPT2Weights } from '../model/weights.js';
import { openSafetensors } from '../io/safetensors.js';
import { checkKeyMatches, loadAcceleratorBundle, loadEnclaveBundle, loadProviderKey, withUpdate } from '../obfuscate/bundle.js';
import { deriveMasks } from '../obfuscate/masks.js';
import { deobfuscate } from '../obfuscate/transform.js';
import { layerLinearNames } from '../protocol/linears.js';
import { loadAdapters, mergeAdaptersPlain, mergeLlamaAdapters } from '../train/session.js';
import { isLlama } from '../model/config.js';
import type { LlamaWeights } from '../model/llama.js';
import { deobfuscateLlama, deriveLlamaMasks } from '../obfuscate/llama_transform.js';
import type { LoraAdapters } from '../model/lora.js';
import type { JobSpec } from './enclave_service.js';
import { BundleError, InputError, PolicyError, SessionError, StateError, TransportError } from '../errors.js';
import { bundleDirDigest, contractSha256, verifyContract, type Contract } from './contract.js';

export const DIST_SRC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The measurement of this build of the enclave program (compiled sources + configuration). */
export function enclaveMeasurement(config: Record<string, unknown> = { program: 'obfuscatune-enclave', version: 1 }): string {
  return measureDirectory(DIST_SRC, config).hex;
}

/**
 * A party's long-lived keys: the HPKE key pair its replies are sealed to, and the Ed25519
 * signing key that is its identity (the contract names its public half; every request is
 * signed with it).
 */
export interface PartyKey extends HpkeKeyPair {
  signing: SigningKeyPair;
}

/**
 * Reads a party's key file, or creates one. A key file of an earlier version (HPKE keys
 * only) gains a signing key: the file is rewritten and the change is reported on stderr.
 */
export async function loadOrCreatePartyKey(file: string, log: (line: string) => void = (l) => console.error(l)): Promise<PartyKey> {
  let kp: HpkeKeyPair;
  const existed = existsSync(file);
  if (existed) {
    let j: { public?: unknown; private?: unknown; signing_private?: unknown };
    try {
      j = JSON.parse(readFileSync(file, 'utf8'));
    } catch (e) {
      throw new InputError(`key file ${file}: not JSON (${(e as Error).message})`, { cause: e });
    }
    if (typeof j.public !== 'string' || typeof j.private !== 'string') throw new InputError(`key file ${file}: "public" and "private" (base64) required`);
    try {
      kp = { publicKey: fromBase64(j.public, 'public key'), privateKey: fromBase64(j.private, 'private key') };
    } catch (e) {
      throw new InputError(`key file ${file}: ${(e as Error).message}`, { cause: e });
    }
    if (typeof j.signing_private === 'string') return { ...kp, signing: signingKeyPairFromBase64(j.signing_private, `key file ${file}: signing key`) };
  } else kp = await generateHpkeKeyPair();
  const signing = generateSigningKeyPair();
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify({
    version: 2, public: toBase64(kp.publicKey), private: toBase64(kp.privateKey),
    signing_public: toBase64(signing.publicKey), signing_private: signingPrivateKeyToBase64(signing.privateKey),
  }) + '\n', { mode: 0o600 });
  if (existed) log(`key file ${file} had no signing key (written by an earlier version): added an Ed25519 signing key, public key ${toBase64(signing.publicKey)}; the enclave knows this party by it (put it in the deployment contract)`);
  return { ...kp, signing };
}

/** A party's signing public key (base64): its identity in the contract and in every request. */
export function partyId(k: PartyKey): string {
  return toBase64(k.signing.publicKey);
}

/** Progress of an upload: `done` of `total` units, and what it is doing (the CLI prints it on stderr). */
export type UploadProgress = (done: number, total: number, label: string) => void;

export interface EnclaveTrust {
  /** the (simulated) platform root public key, PEM file; or verifiers */
  rootPublicKey?: string;
  verifiers?: EvidenceVerifier[];
  /** accepted enclave measurements */
  allowList: string[];
  /** the deployment contract (signed by both parties): submitted if the enclave has none, required to be the one it is bound to */
  contract: Contract;
}

export class EnclaveClient {
  private client: grpc.Client;
  attested: AttestedEnclave | null = null;
  /** the hash of the contract this client requires the enclave to be bound to */
  readonly contractSha256: string;

  constructor(readonly address: string, readonly key: PartyKey, readonly trust: EnclaveTrust) {
    this.client = new EnclaveServiceClient(address, grpc.credentials.createInsecure(), clientOptions());
    this.contractSha256 = contractSha256(trust.contract.body);
  }

  private async handshake(): Promise<AttestedEnclave> {
    const nonce = newNonce();
    const resp = await unary<AttestationResponse>(this.client, ENCLAVE_SERVICE.Attest, attestationRequest(nonce));
    const verifiers = this.trust.verifiers ?? [SimSoftwareVerifier.fromPublicKeyFile(this.trust.rootPublicKey!)];
    return verifyAttestation(resp, nonce, { allowList: this.trust.allowList, verifiers });
  }

  /**
   * Verifies the enclave's evidence (platform root, measurement allow-list, fresh nonce) and
   * that it is bound to this client's contract. An enclave with no contract yet gets it
   * (signed by both parties), and is attested again: the new report must carry its hash.
   */
  async attest(): Promise<AttestedEnclave> {
    let a = await this.handshake();
    if (a.contractSha256 === null) {
      this.attested = a;
      await this.command('submit_contract', { contract: this.trust.contract });
      a = await this.handshake();
    }
    if (a.contractSha256 !== this.contractSha256) {
      this.attested = null;
      throw new PolicyError(`the enclave is bound to contract ${a.contractSha256?.slice(0, 16) ?? 'none'}..., not this party's ${this.contractSha256.slice(0, 16)}...`);
    }
    this.attested = a;
    return a;
  }

  private session(): AttestedEnclave {
    if (!this.attested) throw new StateError('attest the enclave first');
    return this.attested;
  }

  /** A request that fails because the session expired is sent again once, after a new handshake. */
  private async withSession<T>(fn: (s: AttestedEnclave) => Promise<T>): Promise<T> {
    try {
      return await fn(this.session());
    } catch (e) {
      if (!(e instanceof SessionError)) throw e;
      await this.attest();
      return fn(this.session());
    }
  }

  /** Seals, signs and uploads the pieces; progress: a unit per piece sealed, as many for the enclave's checks. */
  async upload(kind: UploadKind, name: string, pieces: Uint8Array[], onProgress?: UploadProgress): Promise<unknown> {
    return this.withSession(async (s) => {
      const chunks = await this.uploadChunks(s, kind, name, pieces, onProgress);
      onProgress?.(pieces.length, 2 * pieces.length, `the enclave checks and opens ${pieces.length} pieces`);
      const r = await clientStream(this.client, ENCLAVE_SERVICE.Upload, chunks);
      onProgress?.(2 * pieces.length, 2 * pieces.length, 'stored');
      return r;
    });
  }

  /** The signed chunks of an upload (tests send them by hand). */
  async uploadChunks(s: AttestedEnclave, kind: UploadKind, name: string, pieces: Uint8Array[], onProgress?: UploadProgress): Promise<UploadChunk[]> {
    const upload_id = randomUUID();
    const sealed = [];
    for (let index = 0; index < pieces.length; index++) {
      onProgress?.(index, 2 * pieces.length, `encrypting piece ${index + 1}/${pieces.length} to the enclave`);
      sealed.push(await sealToEnclave(s, pieces[index], chunkAad({ kind, name, upload_id, index, total: pieces.length })));
    }
    // stamped once every piece is sealed, so a long upload is not already old when it leaves
    const ts = Date.now();
    return sealed.map((m, index) => {
      const c: Omit<UploadChunk, 'signature'> = {
        kind, name, upload_id, index, total: pieces.length, sender: partyId(this.key), reply_key: publicKeyToBase64(this.key.publicKey),
        session: s.transcriptId, ts, sealed: sealedToJson(m),
      };
      return { ...c, signature: signBytes(this.key.signing, chunkSignedBytes(c, s.transcript)) };
    });
  }

  /** A signed command sealed to the enclave (tests send it by hand). */
  async sealedCommand(s: AttestedEnclave, op: string, args: Record<string, unknown> = {}, id: string = randomUUID(), ts = Date.now()): Promise<SealedCommand> {
    const sealed = await sealToEnclave(s, new TextEncoder().encode(JSON.stringify({ op, ...args })), commandAad(id));
    const c: Omit<SealedCommand, 'signature'> = { sender: partyId(this.key), reply_key: publicKeyToBase64(this.key.publicKey), session: s.transcriptId, id, ts, sealed: sealedToJson(sealed) };
    return { ...c, signature: signBytes(this.key.signing, commandSignedBytes(c, s.transcript)) };
  }

  /** Opens the enclave's reply to request `id` (sealed to this party). */
  async openReply<T>(s: AttestedEnclave, id: string, rep: SealedReply): Promise<T> {
    const plain = await openWith(this.key.privateKey, sealedFromJson(rep.sealed), s.transcript, replyAad(id));
    return JSON.parse(new TextDecoder().decode(plain)) as T;
  }

  /** A signed, sealed command; the reply is sealed to this party and opened here. */
  async command<T = Record<string, unknown>>(op: string, args: Record<string, unknown> = {}, deadlineMs = 600_000): Promise<T> {
    return this.withSession(async (s) => {
      const req = await this.sealedCommand(s, op, args);
      const rep = await unary<SealedReply>(this.client, ENCLAVE_SERVICE.Command, req, deadlineMs);
      return this.openReply<T>(s, req.id, rep);
    });
  }

  /** Sends a Command message as given (tests of tampering, spoofing and replays). */
  async rawCommand(msg: unknown): Promise<unknown> {
    return unary(this.client, ENCLAVE_SERVICE.Command, msg);
  }

  /** Sends Upload chunks as given. */
  async rawUpload(items: unknown[]): Promise<unknown> {
    return clientStream(this.client, ENCLAVE_SERVICE.Upload, items);
  }

  close(): void {
    this.client.close();
  }
}

// ------------------------------------------------------------------ provider
/** The provider's signature on an accelerator admin call. */
export function adminAuth(key: PartyKey, method: string, payload: Uint8Array): AdminAuth {
  const a = { sender: partyId(key), ts: Date.now(), nonce: randomUUID(), payload_sha256: createHash('sha256').update(payload).digest('hex') };
  return { ...a, signature: signBytes(key.signing, adminSignedBytes(method, a)) };
}

/** `fn` on a client of the accelerator's admin service, closed afterwards. */
async function withAdmin<T>(accAddress: string, fn: (client: grpc.Client) => Promise<T>): Promise<T> {
  const client = new AccAdminClient(accAddress, grpc.credentials.createInsecure(), clientOptions());
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

/** Uploads the accelerator bundle (obfuscated weights), signed with the provider's key. */
export async function uploadAcceleratorBundle(accAddress: string, bundleDir: string, key: PartyKey, onProgress?: UploadProgress): Promise<{ manifest_sha256: string }> {
  return withAdmin(accAddress, (client) => {
    const packed = packFiles(readDirFiles(bundleDir));
    const auth = adminAuth(key, 'LoadBundle', packed);
    const parts = chunks(packed);
    onProgress?.(0, 1, `sending ${parts.length} chunks (${(packed.length / 2 ** 20).toFixed(1)} MiB); the accelerator checks and loads them`);
    return clientStream(client, ACC_ADMIN_SERVICE.LoadBundle, parts.map((p, index) => ({ index, total: parts.length, data: Buffer.from(p).toString('base64'), ...(index === 0 ? { auth } : {}) })));
  });
}

/** The accelerator's trained weights (full fine-tuning), asked for with the provider's key. */
export async function exportAcceleratorWeights(accAddress: string, key: PartyKey): Promise<{ weights: Buffer; manifest_sha256: string | null }> {
  const r = await withAdmin(accAddress, (client) => unary<{ weights: string; manifest_sha256?: string | null }>(client, ACC_ADMIN_SERVICE.Export, { auth: adminAuth(key, 'Export', new Uint8Array(0)) }));
  return { weights: Buffer.from(r.weights, 'base64'), manifest_sha256: r.manifest_sha256 ?? null };
}

/** Uploads the enclave bundle directory, encrypted to the attested enclave. */
export async function uploadEnclaveBundle(c: EnclaveClient, bundleDir: string, onProgress?: UploadProgress): Promise<unknown> {
  return c.upload('bundle', 'enclave', chunks(packFiles(readDirFiles(bundleDir))), onProgress);
}

/**
 * Provider side of the result: fetches the update from the enclave (and the trained
 * obfuscated weights from the accelerator for full fine-tuning) and merges it into a plain
 * model with the secret key. `bundles` holds accelerator/, enclave/ and provider/.
 */
export async function fetchAndMerge<W extends GPT2Weights | LlamaWeights>(c: EnclaveClient, accAddress: string, base: W, bundles: string, scratch: string): Promise<{ merged: W; update: Record<string, unknown>; adapters: LoraAdapters | null }> {
  // a mask key that did not make these bundles is refused before anything is fetched or written
  const encBundle = loadEnclaveBundle(path.join(bundles, 'enclave'));
  const { key, params, file: keyFile } = loadProviderKey(path.join(bundles, 'provider'));
  checkKeyMatches(key, keyFile, [{ what: `enclave bundle ${path.join(bundles, 'enclave')}`, fingerprint: encBundle.keyFingerprint }]);
  const up = await c.command<{ update: string; method: string; mode: string; task: string; labels: string[]; pooling?: Pooling; summary: unknown; bundle_sha256: string | null; contract_sha256: string | null }>('fetch_update');
  // the update must come from this provider's own bundle, under its own contract
  const own = bundleDirDigest(path.join(bundles, 'enclave'));
  if (up.contract_sha256 !== c.contractSha256) throw new PolicyError(`the update was made under contract ${String(up.contract_sha256).slice(0, 16)}..., not this provider's ${c.contractSha256.slice(0, 16)}...`);
  if (up.bundle_sha256 !== own) throw new BundleError(`the update was made from enclave bundle ${String(up.bundle_sha256).slice(0, 16)}..., not this provider's ${own.slice(0, 16)}... (${path.join(bundles, 'enclave')}); refusing to merge`);
  if (c.trust.contract.body.enclave_bundle_sha256 !== own) throw new BundleError(`the local enclave bundle ${own.slice(0, 16)}... is not the contract's`);
  mkdirSync(scratch, { recursive: true });
  const file = path.join(scratch, 'update.safetensors');
  writeFileSync(file, Buffer.from(up.update, 'base64'));
  const st = openSafetensors(file);
  const tensors = withUpdate(encBundle, st, 'enclave.');
  if (('family' in tensors) !== isLlama(base.config)) throw new BundleError(`the provider's merge: a ${isLlama(base.config) ? 'Llama-family' : 'GPT-2'} base model and a bundle of the other family`);
  let w = base;
  if (up.task === 'cls' && tensors.score) {
    const K = up.labels.length;
    if (up.pooling !== undefined && !POOLINGS.includes(up.pooling)) throw new BundleError(`the enclave's update has an unknown pooling ${JSON.stringify(up.pooling)}`);
    w = { ...base, cls: { numLabels: K, weight: new Float32Array(K * base.config.n_embd), labels: up.labels, pooling: up.pooling ?? 'last' } };
  }
  const { weights: acc, manifestSha256: want } = loadAcceleratorBundle(path.join(bundles, 'accelerator'));
  if (up.method === 'full') {
    const wf = path.join(scratch, 'accelerator.safetensors');
    const ex = await exportAcceleratorWeights(accAddress, c.key);
    if (ex.manifest_sha256 !== want) throw new BundleError(`the accelerator's trained weights belong to bundle ${String(ex.manifest_sha256).slice(0, 16)}..., not this provider's ${want.slice(0, 16)}...`);
    writeFileSync(wf, ex.weights);
    const at = openSafetensors(wf);
    acc.layers.forEach((L, l) => { for (const n of layerLinearNames(L)) { at.getInto(`h.${l}.${n}.weight`, L[n]!.w); at.getInto(`h.${l}.${n}.bias`, L[n]!.b); } });
  }
  const ad = up.method === 'lora' ? loadAdapters(file, base.config.n_layer, base.config.n_embd, base.config.vocab_size, base.config) : null;
  let merged: W;
  if ('family' in tensors) {
    const lw = w as LlamaWeights, plain = deobfuscateLlama(lw, acc, tensors, deriveLlamaMasks(lw.config, key, params, tensors.rotary));
    merged = (ad ? mergeLlamaAdapters(plain, ad) : plain) as W;
  } else {
    const plain = deobfuscate(w as GPT2Weights, acc, tensors, deriveMasks(base.config, key, params));
    merged = (ad ? mergeAdaptersPlain(plain, ad) : plain) as W;
  }
  rmSync(file, { force: true });
  return { merged, update: { method: up.method, mode: up.mode, task: up.task, labels: up.labels, pooling: up.pooling, summary: up.summary }, adapters: ad };
}

// ------------------------------------------------------------------ data owner
/**
 * Encrypts each record (a JSON object, as in the owner's file: the enclave reads it with the
 * job's field names) to the enclave and uploads them, after checking that the enclave
 * runs the contract's bundle (the enclave refuses any other, this check says so up front).
 */
export async function uploadRecords(c: EnclaveClient, split: 'train' | 'eval', records: object[], onProgress?: UploadProgress): Promise<unknown> {
  const st = await c.command<{ bundle: { sha256: string } | null }>('status');
  const want = c.trust.contract.body.enclave_bundle_sha256;
  if (!st.bundle) throw new BundleError('the enclave has no model bundle yet: the provider deploys first (no record was sent)');
  if (st.bundle.sha256 !== want) throw new BundleError(`the enclave's bundle ${st.bundle.sha256.slice(0, 16)}... is not the contract's ${want.slice(0, 16)}... (no record was sent)`);
  return c.upload('dataset', split, records.map((r) => new TextEncoder().encode(JSON.stringify(r))), onProgress);
}

/**
 * Inference of the finished job on records (JSON objects, read in the enclave with the job's
 * field names), MAX_INFER per command: per record, its index and the predicted label with the
 * probability of every label (classification) or the completion (LM).
 */
export async function inferRecords(c: EnclaveClient, records: object[], o: { maxTokens?: number; onBatch?: (done: number) => void } = {}): Promise<Record<string, unknown>[]> {
  const out: Record<string, unknown>[] = [];
  for (let i = 0; i < records.length; i += MAX_INFER) {
    const r = await c.command<Partial<Classified> & { labels?: string[]; completions?: string[] }>('infer', { records: records.slice(i, i + MAX_INFER), max_tokens: o.maxTokens });
    if (r.completions) r.completions.forEach((completion, j) => out.push({ index: i + j, completion }));
    else r.predictions!.forEach((p, j) => out.push(classifiedLine(i + j, p, r.labels!, r.probabilities![j])));
    o.onBatch?.(out.length);
  }
  return out;
}

export async function waitForJob(c: EnclaveClient, onStatus?: (s: Record<string, unknown>) => void, timeoutMs = 3_600_000): Promise<Record<string, unknown>> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const s = await c.command<{ job: { state: string } | null }>('status');
    onStatus?.(s as unknown as Record<string, unknown>);
    if (s.job && s.job.state !== 'running') return s as unknown as Record<string, unknown>;
    if (Date.now() > end) throw new TransportError('timed out waiting for the fine-tuning job', grpc.status.DEADLINE_EXCEEDED);
    await new Promise((r) => setTimeout(r, 300));
  }
}

export type { JobSpec };
