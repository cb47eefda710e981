/**
 * `obfuscatune accelerator serve`: the untrusted accelerator as a gRPC service. It answers the
 * enclave's frames (obfuscated linears only) and, on the admin service, takes the provider's
 * upload of the accelerator bundle (obfuscated weights: nothing secret) and exports its
 * trained weights. The bundle is kept in its state directory, so a restarted accelerator
 * serves again at once; its training state comes back through checkpoint_load.
 * It writes one JSON line {"event":"listening","port":P} to stdout when ready.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, renameSync } from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadAcceleratorBundle, type LoadedAccelerator } from '../obfuscate/bundle.js';
import { layerLinearNames } from '../protocol/linears.js';
import { Accelerator, type EvilMode } from '../accelerator/accelerator.js';
import { startAcceleratorServer, type AcceleratorServer } from '../rpc/accelerator_server.js';
import { ACC_ADMIN_SERVICE, BUNDLE_WEIGHTS_TAG, CHECKPOINT_TAG, adminSignedBytes, unpackFiles, writeDirFiles, type AdminAuth } from './protocol.js';
import { writeSafetensors } from '../io/safetensors.js';
import { serveStream, serveUnary } from '../rpc/status.js';
import { BundleError, InputError, ObfuscatuneError, PolicyError, TransportError } from '../errors.js';
import type { AcceleratorReply, AcceleratorRequest } from '../protocol/messages.js';
import { createHash } from 'node:crypto';
import { verifyPeerProof } from '../tee/attest.js';
import type { EvidenceVerifier } from '../tee/platform.js';
import { ReplayCache } from '../tee/replay.js';
import { signingPublicKeyFromBase64, verifySignature } from '../tee/signing.js';
import { SimSoftwareVerifier } from '../tee/sim.js';
import { verifyContract, type Contract } from './contract.js';

export interface AcceleratorServeOptions {
  /** a bundle directory to serve (else the one in the state dir, else wait for an upload) */
  bundle?: string;
  stateDir: string;
  host?: string;
  port?: number;
  evil?: EvilMode;
  maxMessageMb?: number;
  /**
   * The deployment contract (signed by both parties): the accelerator then serves compute
   * calls only to an attested enclave bound to it (each tensor-channel connection proves
   * itself with attestation evidence over a challenge), takes admin calls (LoadBundle,
   * Export) only signed by the contract's provider, and loads only the contract's bundle.
   */
  contract?: Contract;
  /** how the enclave's evidence is verified: the platform root (PEM file) or verifiers, and the allowed measurements */
  trust?: { rootPublicKey?: string; verifiers?: EvidenceVerifier[]; allowList: string[] };
  /** serve anyone (benchmarks and tests of the transport only): no contract, no authentication */
  noAuth?: boolean;
  /** tensor-channel connection limits (see startAcceleratorServer) */
  maxConnections?: number;
  idleTimeoutMs?: number;
}

/** accelerator checkpoints kept: the latest two, like the enclave's */
const KEEP_CHECKPOINTS = 2;

export class AcceleratorHost {
  acc: Accelerator | null = null;
  loaded: LoadedAccelerator | null = null;
  private dir: string | null = null;

  constructor(readonly o: AcceleratorServeOptions) {
    mkdirSync(o.stateDir, { recursive: true });
    const dir = o.bundle ?? path.join(o.stateDir, 'bundle');
    if (existsSync(path.join(dir, 'manifest.json'))) this.load(dir);
  }

  private outAlloc: ((n: number) => Float32Array) | null = null;

  load(dir: string): void {
    this.dir = dir;
    this.loaded = loadAcceleratorBundle(dir);
    this.acc = new Accelerator(this.loaded.weights, { stateDir: this.checkpointDir, evil: this.o.evil });
    this.acc.useOutputAllocator(this.outAlloc);
  }

  useOutputAllocator(alloc: ((n: number) => Float32Array) | null): void {
    this.outAlloc = alloc;
    this.acc?.useOutputAllocator(alloc);
  }

  private get checkpointDir(): string {
    return path.join(this.o.stateDir, 'checkpoints');
  }

