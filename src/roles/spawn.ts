/** Spawning services as child processes on loopback (benchmarks, tests, `npm start`). */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { linearOf, type AcceleratorWeights } from '../protocol/linears.js';
import { writeAcceleratorBundle } from '../obfuscate/bundle.js';
import { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import * as grpc from '@grpc/grpc-js';
import { TransportError } from '../errors.js';

export const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bin/obfuscatune.js');

export interface Spawned {
  child: ChildProcess;
  port: number;
  /** stderr lines, for error reports */
  log: string[];
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts `obfuscatune <args>` and waits for its {"event":"listening","port":P} line.
 * Rejects with the child's stderr if it exits first or does not listen in time.
 */
export function spawnService(args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; label?: string } = {}): Promise<Spawned> {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1', ...opts.env } });
  const log: string[] = [];
  createInterface({ input: child.stderr! }).on('line', (l) => {
    log.push(l);
    if (log.length > 200) log.shift();
  });
  const label = opts.label ?? args.slice(0, 2).join(' ');
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new TransportError(`${label} did not start within ${opts.timeoutMs ?? 60000} ms: ${log.slice(-5).join(' | ')}`, grpc.status.DEADLINE_EXCEEDED));
    }, opts.timeoutMs ?? 60000);
    child.once('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new TransportError(`${label} exited (${code ?? sig}) before listening: ${log.slice(-5).join(' | ')}`, grpc.status.UNAVAILABLE));
    });
    createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const ev = JSON.parse(line) as { event?: string; port?: number };
        if (ev.event === 'listening' && typeof ev.port === 'number') {
          clearTimeout(timer);
          child.removeAllListeners('exit');
          resolve({
            child, port: ev.port, log,
            kill: (signal = 'SIGTERM') => new Promise<void>((res) => {
              if (child.exitCode !== null || child.signalCode !== null) return res();
              child.once('exit', () => res());
              child.kill(signal);
            }),
          });
        }
      } catch {
        // not a protocol line
      }
    });
  });
}

/**
 * Writes the bundle to a temp dir, serves it from a child process, returns a link to it
 * (Call frames over the tensor channel unless `tensorChannel` is false).
 */
export async function spawnedAcceleratorLink(acc: AcceleratorWeights, o: { tensorChannel?: boolean } = {}): Promise<GrpcAcceleratorLink> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-acc-'));
  writeAcceleratorBundle(path.join(dir, 'accelerator'), acc, 'sealed', linearOf(acc.layers[0], 'qkv').din);
  const svc = await spawnService(['accelerator', 'serve', '--bundle', path.join(dir, 'accelerator'), '--port', '0', '--state-dir', path.join(dir, 'state'), '--insecure-no-auth']);
  const link = new GrpcAcceleratorLink(`127.0.0.1:${svc.port}`, { tensorChannel: o.tensorChannel });
  await link.waitForReady(30000);
  const closeLink = link.close.bind(link);
  link.close = async () => {
    await closeLink();
    await svc.kill();
    rmSync(dir, { recursive: true, force: true });
  };
  return link;
}
