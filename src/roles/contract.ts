/**
 * The deployment contract: a small document the model provider and the data owner both sign
 * before any data moves. It names both parties' signing keys, the provider's two bundles (the
 * accelerator manifest's SHA-256 and the enclave bundle's digest), the jobs the owner may
 * run (methods, tasks, most steps, most jobs) and the release policy (who may cancel a job;
 * the provider receives the update and aggregate metrics only). The enclave accepts it only
 * when both signatures verify, binds its hash into every attestation report from then on,
 * and refuses every request outside it (docs/deployment.md, "The deployment contract").
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { canonicalJson, lengthPrefixed, toBase64 } from '../tee/platform.js';
import { signBytes, signingPublicKeyFromBase64, verifySignature, type SigningKeyPair } from '../tee/signing.js';
import { InputError, PolicyError } from '../errors.js';
import type { Role } from './enclave_policy.js';
import { readDirFiles, type PackedFile } from './protocol.js';

const hex64 = z.string().regex(/^[0-9a-f]{64}$/, 'a SHA-256 in lower-case hex');
const key = z.string().regex(/^[A-Za-z0-9+/]{43}=$/, 'an Ed25519 public key (32 bytes, base64)');

export const ContractBodySchema = z.object({
  version: z.literal(1),
  /** free text naming the deployment */
  name: z.string().max(200),
  /** Ed25519 public keys (base64) */
  provider: key,
  owner: key,
  /** SHA-256 of the accelerator bundle's manifest.json (what the accelerator serves) */
  accelerator_manifest_sha256: hex64,
  /** `bundleDigest` of the enclave bundle's files */
  enclave_bundle_sha256: hex64,
  jobs: z.object({
    methods: z.array(z.enum(['lora', 'full'])).min(1),
    tasks: z.array(z.enum(['cls', 'lm'])).min(1),
    max_steps: z.number().int().min(1).max(10_000_000),
    /** fine-tuning jobs the enclave starts under this contract, in all */
    max_jobs: z.number().int().min(1).max(10_000),
  }).strict(),
  /** the release policy: who receives what, and who may cancel a running job */
  release: z.object({
    /** the provider: the fine-tuned update, the job's aggregate metrics (state, steps, evaluation) */
    provider: z.array(z.enum(['update', 'aggregate_metrics'])),
    /** the owner: the job's metrics (losses per step, evaluation), inference with the fine-tuned model */
    owner: z.array(z.enum(['metrics', 'inference'])),
    cancel: z.array(z.enum(['owner', 'provider'])).min(1),
  }).strict(),
}).strict();

export type ContractBody = z.infer<typeof ContractBodySchema>;

export const ContractSchema = z.object({
  body: ContractBodySchema,
  signatures: z.object({ provider: z.string().optional(), owner: z.string().optional() }).strict(),
}).strict();

export type Contract = z.infer<typeof ContractSchema>;

/** The contract's hash: SHA-256 of its body's canonical JSON, hex. */
export function contractSha256(body: ContractBody): string {
  return createHash('sha256').update(canonicalJson(body)).digest('hex');
}

function signedBytes(body: ContractBody): Uint8Array {
  return lengthPrefixed(new TextEncoder().encode('obfuscatune/contract/v1'), Buffer.from(contractSha256(body), 'hex'));
}

/** Parses a contract (InputError naming the field on a bad one); signatures are not checked here. */
export function parseContract(raw: unknown, source = 'contract'): Contract {
  const r = ContractSchema.safeParse(raw);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new InputError(`${source}: ${i.path.join('.') || '(document)'}: ${i.message}`);
  }
  return r.data;
}

const SIGNERS = ['provider', 'owner'] as const;

/** PolicyError when `role` did not sign, SignatureError when its signature does not verify. */
function checkSignature(c: Contract, role: Role, source: string): void {
  const sig = c.signatures[role];
  if (!sig) throw new PolicyError(`${source}: not signed by the ${role}`);
  verifySignature(signingPublicKeyFromBase64(c.body[role], `${source}: ${role} key`), signedBytes(c.body), sig, `${source}: the ${role}'s signature`);
}

/**
 * Checks a contract is well formed and signed by both parties it names; returns its hash.
 * PolicyError when a signature is missing, SignatureError when one does not verify.
 */
export function verifyContract(raw: unknown, source = 'contract'): { contract: Contract; sha256: string } {
  const c = parseContract(raw, source);
  if (c.body.provider === c.body.owner) throw new PolicyError(`${source}: the provider and the owner must have different keys`);
  for (const role of SIGNERS) checkSignature(c, role, source);
  return { contract: c, sha256: contractSha256(c.body) };
}

