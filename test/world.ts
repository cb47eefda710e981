// A deployment for tests: keys, bundles, a contract signed by both parties, and the
// accelerator and enclave services, in this process (serveAccelerator, serveEnclave) or as
// child processes (deployment.test.ts).
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, partyId, uploadAcceleratorBundle, uploadEnclaveBundle, uploadRecords, type PartyKey } from '../src/roles/parties.js';
import { obfuscateWeights, writeObfuscation } from '../src/obfuscate/provider.js';
import { loadCheckpoint } from '../src/model/checkpoint.js';
import { createSimRoot, loadSimRoot, SimSoftwarePlatform } from '../src/tee/sim.js';
import { draftContract, signContract, writeContract, type Contract, type DraftOptions } from '../src/roles/contract.js';
import { serveAccelerator, type AcceleratorServeOptions } from '../src/roles/accelerator_service.js';
import { serveEnclave, } from '../src/roles/enclave_server.js';
import type { EnclaveServeOptions, EnclaveService } from '../src/roles/enclave_service.js';
import type { Record_ } from '../src/io/jsonl.js';
import type { GPT2Weights } from '../src/model/weights.js';
import { Rng } from '../src/tensor/rng.js';
import type { JobSpecInput } from '../src/train/run_spec.js';

export const FIX = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');

export function records(n: number, seed: number): Record_[] {
  const rng = new Rng(seed);
  const good = ['good', 'great', 'fine'], bad = ['bad', 'awful', 'poor'];
  return Array.from({ length: n }, () => {
    const pos = rng.uniform() < 0.5;
    const w = (pos ? good : bad)[rng.int(3)];
    return { text: `this was ${w} really ${w}`, label: pos ? 'pos' : 'neg' };
  });
}

/** The owner's job: a run spec's settings (the rest are the defaults; mode and masks are the bundle's). */
export const spec = (o: JobSpecInput = {}): JobSpecInput => ({
  task: 'cls', method: 'full', steps: 24, batch: 8, max_len: 16, lr: 0.05, warmup: 2, seed: 3, checkpoint_every: 4, enclave_optimizer: 'sgd', ...o,
});

/** Keys, bundles (seed 5 unless told) and a contract signed by both; nothing running yet. */
export interface Setup {
  dir: string;
  providerKey: PartyKey;
  ownerKey: PartyKey;
  contract: Contract;
  contractFile: string;
  rootPublicKey: string;
  trust: { rootPublicKey: string; allowList: string[]; contract: Contract };
}

/** The fixture with a rank-1 update of every block linear: a model derived from the fixture as its public base. */
export function derivedFromFixture(): GPT2Weights {
  const base = loadCheckpoint(path.join(FIX, 'vocab50257'));
  const p = Float32Array.from(base.params), rng = new Rng(77), d = base.config.n_embd;
  for (const [k, din, dout] of [['qkvw', d, 3 * d], ['attprojw', d, d], ['fcw', d, 4 * d], ['fcprojw', 4 * d, d]] as const) {
    const W = base.layout.view(p, k), u = Array.from({ length: din }, () => rng.normal()), v = Array.from({ length: dout }, () => 0.1 * rng.normal());
    for (let i = 0; i < din; i++) for (let j = 0; j < dout; j++) W[i * dout + j] += u[i] * v[j];
  }
  return { ...base, params: p };
}

export async function setup(o: { contract?: Partial<DraftOptions>; seed?: number; publicBase?: boolean } = {}): Promise<Setup> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-world-'));
  createSimRoot(path.join(dir, 'platform'));
  const providerKey = await loadOrCreatePartyKey(path.join(dir, 'provider.json'));
  const ownerKey = await loadOrCreatePartyKey(path.join(dir, 'owner.json'));
  const fixture = loadCheckpoint(path.join(FIX, 'vocab50257'));
  // with publicBase: the provider's model derives from the fixture, which the accelerator gets (the delta stays in the enclave)
  writeObfuscation(path.join(dir, 'bundles'), o.publicBase
    ? obfuscateWeights(derivedFromFixture(), { mode: 'sealed', seed: o.seed ?? 5, publicBase: { weights: fixture, choice: { rank: 1 } } })
    : obfuscateWeights(fixture, { mode: 'sealed', seed: o.seed ?? 5 }));
  let contract = draftContract({
    provider: partyId(providerKey), owner: partyId(ownerKey),
    acceleratorDir: path.join(dir, 'bundles', 'accelerator'), enclaveDir: path.join(dir, 'bundles', 'enclave'),
    maxSteps: 1_000_000, maxJobs: 10, ...o.contract,
  });
  contract = signContract(signContract(contract, 'provider', providerKey.signing), 'owner', ownerKey.signing);
  const contractFile = path.join(dir, 'contract.json');
  writeContract(contractFile, contract);
  const rootPublicKey = path.join(dir, 'platform', 'sim-root.pub.pem');
  return { dir, providerKey, ownerKey, contract, contractFile, rootPublicKey, trust: { rootPublicKey, allowList: [enclaveMeasurement()], contract } };
}

