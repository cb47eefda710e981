/**
 * `obfuscatune accelerator serve`: the untrusted accelerator as a gRPC service. It loads an
 * accelerator bundle (obfuscated linears only, checked against its manifest) and answers the
 * enclave's frames. It writes one JSON line {"event":"listening","port":P} to stdout when ready.
 */
import path from 'node:path';
import { loadAcceleratorBundle } from '../obfuscate/bundle.js';
import { Accelerator, type EvilMode } from '../split/accelerator.js';
import { startAcceleratorServer, type AcceleratorServer } from '../rpc/accelerator_server.js';

export interface AcceleratorServeOptions {
  bundle: string;
  host?: string;
  port?: number;
  stateDir?: string;
  evil?: EvilMode;
  maxMessageMb?: number;
}

export async function serveAccelerator(o: AcceleratorServeOptions): Promise<{ server: AcceleratorServer; accelerator: Accelerator }> {
  const b = loadAcceleratorBundle(o.bundle);
  const accelerator = new Accelerator(b.weights, { stateDir: o.stateDir ?? path.join(o.bundle, '..', 'accelerator-state'), evil: o.evil });
  const server = await startAcceleratorServer(accelerator, {
    host: o.host ?? '127.0.0.1', port: o.port ?? 0, maxMessageBytes: (o.maxMessageMb ?? 256) * 1024 * 1024,
  });
  return { server, accelerator };
}