  handle(req: AcceleratorRequest): AcceleratorReply {
    if (!this.acc) return { op: 'error', message: 'accelerator: no bundle loaded yet (the provider uploads it)' };
    if (req.op === 'checkpoint_save' || req.op === 'checkpoint_load') {
      if (req.op === 'checkpoint_load' && req.tag === BUNDLE_WEIGHTS_TAG) {
        // the bundle's own weights, read again from disk: a fresh job starts from them, and
        // the checkpoints of an earlier job go (the enclave starts a job only once the
        // previous one's update was fetched)
        try {
          this.load(this.dir!);
          for (const n of this.checkpointNames()) rmSync(path.join(this.checkpointDir, n), { force: true });
        } catch (e) {
          return { op: 'error', message: `accelerator: reloading the bundle failed: ${(e as Error).message}` };
        }
        return { op: 'ack' };
      }
      if (typeof req.tag !== 'string' || !CHECKPOINT_TAG.test(req.tag)) return { op: 'error', message: `accelerator: refusing checkpoint tag ${JSON.stringify(req.tag)} (expected step-NNNNNNN)` };
    }
    const rep = this.acc.handle(req);
    if (req.op === 'checkpoint_save' && rep.op === 'ack') this.prune();
    return rep;
  }

  private checkpointNames(): string[] {
    if (!existsSync(this.checkpointDir)) return [];
    return readdirSync(this.checkpointDir).filter((n) => /^step-\d{7}\.safetensors$/.test(n));
  }

  /** Keeps the two checkpoints written last (by time, not by step: a resumed job writes lower steps again). */
  private prune(): void {
    const byTime = this.checkpointNames().map((n) => ({ n, t: statSync(path.join(this.checkpointDir, n)).mtimeMs })).sort((a, b) => a.t - b.t || (a.n < b.n ? -1 : 1));
    for (const old of byTime.slice(0, -KEEP_CHECKPOINTS)) rmSync(path.join(this.checkpointDir, old.n), { force: true });
  }

  info(): Record<string, unknown> {
    return { manifest_sha256: this.loaded?.manifestSha256 ?? null, evil: this.o.evil ?? null };
  }
}