/** Adds `role`'s signature; the key must be the one the contract names for that role. */
export function signContract(c: Contract, role: Role, k: SigningKeyPair): Contract {
  if (toBase64(k.publicKey) !== c.body[role]) throw new PolicyError(`this key is not the contract's ${role} key`);
  return { ...c, signatures: { ...c.signatures, [role]: signBytes(k, signedBytes(c.body)) } };
}

/** The role a signing key (base64) has under the contract, or null. */
export function roleOf(c: ContractBody, sender: string): Role | null {
  return sender === c.provider ? 'provider' : sender === c.owner ? 'owner' : null;
}

/** Digest of a bundle's files: SHA-256 over the sorted (name, SHA-256 of the bytes) pairs. */
export function bundleDigest(files: PackedFile[]): string {
  const h = createHash('sha256').update('obfuscatune/bundle-digest/v1\n');
  for (const f of [...files].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    h.update(`${f.name}\n${createHash('sha256').update(f.data).digest('hex')}\n`);
  }
  return h.digest('hex');
}

export function bundleDirDigest(dir: string): string {
  return bundleDigest(readDirFiles(dir));
}

export function readContract(file: string): Contract {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new InputError(`contract ${file}: ${(e as Error).message}`, { cause: e });
  }
  return parseContract(raw, `contract ${file}`);
}

export function writeContract(file: string, c: Contract): void {
  writeFileSync(file, JSON.stringify(c, null, 2) + '\n');
}

/** Job limits of the contract (checked by the enclave before a job starts). */
export function checkJobAllowed(c: ContractBody, spec: { method: string; task: string; steps: number }, jobsSoFar: number): void {
  const j = c.jobs;
  if (!(j.methods as string[]).includes(spec.method)) throw new PolicyError(`contract: method "${spec.method}" is not allowed (allowed: ${j.methods.join(', ')})`);
  if (!(j.tasks as string[]).includes(spec.task)) throw new PolicyError(`contract: task "${spec.task}" is not allowed (allowed: ${j.tasks.join(', ')})`);
  if (spec.steps > j.max_steps) throw new PolicyError(`contract: ${spec.steps} steps exceed the contract's limit of ${j.max_steps}`);
  if (jobsSoFar >= j.max_jobs) throw new PolicyError(`contract: the contract allows ${j.max_jobs} job(s), ${jobsSoFar} already ran`);
}

export interface DraftOptions {
  name?: string;
  /** the parties' signing public keys (base64) */
  provider: string;
  owner: string;
  /** the provider's bundle directories */
  acceleratorDir: string;
  enclaveDir: string;
  methods?: ('lora' | 'full')[];
  tasks?: ('cls' | 'lm')[];
  maxSteps?: number;
  maxJobs?: number;
  cancel?: Role[];
  releaseProvider?: ('update' | 'aggregate_metrics')[];
  releaseOwner?: ('metrics' | 'inference')[];
}

/** A contract for the provider's bundles, not yet signed. */
export function draftContract(o: DraftOptions): Contract {
  const manifest = path.join(o.acceleratorDir, 'manifest.json');
  let accSha: string;
  try {
    accSha = createHash('sha256').update(readFileSync(manifest)).digest('hex');
  } catch (e) {
    throw new InputError(`contract draft: cannot read the accelerator manifest ${manifest}: ${(e as Error).message}`, { cause: e });
  }
  const body = {
    version: 1 as const, name: o.name ?? 'obfuscatune deployment',
    provider: o.provider, owner: o.owner,
    accelerator_manifest_sha256: accSha, enclave_bundle_sha256: bundleDirDigest(o.enclaveDir),
    jobs: { methods: o.methods ?? ['lora', 'full'], tasks: o.tasks ?? ['cls', 'lm'], max_steps: o.maxSteps ?? 10_000, max_jobs: o.maxJobs ?? 10 },
    release: { provider: o.releaseProvider ?? ['update', 'aggregate_metrics'], owner: o.releaseOwner ?? ['metrics', 'inference'], cancel: o.cancel ?? ['owner'] },
  };
  return parseContract({ body, signatures: {} }, 'contract draft');
}

/** Who signed the contract, for people: "provider <key> (valid)", ... */
export function describeSignatures(c: Contract): string[] {
  return SIGNERS.map((role) => {
    try {
      checkSignature(c, role, 'contract');
      return `${role} ${c.body[role]}: signed`;
    } catch (e) {
      return `${role} ${c.body[role]}: ${e instanceof PolicyError ? 'NOT SIGNED' : 'BAD SIGNATURE'}`;
    }
  });
}