export interface InProcessWorld extends Setup {
  accAddr: string;
  encAddr: string;
  enclave: EnclaveService;
  provider: EnclaveClient;
  owner: EnclaveClient;
  acc: Awaited<ReturnType<typeof serveAccelerator>>;
  /** restarts the enclave service on the same state directory (its old server closed first) */
  restartEnclave(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Both services in this process, the parties attested, and (unless `deploy` is false) the
 * bundles and the owner's 48 training and 16 evaluation records uploaded.
 */
export async function inProcessWorld(o: {
  contract?: Partial<DraftOptions>; deploy?: boolean; enclave?: Partial<EnclaveServeOptions>; accelerator?: Partial<AcceleratorServeOptions>; publicBase?: boolean;
} = {}): Promise<InProcessWorld> {
  const s = await setup({ contract: o.contract, publicBase: o.publicBase });
  const acc = await serveAccelerator({ stateDir: path.join(s.dir, 'acc'), port: 0, contract: s.contract, trust: { rootPublicKey: s.rootPublicKey, allowList: [enclaveMeasurement()] }, ...o.accelerator });
  const accAddr = `127.0.0.1:${acc.server.port}`;
  const platform = new SimSoftwarePlatform(loadSimRoot(path.join(s.dir, 'platform')), enclaveMeasurement());
  const start = () => serveEnclave({ platform, stateDir: path.join(s.dir, 'enc'), accelerator: accAddr, port: 0, privateDir: path.join(s.dir, 'private'), log: () => {}, ...o.enclave });
  let srv = await start();
  const w: InProcessWorld = {
    ...s, acc, accAddr, encAddr: `127.0.0.1:${srv.port}`, enclave: srv.service,
    provider: new EnclaveClient(`127.0.0.1:${srv.port}`, s.providerKey, s.trust),
    owner: new EnclaveClient(`127.0.0.1:${srv.port}`, s.ownerKey, s.trust),
    restartEnclave: async () => {
      w.provider.close();
      w.owner.close();
      await srv.close();
      srv = await start();
      w.enclave = srv.service;
      w.encAddr = `127.0.0.1:${srv.port}`;
      w.provider = new EnclaveClient(w.encAddr, s.providerKey, s.trust);
      w.owner = new EnclaveClient(w.encAddr, s.ownerKey, s.trust);
      await w.provider.attest();
      await w.owner.attest();
    },
    stop: async () => {
      w.provider.close();
      w.owner.close();
      await srv.service.idle().catch(() => {});
      await srv.close();
      await acc.server.close();
      rmSync(s.dir, { recursive: true, force: true });
    },
  };
  if (o.deploy !== false) {
    await w.provider.attest();
    await w.owner.attest();
    await uploadAcceleratorBundle(accAddr, path.join(s.dir, 'bundles', 'accelerator'), s.providerKey);
    await uploadEnclaveBundle(w.provider, path.join(s.dir, 'bundles', 'enclave'));
    await uploadRecords(w.owner, 'train', records(48, 1));
    await uploadRecords(w.owner, 'eval', records(16, 2));
  }
  return w;
}

/** A contract between two keys for the given bundle directories, signed by both. */
export function signedContract(provider: PartyKey, owner: PartyKey, bundles: string, o: Partial<DraftOptions> = {}): Contract {
  const c = draftContract({ provider: partyId(provider), owner: partyId(owner), acceleratorDir: path.join(bundles, 'accelerator'), enclaveDir: path.join(bundles, 'enclave'), ...o });
  return signContract(signContract(c, 'provider', provider.signing), 'owner', owner.signing);
}