export async function serveAccelerator(o: AcceleratorServeOptions): Promise<{ server: AcceleratorServer; host: AcceleratorHost }> {
  if (!o.contract && !o.noAuth) throw new PolicyError('accelerator: a deployment contract is required (or noAuth, for benchmarks and transport tests only)');
  const contract = o.contract ? verifyContract(o.contract, 'accelerator contract') : null;
  if (contract && !o.trust) throw new InputError('accelerator: verifying the enclave needs the platform root and the allowed measurements (trust)');
  const verifiers = o.trust?.verifiers ?? (o.trust?.rootPublicKey ? [SimSoftwareVerifier.fromPublicKeyFile(o.trust.rootPublicKey)] : []);
  const replay = new ReplayCache({ ttlMs: 10 * 60_000, maxEntries: 10_000 });
  /** admin calls: signed by the contract's provider over the call, its time, a nonce and the payload's hash */
  // the signer is checked before a payload is taken in; the payload's hash once it is complete
  const checkSigner = (method: string, auth: unknown): void => {
    if (!contract) return;
    const a = auth as Partial<AdminAuth> | undefined;
    if (!a || typeof a !== 'object') throw new PolicyError(`${method}: unauthenticated (admin calls are signed by the contract's provider)`);
    verifySignature(signingPublicKeyFromBase64(a.sender, `${method}: sender`), adminSignedBytes(method, a as AdminAuth), a.signature, method);
    if (a.sender !== contract.contract.body.provider) throw new PolicyError(`${method}: only the contract's provider may call it`);
    if (typeof a.nonce !== 'string' || typeof a.ts !== 'number') throw new InputError(`${method}: nonce and ts required`);
    replay.check(`${method}:${a.nonce}`, a.ts);
  };
  const checkPayload = (method: string, auth: unknown, payloadSha256: string): void => {
    if (contract && (auth as Partial<AdminAuth>).payload_sha256 !== payloadSha256) throw new PolicyError(`${method}: the payload is not the one signed`);
  };
  const host = new AcceleratorHost(o);
  const server = await startAcceleratorServer(host, {
    host: o.host ?? '127.0.0.1', port: o.port ?? 0, maxMessageBytes: (o.maxMessageMb ?? 256) * 1024 * 1024,
    maxConnections: o.maxConnections, idleTimeoutMs: o.idleTimeoutMs,
    peerAuth: contract ? {
      verify: async (challenge, proof) => {
        await verifyPeerProof(challenge, proof, { allowList: o.trust!.allowList, verifiers, contractSha256: contract.sha256 });
      },
    } : undefined,
    addServices: (s) => s.addService(ACC_ADMIN_SERVICE, {
      LoadBundle: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const parts: Buffer[] = [];
        let bytes = 0;
        let auth: unknown;
        serveStream<{ index?: unknown; data?: unknown; auth?: unknown }>(call, cb, (m) => {
          if (m?.index === 0) {
            auth = m.auth;
            checkSigner('LoadBundle', auth);
          }
          if (typeof m?.data !== 'string' || m.index !== parts.length) throw new InputError('bundle upload: chunks must arrive in order with base64 data');
          const b = Buffer.from(m.data, 'base64');
          bytes += b.length;
          if (bytes > 8 * 1024 * 1024 * 1024) throw new TransportError('bundle upload: over 8 GiB', grpc.status.RESOURCE_EXHAUSTED);
          parts.push(b);
        }, () => {
          const whole = Buffer.concat(parts);
          if (parts.length === 0) throw new InputError('bundle upload: no chunks');
          checkPayload('LoadBundle', auth, createHash('sha256').update(whole).digest('hex'));
          try {
            const tmp = path.join(o.stateDir, `bundle.upload-${process.pid}`);
            writeDirFiles(tmp, unpackFiles(whole));
            const got = loadAcceleratorBundle(tmp); // validate before replacing anything
            if (contract && got.manifestSha256 !== contract.contract.body.accelerator_manifest_sha256) {
              rmSync(tmp, { recursive: true, force: true });
              throw new BundleError(`the bundle's manifest ${got.manifestSha256.slice(0, 16)}... is not the contract's ${contract.contract.body.accelerator_manifest_sha256.slice(0, 16)}...`);
            }
            const dest = path.join(o.stateDir, 'bundle');
            rmSync(dest, { recursive: true, force: true });
            renameSync(tmp, dest);
            host.load(dest);
            return { ok: true, manifest_sha256: host.loaded!.manifestSha256 };
          } catch (e) {
            // a bad bundle is the uploader's input; anything else (the disk) is this service's failure
            const msg = `bundle upload refused: ${(e as Error).message}`;
            throw e instanceof BundleError || e instanceof InputError ? new InputError(msg, { cause: e }) : new ObfuscatuneError(msg, { cause: e });
          }
        });
      },
      Export: serveUnary((req) => {
        const auth = (req as { auth?: unknown } | null)?.auth;
        checkSigner('Export', auth);
        checkPayload('Export', auth, createHash('sha256').digest('hex'));
        const acc = host.acc;
        if (!acc) throw new BundleError('no bundle loaded');
        const file = path.join(o.stateDir, `export-${process.pid}.safetensors`);
        const t = acc.weights.layers.flatMap((L, l) => layerLinearNames(L).map((name) => [name, L[name]!] as const).flatMap(([name, x]) => [
          { name: `h.${l}.${name}.weight`, dtype: 'F32' as const, shape: [x.din, x.dout], data: x.w },
          { name: `h.${l}.${name}.bias`, dtype: 'F32' as const, shape: [x.b.length], data: x.b },
        ]));
        writeSafetensors(file, t);
        const data = readFileSync(file).toString('base64');
        rmSync(file, { force: true });
        return { weights: data, n_layer: acc.weights.n_layer, manifest_sha256: host.loaded?.manifestSha256 ?? null };
      }),
    }),
  });
  return { server, host };
}
