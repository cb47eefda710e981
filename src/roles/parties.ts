/**
 * The two client parties. The provider obfuscates its model, uploads the accelerator bundle
 * (obfuscated weights) to the accelerator and the enclave bundle, HPKE-encrypted to the
 * attested enclave key, to the enclave; later it fetches the fine-tuned update and merges it
 * with its secret mask key. The data owner encrypts each record to the enclave, starts the
 * job, reads metrics and runs inference. Both verify the enclave's attestation first.
 */
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { POOLINGS, type Pooling } from '../model/kernels.js';
import { newNonce, attestationRequest, verifyAttestation, sealToEnclave, type AttestedEnclave, type AttestationResponse } from '../tee/attest.js';
import { generateHpkeKeyPair, openWith, publicKeyToBase64, sealedFromJson, sealedToJson, type HpkeKeyPair } from '../tee/hpke.js';
import { SimSoftwareVerifier, measureDirectory } from '../tee/sim.js';
import type { EvidenceVerifier } from '../tee/platform.js';
import { fromBase64, toBase64 } from '../tee/platform.js';
import {
  ENCLAVE_SERVICE, ACC_ADMIN_SERVICE, EnclaveServiceClient, AccAdminClient, COMMAND_AAD, chunkAad, replyAad, clientOptions, unary, clientStream,
  chunks, packFiles, type UploadChunk, type UploadKind,
} from './protocol.js';
import type { Record_ } from '../io/jsonl.js';
import type { GPT2Weights } from '../model/weights.js';
import { openSafetensors } from '../io/safetensors.js';
import { checkKeyMatches, loadAcceleratorBundle, loadEnclaveBundle, loadProviderKey, withUpdate } from '../obfuscate/bundle.js';
import { deriveMasks } from '../obfuscate/masks.js';
import { deobfuscate } from '../obfuscate/transform.js';
import { LINEARS } from '../model/block.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import { loadAdapters, mergeAdaptersPlain } from '../train/session.js';
import type { JobSpec } from './enclave_service.js';
import { BundleError, StateError, TransportError } from '../errors.js';

export const DIST_SRC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The measurement of this build of the enclave program (compiled sources + configuration). */
export function enclaveMeasurement(config: Record<string, unknown> = { program: 'obfuscatune-enclave', version: 1 }): string {
  return measureDirectory(DIST_SRC, config).hex;
}

export interface TrustConfig {
  /** the (simulated) platform root public key, PEM file */
  rootPublicKey: string;
  /** accepted enclave measurements */
  allowList: string[];
}

/** A party's long-lived HPKE key pair (replies from the enclave are sealed to it). */
export async function loadOrCreatePartyKey(file: string): Promise<HpkeKeyPair> {
  if (existsSync(file)) {
    const j = JSON.parse(readFileSync(file, 'utf8')) as { public: string; private: string };
    return { publicKey: fromBase64(j.public), privateKey: fromBase64(j.private) };
  }
  const kp = await generateHpkeKeyPair();
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify({ public: toBase64(kp.publicKey), private: toBase64(kp.privateKey) }) + '\n', { mode: 0o600 });
  return kp;
}

export class EnclaveClient {
  private client: grpc.Client;
  attested: AttestedEnclave | null = null;

  constructor(readonly address: string, readonly key: HpkeKeyPair, readonly trust: TrustConfig | { verifiers: EvidenceVerifier[]; allowList: string[] }) {
    this.client = new EnclaveServiceClient(address, grpc.credentials.createInsecure(), clientOptions());
  }

  /** Verifies the enclave's evidence (platform root, measurement allow-list, fresh nonce). */
  async attest(): Promise<AttestedEnclave> {
    const nonce = newNonce();
    const resp = await unary<AttestationResponse>(this.client, ENCLAVE_SERVICE.Attest, attestationRequest(nonce));
    const verifiers = 'verifiers' in this.trust ? this.trust.verifiers : [SimSoftwareVerifier.fromPublicKeyFile(this.trust.rootPublicKey)];
    this.attested = await verifyAttestation(resp, nonce, { allowList: this.trust.allowList, verifiers });
    return this.attested;
  }

  private session(): AttestedEnclave {
    if (!this.attested) throw new StateError('attest the enclave first');
    return this.attested;
  }

  /** Uploads pieces, each sealed to the enclave (one record per piece for datasets). */
  async upload(kind: UploadKind, name: string, pieces: Uint8Array[]): Promise<unknown> {
    const s = this.session();
    const upload_id = randomUUID();
    const items: UploadChunk[] = [];
    for (let index = 0; index < pieces.length; index++) {
      const head = { kind, name, upload_id, index, total: pieces.length };
      const sealed = await sealToEnclave(s, pieces[index], chunkAad(head));
      items.push({ ...head, sender: publicKeyToBase64(this.key.publicKey), session: s.transcriptId, sealed: sealedToJson(sealed) });
    }
    return clientStream(this.client, ENCLAVE_SERVICE.Upload, items);
  }

