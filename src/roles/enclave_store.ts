/**
 * The enclave service's persistent state, sealed to the enclave's measurement: one state blob
 * (parties, datasets, the job, the provider's bundle files) and the job's checkpoints.
 *
 * Storage model: `stateDir` is host-visible storage, so only sealed blobs go there. The
 * private directory (the installed bundle, the plain run directory while training) lives in
 * the enclave's memory-backed temp space, which a confidential VM encrypts.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import type { TeePlatform } from '../tee/platform.js';
import { sealBlob, unsealBlob } from '../tee/seal.js';
import { loadEnclaveBundle, type EnclaveBundle } from '../obfuscate/bundle.js';
import { packFiles, readDirFiles, unpackFiles, writeDirFiles, type PackedFile } from './protocol.js';

export type { PackedFile };

const CHECKPOINT = /^step-\d{7}\.sealed$/;
/** sealed checkpoints kept: the latest two */
const KEEP_CHECKPOINTS = 2;

function writeAtomic(file: string, data: Uint8Array): void {
  writeFileSync(`${file}.tmp`, data);
  renameSync(`${file}.tmp`, file);
}

export class SealedStore {
  private readonly checkpoints: string;

  constructor(private readonly platform: TeePlatform, readonly stateDir: string, readonly privateDir: string) {
    this.checkpoints = path.join(stateDir, 'checkpoints');
    mkdirSync(this.checkpoints, { recursive: true });
  }

  /** Seals `meta` (JSON) and the bundle's files into stateDir/state.sealed, atomically. */
  async save(meta: unknown, bundleFiles: PackedFile[] | null): Promise<void> {
    const files: PackedFile[] = [{ name: 'meta.json', data: new TextEncoder().encode(JSON.stringify(meta)) }];
    if (bundleFiles) files.push({ name: 'bundle.bin', data: packFiles(bundleFiles) });
    writeAtomic(path.join(this.stateDir, 'state.sealed'), await sealBlob(this.platform, 'enclave-state', packFiles(files)));
  }

  /** The sealed state, or null on a fresh state directory. */
  async load(): Promise<{ meta: unknown; bundleFiles: PackedFile[] | null } | null> {
    const f = path.join(this.stateDir, 'state.sealed');
    if (!existsSync(f)) return null;
    const files = unpackFiles(await unsealBlob(this.platform, 'enclave-state', readFileSync(f)));
    const meta = JSON.parse(new TextDecoder().decode(files.find((x) => x.name === 'meta.json')!.data));
    const b = files.find((x) => x.name === 'bundle.bin');
    return { meta, bundleFiles: b ? unpackFiles(b.data) : null };
  }

  /** Writes the bundle's files into private space and loads (and validates) them. */
  installBundle(files: PackedFile[]): EnclaveBundle {
    const dir = path.join(this.privateDir, 'bundle');
    writeDirFiles(dir, files);
    return loadEnclaveBundle(dir);
  }

  /** The newest sealed checkpoint, or null. */
  latestCheckpoint(): string | null {
    const names = readdirSync(this.checkpoints).filter((n) => CHECKPOINT.test(n)).sort();
    return names.length ? path.join(this.checkpoints, names[names.length - 1]) : null;
  }

  /** Seals the run checkpoint `dir` as `name`, keeping the latest two. */
  async sealCheckpoint(name: string, dir: string): Promise<void> {
    writeAtomic(path.join(this.checkpoints, `${name}.sealed`), await sealBlob(this.platform, 'checkpoint', packFiles(readDirFiles(dir))));
    const all = readdirSync(this.checkpoints).filter((n) => CHECKPOINT.test(n)).sort();
    for (const old of all.slice(0, -KEEP_CHECKPOINTS)) rmSync(path.join(this.checkpoints, old), { force: true });
  }

  /** Unseals a checkpoint into runDir/checkpoints/<name> (the only checkpoint there); returns that directory. */
  async unsealCheckpoint(file: string, runDir: string): Promise<string> {
    const name = path.basename(file, '.sealed');
    const files = unpackFiles(await unsealBlob(this.platform, 'checkpoint', readFileSync(file)));
    const dir = path.join(runDir, 'checkpoints', name);
    rmSync(path.join(runDir, 'checkpoints'), { recursive: true, force: true });
    writeDirFiles(dir, files);
    return dir;
  }

  clearCheckpoints(): void {
    for (const f of readdirSync(this.checkpoints)) rmSync(path.join(this.checkpoints, f), { force: true });
  }
}
