/**
 * `obfuscatune accelerator serve`: the untrusted accelerator as a gRPC service. It answers the
 * enclave's frames (obfuscated linears only) and, on the admin service, takes the provider's
 * upload of the accelerator bundle (obfuscated weights: nothing secret) and exports its
 * trained weights. The bundle is kept in its state directory, so a restarted accelerator
 * serves again at once; its training state comes back through checkpoint_load.
 * It writes one JSON line {"event":"listening","port":P} to stdout when ready.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadAcceleratorBundle, type LoadedAccelerator } from '../obfuscate/bundle.js';
import { LINEARS } from '../model/block.js';
import { Accelerator, type EvilMode } from '../accelerator/accelerator.js';
import { startAcceleratorServer, type AcceleratorServer } from '../rpc/accelerator_server.js';
import { ACC_ADMIN_SERVICE, unpackFiles } from './protocol.js';
import { writeSafetensors } from '../io/safetensors.js';
import { serviceError } from '../rpc/status.js';
import { BundleError, InputError, ObfuscatuneError, TransportError } from '../errors.js';
import type { AcceleratorReply, AcceleratorRequest } from '../protocol/messages.js';

export interface AcceleratorServeOptions {
  /** a bundle directory to serve (else the one in the state dir, else wait for an upload) */
  bundle?: string;
  stateDir: string;
  host?: string;
  port?: number;
  evil?: EvilMode;
  maxMessageMb?: number;
}

export class AcceleratorHost {
  acc: Accelerator | null = null;
  loaded: LoadedAccelerator | null = null;

  constructor(readonly o: AcceleratorServeOptions) {
    mkdirSync(o.stateDir, { recursive: true });
    const dir = o.bundle ?? path.join(o.stateDir, 'bundle');
    if (existsSync(path.join(dir, 'manifest.json'))) this.load(dir);
  }

  private outAlloc: ((n: number) => Float32Array) | null = null;

  load(dir: string): void {
    this.loaded = loadAcceleratorBundle(dir);
    this.acc = new Accelerator(this.loaded.weights, { stateDir: path.join(this.o.stateDir, 'checkpoints'), evil: this.o.evil });
    this.acc.useOutputAllocator(this.outAlloc);
  }

  useOutputAllocator(alloc: ((n: number) => Float32Array) | null): void {
    this.outAlloc = alloc;
    this.acc?.useOutputAllocator(alloc);
  }

  handle(req: AcceleratorRequest): AcceleratorReply {
    if (!this.acc) return { op: 'error', message: 'accelerator: no bundle loaded yet (the provider uploads it)' };
    return this.acc.handle(req);
  }

  info(): Record<string, unknown> {
    return { manifest_sha256: this.loaded?.manifestSha256 ?? null, evil: this.o.evil ?? null };
  }
}

export async function serveAccelerator(o: AcceleratorServeOptions): Promise<{ server: AcceleratorServer; host: AcceleratorHost }> {
  const host = new AcceleratorHost(o);
  const server = await startAcceleratorServer(host, {
    host: o.host ?? '127.0.0.1', port: o.port ?? 0, maxMessageBytes: (o.maxMessageMb ?? 256) * 1024 * 1024,
    addServices: (s) => s.addService(ACC_ADMIN_SERVICE, {
      LoadBundle: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const parts: Buffer[] = [];
        let bytes = 0;
        let failed = false;
        call.on('data', (m: { index?: unknown; data?: unknown }) => {
          if (failed) return;
          if (typeof m?.data !== 'string' || m.index !== parts.length) {
            failed = true;
            cb(serviceError(new InputError('bundle upload: chunks must arrive in order with base64 data')));
            return;
          }
          const b = Buffer.from(m.data, 'base64');
          bytes += b.length;
          if (bytes > 8 * 1024 * 1024 * 1024) {
            failed = true;
            cb(serviceError(new TransportError('bundle upload: over 8 GiB', grpc.status.RESOURCE_EXHAUSTED)));
            return;
          }
          parts.push(b);
        });
        call.on('end', () => {
          if (failed) return;
          try {
            const tmp = path.join(o.stateDir, `bundle.upload-${process.pid}`);
            rmSync(tmp, { recursive: true, force: true });
            mkdirSync(tmp, { recursive: true });
            for (const f of unpackFiles(Buffer.concat(parts))) writeFileSync(path.join(tmp, f.name), f.data);
            loadAcceleratorBundle(tmp); // validate before replacing anything
            const dest = path.join(o.stateDir, 'bundle');
            rmSync(dest, { recursive: true, force: true });
            renameSync(tmp, dest);
            host.load(dest);
            cb(null, { ok: true, manifest_sha256: host.loaded!.manifestSha256 });
          } catch (e) {
            // a bad bundle is the uploader's input; anything else (the disk) is this service's failure
            const msg = `bundle upload refused: ${(e as Error).message}`;
            cb(serviceError(e instanceof BundleError || e instanceof InputError ? new InputError(msg, { cause: e }) : new ObfuscatuneError(msg, { cause: e })));
          }
        });
        call.on('error', () => { failed = true; });
      },
      Export: (_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const acc = host.acc;
        if (!acc) return cb(serviceError(new BundleError('no bundle loaded')));
        let data: string;
        try {
          const file = path.join(o.stateDir, `export-${process.pid}.safetensors`);
          const t = acc.weights.layers.flatMap((L, l) => LINEARS.flatMap((name) => [
            { name: `h.${l}.${name}.weight`, dtype: 'F32' as const, shape: [L[name].din, L[name].dout], data: L[name].w },
            { name: `h.${l}.${name}.bias`, dtype: 'F32' as const, shape: [L[name].dout], data: L[name].b },
          ]));
          writeSafetensors(file, t);
          data = readFileSync(file).toString('base64');
          rmSync(file, { force: true });
        } catch (e) {
          return cb(serviceError(e));
        }
        cb(null, { weights: data, n_layer: acc.weights.n_layer });
      },
    }),
  });
  return { server, host };
}
