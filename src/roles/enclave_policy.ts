/**
 * Who may ask the enclave service for what (docs/deployment.md): a party is the provider or
 * the data owner named by its signing key in the deployment contract (contract.ts); every
 * request is signed by that key, so naming a key proves nothing by itself.
 */
import { InputError, PolicyError } from '../errors.js';
import { roleOf, type ContractBody } from './contract.js';

export type Role = 'provider' | 'owner';

/** The commands and the roles allowed to send each (`cancel`: as the contract's release policy says). */
export const POLICY: Record<string, Role[]> = {
  status: ['provider', 'owner'],
  start_finetune: ['owner'],
  cancel: ['owner', 'provider'],
  infer: ['owner'],
  fetch_update: ['provider'],
};

/** The contract, or a PolicyError while none was accepted. */
function accepted(contract: ContractBody | null): ContractBody {
  if (!contract) throw new PolicyError('policy: no deployment contract accepted yet (submit the contract signed by both parties first)');
  return contract;
}

/** The sender's role, or a PolicyError when the command is not theirs to send under the contract. */
export function authorize(op: string, sender: string, contract: ContractBody | null): Role {
  const allowed = POLICY[op];
  if (!allowed) throw new InputError(`unknown command "${op}"`);
  const c = accepted(contract);
  const role = roleOf(c, sender);
  const ok = role !== null && allowed.includes(role) && (op !== 'cancel' || c.release.cancel.includes(role));
  if (!ok) throw new PolicyError(`policy: "${op}" is not allowed for ${role ?? 'a key the contract does not name'}`);
  const needs = RELEASE[op];
  if (needs && !(c.release[role!] as string[]).includes(needs)) throw new PolicyError(`policy: the contract does not release "${needs}" to the ${role}`);
  return role!;
}

/** What of the contract's release policy a command hands out. */
const RELEASE: Record<string, string> = { fetch_update: 'update', infer: 'inference' };

/** Whether the contract releases the job's metrics to `role` (the owner's in full, the provider's as aggregates). */
export function releasesMetrics(contract: ContractBody, role: Role): boolean {
  return role === 'owner' ? contract.release.owner.includes('metrics') : contract.release.provider.includes('aggregate_metrics');
}

/** Uploads: the contract's provider installs the bundle, its owner uploads the data. */
export function checkUploader(kind: 'bundle' | 'dataset', sender: string, contract: ContractBody | null): Role {
  const role = roleOf(accepted(contract), sender);
  const want: Role = kind === 'bundle' ? 'provider' : 'owner';
  if (role !== want) throw new PolicyError(`policy: only the contract's ${want} may upload ${kind === 'bundle' ? 'the model bundle' : 'data'} (the sender is ${role ?? 'a key the contract does not name'})`);
  return role;
}