  /** A sealed command; the reply is sealed to this party and opened here. */
  async command<T = Record<string, unknown>>(op: string, args: Record<string, unknown> = {}, deadlineMs = 600_000): Promise<T> {
    const s = this.session();
    const id = randomUUID();
    const sealed = await sealToEnclave(s, new TextEncoder().encode(JSON.stringify({ id, ts: Date.now(), op, ...args })), COMMAND_AAD);
    const rep = await unary<{ sealed: ReturnType<typeof sealedToJson> }>(this.client, ENCLAVE_SERVICE.Command, { sender: publicKeyToBase64(this.key.publicKey), session: s.transcriptId, sealed: sealedToJson(sealed) }, deadlineMs);
    const plain = await openWith(this.key.privateKey, sealedFromJson(rep.sealed), s.transcript, replyAad(id));
    return JSON.parse(new TextDecoder().decode(plain)) as T;
  }

  /** Sends raw bytes as a Command (tests of tampering and replays). */
  async rawCommand(msg: unknown): Promise<unknown> {
    return unary(this.client, ENCLAVE_SERVICE.Command, msg);
  }

  close(): void {
    this.client.close();
  }
}

// ------------------------------------------------------------------ provider
export async function uploadAcceleratorBundle(accAddress: string, bundleDir: string): Promise<{ manifest_sha256: string }> {
  const client = new AccAdminClient(accAddress, grpc.credentials.createInsecure(), clientOptions());
  try {
    const files = readdirSync(bundleDir).map((f) => ({ name: f, data: readFileSync(path.join(bundleDir, f)) }));
    const parts = chunks(packFiles(files));
    return await clientStream(client, ACC_ADMIN_SERVICE.LoadBundle, parts.map((p, index) => ({ index, total: parts.length, data: Buffer.from(p).toString('base64') })));
  } finally {
    client.close();
  }
}

export async function exportAcceleratorWeights(accAddress: string): Promise<Buffer> {
  const client = new AccAdminClient(accAddress, grpc.credentials.createInsecure(), clientOptions());
  try {
    const r = await unary<{ weights: string }>(client, ACC_ADMIN_SERVICE.Export, {});
    return Buffer.from(r.weights, 'base64');
  } finally {
    client.close();
  }
}

/** Uploads the enclave bundle directory, encrypted to the attested enclave. */
export async function uploadEnclaveBundle(c: EnclaveClient, bundleDir: string): Promise<unknown> {
  const files = readdirSync(bundleDir).map((f) => ({ name: f, data: readFileSync(path.join(bundleDir, f)) }));
  return c.upload('bundle', 'enclave', chunks(packFiles(files)));
}

/**
 * Provider side of the result: fetches the update from the enclave (and the trained
 * obfuscated weights from the accelerator for full fine-tuning) and merges it into a plain
 * model with the secret key. `bundles` holds accelerator/, enclave/ and provider/.
 */
export async function fetchAndMerge(c: EnclaveClient, accAddress: string, base: GPT2Weights, bundles: string, scratch: string): Promise<{ merged: GPT2Weights; update: Record<string, unknown> }> {
  const up = await c.command<{ update: string; method: string; mode: string; task: string; labels: string[]; pooling?: Pooling; summary: unknown }>('fetch_update');
  mkdirSync(scratch, { recursive: true });
  const file = path.join(scratch, 'update.safetensors');
  writeFileSync(file, Buffer.from(up.update, 'base64'));
  const st = openSafetensors(file);
  const encBundle = loadEnclaveBundle(path.join(bundles, 'enclave'));
  const tensors = withUpdate(encBundle, st, 'enclave.');
  const { key, params, file: keyFile } = loadProviderKey(path.join(bundles, 'provider'));
  checkKeyMatches(key, keyFile, [{ what: `enclave bundle ${path.join(bundles, 'enclave')}`, fingerprint: encBundle.keyFingerprint }]);
  let w = base;
  if (up.task === 'cls' && tensors.score) {
    const K = up.labels.length;
    if (up.pooling !== undefined && !POOLINGS.includes(up.pooling)) throw new BundleError(`the enclave's update has an unknown pooling ${JSON.stringify(up.pooling)}`);
    w = { ...base, cls: { numLabels: K, weight: new Float32Array(K * base.config.n_embd), labels: up.labels, pooling: up.pooling ?? 'last' } };
  }
  let acc: AcceleratorWeights;
  if (up.method === 'full') {
    const wf = path.join(scratch, 'accelerator.safetensors');
    writeFileSync(wf, await exportAcceleratorWeights(accAddress));
    const at = openSafetensors(wf);
    acc = loadAcceleratorBundle(path.join(bundles, 'accelerator')).weights;
    acc.layers.forEach((L, l) => { for (const n of LINEARS) { at.getInto(`h.${l}.${n}.weight`, L[n].w); at.getInto(`h.${l}.${n}.bias`, L[n].b); } });
  } else {
    acc = loadAcceleratorBundle(path.join(bundles, 'accelerator')).weights;
  }
  const masks = deriveMasks(base.config, key, params);
  let merged: GPT2Weights;
  if (up.method === 'lora') {
    const ad = loadAdapters(file, base.config.n_layer, base.config.n_embd, base.config.vocab_size);
    merged = mergeAdaptersPlain(deobfuscate(w, acc, tensors, masks), ad);
  } else {
    merged = deobfuscate(w, acc, tensors, masks);
  }
  rmSync(file, { force: true });
  return { merged, update: { method: up.method, mode: up.mode, task: up.task, labels: up.labels, pooling: up.pooling, summary: up.summary } };
}

// ------------------------------------------------------------------ data owner
export async function uploadRecords(c: EnclaveClient, split: 'train' | 'eval', records: Record_[]): Promise<unknown> {
  return c.upload('dataset', split, records.map((r) => new TextEncoder().encode(JSON.stringify(r))));
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
